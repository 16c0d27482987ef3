"use strict";
// Runs: the table (filter, sort, live ingest rate) and one run's config, layers and metrics.
(() => {
  const { api, element, row, number, bytes, time, failed, say } = Eidetic;
  const body = document.querySelector("#runs-table tbody");
  let runs = [];
  let sort = { key: "created_at", descending: true };
  let selected = null;

  async function load() {
    const [list, stats] = await Promise.all([api("/v1/runs?limit=1000"), api("/v1/stats")]);
    const byRun = new Map(stats.runs.map((s) => [s.run_id, s]));
    runs = list.runs.map((run) => {
      const s = byRun.get(run.id) || { rows: 0, layers: 0, bytes: 0, rows_last_minute: 0 };
      return { ...run, rows: s.rows, layers: s.layers, bytes: s.bytes, rate: s.rows_last_minute / 60 };
    });
    say("");
    draw();
  }

  function shown() {
    const text = document.getElementById("run-filter").value.toLowerCase();
    const wanted = document.getElementById("run-status").value;
    const kept = runs.filter((run) => (!wanted || run.status === wanted) &&
      (!text || run.name.toLowerCase().includes(text) || JSON.stringify(run.config).toLowerCase().includes(text)));
    const sign = sort.descending ? -1 : 1;
    return kept.sort((a, b) => (a[sort.key] < b[sort.key] ? -sign : a[sort.key] > b[sort.key] ? sign : 0));
  }

  function draw() {
    const visible = shown();
    body.replaceChildren(...visible.map((run) => {
      const name = element("button", run.name, { type: "button", class: "link" });
      name.addEventListener("click", () => open(run.id));
      const tr = row([name, { text: run.status }, { text: time(run.created_at) }, { text: number(run.rows), numeric: true },
        { text: number(run.layers), numeric: true }, { text: run.rate.toFixed(1), numeric: true },
        { text: bytes(run.bytes), numeric: true }]);
      tr.children[1].className = "status-" + run.status;
      tr.dataset.runId = run.id;
      if (run.id === selected) tr.setAttribute("aria-selected", "true");
      return tr;
    }));
    document.getElementById("run-count").textContent =
      `${visible.length} of ${runs.length} run${runs.length === 1 ? "" : "s"}`;
  }

  async function open(runId) {
    selected = runId;
    draw();
    const run = runs.find((r) => r.id === runId);
    const section = document.getElementById("run-detail");
    section.hidden = false;
    document.getElementById("run-title").textContent = `${run.name} (run ${run.id})`;
    document.getElementById("run-config").textContent = JSON.stringify(run.config, null, 2);
    const layers = await api(`/v1/runs/${runId}/layers`);
    const list = document.getElementById("run-layers");
    list.replaceChildren(...layers.layers.map((layer) => {
      const item = element("li");
      item.append(element("a", layer.name, { href: `/ui/runs/${runId}/layers/${layer.id}` }),
        element("span", ` · ${layer.dim} units · ${layer.kind}`, { class: "muted" }));
      return item;
    }));
    if (!layers.layers.length) list.append(element("li", "no layers", { class: "muted" }));
    drawMetrics(run.metrics || {});
  }

  // Metrics as recorded by an experiment: accuracy matrices as heat maps, the continual-learning
  // scalars as cards, and every list of numbers as a learning curve.
  function drawMetrics(metrics) {
    const target = document.getElementById("run-metrics");
    target.replaceChildren();
    const matrices = [], scalars = [], curves = [];
    const isNumbers = (v) => Array.isArray(v) && v.length > 1 && v.every((x) => typeof x === "number");
    (function walk(value, path) {
      if (value === null || typeof value !== "object") {
        if (typeof value === "number") scalars.push([path.join("."), value]);
        return;
      }
      if (Array.isArray(value) && value.length && value.every((r) => Array.isArray(r) && r.every((x) => typeof x === "number"))
          && /accuracy|matrix/.test(path[path.length - 1] || "")) { matrices.push([path.join("."), value]); return; }
      if (isNumbers(value)) { curves.push([path.join("."), value]); return; }
      for (const [name, inner] of Object.entries(value)) walk(inner, [...path, name]);
    })(metrics, []);
    if (!matrices.length && !scalars.length && !curves.length) {
      target.append(element("p", "No metrics recorded for this run.", { class: "muted" }));
      return;
    }
    target.append(element("h3", "Metrics"));
    const highlight = /backward_transfer|bwt|forgetting|average_accuracy|forward_transfer/i;
    const cards = element("dl", null, { class: "cards", id: "metric-cards" });
    for (const [name, value] of scalars.sort((a, b) => highlight.test(b[0]) - highlight.test(a[0]))) {
      const card = element("div");
      card.append(element("dt", name), element("dd", number(value)));
      cards.append(card);
    }
    target.append(cards);
    for (const [name, matrix] of matrices) target.append(heatTable(name, matrix));
    if (curves.length) {
      const figure = element("figure");
      const box = element("div", null, { class: "chart", id: "chart-curves" });
      figure.append(element("figcaption", "Learning curves"), box);
      target.append(figure);
      const length = Math.max(...curves.map(([, v]) => v.length));
      const x = Array.from({ length }, (_, i) => i);
      const data = [x, ...curves.slice(0, 12).map(([, v]) => x.map((i) => (i < v.length ? v[i] : null)))];
      Eidetic.chart(box, {
        scales: { x: { time: false } },
        series: [{ label: "point" }, ...curves.slice(0, 12).map(([name], i) => ({ label: name, stroke: Eidetic.palette[i % 10], width: 1.5 }))],
      }, data);
    }
  }

  function heatTable(name, matrix) {
    const figure = element("figure");
    figure.append(element("figcaption", `${name} (row: after training task i; column: tested on task j)`));
    const table = element("table", null, { class: "heat", "data-matrix": name });
    const values = matrix.flat();
    const low = Math.min(...values), high = Math.max(...values);
    const head = element("tr");
    head.append(element("th", ""), ...matrix[0].map((_, j) => element("th", `task ${j}`)));
    table.append(head);
    matrix.forEach((cells, i) => {
      const tr = element("tr");
      tr.append(element("th", `after ${i}`));
      for (const value of cells) {
        const share = high > low ? (value - low) / (high - low) : 1;
        const td = element("td", number(value));
        td.style.background = `hsla(${Math.round(share * 120)}, 65%, 45%, ${0.25 + 0.6 * share})`;
        tr.append(td);
      }
      table.append(tr);
    });
    figure.append(table);
    return figure;
  }

  for (const button of document.querySelectorAll("#runs-table th button")) {
    button.parentElement.setAttribute("aria-sort", "none");
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      sort = { key, descending: sort.key === key ? !sort.descending : true };
      for (const th of document.querySelectorAll("#runs-table th")) th.setAttribute("aria-sort", "none");
      button.parentElement.setAttribute("aria-sort", sort.descending ? "descending" : "ascending");
      draw();
    });
  }
  window.addEventListener("themechange", () => {
    const run = runs.find((r) => r.id === selected);
    if (run) drawMetrics(run.metrics || {});
  });
  document.getElementById("run-filter").addEventListener("input", draw);
  document.getElementById("run-status").addEventListener("change", draw);
  load().catch(failed);
  setInterval(() => { if (!document.hidden) load().catch(failed); }, 5000);
})();
