/* The task page: a quality budget first, then what fits it ranked by speed. Filters and the budget are kept in
   the URL hash; a sortable table grouped by standing, an SVG Pareto plot (plot.js) and CSV/JSON downloads of
   the rows shown. All data is embedded in the page (#lb-data): no fetch(), no network. Every string from a
   result file goes through esc() before it reaches innerHTML.
   The rules are leaderboard/data.py's (standing, rank_within, tied_ranks, overlapping, pareto_front) and the
   number formats leaderboard/pages.py's; tests check that the page and `bench recommend` agree. */
(function () {
  'use strict';
  var D = JSON.parse(document.getElementById('lb-data').textContent);
  var ROOT = '../';
  var COLORS = {distillation: '#1f77b4', caching: '#2ca02c', pruning: '#d62728', decoding: '#9467bd',
                quantization: '#ff7f0e', none: '#555555'};
  var $ = function (id) { return document.getElementById(id); };
  var ESC = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'};
  function esc(s) { return String(s == null ? '' : s).replace(/[&<>"']/g, function (c) { return ESC[c]; }); }
  function color(f) { return COLORS[f] || '#8c564b'; }

  // ---- formats: one per quantity (the same rules as leaderboard/pages.py) ------------------------------
  function noMinusZero(s) { return +s === 0 ? s.replace(/^[-+]/, '') : s; }  // never "-0.0"
  function signed(v, digits) { return noMinusZero((v > 0 ? '+' : v < 0 ? '' : '+') + v.toFixed(digits)); }
  function fq(v) { return v == null ? '–' : D.pct ? (v * 100).toFixed(1) + '%' : v.toFixed(2); }
  function fd(v) { return v == null ? '–' : D.pct ? signed(v * 100, 1) + ' pp' : signed(v, 2); }
  function fs(v) { return v == null ? '–' : (v < 100 ? v.toFixed(2) : v.toFixed(0)) + '×'; }
  function fb(n) {
    if (n == null) return '–';
    var u = ['B', 'KiB', 'MiB', 'GiB'], i = 0;
    while (n >= 1024 && i < 3) { n /= 1024; i++; }
    return i ? n.toFixed(1) + ' ' + u[i] : n.toFixed(0) + ' B';
  }
  function fc(n) {  // counts: 3 significant digits with k/M/G
    if (n == null) return '–';
    var units = [[1e9, ' G'], [1e6, ' M'], [1e3, ' k']];
    for (var i = 0; i < units.length; i++) if (Math.abs(n) >= units[i][0]) return +(n / units[i][0]).toPrecision(3) + units[i][1];
    return n.toFixed(0);
  }
  function fratio(v, ref) { return v == null || !ref ? '–' : (v / ref).toFixed(2) + '×'; }
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

  // ---- the quality budget (leaderboard/data.py's parse_budget, Budget.allowed) -------------------------
  var BUDGET_RE = /^([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(%|pp|[a-z][a-z0-9_]*)$/i;
  function parseBudget(text) {
    var m = BUDGET_RE.exec(String(text).trim());
    if (!m) return null;
    var amount = parseFloat(m[1]), unit = m[2].toLowerCase();
    if (!isFinite(amount) || amount < 0 || D.units.indexOf(unit) < 0) return null;
    return {amount: amount, unit: unit, text: m[1] + unit};
  }
  function allowed(b, ref) {
    if (b.unit === '%') return b.amount / 100 * Math.abs(ref == null ? 0 : ref);
    return b.unit === 'pp' ? b.amount / 100 : b.amount;
  }
  function budgetText(b) {
    return b.unit === '%' ? b.amount + '% of the reference' : b.unit === 'pp' ? b.amount + ' pp (absolute)'
      : b.amount + ' ' + b.unit + ' (absolute)';
  }

  // ---- standing under the budget, ranks and ties (data.py: standing, rank_within, tie_text) ------------
  var STANDINGS = ['noise', 'ranked', 'no-speedup', 'unreliable', 'outside'];
  var GROUP = {
    ranked: 'Within the budget, with a measured speedup: ranked by speed',
    'no-speedup': 'Within the budget, but no measured speedup (the speedup\'s 95% interval includes 1× or lies below)',
    unreliable: 'Within the budget, but the speed is unreliable (contended, imprecise or unstable timing)',
    outside: 'Outside the budget: loses more quality than it allows'
  };
  function within(r, b) { return -good(r) <= allowed(b, r.ref) + 1e-12; }
  function standing(r, b) {
    if (r.noise) return 'noise';
    if (!within(r, b)) return 'outside';
    if (!r.speed_ok) return 'unreliable';
    return speedIv(r)[0] > 1 ? 'ranked' : 'no-speedup';
  }
  function markStandings(all, b) {
    all.forEach(function (r) { r._standing = standing(r, b); r._rank = null; r._tiedWith = []; });
    var rows = all.filter(function (r) { return r._standing === 'ranked'; });
    var ivs = rows.map(speedIv), lows = ivs.map(function (v) { return v[0]; }).sort(function (a, b) { return a - b; });
    var n = lows.length;
    rows.forEach(function (r, i) {
      var hi = ivs[i][1], lo = 0, up = n;  // rank: 1 + the rows whose whole interval lies above (bisect right)
      while (lo < up) { var mid = (lo + up) >> 1; if (lows[mid] <= hi) lo = mid + 1; else up = mid; }
      r._rank = 1 + n - lo;
      rows.forEach(function (o, j) {  // tied: the intervals overlap
        if (j !== i && ivs[j][0] <= ivs[i][1] && ivs[i][0] <= ivs[j][1]) r._tiedWith.push(o.method + ' (' + (o.hps || 'defaults') + ')');
      });
    });
  }
  function tieText(r) {
    var better = r._rank - 1;
    var t = 'rank ' + r._rank + ': ' + better + ' result' + (better !== 1 ? 's are' : ' is') +
      ' faster beyond doubt (a 95% interval wholly above this one\'s)';
    if (r._tiedWith.length) t += '; = tied: its interval overlaps ' + r._tiedWith.length + ' other ranked result' +
      (r._tiedWith.length !== 1 ? 's' : '') + ' (' + r._tiedWith.join(', ') + '), which it cannot be told apart from';
    return t;
  }

  // ---- columns: the secondary ones (class "sec") hide behind #toggle-cols ------------------------------
  var COLS = [
    {key: 'rank', label: 'rank', val: function (r) { return r._rank == null ? Infinity : r._rank; }},
    {key: 'method', label: 'method', val: function (r) { return r.method; }},
    {key: 'family', label: 'family', val: function (r) { return r.family; }},
    {key: 'value', label: 'quality', val: function (r) { return good(r); }},
    {key: 'delta', label: 'Δ vs reference [95% CI]', val: function (r) { return good(r); }},
    {key: 'speedup', label: 'speedup [95% CI]', val: function (r) { return r.speedup; }},
    {key: 'mem', label: 'peak memory (× ref)', val: function (r) { return r.mem; }},
    {key: 'params', label: 'parameters', val: function (r) { return r.nonzero == null ? r.params : r.nonzero; }},
    {key: 'hps', label: 'hyper-parameters', val: function (r) { return r.hps; }, sec: true},
    {key: 'bytes', label: 'size', val: function (r) { return r.bytes; }, sec: true},
    {key: 'cost_s', label: 'training cost', val: function (r) { return r.cost_s == null ? 0 : r.cost_s; }, sec: true},
    {key: 'profile', label: 'profile', val: function (r) { return r.profile; }, sec: true},
    {key: 'verified', label: 'verified', val: function (r) { return r.verified ? 1 : 0; }, sec: true},
    {key: 'date', label: 'date', val: function (r) { return r.created_at; }, sec: true},
    {key: 'links', label: 'record', val: null, sec: true}
  ];
  var BYKEY = {};
  COLS.forEach(function (c) { BYKEY[c.key] = c; });

  // ---- state <-> URL hash ------------------------------------------------------------------------------
  function defaults() {
    return {profile: D.default_profile, family: [], method: '', tier: '', sort: 'rank', dir: 'asc',
            budget: parseBudget(D.budget), cols: ''};
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
      else if (k === 'budget' && parseBudget(v)) s.budget = parseBudget(v);
      else if (k === 'cols' && v === 'all') s.cols = 'all';
      else if (k === 'sort') {
        var p = v.split(':');
        if (BYKEY[p[0]] && BYKEY[p[0]].val) { s.sort = p[0]; s.dir = p[1] === 'asc' ? 'asc' : 'desc'; }
      }
    });
    return s;
  }
  function hashOf(s) {
    var parts = ['profile=' + encodeURIComponent(s.profile)];
    if (s.budget.text !== parseBudget(D.budget).text) parts.push('budget=' + encodeURIComponent(s.budget.text));
    if (s.family.length) parts.push('family=' + encodeURIComponent(s.family.join(',')));
    if (s.method) parts.push('method=' + encodeURIComponent(s.method));
    if (s.tier) parts.push('tier=' + encodeURIComponent(s.tier));
    if (s.sort !== 'rank' || s.dir !== 'asc') parts.push('sort=' + s.sort + ':' + s.dir);
    if (s.cols) parts.push('cols=all');
    return '#' + parts.join('&');
  }
  var state = parseHash();

  function syncControls() {
    $('f-profile').value = state.profile;
    $('f-method').value = state.method;
    $('f-tier').value = state.tier;
    $('f-budget-amount').value = String(state.budget.amount);
    $('f-budget-unit').value = state.budget.unit;
    $('f-budget-amount').classList.remove('invalid');
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
    var b = parseBudget($('f-budget-amount').value + $('f-budget-unit').value);
    $('f-budget-amount').classList.toggle('invalid', !b);
    if (b) state.budget = b;  // an unreadable amount keeps the last budget, and the field says so
  }
  function commit() {
    var h = hashOf(state);
    if (location.hash !== h) location.hash = h; else render();  // hashchange renders
  }

  // ---- selection, front ----------------------------------------------------------------------------------
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
  function sortRows(rows) {
    var col = BYKEY[state.sort], m = state.dir === 'asc' ? 1 : -1;
    return rows.slice().sort(function (a, b) {
      var ga = STANDINGS.indexOf(a._standing), gb = STANDINGS.indexOf(b._standing);
      if (ga !== gb) return ga - gb;  // the groups keep their order whatever the column sorted by
      var x = col.val(a), y = col.val(b);
      if (x < y) return -m; if (x > y) return m;
      if (a._standing === 'outside') { x = -good(a); y = -good(b); if (x !== y) return x - y; }  // smallest loss first
      if (a.speedup !== b.speedup) return b.speedup - a.speedup;  // then fastest first
      if (a.method !== b.method) return a.method < b.method ? -1 : 1;
      return a.id < b.id ? -1 : a.id > b.id ? 1 : 0;
    });
  }

  // ---- table -------------------------------------------------------------------------------------------
  function renderHead() {
    $('thead').innerHTML = COLS.map(function (c) {
      var cls = c.sec ? ' class="sec' + (c.val ? ' sortable' : '') + '"' : c.val ? ' class="sortable"' : '';
      if (!c.val) return '<th' + cls + '>' + esc(c.label) + '</th>';
      var arrow = state.sort === c.key ? (state.dir === 'desc' ? ' ▼' : ' ▲') : '';  // ▼: largest first
      return '<th' + cls + ' data-key="' + c.key + '" tabindex="0">' + esc(c.label) + arrow + '</th>';
    }).join('');
    $('table').classList.toggle('all-cols', state.cols === 'all');
    $('toggle-cols').textContent = state.cols === 'all' ? 'fewer columns' : 'all columns';
    $('toggle-cols').setAttribute('aria-pressed', state.cols === 'all' ? 'true' : 'false');
  }
  function iv(a, b, f) { return ' <span class="ci">[' + f(a) + ', ' + f(b) + ']</span>'; }
  function rankCell(r) {
    if (r._standing === 'noise')
      return '<span class="noise-tag" title="the reference timed against itself: how far timing noise reaches; never ranked">noise floor</span>';
    if (r._standing === 'ranked')
      return '<span title="' + esc(tieText(r)) + '">' + r._rank + (r._tiedWith.length ? '<span class="tie">=</span>' : '') + '</span>';
    if (r._standing === 'no-speedup')
      return '<span class="no-speedup" title="' + esc(GROUP['no-speedup']) + '">no measured speedup</span>';
    if (r._standing === 'unreliable') return '<span class="muted" title="not ranked: ' + esc(reasons(r)) + '">–</span>';
    return '<span class="muted" title="' + esc(GROUP.outside) + '">outside</span>';
  }
  function sec(html) { return '<td class="sec">' + html + '</td>'; }
  function rowHtml(r) {
    var page = ROOT + r.page;
    var cls = [r._front ? 'front' : '', r.noise ? 'noise' : '', r.speed_ok ? '' : 'unreliable',
               'st-' + r._standing].filter(Boolean);
    var speed = fs(r.speedup) + iv(r.slo, r.shi, fs);
    speed = r.speed_ok ? '<td>' + speed + '</td>'
      : '<td class="unreliable" title="' + esc(reasons(r)) + '"><span class="speed-unreliable">' + speed +
        '</span> <span class="flag">unreliable</span></td>';
    var params = r.params == null ? '–' : fc(r.params) + (r.nonzero != null && fc(r.nonzero) !== fc(r.params) ? ' (' + fc(r.nonzero) + ' non-zero)' : '');
    return '<tr data-id="' + esc(r.id) + '" class="' + cls.join(' ') + '">' +
      '<td class="rank">' + rankCell(r) + '</td>' +
      '<td class="method"><a href="' + ROOT + 'methods/' + esc(r.method) + '.html" title="' + esc(r.hps) + '">' + esc(r.method) + '</a>' +
      (r._front ? ' <span class="star" title="on the Pareto front">★</span>' : '') +
      ' <a class="run-link" href="' + esc(page) + '" title="this run: every figure, its provenance and the reproduce command">run</a></td>' +
      '<td><span class="fam fam-' + esc(r.family) + '">' + esc(r.family) + '</span></td>' +
      '<td>' + fq(r.value) + '</td>' +
      '<td>' + fd(r.delta) + iv(r.dlo, r.dhi, fd) + '</td>' +
      speed +
      '<td>' + fb(r.mem) + (r.mem != null && r.mem_ref ? ' <span class="ci">(' + fratio(r.mem, r.mem_ref) + ')</span>' : '') + '</td>' +
      '<td>' + params + '</td>' +
      '<td class="sec hp"><code>' + esc(r.hps) + '</code></td>' +
      sec(fb(r.bytes)) + sec(ft(r.cost_s)) +
      sec('<span class="profile">' + esc(r.profile) + '</span>' +
          (r.matched ? '' : ' <span class="warn" title="the machine did not match the profile">⚠</span>')) +
      sec(r.verified ? '<span class="ok">verified</span>' : '<span class="muted">unverified</span>') +
      sec(esc(r.date)) +
      sec('<a href="' + esc(page) + '">run</a> · <a href="' + ROOT + 'results/' + esc(r.file) + '">json</a>') + '</tr>';
  }
  var PAGE = 250, limit = PAGE;  // rows drawn in the table; the plot, ranks and downloads cover every row
  function renderTable(rows) {
    var html = [], last = null;
    rows.slice(0, limit).forEach(function (r) {
      if (r._standing !== last && GROUP[r._standing]) {
        var n = rows.filter(function (x) { return x._standing === r._standing; }).length;
        html.push('<tr class="group g-' + r._standing + '"><th colspan="' + COLS.length + '">' + esc(GROUP[r._standing]) +
                  ' <span class="muted">(' + n + ')</span></th></tr>');
      }
      last = r._standing;
      html.push(rowHtml(r));
    });
    $('tbody').innerHTML = html.join('') || '<tr><td colspan="' + COLS.length + '" class="empty">No result matches these filters.</td></tr>';
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
      '<br>' + (r._standing === 'ranked' ? esc(tieText(r)) : r._standing === 'noise' ? '' : esc(GROUP[r._standing])) +
      '<br><span class="muted">seed ' + esc(r.seed) + ' · ' + esc(r.date) + ' · click for the run</span>';
  }
  function refOf(rows) {
    for (var i = 0; i < rows.length; i++) if (rows[i].ref != null) return rows[i].ref;
    return null;
  }
  function renderPlot(rows) {
    // rows carry _standing ('noise', 'ranked', 'no-speedup', 'unreliable', 'outside'), _rank and _front;
    // opts.budget.loss is the budget in the metric's units (a loss: the quality change at -loss when up is better)
    window.LBPlot.draw($('plot'), $('legend'), $('tip'), rows, {
      metric: D.metric, hib: D.hib, families: D.families, noise: noiseRow(state.profile), root: ROOT,
      fs: fs, fd: fd, esc: esc, color: color, good: good, speedIv: speedIv, reasons: reasons, tip: tipHtml,
      budget: {loss: allowed(state.budget, refOf(rows)), text: budgetText(state.budget)}});
  }

  // ---- downloads (Blob URLs work from file://) -------------------------------------------------------
  var FIELDS = ['task', 'profile', 'method', 'family', 'hyperparameters', 'seed', 'metric', 'value', 'reference_value',
                'delta', 'delta_low', 'delta_high', 'speedup', 'speedup_low', 'speedup_high', 'speed_status',
                'speed_reasons', 'noise_floor', 'method_peak_bytes',
                'reference_peak_bytes', 'method_bytes', 'parameters', 'nonzero_parameters', 'cost_seconds',
                'verified', 'tier', 'created_at', 'run_id', 'result_file', 'budget', 'standing', 'rank', 'tied_with',
                'pareto_front'];
  function record(r) {
    return {task: D.task, profile: r.profile, method: r.method, family: r.family, hyperparameters: r.hp, seed: r.seed,
      metric: D.metric, value: r.value, reference_value: r.ref, delta: r.delta, delta_low: r.dlo, delta_high: r.dhi,
      speedup: r.speedup, speedup_low: r.slo, speedup_high: r.shi,
      speed_status: r.speed_ok ? 'ok' : 'unreliable', speed_reasons: r.speed_reasons.join('; '), noise_floor: r.noise,
      method_peak_bytes: r.mem,
      reference_peak_bytes: r.mem_ref, method_bytes: r.bytes, parameters: r.params, nonzero_parameters: r.nonzero,
      cost_seconds: r.cost_s, verified: r.verified, tier: r.tier, created_at: r.created_at, run_id: r.id,
      result_file: 'results/' + r.file, budget: state.budget.text, standing: r._standing, rank: r._rank,
      tied_with: r._tiedWith.join('; '), pareto_front: r._front};
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
    markStandings(rows, state.budget);  // ranks only within the budget, with a reliable, measured speedup
    shown = sortRows(rows);
    renderHead();
    renderTable(shown);
    renderPlot(shown);
    var total = D.rows.filter(function (r) { return r.profile === state.profile; }).length, n = {};
    STANDINGS.forEach(function (k) { n[k] = rows.filter(function (r) { return r._standing === k; }).length; });
    var ref = refOf(rows);
    $('budget-text').textContent = ref == null ? '' : '= at most ' + fd(-allowed(state.budget, ref)).replace(/^[-+]/, '') +
      ' below the reference\'s ' + fq(ref);
    $('status').innerHTML = 'Profile <span class="profile" id="cur-profile">' + esc(state.profile) + '</span>, budget ' +
      esc(budgetText(state.budget)) + ': ' + rows.length + ' of ' + total + ' result' + (total === 1 ? '' : 's') + ' shown; ' +
      '<strong id="n-ranked">' + n.ranked + '</strong> ranked, ' + n['no-speedup'] + ' with no measured speedup, ' +
      (n.unreliable ? '<span class="unreliable">' + n.unreliable + ' with an unreliable speed</span>, ' : '') +
      n.outside + ' outside the budget. Other profiles are ranked separately.';
    Array.prototype.forEach.call($('noise-floors').querySelectorAll('[data-profile]'), function (el) {
      el.hidden = el.getAttribute('data-profile') !== state.profile;
    });
  }

  $('filters').addEventListener('change', function () { readControls(); limit = PAGE; commit(); });
  $('toggle-cols').addEventListener('click', function () { state.cols = state.cols ? '' : 'all'; commit(); });
  $('more-next').addEventListener('click', function () { limit += PAGE; renderTable(shown); });
  $('more-all').addEventListener('click', function () { limit = Infinity; renderTable(shown); });
  $('reset').addEventListener('click', function () { state = defaults(); syncControls(); commit(); });
  $('thead').addEventListener('click', function (ev) {
    var th = ev.target.closest('th.sortable');
    if (!th) return;
    var k = th.getAttribute('data-key');
    if (state.sort === k) state.dir = state.dir === 'desc' ? 'asc' : 'desc';
    else { state.sort = k; state.dir = k === 'rank' || k === 'method' || k === 'family' ? 'asc' : 'desc'; }
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
