"use strict";
// What every page shares: the key (sessionStorage, never the URL), /v1 requests, charts, formats.
const Eidetic = (() => {
  const KEY = "eidetic.key";
  const keyForm = document.getElementById("key-form");
  const status = document.getElementById("status");

  class ApiError extends Error {
    constructor(status, error) {
      super(error && error.message ? error.message : "HTTP " + status);
      this.status = status;
      this.code = error && error.code;
    }
  }

  function key() { return sessionStorage.getItem(KEY); }

  function askForKey() {
    keyForm.hidden = false;
    document.getElementById("key-input").focus();
  }

  keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("key-input").value.trim());
    location.reload();
  });
  const forget = document.getElementById("forget-key");
  forget.hidden = !key();
  forget.addEventListener("click", () => { sessionStorage.removeItem(KEY); location.reload(); });
  // Light or dark: the system's choice (prefers-color-scheme) until the toggle picks one, which is
  // remembered in localStorage. Pages redraw their charts on "themechange".
  const THEME = "eidetic.theme";
  const themeButton = document.getElementById("theme-toggle");
  const theme = () => (getComputedStyle(document.documentElement).colorScheme === "dark" ? "dark" : "light");
  function showTheme() {
    const dark = theme() === "dark";
    themeButton.textContent = dark ? "☾ Dark" : "☀ Light";
    themeButton.setAttribute("aria-pressed", String(dark));
    themeButton.title = `Dark theme ${dark ? "on" : "off"}: switch to ${dark ? "light" : "dark"}`;
    document.body.dataset.theme = theme();
  }
  themeButton.addEventListener("click", () => {
    const next = theme() === "dark" ? "light" : "dark";
    localStorage.setItem(THEME, next);
    document.documentElement.dataset.theme = next;
    showTheme();
    window.dispatchEvent(new Event("themechange"));
  });
  matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    if (localStorage.getItem(THEME)) return; // a remembered choice wins over the system's
    showTheme();
    window.dispatchEvent(new Event("themechange"));
  });
  showTheme();

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (key()) headers.set("Authorization", "Bearer " + key());
    if (options.json !== undefined) {
      headers.set("Content-Type", "application/json");
      options = { ...options, body: JSON.stringify(options.json) };
    }
    const response = await fetch(path, { ...options, headers });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      if (response.status === 401) askForKey();
      throw new ApiError(response.status, body.error);
    }
    return response.json();
  }

  function query(params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value !== "" && value !== null && value !== undefined) search.set(name, value);
    }
    const text = search.toString();
    return text ? "?" + text : "";
  }

  function say(message) { status.textContent = message || ""; }
  function failed(error) {
    if (error instanceof ApiError && error.status === 401) say("Enter an API key to see this project's data.");
    else say(error.message || String(error));
  }

  const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  // A uPlot chart that fills its container's width and follows the theme.
  function chart(container, options, data) {
    container.replaceChildren();
    const axis = () => ({ stroke: css("--muted"), grid: { stroke: css("--line") }, ticks: { stroke: css("--line") } });
    const plot = new uPlot({
      width: Math.max(container.clientWidth, 280),
      height: options.height || (container.classList.contains("small") ? 150 : 260),
      axes: [axis(), axis()],
      ...options,
    }, data, container);
    container.dataset.series = String(options.series.length - 1);
    const resize = () => plot.setSize({ width: Math.max(container.clientWidth, 280), height: plot.height });
    new ResizeObserver(resize).observe(container);
    return plot;
  }

  const integer = new Intl.NumberFormat();
  function number(value, digits = 3) {
    if (value === null || value === undefined) return "–";
    if (Number.isInteger(value)) return integer.format(value);
    return Number(value).toPrecision(digits);
  }
  function bytes(value) {
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return (i ? value.toFixed(1) : value) + " " + units[i];
  }
  function time(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }

  // An element with text content (never innerHTML: names and labels come from users).
  function element(tag, text, attributes = {}) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) {
      if (cell instanceof Node) { const td = document.createElement("td"); td.append(cell); tr.append(td); }
      else tr.append(element("td", cell.text, cell.numeric ? { class: "num" } : {}));
    }
    return tr;
  }

  return { api, query, say, failed, chart, css, palette, number, bytes, time, element, row, key, ApiError };
})();
