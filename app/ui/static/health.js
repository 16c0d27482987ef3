"use strict";
// Health: readiness and revision, the /metrics counters as rates over the last minutes, size per run.
(() => {
  const { api, element, row, number, bytes, time, failed } = Eidetic;
  const POINTS = 60;
  const history = { t: [], requests: [], client: [], server: [], ingest: [] };
  let previous = null;
  let charts = null;

  async function readiness() {
    const response = await fetch("/readyz");
    const body = await response.json();
    const node = document.getElementById("readiness");
    node.textContent = body.status === "ok" ? "ready" : `not ready: ${body.reason || body.status}`;
    node.className = body.status === "ok" ? "status-finished" : "status-failed";
    document.getElementById("revision").textContent = body.revision || "–";
  }

  // Prometheus text: the totals the charts need, summed over their labels.
  function counters(text) {
    const totals = { requests: 0, client: 0, server: 0, ingest: 0 };
    for (const line of text.split("\n")) {
      if (line.startsWith("#")) continue;
      const match = line.match(/^(\w+)(\{[^}]*\})?\s+([0-9.eE+-]+)/);
      if (!match) continue;
      const [, name, labels = "", value] = match;
      if (name === "eidetic_http_requests_total") {
        totals.requests += Number(value);
        const code = (labels.match(/status="(\d+)"/) || [])[1];
        if (code && code >= 500) totals.server += Number(value);
        else if (code && code >= 400) totals.client += Number(value);
      } else if (name === "eidetic_ingested_rows_total") totals.ingest += Number(value);
    }
    return totals;
  }

  async function sample() {
    const text = await (await fetch("/metrics")).text();
    const now = Date.now() / 1000;
    const totals = counters(text);
    if (previous) {
      const seconds = Math.max(now - previous.t, 0.001);
      history.t.push(now);
      for (const name of ["requests", "client", "server", "ingest"]) {
        history[name].push(Math.max(totals[name] - previous.totals[name], 0) / seconds);
      }
      for (const series of Object.values(history)) if (series.length > POINTS) series.shift();
    }
    previous = { t: now, totals };
    draw();
  }

  function draw() {
    const line = (label, color) => ({ label, stroke: color, width: 1.5, fill: color + "22" });
    if (!charts) {
      charts = {
        requests: Eidetic.chart(document.getElementById("chart-requests"), { series: [{}, line("requests/s", "#1f77b4")] }, [[], []]),
        errors: Eidetic.chart(document.getElementById("chart-errors"),
          { series: [{}, line("4xx/s", "#ff7f0e"), line("5xx/s", "#d62728")] }, [[], [], []]),
        ingest: Eidetic.chart(document.getElementById("chart-ingest"), { series: [{}, line("rows/s", "#2ca02c")] }, [[], []]),
      };
    }
    charts.requests.setData([history.t, history.requests]);
    charts.errors.setData([history.t, history.client, history.server]);
    charts.ingest.setData([history.t, history.ingest]);
  }

  async function sizes() {
    const stats = await api("/v1/stats");
    document.getElementById("health-runs").textContent = number(stats.runs.length);
    document.getElementById("health-bytes").textContent = bytes(stats.runs.reduce((sum, r) => sum + r.bytes, 0));
    document.querySelector("#size-table tbody").replaceChildren(...stats.runs.map((run) => row([
      { text: run.name }, { text: number(run.rows), numeric: true }, { text: bytes(run.bytes), numeric: true },
      { text: time(run.last_ingest_at) }])));
  }

  window.addEventListener("themechange", () => { charts = null; draw(); });

  function tick() {
    readiness().catch(failed);
    sample().catch(failed);
  }
  tick();
  sizes().catch(failed);
  setInterval(() => { if (!document.hidden) tick(); }, 2000);
  setInterval(() => { if (!document.hidden) sizes().catch(failed); }, 10000);
  void element;
})();
