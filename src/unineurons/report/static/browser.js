/* unineurons neuron browser: the table of neurons and the neuron pages of a report.
 *
 * Reads the JSON document embedded in <script id="unineurons-data"> (layout: see
 * unineurons/report/browser.py). Every string from the run (token strings, contexts, model
 * specs, features) is put on the page with textContent or as a property, never parsed as HTML.
 * Routes (location.hash):
 *   #/figures[/ID]           the figures (static HTML)
 *   #/neurons                the table: only the visible page of rows is built
 *   #/neuron/MODEL/L3.N12    one neuron, built when opened
 */
(function () {
  "use strict";

  var DATA = JSON.parse(document.getElementById("unineurons-data").textContent || "{}");
  var MODELS = DATA.models || [];
  var NEURONS = DATA.neurons || { n: 0, model: [], columns: [], visible: [] };
  var STRINGS = DATA.strings || [];
  var COLS = {};
  (NEURONS.columns || []).forEach(function (c) { COLS[c.name] = c; });
  var LAYER = COLS.layer ? COLS.layer.values : [];
  var NEURON = COLS.neuron ? COLS.neuron.values : [];

  // ---- small helpers: text nodes only, data never parsed as HTML -----------------------
  function el(tag, props) {
    var node = document.createElement(tag);
    if (props) {
      Object.keys(props).forEach(function (k) { node[k] = props[k]; });
    }
    for (var i = 2; i < arguments.length; i++) {
      var ch = arguments[i];
      if (ch === null || ch === undefined) continue;
      node.appendChild(typeof ch === "string" || typeof ch === "number"
        ? document.createTextNode(String(ch)) : ch);
    }
    return node;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function $(id) { return document.getElementById(id); }
  function address(layer, neuron) { return "L" + layer + ".N" + neuron; }
  function neuronHref(m, layer, neuron) { return "#/neuron/" + m + "/" + address(layer, neuron); }
  function corr(v) { return v === null || v === undefined ? "" : v.toFixed(3); }
  // isFloat: a float column (its 1.0 shows as 1.00, not as the integer 1)
  function fmt(v, isFloat) {
    if (v === null || v === undefined) return "";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && !isFloat) return String(v);
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return v.toPrecision(3);
  }
  // A token as readable text: newlines and tabs made visible, spaces kept (CSS white-space: pre).
  function showToken(s) { return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192").replace(/\r/g, "\u240d"); }

  // ---- column access -----------------------------------------------------------------------
  function cell(name, i) {
    if (name === "model") return MODELS[NEURONS.model[i]] ? MODELS[NEURONS.model[i]].short : "";
    if (name === "address") return address(LAYER[i], NEURON[i]);
    var c = COLS[name];
    if (!c) return null;
    if (c.kind === "cat") { var k = c.codes[i]; return k < 0 ? null : c.levels[k]; }
    if (c.kind === "bool") { var b = c.values[i]; return b === null ? null : (b ? "yes" : "no"); }
    return c.values[i];
  }
  function isFloat(name) { return COLS[name] !== undefined && COLS[name].kind === "num"; }
  function sortKey(name) {
    // a function i -> comparable value (numbers or strings; null sorts last)
    if (name === "model") return function (i) { return NEURONS.model[i]; };
    if (name === "address") return function (i) { return LAYER[i] * 1e7 + NEURON[i]; };
    var c = COLS[name];
    if (c.kind === "cat") return function (i) { var k = c.codes[i]; return k < 0 ? null : c.levels[k]; };
    return function (i) { return c.values[i]; };
  }

  // ---- lookups built on first use ----------------------------------------------------------
  var rowIndex = null;
  function findRow(m, layer, neuron) {
    if (!rowIndex) {
      rowIndex = new Map();
      for (var i = 0; i < NEURONS.n; i++) rowIndex.set(NEURONS.model[i] + ":" + LAYER[i] + ":" + NEURON[i], i);
    }
    var r = rowIndex.get(m + ":" + layer + ":" + neuron);
    return r === undefined ? -1 : r;
  }
  var matchIndex = null;
  function related(m, layer, neuron) {
    // best matches of this neuron in other models, and neurons of other models that match it
    var M = DATA.matches || {};
    if (!matchIndex) {
      matchIndex = { from: new Map(), to: new Map() };
      var n = (M.model || []).length;
      for (var j = 0; j < n; j++) {
        var a = M.model[j] + ":" + M.layer[j] + ":" + M.neuron[j];
        var b = M.partner[j] + ":" + M.argmax_layer[j] + ":" + M.argmax_neuron[j];
        if (!matchIndex.from.has(a)) matchIndex.from.set(a, []);
        matchIndex.from.get(a).push(j);
        if (!matchIndex.to.has(b)) matchIndex.to.set(b, []);
        matchIndex.to.get(b).push(j);
      }
    }
    var key = m + ":" + layer + ":" + neuron;
    return { from: matchIndex.from.get(key) || [], to: matchIndex.to.get(key) || [] };
  }

  // ---- views -------------------------------------------------------------------------------
  function show(view) {
    ["figures", "neurons", "neuron"].forEach(function (v) {
      var s = $("view-" + v);
      if (s) s.hidden = v !== view;
    });
    document.querySelectorAll("header nav a").forEach(function (a) {
      a.classList.toggle("active", a.dataset.view === view || (view === "neuron" && a.dataset.view === "neurons"));
    });
  }

  function route() {
    var h = decodeURIComponent(location.hash || "#/figures");
    var m = /^#\/neuron\/(\d+)\/L(\d+)\.N(\d+)$/.exec(h);
    if (m && $("view-neuron")) { showNeuron(+m[1], +m[2], +m[3]); return; }
    if (h.indexOf("#/neurons") === 0 && $("view-neurons")) { show("neurons"); renderTable(); return; }
    show("figures");
    var f = /^#\/figures\/([\w-]+)$/.exec(h);
    if (f && $("fig-" + f[1])) $("fig-" + f[1]).scrollIntoView();
    else window.scrollTo(0, 0);
  }

  // ---- the table ---------------------------------------------------------------------------
  var state = { sort: null, desc: true, page: 0, size: 50, visible: (NEURONS.visible || []).slice(), rows: null };

  function fillSelect(id, values, labels) {
    var s = $(id);
    if (!s) return;
    clear(s);
    s.appendChild(el("option", { value: "" }, "any"));
    values.forEach(function (v, k) { s.appendChild(el("option", { value: String(v) }, labels ? labels[k] : String(v))); });
  }

  function setupTable() {
    if (!$("view-neurons")) return;
    fillSelect("f-model", MODELS.map(function (_, i) { return i; }), MODELS.map(function (m) { return m.short; }));
    var layers = Array.from(new Set(LAYER)).sort(function (a, b) { return a - b; });
    fillSelect("f-layer", layers);
    fillSelect("f-role", COLS.role ? COLS.role.levels : []);
    fillSelect("f-family", COLS.family ? COLS.family.levels : []);
    if (!COLS.is_universal) $("f-universal").disabled = true;
    ["f-model", "f-layer", "f-universal", "f-role", "f-family"].forEach(function (id) {
      $(id).addEventListener("change", function () { state.page = 0; state.rows = null; renderTable(); });
    });
    $("f-search").addEventListener("input", function () { state.page = 0; state.rows = null; renderTable(); });
    $("f-reset").addEventListener("click", function () {
      $("filters").reset(); state.page = 0; state.rows = null; renderTable();
    });
    $("p-size").addEventListener("change", function () { state.size = +this.value; state.page = 0; renderTable(); });
    $("p-first").addEventListener("click", function () { state.page = 0; renderTable(); });
    $("p-prev").addEventListener("click", function () { state.page = Math.max(0, state.page - 1); renderTable(); });
    $("p-next").addEventListener("click", function () { state.page += 1; renderTable(); });
    $("p-last").addEventListener("click", function () { state.page = 1e9; renderTable(); });
    var box = $("f-columns");
    ["model", "address"].concat(NEURONS.columns.map(function (c) { return c.name; })).forEach(function (name) {
      if (name === "layer" || name === "neuron") return;
      var cb = el("input", { type: "checkbox", checked: state.visible.indexOf(name) >= 0 });
      cb.dataset.column = name;
      cb.addEventListener("change", function () {
        state.visible = Array.from(box.querySelectorAll("input:checked")).map(function (x) { return x.dataset.column; });
        renderTable();
      });
      box.appendChild(el("label", null, cb, name));
    });
  }

  function filtered() {
    if (state.rows) return state.rows;
    var fm = $("f-model").value, fl = $("f-layer").value, fu = $("f-universal").value;
    var fr = $("f-role").value, ff = $("f-family").value;
    var q = $("f-search").value.trim();
    var qa = /^L(\d+)(?:\.(?:N(\d*))?)?$/i.exec(q);
    var ql = q.toLowerCase();
    var feat = COLS.family_feature;
    var univ = COLS.is_universal, role = COLS.role, fam = COLS.family;
    var out = [];
    for (var i = 0; i < NEURONS.n; i++) {
      if (fm !== "" && NEURONS.model[i] !== +fm) continue;
      if (fl !== "" && LAYER[i] !== +fl) continue;
      // untested neurons (null: partner seeds) are neither universal nor not universal
      if (fu !== "" && univ && univ.values[i] !== +fu) continue;
      if (fr !== "" && (!role || role.codes[i] < 0 || role.levels[role.codes[i]] !== fr)) continue;
      if (ff !== "" && (!fam || fam.codes[i] < 0 || fam.levels[fam.codes[i]] !== ff)) continue;
      if (q) {
        if (qa) {
          if (LAYER[i] !== +qa[1]) continue;
          // "L3.N12" is that neuron (in every model); "L3" or "L3.N" the whole layer
          if (qa[2] !== undefined && qa[2] !== "" && NEURON[i] !== +qa[2]) continue;
        } else {
          var f = feat && feat.codes[i] >= 0 ? feat.levels[feat.codes[i]].toLowerCase() : "";
          if (f.indexOf(ql) < 0) continue;
        }
      }
      out.push(i);
    }
    if (state.sort) {
      var key = sortKey(state.sort), sign = state.desc ? -1 : 1;
      var keys = new Map(out.map(function (i) { return [i, key(i)]; }));
      out.sort(function (a, b) {
        var x = keys.get(a), y = keys.get(b);
        if (x === null || x === undefined) return (y === null || y === undefined) ? a - b : 1;
        if (y === null || y === undefined) return -1;
        if (x < y) return -sign;
        if (x > y) return sign;
        return a - b;
      });
    }
    state.rows = out;
    return out;
  }

  function renderTable() {
    var rows = filtered();
    var pages = Math.max(1, Math.ceil(rows.length / state.size));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    $("row-count").textContent = rows.length + " of " + NEURONS.n + " neurons";
    $("p-label").textContent = "page " + (state.page + 1) + " of " + pages;
    var table = $("neuron-table");
    var head = table.tHead;
    clear(head);
    var tr = el("tr");
    state.visible.forEach(function (name) {
      var arrow = state.sort === name ? (state.desc ? " \u25bc" : " \u25b2") : "";
      var th = el("th", { scope: "col", title: "sort by " + name }, name + arrow);
      th.dataset.column = name;
      th.addEventListener("click", function () {
        if (state.sort === name) state.desc = !state.desc; else { state.sort = name; state.desc = true; }
        state.rows = null;
        renderTable();
      });
      tr.appendChild(th);
    });
    head.appendChild(tr);
    var body = table.tBodies[0];
    clear(body);
    var frag = document.createDocumentFragment();
    rows.slice(state.page * state.size, (state.page + 1) * state.size).forEach(function (i) {
      var r = el("tr");
      state.visible.forEach(function (name) {
        var v = cell(name, i);
        var td;
        if (name === "address") {
          td = el("td", null, el("a", { href: neuronHref(NEURONS.model[i], LAYER[i], NEURON[i]) }, String(v)));
        } else {
          td = el("td", { className: typeof v === "number" ? "num" : "" }, fmt(v, isFloat(name)));
          if (name === "is_universal" && v === "yes") td.classList.add("yes");
        }
        r.appendChild(td);
      });
      frag.appendChild(r);
    });
    body.appendChild(frag);
  }

  // ---- a neuron page -----------------------------------------------------------------------
  function modelName(m) { return MODELS[m] ? MODELS[m].short : "model " + m; }

  function contextsColumn(m, layer, neuron, label) {
    var col = el("div", { className: "ctx-col" });
    var head = el("div", { className: "ctx-head" }, el("a", { href: neuronHref(m, layer, neuron) }, address(layer, neuron)),
      " in " + modelName(m), label ? el("span", { className: "muted" }, " " + label) : null);
    col.appendChild(head);
    var c = (DATA.contexts || {})[m + ":" + layer + ":" + neuron];
    if (!c) {
      col.appendChild(el("p", { className: "muted" }, "No top contexts stored for this neuron (analyze did not run on this model, or it is beyond --max-context-neurons)."));
      return col;
    }
    var scale = c.scale || 1;
    c.items.forEach(function (it) {
      var value = it[0], pos = it[1], start = it[2], toks = it[4], acts = it[5];
      var line = el("div", { className: "ctx" });
      line.appendChild(el("span", { className: "ctx-val", title: "activation of the top token; context row " + it[3] + ", position " + pos }, fmt(value, true)));
      var text = el("span", { className: "ctx-text" });
      toks.forEach(function (sidx, j) {
        var s = STRINGS[sidx] || "";
        var a = acts ? acts[j] / 100 : (j === pos - start ? (value || 0) / scale : 0);
        var span = el("span", { className: "tok" }, showToken(s));
        if (a > 0) span.style.backgroundColor = "rgba(213, 94, 0, " + Math.min(1, a).toFixed(2) + ")";
        else if (a < 0) span.style.backgroundColor = "rgba(0, 114, 178, " + Math.min(1, -a).toFixed(2) + ")";
        if (j === pos - start) span.classList.add("top-tok");
        span.title = JSON.stringify(s) + (acts ? "  activation " + fmt(acts[j] / 100 * scale, true) : "");
        text.appendChild(span);
      });
      line.appendChild(text);
      col.appendChild(line);
    });
    return col;
  }

  function vocabList(title, items) {
    var box = el("div", { className: "vocab-list" }, el("h4", null, title));
    if (!items || !items.length) { box.appendChild(el("p", { className: "muted" }, "none stored")); return box; }
    var ol = el("ol");
    items.forEach(function (it) {
      ol.appendChild(el("li", null, el("code", { className: "tok-code" }, showToken(STRINGS[it[0]] || "")), " ", el("span", { className: "muted" }, fmt(it[1], true))));
    });
    box.appendChild(ol);
    return box;
  }

  function showNeuron(m, layer, neuron) {
    show("neuron");
    var view = $("view-neuron");
    clear(view);
    window.scrollTo(0, 0);
    var i = findRow(m, layer, neuron);
    var title = el("h1", null, address(layer, neuron), el("span", { className: "muted" }, " in " + modelName(m)));
    view.appendChild(el("p", null, el("a", { href: "#/neurons" }, "\u2190 all neurons")));
    view.appendChild(title);
    if (MODELS[m]) view.appendChild(el("p", { className: "muted spec" }, MODELS[m].spec));
    var badges = el("p", { className: "badges" });
    if (i >= 0) {
      if (cell("is_universal", i) === "yes") badges.appendChild(el("span", { className: "badge universal" }, "universal"));
      ["role", "family", "family_feature"].forEach(function (k) {
        var v = cell(k, i);
        if (v && v !== "none") badges.appendChild(el("span", { className: "badge" }, k + ": " + v));
      });
    }
    view.appendChild(badges);

    // matches in every other seed, and neurons that match this one
    var rel = related(m, layer, neuron), M = DATA.matches;
    var others = [];  // [model, layer, neuron, label] shown side by side
    var seen = {};
    seen[m] = true;
    if (rel.from.length || rel.to.length) {
      view.appendChild(el("h2", null, "Matches in other seeds"));
      var t = el("table", { className: "matches" });
      t.appendChild(el("thead", null, el("tr", null, el("th", null, "seed"), el("th", null, "neuron"), el("th", null, "\u03c1"), el("th", null, "baseline \u03c1"), el("th", null, "direction"))));
      var tb = el("tbody");
      rel.from.forEach(function (j) {
        var p = M.partner[j];
        tb.appendChild(el("tr", null, el("td", null, modelName(p)),
          el("td", null, el("a", { href: neuronHref(p, M.argmax_layer[j], M.argmax_neuron[j]) }, address(M.argmax_layer[j], M.argmax_neuron[j]))),
          el("td", { className: "num" }, corr(M.max_corr[j])), el("td", { className: "num" }, corr(M.baseline_corr[j])),
          el("td", { className: "muted" }, "its best match")));
        if (!seen[p]) { seen[p] = true; others.push([p, M.argmax_layer[j], M.argmax_neuron[j], "best match, \u03c1 " + corr(M.max_corr[j])]); }
      });
      rel.to.forEach(function (j) {
        var a = M.model[j];
        tb.appendChild(el("tr", null, el("td", null, modelName(a)),
          el("td", null, el("a", { href: neuronHref(a, M.layer[j], M.neuron[j]) }, address(M.layer[j], M.neuron[j]))),
          el("td", { className: "num" }, corr(M.max_corr[j])), el("td", { className: "num" }, corr(M.baseline_corr[j])),
          el("td", { className: "muted" }, "matches this neuron")));
        if (!seen[a]) { seen[a] = true; others.push([a, M.layer[j], M.neuron[j], "its best match is this neuron, \u03c1 " + corr(M.max_corr[j])]); }
      });
      t.appendChild(tb);
      view.appendChild(t);
    }

    view.appendChild(el("h2", null, "Top activating contexts"));
    view.appendChild(el("p", { className: "muted" }, "Shading: the neuron's activation on each token relative to its largest (orange positive, blue negative); outlined: the top-activating token."));
    var grid = el("div", { className: "ctx-grid" });
    grid.appendChild(contextsColumn(m, layer, neuron, "this neuron"));
    others.forEach(function (o) { grid.appendChild(contextsColumn(o[0], o[1], o[2], o[3])); });
    view.appendChild(grid);

    var v = (DATA.vocab || {})[m + ":" + layer + ":" + neuron];
    view.appendChild(el("h2", null, "Vocabulary"));
    if (v) {
      var vb = el("div", { className: "vocab" });
      vb.appendChild(vocabList("promoted (cos w_out, W_U)", v.out_top));
      vb.appendChild(vocabList("suppressed (cos w_out, W_U)", v.out_bottom));
      vb.appendChild(vocabList("read from (cos w_in, W_E)", v.in_top));
      view.appendChild(vb);
    } else {
      view.appendChild(el("p", { className: "muted" }, "No vocabulary tokens stored for this neuron."));
    }

    view.appendChild(el("h2", null, "Statistics"));
    if (i < 0) {
      view.appendChild(el("p", { className: "muted" }, "This neuron has no row in neurons.parquet."));
      return;
    }
    var dl = el("dl", { className: "stats" });
    NEURONS.columns.forEach(function (c) {
      var val = cell(c.name, i);
      if (val === null || val === undefined) return;
      dl.appendChild(el("div", { className: "stat" }, el("dt", null, c.name), el("dd", null, fmt(val, c.kind === "num"))));
    });
    view.appendChild(dl);
  }

  setupTable();
  window.addEventListener("hashchange", route);
  route();
})();
