"""The benchmark driver: every benchmark runs through `python -m bench NAME --tiny`, writes its
JSON record, and renders its marked region of RESULTS.md, in a temporary copy of both; and the
committed RESULTS.md is the rendering of the committed records."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import BENCHMARKS, RESULTS_DIR, RESULTS_MD, record
from bench.__main__ import main as bench_main
from tests import citus_kit

REPO = Path(__file__).resolve().parents[1]
RECORD_KEYS = {
    "layout",
    "benchmark",
    "heading",
    "date",
    "command",
    "machine",
    "wall_s",
    "tiny",
    "passed",
    "notes",
    "options",
    "figures",
    "section",
}
MACHINE_KEYS = {"nproc", "cpu", "memory", "software"}


def fingerprint() -> dict[str, str]:
    """The recorded results as they are: a smoke run must leave them so."""
    files = [RESULTS_MD, *sorted(RESULTS_DIR.glob("*.json"))]
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def outside(text: str, name: str) -> tuple[str, str]:
    """What lies before the region's begin marker and after its end marker."""
    begin, end = record.begin_marker(name), record.end_marker(name)
    return text[: text.index(begin)], text[text.index(end) + len(end) :]


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_runs_tiny_through_the_driver(name: str, tmp_path: Path) -> None:
    benchmark = BENCHMARKS[name]
    if benchmark.missing():
        pytest.skip(f"{name} needs {', '.join(benchmark.missing())} (the [train] extra)")
    if name == "scale_out" and citus_kit.tarball() is None:
        pytest.skip(f"scale_out builds Citus from {citus_kit.TARBALL_NAME}, not found: set EIDETIC_CITUS_TARBALL")
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(RESULTS_MD.read_text())
    recorded = fingerprint()
    command = [
        sys.executable,
        "-m",
        "bench",
        name,
        "--tiny",
        "--results-dir",
        str(tmp_path),
        "--markdown",
        str(markdown),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert fingerprint() == recorded, "a smoke run touched bench/results or bench/RESULTS.md"

    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(result) == RECORD_KEYS
    assert result["layout"] == record.LAYOUT and result["benchmark"] == name and result["tiny"] is True
    assert result["passed"] is True and result["wall_s"] > 0
    assert set(result["machine"]) == MACHINE_KEYS
    assert result["command"].endswith(f"-m bench {name} --tiny --results-dir {tmp_path} --markdown {markdown}")
    assert result["options"] and result["figures"]
    tables = [block["table"] for block in result["section"] if "table" in block]
    assert tables, "the section has no table"
    for table in tables:
        assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])

    if name == "knn" and importlib.util.find_spec("faiss") is None:  # the anchor is skipped, and says so
        assert any("FAISS is not installed" in note for note in result["notes"])
        assert "FAISS is not installed" in record.render(result["section"])

    text, before = markdown.read_text(), RESULTS_MD.read_text()
    assert record.render_region(result) in text
    assert outside(text, name) == outside(before, name), "rendering changed text outside the region"


def test_recorded_results_md_is_the_rendering_of_the_recorded_json(tmp_path: Path) -> None:
    markdown = tmp_path / "RESULTS.md"
    markdown.write_text(RESULTS_MD.read_text())
    assert bench_main(["render", "--markdown", str(markdown)]) == 0
    assert markdown.read_text() == RESULTS_MD.read_text()
    for name in BENCHMARKS:
        result = record.load(RESULTS_DIR / f"{name}.json")
        assert set(result) == RECORD_KEYS
        assert result["heading"] in RESULTS_MD.read_text()


def test_markdown_blocks_round_trip() -> None:
    text = (
        "- Date: today\n\nSome prose.\n\n| a | b |\n|---|---:|\n| 1 | |\n|   indented | 2 |\n\n"
        "```\nprofile | line\n```\n\nTail."
    )
    blocks = record.blocks_of(text)
    assert [next(iter(block)) for block in blocks] == ["text", "table", "text", "code", "text"]
    table = blocks[1]["table"]
    assert table == {"columns": ["a", "b"], "align": ["---", "---:"], "rows": [["1", ""], ["  indented", "2"]]}
    assert record.render(blocks) == text


def test_a_region_is_replaced_and_everything_else_kept() -> None:
    result = {"benchmark": "knn", "heading": "## Nearest neighbours", "section": record.blocks_of("new figures")}
    text = (
        "# Results\n\n## Nearest neighbours\n\nHand-written.\n\n"
        "<!-- bench:knn:begin -->\nold\n<!-- bench:knn:end -->\n\nMore prose.\n"
    )
    assert record.replace_region(text, result) == text.replace("\nold\n", "\nnew figures\n")
    appended = record.replace_region("# Results\n", result)
    assert (
        appended
        == "# Results\n\n## Nearest neighbours\n\n<!-- bench:knn:begin -->\nnew figures\n<!-- bench:knn:end -->\n"
    )


def test_list_names_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["list"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(BENCHMARKS)
    assert bench_main(["no_such_benchmark"]) == 2
