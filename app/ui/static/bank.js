"use strict";
// One memory bank: its numbers, items by label (scores and hits), neighbours of an item or of a
// pasted key, and a 2-D projection of a sample of its keys coloured by label.
(() => {
  const { api, query, element, row, number, failed, say, palette } = Eidetic;
  const bankId = document.body.dataset.bankId;
  const base = `/v1/memory-banks/${bankId}`;
  const itemsBody = document.querySelector("#items-table tbody");
  const more = document.getElementById("items-more");
  let after = 0;
  let bank = null;

  async function start() {
    bank = await api(base);
    document.getElementById("bank-title").textContent = `${bank.name} · ${bank.dim}-d ${bank.metric} keys`;
    document.title = `${bank.name} · Eidetic`;
    const cards = document.getElementById("bank-cards");
    const fill = bank.capacity ? (100 * bank.size) / bank.capacity : 0;
    for (const [name, value] of [["Size", `${number(bank.size)} / ${number(bank.capacity)} (${fill.toFixed(1)}%)`],
      ["Policy", bank.policy], ["Version", number(bank.version)], ["Similarity threshold", number(bank.similarity_threshold)]]) {
      const card = element("div");
      card.append(element("dt", name), element("dd", value));
      cards.append(card);
    }
    await Promise.all([items(true), projection(), loadFill()]);
  }

  // Fill over time: the bank's size after each change (its size history), and its capacity.
  let filled = null;
  async function loadFill() {
    filled = await api(`${base}/fill?points=200`);
    drawFill();
  }

  function drawFill() {
    const found = filled;
    document.getElementById("fill-caption").textContent = found.versions.length
      ? `Size over time, ${number(found.versions.length)} of ${number(found.version)} changes; capacity ${number(found.capacity)}`
      : "Size over time: nothing written yet";
    const line = (label, colour, dash) => ({ label, stroke: colour, width: 1.5, dash });
    Eidetic.chart(document.getElementById("chart-fill"), {
      series: [{ label: "time" }, line("size", palette[0]), line("capacity", palette[7], [4, 3])],
    }, [found.times, found.sizes, found.times.map(() => found.capacity)]);
  }
  window.addEventListener("themechange", () => { if (filled) drawFill(); });

  async function items(first) {
    if (first) { after = 0; itemsBody.replaceChildren(); }
    const label = document.getElementById("label-select").value;
    const page = await api(`${base}/items${query({ label, after_id: after, limit: 50 })}`);
    const select = document.getElementById("label-select");
    if (select.options.length === 1) {
      for (const count of page.labels) {
        if (count.label === null) continue;
        select.append(element("option", `${count.label} (${number(count.items)})`, { value: count.label }));
      }
    }
    for (const item of page.items) {
      const pick = element("button", "Neighbours", { type: "button", "data-item": item.id });
      pick.addEventListener("click", () => itemNeighbours(item.id).catch(failed));
      const tr = row([{ text: item.id, numeric: true }, { text: item.label ?? "–", numeric: true },
        { text: number(item.confidence), numeric: true }, { text: number(item.hits), numeric: true },
        { text: number(item.version), numeric: true }, pick]);
      tr.dataset.itemId = item.id;
      itemsBody.append(tr);
    }
    after = page.next_after_id || 0;
    more.hidden = page.next_after_id === null;
  }

  function showNeighbours(title, found) {
    document.getElementById("neighbours-of").textContent = title;
    document.querySelector("#neighbours-table tbody").replaceChildren(...found.ids.map((id, i) => {
      const tr = row([{ text: i + 1, numeric: true }, { text: id, numeric: true },
        { text: found.scores[i].toFixed(4), numeric: true }, { text: found.labels[i] ?? "–", numeric: true }]);
      tr.dataset.neighbour = id;
      return tr;
    }));
  }

  function k() { return Math.min(Math.max(Number(document.getElementById("k-input").value) || 10, 1), 100); }

  async function itemNeighbours(itemId) {
    for (const tr of itemsBody.children) tr.setAttribute("aria-selected", String(tr.dataset.itemId === String(itemId)));
    showNeighbours(`Nearest ${k()} to item ${itemId} (exact)`, await api(`${base}/items/${itemId}/neighbours?k=${k()}`));
  }

  document.getElementById("vector-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = document.getElementById("vector-input").value.split(/[\s,;\[\]]+/).filter(Boolean).map(Number);
    if (!bank || key.length !== bank.dim || key.some((v) => !Number.isFinite(v))) {
      say(`paste ${bank ? bank.dim : ""} numbers`);
      return;
    }
    say("");
    try {
      const found = await api(`${base}/search`, { method: "POST", json: { queries: [key], k: k(), exact: true } });
      showNeighbours(`Nearest ${k()} to the pasted key (exact)`, found.results[0]);
    } catch (error) { failed(error); }
  });

  async function projection() {
    const found = await api(`${base}/projection?sample=5000`);
    const canvas = document.getElementById("projection");
    const width = canvas.parentElement.clientWidth || 640;
    canvas.width = Math.min(width, 900);
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    const pad = 16;
    const span = (values) => [Math.min(...values), Math.max(...values)];
    const [x0, x1] = span(found.x), [y0, y1] = span(found.y);
    const labels = [...new Set(found.labels)].sort((a, b) => (a ?? Infinity) - (b ?? Infinity));
    const colour = (label) => (label === null ? "#888" : palette[labels.indexOf(label) % palette.length]);
    found.x.forEach((x, i) => {
      const left = pad + ((x - x0) / (x1 - x0 || 1)) * (canvas.width - 2 * pad);
      const top = canvas.height - pad - ((found.y[i] - y0) / (y1 - y0 || 1)) * (canvas.height - 2 * pad);
      context.fillStyle = colour(found.labels[i]);
      context.globalAlpha = 0.75;
      context.beginPath();
      context.arc(left, top, 3, 0, 2 * Math.PI);
      context.fill();
    });
    canvas.dataset.points = String(found.x.length);
    const [a, b] = found.explained_variance.map((v) => (100 * v).toFixed(1));
    document.getElementById("projection-caption").textContent = found.x.length
      ? `Keys, first two principal components (${a}% and ${b}% of the variance): ${number(found.x.length)} sampled of ${number(found.size)}`
      : "No keys stored yet";
    document.getElementById("projection-legend").replaceChildren(...labels.map((label) => {
      const key = element("span", label === null ? "no label" : `label ${label}`);
      key.style.setProperty("--swatch", colour(label));
      return key;
    }));
  }

  document.getElementById("label-select").addEventListener("change", () => items(true).catch(failed));
  more.addEventListener("click", () => items(false).catch(failed));
  start().catch(failed);
})();
