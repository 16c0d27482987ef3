"use strict";
// Layer: one unit's percentile bands over steps, its histogram with a quantile set's boundaries,
// and a units x statistics heat map. Every chart is drawn from an aggregate route; on a large
// layer those read a block sample, and the page says so.
(() => {
  const { api, query, element, number, failed, say } = Eidetic;
  const runId = document.body.dataset.runId;
  const layerId = document.body.dataset.layerId;
  const base = `/v1/runs/${runId}/layers/${layerId}`;
  const form = document.getElementById("layer-form");
  const setSelect = document.getElementById("quantile-set");
  let layer = null;
  let boundaries = null; // the chosen quantile set's boundaries, units x (Q - 1)
  let shown = null; // the answers drawn last: redrawn as they are when the theme changes

  function filters() {
    const data = new FormData(form);
    const pick = (name) => (data.get(name) || "").toString().trim();
    return { task: pick("task"), label: pick("label"), epoch: pick("epoch"), step_min: pick("step_min"), step_max: pick("step_max") };
  }

  async function start() {
    const [run, found] = await Promise.all([api(`/v1/runs/${runId}`), api(base)]);
    layer = found;
    document.getElementById("layer-title").textContent = `${run.name} / ${layer.name} · ${layer.dim} units`;
    document.title = `${layer.name} · Eidetic`;
    form.elements.unit.max = layer.dim - 1;
    const { sets } = await api(`${base}/quantiles?limit=100`);
    for (const set of sets) {
      const rows = `${number(set.rows)} rows`;
      setSelect.append(element("option", `v${set.version} · Q=${set.n_quantiles} · ${set.method} · ${rows}`, { value: set.id }));
    }
    if (sets.length) setSelect.value = String(sets[0].id); // the newest
    await Promise.all([refresh(), pickSet()]);
  }

  async function pickSet() {
    boundaries = setSelect.value ? (await api(`/v1/quantile-sets/${setSelect.value}`)).boundaries : null;
    if (shown) drawHistogram(shown.histogram, shown.unit);
  }

  // What an aggregate read: every selected row, or a block sample of a large layer.
  function readNote(answer) {
    return answer.sampled
      ? `a block sample (${number(answer.sample_percent)}% of the pages of ${number(answer.layer_rows)} rows)`
      : "every row";
  }

  async function refresh() {
    const data = new FormData(form);
    const unit = Number(data.get("unit"));
    const where = filters();
    document.getElementById("arrow-link").href = `${base}/activations${query({ ...where, format: "arrow" })}`;
    const [distribution, histogram, summary] = await Promise.all([
      api(`${base}/distribution${query({ unit, buckets: data.get("buckets"), ...where })}`),
      api(`${base}/histogram${query({ unit, bins: data.get("bins"), ...where })}`),
      api(`${base}/summary${query({ ...where, sample: true })}`),
    ]);
    say("");
    shown = { distribution, histogram, summary, unit };
    draw();
  }

  function draw() {
    drawDistribution(shown.distribution);
    drawHistogram(shown.histogram, shown.unit);
    drawHeatmap(shown.summary, shown.unit);
    const note = document.getElementById("sample-note");
    note.textContent = shown.histogram.sampled
      ? `Large layer: these charts read ${readNote(shown.histogram)}; the row counts below are of the sample.`
      : "";
    note.dataset.sampled = String(Boolean(shown.histogram.sampled));
  }

  function drawDistribution(found) {
    const box = document.getElementById("chart-distribution");
    document.getElementById("distribution-caption").textContent =
      `Unit ${found.unit} over steps: percentiles ${found.percentiles.join(", ")} (${found.buckets.length} step buckets, ${readNote(found)})`;
    const x = found.buckets.map((b) => (b.step_min + b.step_max) / 2);
    const series = found.percentiles.map((_, i) => found.buckets.map((b) => b.values[i]));
    const middle = (found.percentiles.length - 1) / 2;
    const bands = [];
    const n = found.percentiles.length;
    for (let i = 0; i < middle; i += 1) {  // p[i]..p[n-1-i]: the series after x, outermost first
      bands.push({ series: [n - i, i + 1], fill: `rgba(31, 111, 235, ${0.08 + 0.06 * i})` });
    }
    Eidetic.chart(box, {
      scales: { x: { time: false } },
      bands,
      series: [{ label: "step" }, ...found.percentiles.map((p, i) => ({
        label: `p${p}`, stroke: i === middle ? "#1f6feb" : "rgba(31, 111, 235, 0.45)", width: i === middle ? 2 : 1,
      }))],
    }, [x, ...series]);
  }

  function drawHistogram(found, unit) {
    const box = document.getElementById("chart-histogram");
    const lines = boundaries && boundaries[unit] ? boundaries[unit] : [];
    document.getElementById("histogram-caption").textContent =
      `Unit ${unit}: ${number(found.rows)} rows in ${found.counts.length} bins` + (found.sampled ? " (sampled)" : "") +
      (lines.length ? `; ${lines.length} quantile boundaries (dashed)` : setSelect.options.length > 1 ? "" : "; no quantile set yet");
    const centres = found.counts.map((_, i) => (found.edges[i] + found.edges[i + 1]) / 2);
    const accent = Eidetic.css("--bad") || "#c62828";
    Eidetic.chart(box, {
      scales: { x: { time: false, range: found.edges.length ? [found.edges[0], found.edges[found.edges.length - 1]] : undefined } },
      series: [{ label: "value" }, { label: "rows", stroke: "#1f77b4", fill: "rgba(31, 119, 180, 0.35)", paths: uPlot.paths.bars({ size: [1, Infinity] }) }],
      hooks: {
        draw: [(plot) => {
          const context = plot.ctx;
          context.save();
          context.strokeStyle = accent;
          context.setLineDash([4, 3]);
          for (const value of lines) {
            const left = plot.valToPos(value, "x", true);
            context.beginPath();
            context.moveTo(left, plot.bbox.top);
            context.lineTo(left, plot.bbox.top + plot.bbox.height);
            context.stroke();
          }
          context.restore();
        }],
      },
    }, [centres, found.counts]);
    box.dataset.boundaries = String(lines.length);
  }

  const STATS = ["mean", "std", "min", "max"];
  function drawHeatmap(summary, unit) {
    const canvas = document.getElementById("unit-heatmap");
    const units = summary.mean.length;
    const width = canvas.clientWidth || 1000;
    canvas.width = width;
    const label = 48, rowHeight = 26;
    canvas.height = rowHeight * STATS.length + 4;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    const cell = (width - label) / units;
    context.font = "12px system-ui";
    STATS.forEach((name, r) => {
      const values = summary[name].map((v) => (v === null ? NaN : v));
      const finite = values.filter(Number.isFinite);
      const low = Math.min(...finite), high = Math.max(...finite);
      context.fillStyle = Eidetic.css("--fg");
      context.fillText(name, 4, r * rowHeight + 17);
      values.forEach((value, u) => {
        const share = Number.isFinite(value) && high > low ? (value - low) / (high - low) : 0.5;
        context.fillStyle = Number.isFinite(value) ? `hsl(${240 - 240 * share}, 70%, 50%)` : "#888";
        context.fillRect(label + u * cell, r * rowHeight + 2, Math.max(cell - (cell > 4 ? 1 : 0), 1), rowHeight - 2);
      });
    });
    context.strokeStyle = Eidetic.css("--fg");
    context.lineWidth = 2;
    context.strokeRect(label + unit * cell, 1, Math.max(cell, 2), rowHeight * STATS.length);
    canvas.dataset.units = String(units);
    document.getElementById("heatmap-note").textContent =
      `${number(summary.rows)} rows${summary.sampled ? " (sampled)" : ""} · unit ${unit}: mean ${number(summary.mean[unit])}, std ${number(summary.std[unit])}, ` +
      `min ${number(summary.min[unit])}, max ${number(summary.max[unit])}`;
    canvas.onclick = (event) => {
      const picked = Math.floor((event.offsetX * (canvas.width / canvas.clientWidth) - label) / cell);
      if (picked >= 0 && picked < units) { form.elements.unit.value = picked; refresh().catch(failed); }
    };
  }

  // The Arrow download carries the key in a header when one is kept (never in the URL).
  document.getElementById("arrow-link").addEventListener("click", async (event) => {
    if (!Eidetic.key()) return;
    event.preventDefault();
    const response = await fetch(event.currentTarget.href, { headers: { Authorization: "Bearer " + Eidetic.key() } });
    if (!response.ok) { say(`download failed: HTTP ${response.status}`); return; }
    const link = element("a", null, { href: URL.createObjectURL(await response.blob()), download: `layer-${layerId}.arrow` });
    link.click();
    URL.revokeObjectURL(link.href);
  });
  form.addEventListener("submit", (event) => { event.preventDefault(); refresh().catch(failed); });
  setSelect.addEventListener("change", () => pickSet().catch(failed));
  window.addEventListener("themechange", () => { if (shown) draw(); });
  start().catch(failed);
})();
