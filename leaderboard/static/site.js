/* Shared by every page: copy buttons (run pages) and the home page's tier/profile filters in the URL hash. */
(function () {
  'use strict';
  document.addEventListener('click', function (ev) {
    var b = ev.target.closest && ev.target.closest('button[data-copy]');
    if (!b) return;
    var el = document.getElementById(b.getAttribute('data-copy')), text = el.textContent;
    function done() { b.textContent = 'copied'; setTimeout(function () { b.textContent = 'copy'; }, 1500); }
    function fallback() {  // the clipboard API may be refused on file://: select the text and copy that
      var range = document.createRange(); range.selectNodeContents(el);
      var sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
      try { if (document.execCommand('copy')) done(); } catch (e) { /* the text stays selected */ }
    }
    if (navigator.clipboard && navigator.clipboard.writeText) navigator.clipboard.writeText(text).then(done, fallback);
    else fallback();
  });

  var form = document.getElementById('home-filters');
  if (!form) return;
  var selects = form.querySelectorAll('select');
  function options(sel) { return Array.prototype.map.call(sel.options, function (o) { return o.value; }); }
  function fromHash() {
    var h = {};
    location.hash.replace(/^#/, '').split('&').forEach(function (kv) {
      var i = kv.indexOf('=');
      if (i > 0) { try { h[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1)); } catch (e) { /* ignore */ } }
    });
    Array.prototype.forEach.call(selects, function (s) {
      var v = h[s.getAttribute('data-key')] || '';
      s.value = options(s).indexOf(v) >= 0 ? v : '';
    });
    apply();
  }
  function apply() {
    var tier = document.getElementById('f-tier').value, prof = document.getElementById('f-profile').value;
    Array.prototype.forEach.call(document.querySelectorAll('.profile-scope'), function (b) {
      b.hidden = !!prof && b.getAttribute('data-profile') !== prof;
    });
    Array.prototype.forEach.call(document.querySelectorAll('.card'), function (c) {
      var blocks = c.querySelectorAll('.profile-block'), any = false;
      Array.prototype.forEach.call(blocks, function (b) {
        var on = !prof || b.getAttribute('data-profile') === prof;
        b.hidden = !on; any = any || on;
      });
      c.hidden = (tier && c.getAttribute('data-tier') !== tier) || !any;
    });
  }
  form.addEventListener('change', function () {
    var parts = [];
    Array.prototype.forEach.call(selects, function (s) {
      if (s.value) parts.push(s.getAttribute('data-key') + '=' + encodeURIComponent(s.value));
    });
    location.hash = parts.length ? '#' + parts.join('&') : '#';
  });
  window.addEventListener('hashchange', fromHash);
  fromHash();
})();
