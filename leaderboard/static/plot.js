/* The task page's Pareto plot: an SVG of quality change against speedup (log x), with the intervals, the
   front, the noise-floor band and a tooltip. `LBPlot.draw(el, legendEl, tipEl, rows, opts)`; the page passes
   its formats and rules in `opts` (task.js), so the numbers read the same as in the table.
   Every string from a result file goes through opts.esc() before it reaches innerHTML.

   The SVG is drawn at the width of its box (one SVG unit = one CSS pixel, redrawn when the window is
   resized), so text sizes and the rules below hold on a phone as on a laptop:
   - x ticks step 1-2-5 (0.5x 1x 2x 5x on a wide range; 2.2x 2.4x 2.6x or 2.5x 3x on a narrow one), the densest
     set whose labels, measured, keep a gap between them; y ticks likewise (1-2-5 steps, never closer than a line);
   - a row far outside the rest (Tukey's fences on the quality change, the interquartile range floored at the
     typical interval width) is clipped to the frame: drawn at the edge with an arrow and its value, when
     leaving it out at least halves the range the others need. The front, 0 and the noise floor always fit;
   - the front's points are labelled with their method where a place next to the point is free (8 places,
     then 8 farther ones with a leader line); a label never covers another label, a point or a clipped value;
   - a tap shows the tooltip of the nearest point (within 24 px) and a second tap on it opens its run; a mouse
     click opens the run at once, hovering shows the tooltip. */
(function () {
  'use strict';
  var MAXBARS = 400, MT = 14, MR = 26, TICK = 11, GAP = 8, MINSTEP = 34, TAP = 24;
  var SVGNS = 'http://www.w3.org/2000/svg';

  // ---- measuring text in the page's own fonts ------------------------------------------------------------
  function measurer(el) {
    var svg = document.createElementNS(SVGNS, 'svg'), cache = {};
    svg.setAttribute('aria-hidden', 'true');
    svg.style.cssText = 'position:absolute;left:-10000px;top:0;width:10px;height:10px;visibility:hidden';
    el.appendChild(svg);
    function box(s, cls) {
      var k = cls + '\u0000' + s;
      if (cache[k] == null) {
        var t = document.createElementNS(SVGNS, 'text');
        t.setAttribute('class', cls);
        t.textContent = s;  // text, never markup
        svg.appendChild(t);
        var w = 0, bb = null;
        try { w = t.getComputedTextLength(); bb = t.getBBox(); } catch (e) { w = 0; }
        var size = cls === 'axis' ? 12 : TICK;  // not laid out (a hidden box): estimates
        cache[k] = w > 0 && bb && bb.height > 0 ? {w: w, asc: -bb.y, h: bb.height}
          : {w: s.length * size * 0.62, asc: size * 0.93, h: size * 1.17};
        svg.removeChild(t);
      }
      return cache[k];
    }
    return {width: function (s, cls) { return box(s, cls).w; }, box: box,
            done: function () { if (svg.parentNode) svg.parentNode.removeChild(svg); }};
  }

  // ---- ticks -------------------------------------------------------------------------------------------
  function decimalsOf(step) { return Math.max(0, -Math.floor(Math.log10(step) + 1e-9)); }
  function fx(t, dec) { return t.toFixed(dec) + '×'; }
  function multiples(a, b, step) {
    var out = [], k0 = Math.ceil(a / step - 1e-9), k1 = Math.floor(b / step + 1e-9);
    if (k1 - k0 > 60) return null;
    for (var k = k0; k <= k1; k++) out.push(+(k * step).toPrecision(12));
    return out;
  }
  function steps125(span, from, to) {  // 1-2-5 steps from 10^from x span to 10^to x span
    var out = [], e0 = Math.floor(Math.log10(span)) + from, e1 = Math.floor(Math.log10(span)) + to;
    for (var e = e0; e <= e1; e++) [1, 2, 5].forEach(function (m) { out.push(m * Math.pow(10, e)); });
    return out;
  }
  // candidate x tick sets, densest first: linear 1-2-5 steps on a narrow range, 1-2-5 per decade on a wide one
  function xCandidates(a, b) {
    var lin = [], logs = [], e, e0 = Math.floor(Math.log10(a)), e1 = Math.ceil(Math.log10(b));
    steps125(b - a, -2, 1).forEach(function (s) {
      var ts = multiples(a, b, s);
      if (ts && ts.length) lin.push({ticks: ts, dec: decimalsOf(s)});
    });
    [[1, 2, 5], [1, 5], [1], [1, 100]].forEach(function (mult, j) {
      var ts = [];
      for (e = e0 - 1; e <= e1; e++) mult.forEach(function (m) {
        var t = j === 3 ? (e % 2 ? 0 : Math.pow(10, e)) : m * Math.pow(10, e);
        if (t && t >= a * (1 - 1e-9) && t <= b * (1 + 1e-9) && ts.indexOf(t) < 0) ts.push(+t.toPrecision(12));
      });
      if (ts.length) logs.push({ticks: ts, dec: -1});
    });
    return Math.log10(b / a) >= 0.5 ? logs.concat(lin) : lin.concat(logs);
  }
  function xLabel(t, dec) { return fx(t, dec >= 0 ? dec : decimalsOf(t)); }
  // the densest candidate with 3 ticks or more (else 2, else 1) whose ticks are MINSTEP px apart or more, and
  // whose labels keep GAP px apart and stay within [lo, hi]
  function pickX(cands, X, width, lo, hi) {
    for (var least = 3; least >= 1; least--) {
      for (var c = 0; c < cands.length; c++) {
        var ts = cands[c].ticks;
        if (ts.length < least) continue;
        var ok = true, prev = -Infinity, boxes = [];
        for (var i = 0; i < ts.length && ok; i++) {
          var s = xLabel(ts[i], cands[c].dec), w = width(s, 'tick'), x = X(ts[i]);
          var l = x - w / 2, r = x + w / 2;
          if (l < lo || r > hi || l < prev + GAP || (i && x - boxes[i - 1].x < MINSTEP)) ok = false;
          boxes.push({t: ts[i], s: s, x: x, w: w});
          prev = r;
        }
        if (ok) return boxes;
      }
    }
    return [];
  }
  function pickY(a, b, Y) {  // linear 1-2-5 steps, about three lines apart
    var cands = steps125(b - a, -2, 1), best = null;
    for (var least = 3; least >= 1 && !best; least--)
      for (var c = 0; c < cands.length && !best; c++) {
        var ts = multiples(a, b, cands[c]);
        if (!ts || ts.length < least || ts.length > 12) continue;
        if (ts.length > 1 && Math.abs(Y(ts[1]) - Y(ts[0])) < TICK * 3) continue;
        best = ts.map(function (t) { return Math.abs(t) < cands[c] * 1e-9 ? 0 : t; });
      }
    return best || [];
  }

  // ---- the range that matters: outliers on the quality axis -----------------------------------------------
  function quantile(s, q) {
    var p = (s.length - 1) * q, i = Math.floor(p);
    return i + 1 < s.length ? s[i] + (s[i + 1] - s[i]) * (p - i) : s[i];
  }
  function extent(vals) {
    var lo = Infinity, hi = -Infinity;
    vals.forEach(function (v) { if (v != null && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); } });
    return [lo, hi];
  }
  function span(e) { return e[1] - e[0]; }
  // [y0, y1] before padding and the rows drawn clipped (outside it)
  function yRange(rows, must) {
    var all = [], kept = must.slice(), ds = [], cis = [];
    rows.forEach(function (r) {
      if (r.delta == null) return;
      ds.push(r.delta);
      all.push(r.delta, r.dlo, r.dhi);
      if (r.dlo != null && r.dhi != null) cis.push(r.dhi - r.dlo);
    });
    var full = extent(all.concat(must));
    if (ds.length < 4) return {range: full, out: {}};
    ds.sort(function (a, b) { return a - b; });
    cis.sort(function (a, b) { return a - b; });
    var q1 = quantile(ds, 0.25), q3 = quantile(ds, 0.75);
    var iqr = Math.max(q3 - q1, cis.length ? quantile(cis, 0.5) : 0);
    var lo = Math.min(q1 - 1.5 * iqr, extent(must)[0]), hi = Math.max(q3 + 1.5 * iqr, extent(must)[1]);
    var out = {}, n = 0;
    rows.forEach(function (r, i) {
      if (r.delta == null) return;
      if (r.delta < lo || r.delta > hi) { out[i] = r.delta < lo ? 'low' : 'high'; n++; }
      else kept.push(r.delta, r.dlo, r.dhi);
    });
    var core = extent(kept);
    if (!n || span(core) * 2 > span(full) || !(span(core) > 0)) return {range: full, out: {}};
    return {range: core, out: out};
  }

  // ---- label placement -----------------------------------------------------------------------------------
  function hit(a, b) { return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h; }
  function free(box, taken, frame) {
    if (box.x < frame.x || box.y < frame.y || box.x + box.w > frame.x + frame.w || box.y + box.h > frame.y + frame.h)
      return false;
    for (var i = 0; i < taken.length; i++) if (hit(box, taken[i])) return false;
    return true;
  }
  // the first free place for a w x h label around (px, py): beside, above, below, diagonal; then farther out
  function place(px, py, pr, w, h, taken, frame) {
    for (var ring = 0; ring < 2; ring++) {
      var d = pr + 3 + ring * 14, dd = d * 0.75;
      var spots = [[px + d, py - h / 2], [px - d - w, py - h / 2], [px - w / 2, py - d - h], [px - w / 2, py + d],
                   [px + dd, py - dd - h], [px + dd, py + dd], [px - dd - w, py - dd - h], [px - dd - w, py + dd]];
      for (var s = 0; s < spots.length; s++) {
        var box = {x: spots[s][0], y: spots[s][1], w: w, h: h};
        if (free(box, taken, frame)) { box.leader = ring > 0; return box; }
      }
    }
    return null;
  }

  // ---- drawing -----------------------------------------------------------------------------------------
  var current = null;  // the arguments of the last draw, for a redraw at a new width
  function draw(el, legendEl, tipEl, rows, o, again) {
    current = {el: el, legendEl: legendEl, tipEl: tipEl, rows: rows, o: o};
    var D = {metric: o.metric, hib: o.hib, families: o.families}, fs = o.fs, fd = o.fd, esc = o.esc,
      color = o.color, good = o.good, speedIv = o.speedIv, reasons = o.reasons, ROOT = o.root, nf = o.noise;
    var W = Math.max(260, Math.round(el.clientWidth || 840)), H = Math.round(Math.min(440, Math.max(270, W * 0.5)));
    var m = measurer(el), width = m.width;

    // quality axis first: its tick labels set the left margin
    var must = [0];
    if (nf && nf.delta != null) must.push(nf.delta);
    rows.forEach(function (r) { if (r._front && r.delta != null) must.push(r.delta); });
    var yr = yRange(rows, must), out = yr.out, y0 = yr.range[0], y1 = yr.range[1];
    var clipped = Object.keys(out).length, lowOut = false, highOut = false;
    Object.keys(out).forEach(function (k) { if (out[k] === 'low') lowOut = true; else highOut = true; });
    var pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 0.01;
    y0 -= pad * (lowOut ? 2.2 : 1); y1 += pad * (highOut ? 2.2 : 1);
    var MB = 48, plotH = H - MT - MB;
    function Y(v) { return MT + (y1 - v) / (y1 - y0) * plotH; }
    var yTicks = pickY(y0, y1, Y), yLabels = yTicks.map(function (t) { return fd(t); });
    var yw = 0;
    yLabels.forEach(function (s) { yw = Math.max(yw, width(s, 'tick')); });
    var ML = Math.ceil(yw) + 30;

    // speed axis: log scale over every point and interval, 1x and the noise floor
    var xs = [1];
    if (nf) xs.push.apply(xs, speedIv(nf).filter(function (v) { return v > 0; }));
    rows.forEach(function (r) {
      var s = speedIv(r);
      [r.speedup, s[0], s[1]].forEach(function (v) { if (v > 0) xs.push(v); });
    });
    var x0 = Math.min.apply(null, xs) / 1.08, x1 = Math.max.apply(null, xs) * 1.08;
    var lx0 = Math.log(x0), lx1 = Math.log(x1);
    function X(v) { return ML + (Math.log(Math.max(v, x0)) - lx0) / (lx1 - lx0) * (W - ML - MR); }
    var xTicks = pickX(xCandidates(x0, x1), X, width, 2, W - 2);
    function clampY(v) { return Math.max(MT, Math.min(H - MB, Y(v))); }

    var g = [], frame = {x: ML, y: MT, w: W - ML - MR, h: plotH};
    g.push('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ' + W + ' ' + H + '" width="100%" role="img"' +
           ' aria-label="Pareto plot: change in ' + esc(D.metric) + ' against speedup">');
    g.push('<defs><clipPath id="lb-frame"><rect x="' + ML + '" y="' + MT + '" width="' + frame.w + '" height="' +
           plotH + '"/></clipPath></defs>');
    xTicks.forEach(function (t) {
      g.push('<line class="grid" x1="' + t.x + '" x2="' + t.x + '" y1="' + MT + '" y2="' + (H - MB) + '"/>' +
             '<text class="tick xtick" x="' + t.x + '" y="' + (H - MB + 16) + '" text-anchor="middle">' + esc(t.s) + '</text>');
    });
    yTicks.forEach(function (t, i) {
      g.push('<line class="grid" x1="' + ML + '" x2="' + (W - MR) + '" y1="' + Y(t) + '" y2="' + Y(t) + '"/>' +
             '<text class="tick ytick" x="' + (ML - 6) + '" y="' + (Y(t) + 4) + '" text-anchor="end">' + esc(yLabels[i]) + '</text>');
    });
    g.push('<g clip-path="url(#lb-frame)">');
    if (nf) {
      var b = speedIv(nf);
      g.push('<rect class="nfband' + (nf.speed_ok ? '' : ' unreliable') + '" x="' + X(b[0]) + '" y="' + MT + '" width="' +
             Math.max(X(b[1]) - X(b[0]), 1) + '" height="' + plotH + '"><title>noise floor (reference vs itself): ' +
             fs(nf.speedup) + ' [' + fs(b[0]) + ', ' + fs(b[1]) + ']' + (nf.speed_ok ? '' : '; ' + esc(reasons(nf))) + '</title></rect>');
    }
    // the quality budget: the change at which a result leaves it, and the region beyond it shaded
    var bl = o.budget && o.budget.loss != null && isFinite(o.budget.loss) ? (D.hib ? -o.budget.loss : o.budget.loss) : null;
    if (bl != null && bl > y0 && bl < y1) {
      var by = Y(bl), beyond = D.hib ? [by, H - MB] : [MT, by];
      g.push('<rect class="outside-budget" x="' + ML + '" y="' + beyond[0] + '" width="' + frame.w + '" height="' +
             Math.max(0, beyond[1] - beyond[0]) + '"/>');
      g.push('<line class="budget" x1="' + ML + '" x2="' + (W - MR) + '" y1="' + by + '" y2="' + by + '"><title>quality budget: ' +
             esc(o.budget.text || '') + '</title></line>');
    }
    g.push('<line class="refline" x1="' + X(1) + '" x2="' + X(1) + '" y1="' + MT + '" y2="' + (H - MB) + '"/>');
    g.push('<line class="refline" x1="' + ML + '" x2="' + (W - MR) + '" y1="' + Y(0) + '" y2="' + Y(0) + '"/>');

    // where each point is drawn: clipped rows sit just inside the edge they went past
    var pos = rows.map(function (r, i) {
      var front = !!r._front, rad = front ? 5.5 : 4;
      if (out[i] === 'low') return {x: X(r.speedup), y: H - MB - 13, r: rad, clip: 'low'};
      if (out[i] === 'high') return {x: X(r.speedup), y: MT + 13, r: rad, clip: 'high'};
      return {x: X(r.speedup), y: Y(r.delta), r: rad, clip: ''};
    });
    if (rows.length <= MAXBARS) rows.forEach(function (r, i) {
      var s = speedIv(r), p = pos[i];
      var eb = r.speed_ok ? 'eb' : 'eb unreliable';
      g.push('<line class="' + eb + '" x1="' + X(s[0]) + '" x2="' + X(s[1]) + '" y1="' + p.y + '" y2="' + p.y + '" stroke="' + color(r.family) + '"/>');
      if (!p.clip && r.dlo != null && r.dhi != null)
        g.push('<line class="eb" x1="' + p.x + '" x2="' + p.x + '" y1="' + Y(r.dlo) + '" y2="' + Y(r.dhi) + '" stroke="' + color(r.family) + '"/>');
    });
    var front = rows.filter(function (r) { return r._front; }).sort(function (a, b) { return a.speedup - b.speedup || good(b) - good(a); });
    if (front.length) {
      var d = 'M' + X(x0) + ' ' + clampY(front[0].delta) + ' H' + X(front[0].speedup);
      for (var i = 1; i < front.length; i++) d += ' H' + X(front[i].speedup) + ' V' + clampY(front[i].delta);
      d += ' V' + (D.hib ? H - MB : MT);
      g.push('<path class="front" d="' + d + '"/>');
    }
    g.push('</g>');

    // labels: the clipped rows' values first (they must show), then the front's methods
    var taken = pos.map(function (p) { return {x: p.x - p.r - 1, y: p.y - p.r - 1, w: 2 * p.r + 2, h: 2 * p.r + 2}; });
    var labels = [];
    rows.forEach(function (r, i) {
      var p = pos[i];
      if (!p.clip) return;
      var up = p.clip === 'high', tipY = up ? MT + 1 : H - MB - 1, baseY = up ? MT + 6 : H - MB - 6;
      g.push('<path class="clip-arrow" d="M' + (p.x - 4) + ' ' + baseY + ' L' + p.x + ' ' + tipY + ' L' + (p.x + 4) + ' ' +
             baseY + ' Z" fill="' + color(r.family) + '"/>');
      taken.push({x: p.x - 5, y: Math.min(tipY, baseY), w: 10, h: 6});
      var s = fd(r.delta) + (up ? ' ↑' : ' ↓'), tb = m.box(s, 'lbl clipval');
      var box = place(p.x, p.y, p.r, tb.w + 2, tb.h + 2, taken, frame);
      if (!box) box = {x: Math.min(Math.max(ML, p.x + p.r + 3), W - MR - tb.w - 2), y: p.y - tb.h / 2 - 1, w: tb.w + 2, h: tb.h + 2};
      taken.push(box);
      labels.push({box: box, s: s, cls: 'lbl clipval', i: i, p: p, asc: tb.asc});
    });
    rows.map(function (r, i) { return i; }).filter(function (i) { return rows[i]._front; })
      .sort(function (a, b) { return rows[b].speedup - rows[a].speedup; })
      .forEach(function (i) {
        var r = rows[i], p = pos[i], s = String(r.method), tb = m.box(s, 'lbl front-label');
        var box = place(p.x, p.y, p.r, tb.w + 2, tb.h + 2, taken, frame);
        if (!box) return;  // no free place: the tooltip still names it
        taken.push(box);
        labels.push({box: box, s: s, cls: 'lbl front-label', i: i, p: p, asc: tb.asc});
      });
    labels.forEach(function (l) {
      var bx = l.box;
      if (bx.leader) {
        var cx = Math.max(bx.x, Math.min(l.p.x, bx.x + bx.w)), cy = Math.max(bx.y, Math.min(l.p.y, bx.y + bx.h));
        g.push('<line class="leader" x1="' + l.p.x + '" y1="' + l.p.y + '" x2="' + cx + '" y2="' + cy + '"/>');
      }
      g.push('<text class="' + l.cls + '" data-i="' + l.i + '" x="' + (bx.x + 1) + '" y="' + (bx.y + 1 + l.asc) + '">' + esc(l.s) + '</text>');
    });

    rows.forEach(function (r, i) {
      var p = pos[i];
      g.push('<a href="' + esc(ROOT + r.page) + '"><circle class="pt' + (r._front ? ' on-front' : '') +
             (r.speed_ok ? '' : ' unreliable') + (r.noise ? ' noise' : '') + (p.clip ? ' clipped' : '') + '" data-i="' + i +
             '" cx="' + p.x + '" cy="' + p.y + '" r="' + p.r + '" fill="' + color(r.family) + '"/></a>');
    });

    var xt = 'speedup over the reference (log scale; right is faster)';
    if (width(xt, 'axis') > frame.w) xt = 'speedup (log; right is faster)';
    g.push('<text class="axis" x="' + ((ML + W - MR) / 2) + '" y="' + (H - 10) + '" text-anchor="middle">' + xt + '</text>');
    var yt = 'Δ ' + D.metric + ' vs reference (' + (D.hib ? 'up' : 'down') + ' is better)';
    if (width(yt, 'axis') > plotH) yt = 'Δ ' + D.metric + ' (' + (D.hib ? 'up' : 'down') + ' is better)';
    g.push('<text class="axis" transform="translate(14 ' + (MT + plotH / 2) + ') rotate(-90)" text-anchor="middle">' +
           esc(yt) + '</text>');
    g.push('</svg>');
    m.done();
    el.innerHTML = g.join('');

    var fams = [];
    rows.forEach(function (r) { if (fams.indexOf(r.family) < 0) fams.push(r.family); });
    fams.sort(function (a, b) { return D.families.indexOf(a) - D.families.indexOf(b); });
    legendEl.innerHTML = fams.map(function (f) {
      return '<span class="lg"><span class="dot" style="background:' + color(f) + '"></span>' + esc(f) + '</span>';
    }).join('') + '<span class="lg"><span class="line"></span>Pareto front</span>' +
      (nf ? '<span class="lg"><span class="band"></span>noise floor (reference vs itself)</span>' : '') +
      (bl != null && bl > y0 && bl < y1 ? '<span class="lg"><span class="budget-line"></span>quality budget' +
        (o.budget.text ? ': ' + esc(o.budget.text) : '') + ' (shaded: outside it)</span>' : '') +
      (rows.some(function (r) { return !r.speed_ok; }) ? '<span class="lg"><span class="dot hollow"></span>unreliable speed (not ranked)</span>' : '') +
      (clipped ? '<span class="lg"><span class="arrow">▲▼</span>' + clipped + (clipped === 1 ? ' result' : ' results') +
               ' far outside the rest: at the edge, with ' + (clipped === 1 ? 'its value' : 'their values') + '</span>' : '') +
      (rows.length > MAXBARS ? '<span class="lg muted">intervals drawn up to ' + MAXBARS + ' points; filter to see them</span>' : '');

    plotRows = rows; plotPos = pos; plotW = W; tipOf = o.tip; tip = tipEl; tapped = -1; tip.hidden = true;
    if (!el._lbWired) wire(el);
    // the legend beside the plot may have taken some of its width: draw again at the width it has now
    if (!again && el.clientWidth && Math.abs(el.clientWidth - W) > 1 && el.clientWidth >= 260) draw(el, legendEl, tipEl, rows, o, true);
    lastW = el.clientWidth;
  }

  // ---- tooltip: hover with a mouse; on a touch screen the first tap shows it, a second tap opens the run ----
  var plotRows = [], plotPos = [], plotW = 1, tipOf = null, tip = null, tapped = -1, lastPointer = '', lastW = 0;
  function showTip(i, cx, cy, touch) {
    tip.innerHTML = tipOf(plotRows[i]) + (touch ? '<br><strong>tap again to open the run</strong>' : '');
    tip.hidden = false;
    var vw = document.documentElement.clientWidth, vh = window.innerHeight, w = tip.offsetWidth, h = tip.offsetHeight;
    var left = cx + 14;
    if (left + w > vw - 8) left = cx - 14 - w;
    left = Math.max(8, Math.min(left, vw - 8 - w));
    var top = cy + 14;
    if (top + h > vh - 8) top = cy - 14 - h;
    tip.style.left = left + 'px';
    tip.style.top = Math.max(8, top) + 'px';
  }
  function hideTip() { if (tip) tip.hidden = true; tapped = -1; }
  function nearest(svg, cx, cy, within) {  // the point nearest a client position, or -1
    var box = svg.getBoundingClientRect(), k = plotW / (box.width || 1), best = -1, bd = within * within;
    var x = (cx - box.left) * k, y = (cy - box.top) * k;
    for (var i = 0; i < plotPos.length; i++) {
      var dx = (plotPos[i].x - x) / k, dy = (plotPos[i].y - y) / k, d2 = dx * dx + dy * dy;
      if (d2 <= bd) { bd = d2; best = i; }
    }
    return best;
  }
  function center(i, svg) {
    var box = svg.getBoundingClientRect(), k = (box.width || 1) / plotW;
    return [box.left + plotPos[i].x * k, box.top + plotPos[i].y * k];
  }
  function wire(el) {
    el._lbWired = true;
    el.addEventListener('pointerdown', function (ev) { lastPointer = ev.pointerType || ''; }, true);
    el.addEventListener('touchstart', function () { lastPointer = 'touch'; }, {passive: true, capture: true});
    el.addEventListener('mouseover', function (ev) {
      if (lastPointer === 'touch') return;  // emulated mouse events after a tap: the click handler decides
      var t = ev.target;
      if (!t.classList || !t.classList.contains('pt')) { hideTip(); return; }
      showTip(+t.getAttribute('data-i'), ev.clientX, ev.clientY, false);
    });
    el.addEventListener('mouseleave', function () { if (lastPointer !== 'touch') hideTip(); });
    el.addEventListener('focusin', function (ev) {  // keyboard: the focused point's link
      var c = ev.target.querySelector && ev.target.querySelector('circle.pt'), svg = el.querySelector('svg');
      if (!c || !svg) return;
      var i = +c.getAttribute('data-i'), at = center(i, svg);
      showTip(i, at[0], at[1], false);
    });
    el.addEventListener('focusout', function () { if (lastPointer !== 'touch') hideTip(); });
    el.addEventListener('click', function (ev) {
      if (lastPointer !== 'touch') return;  // a mouse click on a point follows its link
      var svg = el.querySelector('svg');
      if (!svg) return;
      var i = nearest(svg, ev.clientX, ev.clientY, TAP);
      ev.preventDefault();
      if (i < 0) { hideTip(); return; }
      if (tapped === i) {
        var a = svg.querySelector('circle.pt[data-i="' + i + '"]').parentNode;
        location.href = a.getAttribute('href');
        return;
      }
      var at = center(i, svg);
      showTip(i, at[0], at[1], true);
      tapped = i;
    });
    document.addEventListener('click', function (ev) {
      if (tip && !tip.hidden && !el.contains(ev.target)) hideTip();
    });
    var timer = null;
    function resized() {
      clearTimeout(timer);
      timer = setTimeout(function () {
        if (!current || Math.abs(current.el.clientWidth - lastW) <= 1) return;
        draw(current.el, current.legendEl, current.tipEl, current.rows, current.o);
      }, 100);
    }
    if (window.ResizeObserver) new ResizeObserver(resized).observe(el);
    else window.addEventListener('resize', resized);
  }

  window.LBPlot = {draw: draw};
})();
