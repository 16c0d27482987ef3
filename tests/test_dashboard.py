"""The dashboard in a real headless Chromium against a live service with real data.

Each page must load, show what the data says (counts, series, neighbours) and log no console
error; a screenshot of each is saved under pytest's tmp dir (its path is printed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pyarrow as pa
import pytest

from app import migrate
from app.settings import Settings
from tests.conftest import Service
from tests.helpers import make_layer, post_arrow, random_rows, sampling_settings

CHROMIUM = os.environ.get("EIDETIC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
if CHROMIUM is None:
    pytest.skip("no Chromium here (Debian: apt-get install chromium)", allow_module_level=True)


SAMPLE_ROWS = 2000  # layers above this many rows are read through a block sample here


@pytest.fixture
def settings() -> Settings:
    """The suite's settings, with a small sampling budget so a test layer can be "large"."""
    return sampling_settings(SAMPLE_ROWS)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("dashboard-screenshots")
    print(f"\ndashboard screenshots: {folder}")
    return str(folder)


class Page:
    """A browser tab holding a key in its session storage, recording console errors."""

    def __init__(self, browser, service: Service, key: str | None, color_scheme: str = "light") -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=color_scheme)
        if key is not None:
            self.context.add_init_script(f"sessionStorage.setItem('eidetic.key', {key!r})")
        self.tab = self.context.new_page()
        self.errors: list[str] = []
        self.tab.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.tab.on("pageerror", lambda error: self.errors.append(str(error)))
        self.base_url = service.base_url

    def open(self, path: str):
        self.tab.goto(self.base_url + path)
        return self.tab

    def shoot(self, folder: str, name: str) -> None:
        self.tab.screenshot(path=os.path.join(folder, f"{name}.png"), full_page=True)


@pytest.fixture
def open_page(browser, service: Service):
    pages: list[Page] = []

    def opener(key: str | None = service.write_key, color_scheme: str = "light") -> Page:
        pages.append(Page(browser, service, key, color_scheme))
        return pages[-1]

    yield opener
    for page in pages:
        page.context.close()


def expect_text(tab, selector: str, text: str) -> None:
    sync_api.expect(tab.locator(selector)).to_contain_text(text, timeout=10_000)


def test_the_shell_is_served_without_a_key_and_holds_no_data(service: Service):
    for path in ("/", "/ui/health", "/ui/banks", "/ui/runs/1/layers/1", "/ui/static/common.js"):
        response = httpx.get(service.base_url + path)
        assert response.status_code == 200, path
    assert httpx.get(service.base_url + "/ui/static/../main.py").status_code == 404
    assert "uPlot" in httpx.get(service.base_url + "/ui/static/vendor/uplot/uPlot.iife.min.js").text


def test_runs_page_lists_the_runs_with_rows_and_metrics(service, api, open_page, screenshots):
    run_id, layer_id = make_layer(api, dim=4, run="mnist-a")
    assert post_arrow(api, run_id, layer_id, random_rows(300, 4, step=1)).status_code == 201
    for name in ("mnist-b", "cifar"):
        assert api.post("/v1/runs", json={"name": name, "config": {"lr": 0.01}}).status_code == 201
    metrics = {
        "accuracy_matrix": [[0.9, 0.1], [0.6, 0.95]],
        "backward_transfer": -0.3,
        "forgetting": 0.3,
        "train_loss": {"A": [1.0, 0.6, 0.4], "B": [1.2, 0.7, 0.5]},
    }
    assert api.patch(f"/v1/runs/{run_id}", json={"metrics": metrics, "status": "finished"}).status_code == 200

    page = open_page()
    tab = page.open("/")
    expect_text(tab, "#run-count", "3 of 3 runs")
    expect_text(tab, f"#runs-table tr[data-run-id='{run_id}']", "300")
    tab.click("#runs-table th button[data-sort='rows']")  # most rows first
    expect_text(tab, "#runs-table tbody tr:first-child", "mnist-a")
    sync_api.expect(tab.locator("#runs-table th:has(button[data-sort='rows'])")).to_have_attribute(
        "aria-sort", "descending"
    )
    tab.click("#runs-table th button[data-sort='name']")
    tab.click("#runs-table th button[data-sort='name']")  # again: ascending
    expect_text(tab, "#runs-table tbody tr:first-child", "cifar")
    tab.fill("#run-filter", "mnist")
    expect_text(tab, "#run-count", "2 of 3 runs")
    tab.locator(f"#runs-table tr[data-run-id='{run_id}'] button").click()
    expect_text(tab, "#run-layers", "fc")
    sync_api.expect(tab.locator("table.heat td")).to_have_count(4)
    expect_text(tab, "#metric-cards", "backward_transfer")
    sync_api.expect(tab.locator("#chart-curves")).to_have_attribute("data-series", "2")
    page.shoot(screenshots, "runs")
    assert page.errors == []


def test_health_page_shows_readiness_revision_and_live_charts(service, api, open_page, screenshots):
    make_layer(api, dim=4)
    page = open_page()
    tab = page.open("/ui/health")
    expect_text(tab, "#readiness", "ready")
    expect_text(tab, "#revision", migrate.head_revision())
    expect_text(tab, "#health-runs", "1")
    for chart, series in (("requests", "1"), ("errors", "2"), ("ingest", "1")):
        sync_api.expect(tab.locator(f"#chart-{chart}")).to_have_attribute("data-series", series)
    tab.wait_for_timeout(2500)  # a second sample of /metrics: the charts have a point
    page.shoot(screenshots, "health")
    assert page.errors == []


def test_a_key_is_asked_for_once_and_sees_only_its_project(service, api, open_page):
    make_layer(api, dim=4, run="alpha-run")
    other = service.new_key(project="beta", scope="read")
    page = open_page(key=None)
    tab = page.open("/")
    sync_api.expect(tab.locator("#key-form")).to_be_visible()
    tab.fill("#key-input", other)
    tab.press("#key-input", "Enter")
    expect_text(tab, "#run-count", "0 of 0 runs")
    assert other not in tab.url
    page.tab.goto(service.base_url + "/ui/health")  # the key stays for the session
    expect_text(tab, "#health-runs", "0")
    assert all("401" in error for error in page.errors), page.errors  # only the first, keyless request


def test_layer_page_draws_bands_histogram_boundaries_and_heat_map(service, api, open_page, screenshots):
    run_id, layer_id = make_layer(api, dim=16, run="layer-run")
    for step in range(0, 100, 10):
        rows = random_rows(50, 16, seed=step, step=step, epoch=0, task="A", label=step % 3)
        assert post_arrow(api, run_id, layer_id, rows).status_code == 201
    for n_quantiles in (4, 8):
        set_response = api.post(f"/v1/runs/{run_id}/layers/{layer_id}/quantiles", json={"n_quantiles": n_quantiles})
        assert set_response.status_code == 201, set_response.text

    page = open_page()
    tab = page.open(f"/ui/runs/{run_id}/layers/{layer_id}")
    expect_text(tab, "#layer-title", "layer-run / fc · 16 units")
    sync_api.expect(tab.locator("#chart-distribution")).to_have_attribute("data-series", "9")
    sync_api.expect(tab.locator("#quantile-set option")).to_have_count(3)  # none, and the two sets
    expect_text(tab, "#quantile-set", "v2 · Q=8 · exact · 500 rows")
    sync_api.expect(tab.locator("#chart-histogram")).to_have_attribute("data-boundaries", "7")  # the newest
    tab.select_option("#quantile-set", label="v1 · Q=4 · exact · 500 rows")
    sync_api.expect(tab.locator("#chart-histogram")).to_have_attribute("data-boundaries", "3")
    expect_text(tab, "#histogram-caption", "500 rows in 40 bins")
    sync_api.expect(tab.locator("#sample-note")).to_have_attribute("data-sampled", "false")
    sync_api.expect(tab.locator("#unit-heatmap")).to_have_attribute("data-units", "16")
    tab.fill("input[name=unit]", "5")
    tab.fill("input[name=step_max]", "40")
    tab.press("input[name=step_max]", "Enter")
    expect_text(tab, "#histogram-caption", "Unit 5: 250 rows")
    assert "step_max=40" in tab.locator("#arrow-link").get_attribute("href")
    with tab.expect_download() as download:  # fetched with the key in a header, never in the URL
        tab.click("#arrow-link")
    table = pa.ipc.open_stream(download.value.path().read_bytes()).read_all()
    assert table.num_rows == 250 and set(table.column("step").to_pylist()) == {0, 10, 20, 30, 40}
    assert service.write_key not in tab.locator("#arrow-link").get_attribute("href")
    tab.fill("input[name=label]", "1")  # steps 10 and 40 of those
    tab.press("input[name=label]", "Enter")
    expect_text(tab, "#histogram-caption", "Unit 5: 100 rows")
    tab.fill("input[name=label]", "")
    tab.fill("input[name=step_max]", "")
    tab.fill("input[name=task]", "B")  # no such task: an empty histogram, not an error
    tab.press("input[name=task]", "Enter")
    expect_text(tab, "#histogram-caption", "Unit 5: 0 rows")
    tab.fill("input[name=task]", "A")
    tab.fill("input[name=epoch]", "0")
    tab.press("input[name=epoch]", "Enter")
    expect_text(tab, "#histogram-caption", "Unit 5: 500 rows")
    page.shoot(screenshots, "layer")
    assert page.errors == []


def test_layer_page_says_when_a_large_layer_is_sampled(service, api, open_page, screenshots):
    run_id, layer_id = make_layer(api, dim=8, run="large-run")
    for step in range(6):
        assert post_arrow(api, run_id, layer_id, random_rows(1000, 8, seed=step, step=step)).status_code == 201
    exact = api.get(f"/v1/runs/{run_id}/layers/{layer_id}/histogram", params={"unit": 0, "bins": 40}).json()
    assert exact["sampled"] is True

    page = open_page()
    tab = page.open(f"/ui/runs/{run_id}/layers/{layer_id}")
    sync_api.expect(tab.locator("#sample-note")).to_have_attribute("data-sampled", "true")
    expect_text(tab, "#sample-note", "of 6,000 rows")
    expect_text(tab, "#histogram-caption", f"{exact['rows']:,} rows in 40 bins (sampled)")
    expect_text(tab, "#distribution-caption", "a block sample")
    expect_text(tab, "#heatmap-note", "(sampled)")
    expect_text(tab, "#histogram-caption", "no quantile set yet")
    page.shoot(screenshots, "layer-sampled")
    assert page.errors == []


def test_theme_follows_the_system_until_toggled_by_keyboard_and_is_remembered(service, api, open_page, screenshots):
    make_layer(api, dim=4, run="themed")
    dark = open_page(color_scheme="dark")
    tab = dark.open("/")
    expect_text(tab, "#run-count", "1 of 1 run")
    sync_api.expect(tab.locator("body")).to_have_attribute("data-theme", "dark")  # the system's choice
    sync_api.expect(tab.locator("#theme-toggle")).to_have_attribute("aria-pressed", "true")

    page = open_page(color_scheme="light")
    tab = page.open("/")
    expect_text(tab, "#run-count", "1 of 1 run")
    sync_api.expect(tab.locator("body")).to_have_attribute("data-theme", "light")
    background = tab.evaluate("getComputedStyle(document.body).backgroundColor")
    page.shoot(screenshots, "theme-light")
    tab.focus("#theme-toggle")
    tab.keyboard.press("Enter")
    sync_api.expect(tab.locator("body")).to_have_attribute("data-theme", "dark")
    sync_api.expect(tab.locator("#theme-toggle")).to_have_attribute("aria-pressed", "true")
    assert tab.evaluate("getComputedStyle(document.body).backgroundColor") != background
    assert tab.evaluate("localStorage.getItem('eidetic.theme')") == "dark"
    page.shoot(screenshots, "theme-dark")
    tab.goto(service.base_url + "/ui/health")  # remembered on the next page, against the system's light
    sync_api.expect(tab.locator("body")).to_have_attribute("data-theme", "dark")
    tab.keyboard.press("Tab")  # the toggle is reachable from the keyboard: brand, then links, then it
    for _ in range(6):
        if tab.evaluate("document.activeElement.id") == "theme-toggle":
            break
        tab.keyboard.press("Tab")
    assert tab.evaluate("document.activeElement.id") == "theme-toggle"
    tab.keyboard.press(" ")
    sync_api.expect(tab.locator("body")).to_have_attribute("data-theme", "light")
    assert page.errors == [] and dark.errors == []


def test_banks_pages_show_fill_items_neighbours_and_projection(service, api, open_page, screenshots):
    bank = api.post("/v1/memory-banks", json={"name": "episodic", "dim": 8, "capacity": 400, "policy": "fifo"}).json()
    centres = np.eye(8)[:3] * 4
    noise = np.random.default_rng(1).standard_normal((120, 8)) * 0.5
    items = [{"key": (centres[i % 3] + noise[i]).tolist(), "label": i % 3, "confidence": 0.9} for i in range(120)]
    ids = []
    for start in range(0, 120, 30):  # four writes: four versions on the fill chart
        written = api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items[start : start + 30]})
        assert written.status_code == 200, written.text
        ids += written.json()["ids"]
    item = ids[4]
    expected = api.get(f"/v1/memory-banks/{bank['id']}/items/{item}/neighbours", params={"k": 10}).json()["ids"]

    page = open_page()
    tab = page.open("/ui/banks")
    expect_text(tab, "#bank-count", "1 bank")
    expect_text(tab, f"#banks-table tr[data-bank-id='{bank['id']}']", "120 / 400")
    page.shoot(screenshots, "banks")
    tab.click("#banks-table a")
    expect_text(tab, "#bank-title", "episodic")
    sync_api.expect(tab.locator("#chart-fill")).to_have_attribute("data-series", "2")
    expect_text(tab, "#fill-caption", "4 of 4 changes")
    expect_text(tab, "#fill-caption", "capacity 400")
    sync_api.expect(tab.locator("#projection")).to_have_attribute("data-points", "120")
    sync_api.expect(tab.locator("#projection-legend span")).to_have_count(3)
    tab.select_option("#label-select", "1")
    sync_api.expect(tab.locator("#items-table tbody tr")).to_have_count(40)
    tab.click(f"button[data-item='{item}']")
    expect_text(tab, "#neighbours-of", f"item {item}")
    shown = tab.locator("#neighbours-table tbody tr").evaluate_all("rows => rows.map(r => Number(r.dataset.neighbour))")
    assert shown == expected
    tab.fill("#vector-input", ", ".join(str(v) for v in centres[2]))
    tab.click("#vector-form button")
    expect_text(tab, "#neighbours-of", "pasted key")
    labels = tab.locator("#neighbours-table tbody tr td:nth-child(4)").all_inner_texts()
    assert labels == ["2"] * 10
    page.shoot(screenshots, "bank")
    assert page.errors == []
