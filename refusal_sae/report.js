// The circuit report's script (refusal_sae/report.py inlines it into index.html): draws each circuit as a
// layered SVG graph from the embedded JSON and shows a node's card on hover or click. No network, no library.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const MAX_EDGES = 3000; // the strongest edges drawn per circuit; a denser picture shows nothing more
  const SIZES = [10, 20, 30, 50, 100, 200, 500]; // the size control's choices (and "all")

  // ---------------------------------------------------------------- node cards, one script per circuit
  // Each circuit's cards live in report/cards/<n>.js, which calls refusalReportCards when the circuit is first
  // opened: a <script> loads from the file system, where fetching a JSON file would be refused.
  data.cards = {};
  data.prompts = {};
  const loaded = new Map(); // cards file -> Promise
  const arrived = new Map(); // cards file -> resolve
  window.refusalReportCards = (file, payload) => {
    Object.assign(data.cards, payload.cards);
    Object.assign(data.prompts, payload.prompts);
    const done = arrived.get("cards/" + file);
    if (done) done();
  };
  function loadCards(circuit) {
    const file = circuit.cards_file;
    if (!loaded.has(file)) {
      loaded.set(file, new Promise((resolve, reject) => {
        arrived.set(file, resolve);
        const script = el("script", { src: file });
        script.onerror = () => reject(new Error(`${file} did not load`));
        document.head.appendChild(script);
      }));
    }
    return loaded.get(file);
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function fmt(x, digits) {
    return x === null || x === undefined ? "-" : Number(x).toFixed(digits === undefined ? 3 : digits);
  }
  function interval(x) {
    return x ? `${fmt(x.value, 2)} [${fmt(x.low, 2)}, ${fmt(x.high, 2)}]` : "null";
  }
  function table(head, rows) {
    const t = el("table");
    const tr = el("tr");
    head.forEach((h) => tr.appendChild(el("th", {}, h)));
    t.appendChild(tr);
    rows.forEach((r) => {
      const row = el("tr");
      r.forEach((c) => row.appendChild(el("td", {}, String(c))));
      t.appendChild(row);
    });
    return t;
  }
  function figure(parent, title, uri) {
    if (!uri) return;
    parent.appendChild(el("h3", {}, title));
    parent.appendChild(el("img", { class: "figure", src: uri, alt: title }));
  }

  // ---------------------------------------------------------------- the page's frame
  const header = el("header");
  header.appendChild(el("h1", {}, `Refusal circuits: ${data.analysis}`));
  const s = data.scheme;
  header.appendChild(el("div", { class: "note" }, `run ${data.run} · F: ${data.target} · position classes ` +
    `${data.classes.join(", ")} (shared prefix ${s.prefix}, suffix ${s.suffix} tokens) · click or hover a node for its card`));
  document.body.appendChild(header);
  const main = el("main");
  document.body.appendChild(main);
  const card = el("aside", { id: "card" });
  card.appendChild(el("p", { class: "note" }, "Click a node of a circuit to see what it is."));
  document.body.appendChild(card);

  // ---------------------------------------------------------------- the node card
  const highlight = (v, peak) => `rgba(255, 140, 0, ${Math.min(1, 0.15 + 0.85 * v / (peak || 1)).toFixed(2)})`;

  function classOf(position, length) {
    if (s.mode === "global") return "all";
    if (position < s.prefix) return "prefix";
    if (position >= length - s.suffix) return String(position - length);
    return "content";
  }

  function contextBlock(c, node) {
    const p = data.prompts[String(c.prompt)];
    const box = el("div", { class: "context" });
    box.appendChild(el("div", { class: "meta" },
      `${p.category} · ${p.label} · ${p.split} · peak ${fmt(c.peak)} · prompt ${c.prompt}`));
    const values = new Map(c.values.map(([pos, v]) => [pos, v]));
    const tokens = el("div", { class: "tokens" });
    p.tokens.forEach((t, pos) => {
      const cls = classOf(pos, p.tokens.length);
      if (cls === "prefix") return; // the shared template start: the same in every prompt, never a node
      const span = el("span", { class: "tok" + (cls === node.position ? " at" : "") }, t.replace(/\n/g, "⏎"));
      const v = values.get(pos);
      if (v !== undefined) {
        span.style.background = highlight(v, c.peak);
        span.title = `${fmt(v)} (${cls})`;
      }
      tokens.appendChild(span);
    });
    box.appendChild(tokens);
    return box;
  }

  function showCard(name, circuit) {
    const c = data.cards[name];
    card.replaceChildren();
    document.querySelectorAll("svg .node.selected").forEach((n) => n.classList.remove("selected"));
    document.querySelectorAll(`svg .node[data-node="${CSS.escape(name)}"]`).forEach((n) => n.classList.add("selected"));
    if (!c && circuit && !card.loading) {
      card.appendChild(el("p", { class: "note" }, `${name}: loading its card…`));
      card.loading = true;
      loadCards(circuit).then(() => { card.loading = false; showCard(name); },
        (e) => { card.loading = false; card.replaceChildren(el("p", {}, `${name}: ${e.message}`)); });
      return;
    }
    if (!c) {
      card.appendChild(el("p", {}, `${name}: no card (the report has cards for each circuit's ` +
        `${data.card_nodes} most important nodes)`));
      return;
    }
    card.setAttribute("data-node", name);
    const error = c.feature < 0;
    card.appendChild(el("h2", {}, c.name));
    card.appendChild(el("div", { class: "note" }, error
      ? `the SAE error term of ${c.layer} at position class ${c.position}`
      : `latent ${c.feature} of the ${c.layer} SAE at position class ${c.position}`));
    card.appendChild(el("p", {}, `in ${c.circuits.length} circuit(s): ${c.circuits.join(", ")}` +
      (c.shared_core.length ? ` · shared core of ${c.shared_core.join(", ")}` : "")));
    if (!error) {
      card.appendChild(el("h3", {}, "Logit lens (decoder direction through final norm and unembedding)"));
      for (const [label, list] of [["promotes", c.promoted], ["suppresses", c.suppressed]]) {
        const line = el("div", { class: "lens" });
        line.appendChild(el("b", {}, label + " "));
        list.forEach(([t, v]) => line.appendChild(el("span", { title: fmt(v, 2) }, JSON.stringify(t))));
        card.appendChild(line);
      }
      const cos = Object.entries(c.cosines);
      if (cos.length) {
        card.appendChild(el("h3", {}, `Cosine with the refusal directions (${data.directions.layer === c.layer ?
          "the chosen layer" : c.layer}, position ${data.directions.position})`));
        card.appendChild(table(["direction", "cosine"], cos.map(([n, v]) => [n, fmt(v)])));
      }
    }
    card.appendChild(el("h3", {}, `Top contexts (largest at ${c.position}; orange: where it fires, underlined: ${c.position} tokens)`));
    if (!c.contexts.length) card.appendChild(el("p", { class: "note" }, "never fires at this position class"));
    const contexts = el("div", { class: "contexts" });
    c.contexts.forEach((x) => contexts.appendChild(contextBlock(x, c)));
    card.appendChild(contexts);
    card.appendChild(el("h3", {}, error ? "Error norm by category (mean over the class's tokens)"
      : "By category (density: share of the class's tokens where it fires; mean activation)"));
    const groups = {};
    c.stats.forEach((g) => { (groups[g.category] = groups[g.category] || {})[g.label] = g; });
    card.appendChild(table(error ? ["category", "toxic norm", "safe norm"]
      : ["category", "toxic density", "toxic mean", "safe density", "safe mean"],
    Object.entries(groups).map(([cat, g]) => error
      ? [cat, fmt(g.toxic && g.toxic.mean), fmt(g.safe && g.safe.mean)]
      : [cat, fmt(g.toxic && g.toxic.density), fmt(g.toxic && g.toxic.mean),
        fmt(g.safe && g.safe.density), fmt(g.safe && g.safe.mean)])));
    card.appendChild(el("h3", {}, "Scores in every circuit"));
    card.appendChild(table(["method", "circuit", "importance", "signed", "in circuit"],
      c.scores.map((x) => [x.method, x.circuit, fmt(x.importance), fmt(x.score), x.in_circuit ? "yes" : ""])));
  }

  // ---------------------------------------------------------------- the circuit graph
  function drawCircuit(circuit, method, size) {
    const classes = data.classes, layers = data.layers;
    const colW = 120, dy = 16, top = 40, left = 20;
    const columns = new Map();
    const shown = circuit.nodes.slice(0, size); // the most important first
    shown.forEach((n) => {
      const key = layers.indexOf(n.layer) * classes.length + classes.indexOf(n.position);
      if (!columns.has(key)) columns.set(key, []);
      columns.get(key).push(n);
    });
    const maxImp = Math.max(1e-9, ...shown.map((n) => Math.abs(n.importance)));
    const place = new Map();
    let height = top + 20;
    const used = [...columns.keys()].sort((a, b) => a - b);
    const colIndex = new Map();
    // every (layer, class) column of the layers, so the picture reads the same across circuits
    for (let l = 0; l < layers.length; l++) for (let c = 0; c < classes.length; c++) colIndex.set(l * classes.length + c, colIndex.size);
    used.forEach((key) => {
      const nodes = columns.get(key).sort((a, b) => b.importance - a.importance);
      nodes.forEach((n, i) => {
        const x = left + colIndex.get(key) * colW + 12;
        const y = top + i * dy;
        place.set(n.name, [x, y]);
        height = Math.max(height, y + 20);
      });
    });
    const width = left * 2 + colIndex.size * colW;
    const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, "data-circuit": `${method}/${circuit.name}` });
    layers.forEach((layer, l) => {
      const x = left + l * classes.length * colW;
      svg.appendChild(svgEl("line", { x1: x, x2: x, y1: 0, y2: height, stroke: "#ddd" }));
      const t = svgEl("text", { x: x + 4, y: 13 });
      t.textContent = layer;
      svg.appendChild(t);
      classes.forEach((cls, c) => {
        const u = svgEl("text", { x: x + c * colW + 6, y: 28 });
        u.textContent = cls;
        svg.appendChild(u);
      });
    });
    const edges = circuit.edges.filter((e) => place.has(e[0]) && place.has(e[1]))
      .sort((a, b) => Math.abs(b[2]) - Math.abs(a[2])).slice(0, MAX_EDGES);
    const maxW = Math.max(1e-9, ...edges.map((e) => Math.abs(e[2])));
    const edgeGroup = svgEl("g");
    edges.forEach(([a, b, w]) => {
      const [x1, y1] = place.get(a), [x2, y2] = place.get(b);
      const line = svgEl("line", { class: "edge", x1, y1, x2, y2, stroke: w < 0 ? "#3b7dd8" : "#d9534f",
        "stroke-opacity": (0.15 + 0.6 * Math.abs(w) / maxW).toFixed(2),
        "stroke-width": (0.5 + 2.5 * Math.abs(w) / maxW).toFixed(2) });
      const title = svgEl("title");
      title.textContent = `${a} → ${b}: ${fmt(w)}`;
      line.appendChild(title);
      edgeGroup.appendChild(line);
    });
    svg.appendChild(edgeGroup);
    shown.forEach((n) => {
      const [x, y] = place.get(n.name);
      const r = 2 + 5 * Math.sqrt(Math.abs(n.importance) / maxImp);
      const sign = n.score === null ? 0 : Math.sign(n.score);
      const fill = n.error ? "#bbb" : sign > 0 ? "#d9534f" : sign < 0 ? "#3b7dd8" : "#8a6";
      const dot = svgEl("circle", { class: "node" + (n.error ? " error" : ""), cx: x, cy: y, r: r.toFixed(2), fill,
        "data-node": n.name });
      const title = svgEl("title");
      title.textContent = `${n.name}\nimportance ${fmt(n.importance)}, score ${fmt(n.score)}`;
      dot.appendChild(title);
      dot.addEventListener("click", () => showCard(n.name, circuit));
      dot.addEventListener("mouseenter", () => { if (!card.getAttribute("data-node")) showCard(n.name, circuit); });
      svg.appendChild(dot);
      if (n.label) {
        const label = svgEl("text", { class: "label", x: x + 9, y: y + 3, "data-node": n.name });
        label.textContent = n.label;
        svg.appendChild(label);
      }
    });
    return svg;
  }

  // ---------------------------------------------------------------- answers under edits (the edit stage)
  function rate(r) {
    return r.rate === null ? "n/a" : `${r.refused}/${r.n} (${interval(r.rate)})`;
  }

  function answersBlock(records) {
    const block = el("div", { class: "answers" });
    block.appendChild(el("h3", {}, "What the model says under each edit"));
    block.appendChild(el("p", { class: "note" }, "Greedy answers of the held-out toxic and hard prompts; refused: " +
      "the validity report's string match, 95% Wilson interval; coherence: change of the log-likelihood per token " +
      "of the unedited answers. Pick an edit to read its answers beside the unedited ones."));
    records.forEach((r) => {
      const details = el("details", { "data-category": r.category });
      details.appendChild(el("summary", {}, `${r.category}: circuit ${r.circuit}, ${r.size} nodes (${r.size_reason})` +
        (r.edit_generated ? ", generated tokens edited too" : ", prompt positions edited")));
      details.appendChild(table(["edit", "toxic refused", "hard refused", "coherence change"], r.outcomes.map((o) =>
        [o.edit, rate(o.toxic), rate(o.hard), interval(o.coherence_change)])));
      const select = el("select");
      r.outcomes.forEach((o, i) => { if (i > 0) select.appendChild(el("option", { value: String(i) }, o.edit)); });
      details.appendChild(select);
      const holder = el("div");
      const show = () => {
        const edited = r.outcomes[Number(select.value)], base = r.outcomes[0];
        holder.replaceChildren(table(["prompt", "set", base.edit, edited.edit], r.prompts.map((p, i) =>
          [p, i < r.n_toxic ? "toxic" : "hard", base.answers[i], edited.answers[i]])));
      };
      select.addEventListener("change", show);
      if (r.outcomes.length > 1) show();
      details.appendChild(holder);
      block.appendChild(details);
    });
    return block;
  }

  // ---------------------------------------------------------------- sections
  data.methods.forEach((m, mi) => {
    const section = el("section", { "data-method": m.name });
    section.appendChild(el("h2", {}, `${m.name} circuits`));
    const nav = el("nav", { class: "tabs" });
    section.appendChild(nav);
    const panes = [];
    m.circuits.forEach((c, ci) => {
      const button = el("button", { "data-circuit": `${m.name}/${c.name}` }, `${c.name} (${c.nodes.length})`);
      const pane = el("div", { class: "circuit", "data-circuit": `${m.name}/${c.name}` });
      const ev = c.evaluation;
      pane.appendChild(el("p", { class: "note" }, `${c.nodes.length} nodes, ${c.n_edges} edges ` +
        `(the ${c.edges.length} among each node's ${data.edges_per_node} strongest drawn), ` +
        `threshold ${fmt(c.threshold, 2)}, ${c.n_prompts} discovery prompts` + (ev ? ` · F(M) - F(∅) ${interval(ev.span)}` +
        ` · faithfulness 0.5 / 0.8 at ${ev.reaches["0.5"] ?? "-"} / ${ev.reaches["0.8"] ?? "-"} of ${ev.n_candidates}` +
        ` nodes · CPR ${interval(ev.cpr)} · sanity ${ev.sanity_passed === null ? "not tested" : ev.sanity_passed ? "ok" : "FAILED"}` : " · not evaluated") +
        " · colour: red raises, blue lowers the signed score; grey: SAE error"));
      const graph = el("div", { class: "graph" });
      const control = el("label", { class: "size" }, "nodes shown (most important first): ");
      const select = el("select", { "data-circuit": `${m.name}/${c.name}` });
      const sizes = [...new Set([...SIZES.filter((k) => k < c.nodes.length), c.default_size])].sort((a, b) => a - b);
      sizes.forEach((k) => select.appendChild(el("option", { value: String(k) }, String(k) +
        (k === c.default_size ? (ev && ev.reaches["0.8"] === k ? " (faithfulness 0.8)" : " (top)") : ""))));
      select.appendChild(el("option", { value: String(c.nodes.length) }, `all ${c.nodes.length}`));
      select.value = String(c.default_size);
      control.appendChild(select);
      const draw = () => graph.replaceChildren(drawCircuit(c, m.name, Number(select.value)));
      select.addEventListener("change", draw);
      if (c.measurable === false) { // nothing to explain: say so instead of drawing a graph
        const why = el("p", { class: "unmeasurable" }, `Nothing measurable to explain: F(M) - F(∅) = ` +
          `${interval(ev.span)} does not lie above 0 on the held-out prompts, so no size of this circuit can be ` +
          "faithful; the graph is not drawn. ");
        const anyway = el("button", {}, "draw it anyway");
        anyway.addEventListener("click", () => { why.remove(); pane.insertBefore(control, graph); draw(); });
        why.appendChild(anyway);
        pane.appendChild(why);
      } else {
        pane.appendChild(control);
        draw();
      }
      pane.appendChild(graph);
      button.addEventListener("click", () => {
        panes.forEach(([b, p]) => { b.classList.remove("active"); p.classList.remove("active"); });
        button.classList.add("active");
        pane.classList.add("active");
        loadCards(c).catch(() => {}); // ready before the first click
      });
      panes.push([button, pane]);
      nav.appendChild(button);
      section.appendChild(pane);
      if (ci === 0) { button.classList.add("active"); pane.classList.add("active"); loadCards(c).catch(() => {}); }
    });
    if (m.verdict) section.appendChild(el("p", {}, m.verdict));
    if (m.shared_core.length) {
      const core = el("p", {}, "Shared core: ");
      m.shared_core.forEach((name) => {
        const a = el("a", { href: "#", "data-node": name }, name);
        a.addEventListener("click", (e) => {
          e.preventDefault();
          showCard(name, m.circuits.find((c) => c.nodes.some((n) => n.name === name && n.card)));
        });
        core.appendChild(a);
        core.appendChild(document.createTextNode(" "));
      });
      section.appendChild(core);
    }
    figure(section, "Faithfulness and completeness against circuit size", m.curves);
    figure(section, "Similarity of the category circuits", m.similarity_png);
    if (m.answers.length) section.appendChild(answersBlock(m.answers));
    main.appendChild(section);
  });
  if (data.comparison || data.directions || data.summary_html || data.validity || data.tradeoff) {
    const rest = el("section");
    figure(rest, "Methods side by side", data.comparison);
    if (data.directions) {
      figure(rest, `Refusal directions (${data.directions.layer}, position ${data.directions.position})`, data.directions.png);
      rest.appendChild(el("p", {}, data.directions.verdict));
    }
    if (data.tradeoff) {
      const t = data.tradeoff;
      rest.appendChild(el("h2", {}, "Lowering over-refusal"));
      figure(rest, "Toxic refusal against over-refusal, three edits swept", t.png);
      if (t.tables_html) {
        const div = el("div");
        div.innerHTML = t.tables_html; // built and escaped by refusal_sae.report.markdown_tables
        rest.appendChild(div);
      }
      const details = el("details");
      details.appendChild(el("summary", {}, "Every held-out answer under each method's chosen edit"));
      details.appendChild(table(t.columns, t.answers));
      rest.appendChild(details);
    }
    if (data.summary_html) {
      rest.appendChild(el("h2", {}, "Results"));
      const div = el("div");
      div.innerHTML = data.summary_html; // built and escaped by refusal_sae.report.markdown_tables
      rest.appendChild(div);
    }
    if (data.validity) {
      const v = data.validity;
      rest.appendChild(el("h2", {}, "Does the refusal score predict refusals? (metric validity)"));
      rest.appendChild(table(["measure", "value"], [["prompts", v.n_prompts], ["refused (greedy answers)", v.n_refused],
        ["refusal rate", fmt(v.refusal_rate)], ["AUC score vs refusal", fmt(v.auc_score_vs_refusal)],
        ["AUC label vs refusal", fmt(v.auc_label_vs_refusal)], ["AUC score vs label", fmt(v.auc_score_vs_label)]]));
    }
    main.appendChild(rest);
  }
  document.body.setAttribute("data-ready", "1");
})();
