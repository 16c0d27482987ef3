"""A benchmark run as JSON, and its marked region of bench/RESULTS.md rendered from that JSON.

A benchmark reports Markdown (prose with its figures, tables, profiles); the record keeps it
as blocks, each table as its columns and rows, beside the raw figures, the options and the
machine. RESULTS.md holds one region per benchmark between `<!-- bench:NAME:begin -->` and
`<!-- bench:NAME:end -->`: the driver replaces what lies between the markers with the
rendering of the record and leaves every other line of the file (headings, hand-written
prose) as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Outcome",
    "begin_marker",
    "blocks_of",
    "end_marker",
    "load",
    "plain",
    "render",
    "render_region",
    "replace_region",
    "save",
]

LAYOUT = 1  # the JSON layout's version: bump it when a key changes meaning
LARGEST_ARRAY = 1024  # arrays with more elements are recorded by shape and dtype only
_TABLE_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+$")


@dataclass
class Outcome:
    """What one benchmark run hands the driver."""

    section: str  # Markdown below the section's heading: prose with figures, tables, profiles
    figures: dict[str, Any]  # the measured figures, JSON-ready (see plain)
    machine: dict[str, str]  # bench.common.machine_facts
    passed: bool = True  # the run's correctness checks held (speed targets are figures, not checks)
    notes: list[str] = field(default_factory=list)  # what was skipped and why (a missing optional dependency)


# ---------------------------------------------------------------- figures as JSON


def plain(value: Any, *, skip: tuple[str, ...] = ()) -> Any:
    """`value` as JSON-ready data: dataclasses and namespaces as objects (less the fields in `skip`),
    numpy and torch scalars as numbers, small arrays as lists, large ones as their shape, NaN as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name not in skip}
    if isinstance(value, argparse.Namespace):
        return {name: plain(item) for name, item in vars(value).items() if name not in skip}
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items() if key not in skip}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(item) for item in value]
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars, torch tensors
        count = value.numel() if hasattr(value, "numel") else value.size
        if count > LARGEST_ARRAY:
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        return plain(value.tolist())
    return str(value)


# ---------------------------------------------------------------- Markdown as blocks


def blocks_of(markdown: str) -> list[dict[str, Any]]:
    """Markdown split into blocks: {"table": {"columns", "align", "rows"}}, {"code": text} (a fenced
    block without its fences) and {"text": text} (everything else, verbatim, blank lines included)."""
    lines = markdown.split("\n")
    blocks: list[dict[str, Any]] = []
    text: list[str] = []

    def flush_text() -> None:
        if text:
            blocks.append({"text": "\n".join(text)})
            text.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is not None and line == "```":
                flush_text()
                blocks.append({"code": "\n".join(lines[i + 1 : end])})
                i = end + 1
                continue
        if line.startswith("|") and i + 1 < len(lines) and _TABLE_SEPARATOR.match(lines[i + 1].strip()):
            end = i + 2
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            flush_text()
            blocks.append(
                {
                    "table": {
                        "columns": _cells(line),
                        "align": _cells(lines[i + 1]),
                        "rows": [_cells(row) for row in lines[i + 2 : end]],
                    }
                }
            )
            i = end
            continue
        text.append(line)
        i += 1
    flush_text()
    return blocks


def _cells(row: str) -> list[str]:
    inner = row.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") else inner
    return [_cell(cell) for cell in inner.split("|")]


def _cell(raw: str) -> str:
    """A cell's text without the space after its bar; an indent beyond that space is kept."""
    cell = raw.rstrip()
    return cell[1:] if cell.startswith(" ") else cell


def render(blocks: list[dict[str, Any]]) -> str:
    """The Markdown of `blocks` (the inverse of blocks_of, up to spaces inside table rows)."""
    parts = []
    for block in blocks:
        if "table" in block:
            table = block["table"]
            lines = [_row(table["columns"]), "|" + "|".join(table["align"]) + "|", *map(_row, table["rows"])]
            parts.append("\n".join(lines))
        elif "code" in block:
            parts.append("```\n" + block["code"] + "\n```")
        else:
            parts.append(block["text"])
    return "\n".join(parts)


def _row(cells: list[str]) -> str:
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


# ---------------------------------------------------------------- the record and its region


def save(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(record) + "\n")


def _dumps(value: Any, indent: str = "") -> str:
    """JSON with one line per list of plain values (a table row, a series of timings), so diffs read by row."""
    inner = indent + " "
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {_dumps(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        return "[\n" + ",\n".join(inner + _dumps(item, inner) for item in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False)


def load(path: Path) -> dict[str, Any]:
    record = json.loads(path.read_text())
    if record.get("layout") != LAYOUT:
        raise ValueError(f"{path}: layout {record.get('layout')!r}, this driver reads layout {LAYOUT}")
    return record


def begin_marker(name: str) -> str:
    return f"<!-- bench:{name}:begin -->"


def end_marker(name: str) -> str:
    return f"<!-- bench:{name}:end -->"


def render_region(record: dict[str, Any]) -> str:
    """The region of RESULTS.md for one record, markers included."""
    name = record["benchmark"]
    body = render(record["section"]).strip("\n")
    return f"{begin_marker(name)}\n{body}\n{end_marker(name)}"


def replace_region(text: str, record: dict[str, Any]) -> str:
    """`text` (all of RESULTS.md) with the record's region rendered anew; every line outside it kept.

    A benchmark without a region yet gets its heading and region at the end of the file.
    """
    name = record["benchmark"]
    begin, end = begin_marker(name), end_marker(name)
    start = text.find(begin)
    if start < 0:
        return text.rstrip("\n") + f"\n\n{record['heading']}\n\n{render_region(record)}\n"
    stop = text.find(end, start)
    if stop < 0:
        raise ValueError(f"RESULTS.md has {begin} without {end}")
    return text[:start] + render_region(record) + text[stop + len(end) :]
