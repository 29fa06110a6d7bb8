/* The task page: filters kept in the URL hash, a sortable tie-aware table, an SVG Pareto plot (log x) and
   CSV/JSON downloads of the rows shown. All data is embedded in the page (#lb-data): no fetch(), no network.
   Every string from a result file goes through esc() before it reaches innerHTML.
   Rows with an unreliable speed (speed_ok false) are drawn greyed with their reasons and get no speed rank and
   no place on the front; the noise-floor row (the `none` method, r.noise) is pinned first and never ranked.
   The same rules as leaderboard/data.py (rankable, pareto_front). */
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('lb-data').textContent);
  var ROOT = '../';
  var COLORS = {distillation: '#1f77b4', caching: '#2ca02c', pruning: '#d62728', decoding: '#9467bd',
                none: '#555555'};
  var $ = function (id) { return document.getElementById(id); };
  var ESC = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'};
  function esc(s) { return String(s == null ? '' : s).replace(/[&<>"']/g, function (c) { return ESC[c]; }); }
  function color(f) { return COLORS[f] || '#8c564b'; }

  // ---- formats (the same rules as leaderboard/pages.py) ------------------------------------------------
  function fq(v) { return v == null ? '–' : D.pct ? (v * 100).toFixed(2) + '%' : v.toPrecision(4); }
  function signed(s) { return +s === 0 ? s.replace('-', '') : (+s > 0 ? '+' : '') + s; }  // never "-0.00"
  function fd(v) {
    if (v == null) return '–';
    return D.pct ? signed((v * 100).toFixed(2)) + ' pp' : signed(v.toPrecision(3));
  }
  function fs(v) { return v == null ? '–' : (v < 100 ? v.toFixed(2) : v.toFixed(0)) + '×'; }
  function fb(n) {
    if (n == null) return '–';
    var u = ['B', 'KiB', 'MiB', 'GiB'], i = 0;
    while (n >= 1024 && i < 3) { n /= 1024; i++; }
    return i ? n.toFixed(1) + ' ' + u[i] : n.toFixed(0) + ' B';
  }
  function ft(s) {
    if (s == null) return '–';
    return s < 60 ? s.toFixed(1) + ' s' : s < 3600 ? (s / 60).toFixed(1) + ' min' : (s / 3600).toFixed(1) + ' h';
  }
  function good(r) { return D.hib ? r.delta : -r.delta; }
  function goodIv(r) {
    var lo = r.dlo == null ? r.delta : r.dlo, hi = r.dhi == null ? r.delta : r.dhi;
    return D.hib ? [lo, hi] : [-hi, -lo];
  }
  function speedIv(r) { return [r.slo == null ? r.speedup : r.slo, r.shi == null ? r.speedup : r.shi]; }
  function rankable(r) { return r.speed_ok === true && !r.noise; }
  function reasons(r) { return 'unreliable speed: ' + (r.speed_reasons.join('; ') || 'no reason recorded'); }
  function noiseRow(profile) {
    var id = D.noise[profile];
    if (!id) return null;
    for (var i = 0; i < D.rows.length; i++) if (D.rows[i].id === id && D.rows[i].profile === profile) return D.rows[i];
    return null;
  }

  // ---- columns -----------------------------------------------------------------------------------------
  var COLS = [
    {key: 'rank', label: 'rank', val: function (r) { return r._rank == null ? Infinity : r._rank; }},
    {key: 'method', label: 'method', val: function (r) { return r.method; }},
    {key: 'family', label: 'family', val: function (r) { return r.family; }},
    {key: 'hps', label: 'hyper-parameters', val: function (r) { return r.hps; }},
    {key: 'value', label: 'quality', val: function (r) { return good(r); }},
    {key: 'delta', label: 'Δ vs reference [95% CI]', val: function (r) { return good(r); }},
    {key: 'speedup', label: 'speedup [95% CI]', val: function (r) { return r.speedup; }},
    {key: 'mem', label: 'peak memory', val: function (r) { return r.mem; }},
    {key: 'bytes', label: 'size', val: function (r) { return r.bytes; }},
    {key: 'cost_s', label: 'training cost', val: function (r) { return r.cost_s == null ? 0 : r.cost_s; }},
    {key: 'profile', label: 'profile', val: function (r) { return r.profile; }},
    {key: 'verified', label: 'verified', val: function (r) { return r.verified ? 1 : 0; }},
    {key: 'date', label: 'date', val: function (r) { return r.created_at; }},
    {key: 'links', label: 'record', val: null}
  ];
  var BYKEY = {};
  COLS.forEach(function (c) { BYKEY[c.key] = c; });

  // ---- state <-> URL hash ------------------------------------------------------------------------------
  function defaults() {
    return {profile: D.default_profile, family: [], method: '', tier: '', sort: 'rank', dir: 'asc'};
  }
  function parseHash() {
    var s = defaults();
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf('='), k = i < 0 ? kv : kv.slice(0, i), v = '';
      try { v = i < 0 ? '' : decodeURIComponent(kv.slice(i + 1)); } catch (e) { return; }
      if (k === 'profile' && D.profiles.indexOf(v) >= 0) s.profile = v;
      else if (k === 'family') s.family = v.split(',').filter(function (f) { return D.families.indexOf(f) >= 0; });
      else if (k === 'method' && D.methods.indexOf(v) >= 0) s.method = v;
      else if (k === 'tier' && D.tiers.indexOf(v) >= 0) s.tier = v;
      else if (k === 'sort') {
        var p = v.split(':');
        if (BYKEY[p[0]] && BYKEY[p[0]].val) { s.sort = p[0]; s.dir = p[1] === 'asc' ? 'asc' : 'desc'; }
      }
    });
    return s;
  }
  function hashOf(s) {
    var parts = ['profile=' + encodeURIComponent(s.profile)];
    if (s.family.length) parts.push('family=' + encodeURIComponent(s.family.join(',')));
    if (s.method) parts.push('method=' + encodeURIComponent(s.method));
    if (s.tier) parts.push('tier=' + encodeURIComponent(s.tier));
    if (s.sort !== 'rank' || s.dir !== 'asc') parts.push('sort=' + s.sort + ':' + s.dir);
    return '#' + parts.join('&');
  }
  var state = parseHash();

  function syncControls() {
    $('f-profile').value = state.profile;
    $('f-method').value = state.method;
    $('f-tier').value = state.tier;
    Array.prototype.forEach.call($('f-family').querySelectorAll('input'), function (el) {
      el.checked = state.family.indexOf(el.value) >= 0;
    });
  }
  function readControls() {
    var fam = [];
    Array.prototype.forEach.call($('f-family').querySelectorAll('input'), function (el) {
      if (el.checked) fam.push(el.value);
    });
    state.profile = $('f-profile').value; state.method = $('f-method').value; state.tier = $('f-tier').value;
    state.family = fam;
  }
  function commit() {
    var h = hashOf(state);
    if (location.hash !== h) location.hash = h; else render();  // hashchange renders
  }

  // ---- selection, front, ranks -------------------------------------------------------------------------
  function selected() {
    return D.rows.filter(function (r) {
      return r.profile === state.profile && (!state.family.length || state.family.indexOf(r.family) >= 0) &&
        (!state.method || r.method === state.method) && (!state.tier || r.tier === state.tier);
    });
  }
  function byRef(r) {  // the reference itself (1x, no change) dominates the row
    var g = good(r);
    return r.speedup <= 1 && g <= 0 && (r.speedup < 1 || g < 0);
  }
  function markFront(all) {
    var rows = all.filter(rankable);
    var order = rows.slice().sort(function (a, b) { return b.speedup - a.speedup; });
    var best = -Infinity, i = 0;
    all.forEach(function (r) { r._front = false; });
    while (i < order.length) {
      var j = i, gmax = -Infinity;
      while (j < order.length && order[j].speedup === order[i].speedup) { gmax = Math.max(gmax, good(order[j])); j++; }
      if (gmax > best) {
        for (var k = i; k < j; k++) if (good(order[k]) === gmax && !byRef(order[k])) order[k]._front = true;
        best = gmax;
      }
      i = j;
    }
  }
  function markRanks(all, ivf, eligible) {
    all.forEach(function (r) { r._rank = null; r._tied = false; });
    var rows = all.filter(eligible);
    var ivs = rows.map(ivf), lows = ivs.map(function (v) { return v[0]; }).sort(function (a, b) { return a - b; });
    var n = lows.length, counts = {};
    rows.forEach(function (r, i) {
      var hi = ivs[i][1], lo = 0, up = n;  // count lows <= hi (bisect right)
      while (lo < up) { var mid = (lo + up) >> 1; if (lows[mid] <= hi) lo = mid + 1; else up = mid; }
      r._rank = 1 + n - lo;
      counts[r._rank] = (counts[r._rank] || 0) + 1;
    });
    rows.forEach(function (r) { r._tied = counts[r._rank] > 1; });
  }
  function rankBy() { return state.sort === 'delta' || state.sort === 'value' ? 'delta' : 'speedup'; }
  function sortRows(rows) {
    var col = BYKEY[state.sort], m = state.dir === 'asc' ? 1 : -1, second = BYKEY[rankBy()];
    return rows.slice().sort(function (a, b) {
      if (a.noise !== b.noise) return a.noise ? -1 : 1;  // the noise floor is pinned first
      if (state.sort === 'rank' && (a._rank == null) !== (b._rank == null)) return a._rank == null ? 1 : -1;
      var x = col.val(a), y = col.val(b);
      if (x < y) return -m; if (x > y) return m;
      x = second.val(a); y = second.val(b);  // then the point estimate the ranks are built on, best first
      if (x !== y) return y - x;
      if (a.method !== b.method) return a.method < b.method ? -1 : 1;
      return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    });
  }

  // ---- table -------------------------------------------------------------------------------------------
  function renderHead() {
    $('thead').innerHTML = COLS.map(function (c) {
      var label = c.key === 'rank' ? 'rank (' + (rankBy() === 'delta' ? 'quality' : 'speedup') + ')' : c.label;
      if (!c.val) return '<th>' + esc(label) + '</th>';
      var arrow = state.sort === c.key ? (state.dir === 'desc' ? ' ▼' : ' ▲') : '';  // ▼: largest first
      return '<th class="sortable" data-key="' + c.key + '" tabindex="0">' + esc(label) + arrow + '</th>';
    }).join('');
  }
  function iv(a, b, f) { return ' <span class="ci">[' + f(a) + ', ' + f(b) + ']</span>'; }
  var PAGE = 250, limit = PAGE;  // rows drawn in the table; the plot, ranks and downloads cover every row
  function renderTable(rows) {
    var html = rows.slice(0, limit).map(function (r) {
      var page = ROOT + r.page;
      var cls = [r._front ? 'front' : '', r.noise ? 'noise' : '', r.speed_ok ? '' : 'unreliable'].filter(Boolean);
      var rank = r.noise ? '<span class="noise-tag" title="the reference timed against itself: how far timing noise reaches; never ranked">noise floor</span>'
        : r._rank == null ? '<span class="muted" title="not ranked: the speed is unreliable">–</span>'
        : r._rank + (r._tied ? '<span class="tie" title="statistically tied: the 95% intervals overlap">=</span>' : '');
      var speed = fs(r.speedup) + iv(r.slo, r.shi, fs);
      speed = r.speed_ok ? '<td>' + speed + '</td>'
        : '<td class="unreliable" title="' + esc(reasons(r)) + '"><span class="speed-unreliable">' + speed +
          '</span> <span class="flag">unreliable</span></td>';
      return '<tr data-id="' + esc(r.id) + '"' + (cls.length ? ' class="' + cls.join(' ') + '"' : '') + '>' +
        '<td class="rank">' + rank + '</td>' +
        '<td><a href="' + ROOT + 'methods/' + esc(r.method) + '.html">' + esc(r.method) + '</a>' +
        (r._front ? ' <span class="star" title="on the Pareto front">★</span>' : '') + '</td>' +
        '<td><span class="fam fam-' + esc(r.family) + '">' + esc(r.family) + '</span></td>' +
        '<td class="hp"><code>' + esc(r.hps) + '</code></td>' +
        '<td>' + fq(r.value) + '</td>' +
        '<td>' + fd(r.delta) + iv(r.dlo, r.dhi, fd) + '</td>' +
        speed +
        '<td>' + fb(r.mem) + '</td>' +
        '<td>' + fb(r.bytes) + '</td>' +
        '<td>' + ft(r.cost_s) + '</td>' +
        '<td><span class="profile">' + esc(r.profile) + '</span>' +
        (r.matched ? '' : ' <span class="warn" title="the machine did not match the profile">⚠</span>') + '</td>' +
        '<td>' + (r.verified ? '<span class="ok">verified</span>' : '<span class="muted">unverified</span>') + '</td>' +
        '<td>' + esc(r.date) + '</td>' +
        '<td><a href="' + esc(page) + '">run</a> · <a href="' + ROOT + 'results/' + esc(r.file) + '">json</a></td></tr>';
    }).join('');
    $('tbody').innerHTML = html || '<tr><td colspan="' + COLS.length + '" class="empty">No result matches these filters.</td></tr>';
    var more = rows.length - Math.min(limit, rows.length);
    $('more').hidden = more <= 0;
    if (more > 0) {
      $('more-text').textContent = 'The table shows the first ' + limit + ' of ' + rows.length +
        ' rows (the plot, the ranks and the downloads cover all of them).';
      $('more-next').textContent = 'show ' + Math.min(PAGE, more) + ' more';
      $('more-all').textContent = 'show all ' + rows.length;
    }
  }

  // ---- the Pareto plot is drawn by plot.js (LBPlot); this page passes it the rows and its formats ------
  function tipHtml(r) {
    return '<strong>' + esc(r.method) + '</strong> <span class="fam fam-' + esc(r.family) + '">' + esc(r.family) + '</span><br>' +
      (r.hps ? '<code>' + esc(r.hps) + '</code><br>' : '') +
      (r.noise ? '<span class="noise-tag">noise floor</span><br>' : '') +
      'speedup ' + fs(r.speedup) + iv(r.slo, r.shi, fs) +
      (r.speed_ok ? '' : ' <span class="flag">unreliable</span><br><span class="reasons">' + esc(r.speed_reasons.join('; ')) + '</span>') +
      '<br>Δ ' + esc(D.metric) + ' ' + fd(r.delta) + iv(r.dlo, r.dhi, fd) +
      '<br><span class="muted">seed ' + esc(r.seed) + ' · ' + esc(r.date) + ' · click for the run</span>';
  }
  function renderPlot(rows) {
    window.LBPlot.draw($('plot'), $('legend'), $('tip'), rows, {
      metric: D.metric, hib: D.hib, families: D.families, noise: noiseRow(state.profile), root: ROOT,
      fs: fs, fd: fd, esc: esc, color: color, good: good, speedIv: speedIv, reasons: reasons, tip: tipHtml});
  }

  // ---- downloads (Blob URLs work from file://) -------------------------------------------------------
  var FIELDS = ['task', 'profile', 'method', 'family', 'hyperparameters', 'seed', 'metric', 'value', 'reference_value',
                'delta', 'delta_low', 'delta_high', 'speedup', 'speedup_low', 'speedup_high', 'speed_status',
                'speed_reasons', 'noise_floor', 'method_peak_bytes',
                'reference_peak_bytes', 'method_bytes', 'parameters', 'nonzero_parameters', 'cost_seconds',
                'verified', 'tier', 'created_at', 'run_id', 'result_file', 'rank', 'tied', 'pareto_front'];
  function record(r) {
    return {task: D.task, profile: r.profile, method: r.method, family: r.family, hyperparameters: r.hp, seed: r.seed,
      metric: D.metric, value: r.value, reference_value: r.ref, delta: r.delta, delta_low: r.dlo, delta_high: r.dhi,
      speedup: r.speedup, speedup_low: r.slo, speedup_high: r.shi,
      speed_status: r.speed_ok ? 'ok' : 'unreliable', speed_reasons: r.speed_reasons.join('; '), noise_floor: r.noise,
      method_peak_bytes: r.mem,
      reference_peak_bytes: r.mem_ref, method_bytes: r.bytes, parameters: r.params, nonzero_parameters: r.nonzero,
      cost_seconds: r.cost_s, verified: r.verified, tier: r.tier, created_at: r.created_at, run_id: r.id,
      result_file: 'results/' + r.file, rank: r._rank, tied: r._tied, pareto_front: r._front};
  }
  function csvCell(v) {
    var s = v == null ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  function download(name, type, text) {
    var url = URL.createObjectURL(new Blob([text], {type: type})), a = document.createElement('a');
    a.href = url; a.download = name; document.body.appendChild(a); a.click();
    setTimeout(function () { URL.revokeObjectURL(url); a.remove(); }, 0);
  }
  function stem() { return D.task + '-' + state.profile; }
  var shown = [];

  // ---- render ------------------------------------------------------------------------------------------
  function render() {
    var rows = selected();
    markFront(rows);
    markRanks(rows, rankBy() === 'delta' ? goodIv : speedIv, rankable);  // never an unreliable speed or the noise floor
    shown = sortRows(rows);
    renderHead();
    renderTable(shown);
    renderPlot(shown);
    var nf = rows.filter(function (r) { return r._front; }).length, total = D.rows.filter(function (r) { return r.profile === state.profile; }).length;
    var nu = rows.filter(function (r) { return !r.speed_ok && !r.noise; }).length;
    $('status').innerHTML = 'Profile <span class="profile" id="cur-profile">' + esc(state.profile) + '</span>: ' +
      rows.length + ' of ' + total + ' result' + (total === 1 ? '' : 's') + ' shown, ' + nf + ' on the Pareto front' +
      (nu ? ', <span class="unreliable">' + nu + ' with an unreliable speed (greyed, not ranked)</span>' : '') + '. ' +
      'Other profiles are ranked separately.';
    Array.prototype.forEach.call($('noise-floors').querySelectorAll('[data-profile]'), function (el) {
      el.hidden = el.getAttribute('data-profile') !== state.profile;
    });
  }

  $('filters').addEventListener('change', function () { readControls(); limit = PAGE; commit(); });
  $('more-next').addEventListener('click', function () { limit += PAGE; renderTable(shown); });
  $('more-all').addEventListener('click', function () { limit = Infinity; renderTable(shown); });
  $('reset').addEventListener('click', function () { state = defaults(); syncControls(); commit(); });
  $('thead').addEventListener('click', function (ev) {
    var th = ev.target.closest('th.sortable');
    if (!th) return;
    var k = th.getAttribute('data-key');
    if (state.sort === k) state.dir = state.dir === 'desc' ? 'asc' : 'desc';
    else { state.sort = k; state.dir = k === 'rank' ? 'asc' : 'desc'; }
    commit();
  });
  $('thead').addEventListener('keydown', function (ev) { if (ev.key === 'Enter') ev.target.click(); });
  window.addEventListener('hashchange', function () { state = parseHash(); syncControls(); render(); });
  $('dl-json').addEventListener('click', function () {
    download(stem() + '.json', 'application/json', JSON.stringify(shown.map(record), null, 2) + '\n');
  });
  $('dl-csv').addEventListener('click', function () {
    var lines = [FIELDS.join(',')].concat(shown.map(function (r) {
      var o = record(r); return FIELDS.map(function (f) { return csvCell(o[f]); }).join(',');
    }));
    download(stem() + '.csv', 'text/csv', lines.join('\r\n') + '\r\n');
  });
  syncControls();
  render();
  document.body.setAttribute('data-ready', '1');
})();
