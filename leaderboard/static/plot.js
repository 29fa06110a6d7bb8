/* The task page's Pareto plot: an SVG of quality change against speedup (log x), with the intervals, the
   front, the noise-floor band and a tooltip. `LBPlot.draw(el, legendEl, tipEl, rows, opts)`; the page passes
   its formats and rules in `opts` (task.js), so the numbers read the same as in the table.
   Every string from a result file goes through opts.esc() before it reaches innerHTML. */
(function () {
  'use strict';
  // ---- Pareto plot (SVG, log x) ------------------------------------------------------------------------
  var MAXBARS = 400, W = 840, H = 420, ML = 90, MR = 20, MT = 16, MB = 50;
  function ticksLog(a, b) {
    var out = [], e, m, mult = [1, 2, 5];
    if (Math.log10(b / a) > 0.6) {
      for (e = Math.floor(Math.log10(a)) - 1; e <= Math.ceil(Math.log10(b)); e++)
        for (m = 0; m < 3; m++) { var t = mult[m] * Math.pow(10, e); if (t >= a && t <= b) out.push(t); }
      if (out.length >= 3) return out;
    }
    return ticksLin(a, b);
  }
  function ticksLin(a, b) {
    var span = b - a, step = Math.pow(10, Math.floor(Math.log10(span / 5))), err = span / 5 / step;
    step *= err >= 5 ? 5 : err >= 2 ? 2 : 1;
    var out = [];
    for (var t = Math.ceil(a / step) * step; t <= b + step * 1e-9; t += step) out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return out;
  }
  function tickText(t, f) { return f(t); }
  function draw(el, legendEl, tipEl, rows, o) {
    var D = {metric: o.metric, hib: o.hib, families: o.families}, fs = o.fs, fd = o.fd, esc = o.esc,
      color = o.color, good = o.good, speedIv = o.speedIv, reasons = o.reasons, ROOT = o.root;
    var xs = [1], ys = [0], nf = o.noise;
    if (nf) xs.push.apply(xs, speedIv(nf).filter(function (v) { return v > 0; }));
    rows.forEach(function (r) {
      var s = speedIv(r);
      [r.speedup, s[0], s[1]].forEach(function (v) { if (v > 0) xs.push(v); });
      [r.delta, r.dlo, r.dhi].forEach(function (v) { if (v != null) ys.push(v); });
    });
    var x0 = Math.min.apply(null, xs) / 1.08, x1 = Math.max.apply(null, xs) * 1.08;
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys), pad = (y1 - y0) * 0.08 || Math.abs(y0) * 0.1 || 0.01;
    y0 -= pad; y1 += pad;
    var lx0 = Math.log(x0), lx1 = Math.log(x1);
    function X(v) { return ML + (Math.log(Math.max(v, x0)) - lx0) / (lx1 - lx0) * (W - ML - MR); }
    function Y(v) { return MT + (y1 - v) / (y1 - y0) * (H - MT - MB); }
    var g = [];
    g.push('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ' + W + ' ' + H + '" width="100%" role="img">');
    ticksLog(x0, x1).forEach(function (t) {
      g.push('<line class="grid" x1="' + X(t) + '" x2="' + X(t) + '" y1="' + MT + '" y2="' + (H - MB) + '"/>' +
             '<text class="tick" x="' + X(t) + '" y="' + (H - MB + 16) + '" text-anchor="middle">' + tickText(t, fs) + '</text>');
    });
    ticksLin(y0, y1).forEach(function (t) {
      g.push('<line class="grid" x1="' + ML + '" x2="' + (W - MR) + '" y1="' + Y(t) + '" y2="' + Y(t) + '"/>' +
             '<text class="tick" x="' + (ML - 6) + '" y="' + (Y(t) + 4) + '" text-anchor="end">' + tickText(t, fd) + '</text>');
    });
    if (nf) {
      var b = speedIv(nf);
      g.push('<rect class="nfband' + (nf.speed_ok ? '' : ' unreliable') + '" x="' + X(b[0]) + '" y="' + MT + '" width="' +
             Math.max(X(b[1]) - X(b[0]), 1) + '" height="' + (H - MT - MB) + '"><title>noise floor (reference vs itself): ' +
             fs(nf.speedup) + ' [' + fs(b[0]) + ', ' + fs(b[1]) + ']' + (nf.speed_ok ? '' : '; ' + esc(reasons(nf))) + '</title></rect>');
    }
    g.push('<line class="refline" x1="' + X(1) + '" x2="' + X(1) + '" y1="' + MT + '" y2="' + (H - MB) + '"/>');
    g.push('<line class="refline" x1="' + ML + '" x2="' + (W - MR) + '" y1="' + Y(0) + '" y2="' + Y(0) + '"/>');
    g.push('<text class="axis" x="' + ((ML + W - MR) / 2) + '" y="' + (H - 10) + '" text-anchor="middle">speedup over the reference (log scale; right is faster)</text>');
    g.push('<text class="axis" transform="translate(14 ' + ((MT + H - MB) / 2) + ') rotate(-90)" text-anchor="middle">Δ ' +
           esc(D.metric) + ' vs reference (' + (D.hib ? 'up' : 'down') + ' is better)</text>');
    if (rows.length <= MAXBARS) rows.forEach(function (r) {
      var s = speedIv(r);
      var eb = r.speed_ok ? 'eb' : 'eb unreliable';
      g.push('<line class="' + eb + '" x1="' + X(s[0]) + '" x2="' + X(s[1]) + '" y1="' + Y(r.delta) + '" y2="' + Y(r.delta) + '" stroke="' + color(r.family) + '"/>');
      if (r.dlo != null && r.dhi != null)
        g.push('<line class="eb" x1="' + X(r.speedup) + '" x2="' + X(r.speedup) + '" y1="' + Y(r.dlo) + '" y2="' + Y(r.dhi) + '" stroke="' + color(r.family) + '"/>');
    });
    var front = rows.filter(function (r) { return r._front; }).sort(function (a, b) { return a.speedup - b.speedup || good(b) - good(a); });
    if (front.length) {
      var d = 'M' + X(x0) + ' ' + Y(front[0].delta) + ' H' + X(front[0].speedup);
      for (var i = 1; i < front.length; i++) d += ' H' + X(front[i].speedup) + ' V' + Y(front[i].delta);
      d += ' V' + (D.hib ? H - MB : MT);
      g.push('<path class="front" d="' + d + '"/>');
    }
    rows.forEach(function (r, i) {
      g.push('<a href="' + esc(ROOT + r.page) + '"><circle class="pt' + (r._front ? ' on-front' : '') +
             (r.speed_ok ? '' : ' unreliable') + (r.noise ? ' noise' : '') + '" data-i="' + i +
             '" cx="' + X(r.speedup) + '" cy="' + Y(r.delta) + '" r="' + (r._front ? 5.5 : 4) + '" fill="' + color(r.family) + '"/></a>');
    });
    g.push('</svg>');
    el.innerHTML = g.join('');
    var fams = [];
    rows.forEach(function (r) { if (fams.indexOf(r.family) < 0) fams.push(r.family); });
    fams.sort(function (a, b) { return D.families.indexOf(a) - D.families.indexOf(b); });
    legendEl.innerHTML = fams.map(function (f) {
      return '<span class="lg"><span class="dot" style="background:' + color(f) + '"></span>' + esc(f) + '</span>';
    }).join('') + '<span class="lg"><span class="line"></span>Pareto front</span>' +
      (nf ? '<span class="lg"><span class="band"></span>noise floor (reference vs itself)</span>' : '') +
      (rows.some(function (r) { return !r.speed_ok; }) ? '<span class="lg"><span class="dot hollow"></span>unreliable speed (not ranked)</span>' : '') +
      (rows.length > MAXBARS ? '<span class="lg muted">intervals drawn up to ' + MAXBARS + ' points; filter to see them</span>' : '');
    plotRows = rows; tipOf = o.tip; tip = tipEl;
    if (!el._lbWired) {
      el._lbWired = true;
      el.addEventListener('mouseover', showTip);
      el.addEventListener('mouseleave', function () { tip.hidden = true; });
    }
  }
  var plotRows = [], tipOf = null, tip = null;
  function showTip(ev) {
    var t = ev.target;
    if (!t.classList || !t.classList.contains('pt')) { tip.hidden = true; return; }
    tip.innerHTML = tipOf(plotRows[+t.getAttribute('data-i')]);
    tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 330) + 'px';
    tip.style.top = (ev.clientY + 14) + 'px';
    tip.hidden = false;
  }

  window.LBPlot = {draw: draw};
})();
