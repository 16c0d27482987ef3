"""The benchmark driver.

    python -m bench list                      the benchmarks
    python -m bench NAME [options]            run one; write bench/results/NAME.json, re-render its region of RESULTS.md
    python -m bench NAME --help               its options
    python -m bench NAME --tiny               a smoke run: writes only where --results-dir / --markdown point
    python -m bench render [NAME ...]         re-render regions of RESULTS.md from the recorded JSON

A run prints its section as well; --no-write leaves every file alone.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import BENCHMARKS, RESULTS_DIR, RESULTS_MD, Benchmark, record

USAGE = __doc__.split("\n\n")[1]


def benchmark_parser(benchmark: Benchmark, module: ModuleType) -> argparse.ArgumentParser:
    """The benchmark's own options, and the driver's in a group of their own."""
    parser = module.build_parser(f"python -m bench {benchmark.name}")
    driver = parser.add_argument_group("driver")
    driver.add_argument("--tiny", action="store_true", help=f"smoke-run preset: {shlex.join(module.TINY)}")
    driver.add_argument("--no-write", action="store_true", help="print only; write no JSON and leave RESULTS.md alone")
    driver.add_argument(
        "--results-dir", type=Path, default=None, help=f"where NAME.json goes (default: {_shown(RESULTS_DIR)})"
    )
    driver.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help=f"the file whose region is re-rendered (default: {_shown(RESULTS_MD)})",
    )
    return parser


def run_one(name: str, argv: list[str]) -> int:
    benchmark = BENCHMARKS[name]
    if benchmark.missing():
        print(f"{name} needs {', '.join(benchmark.missing())} (`pip install -e '.[train]'`)", file=sys.stderr)
        return 2
    module = importlib.import_module(benchmark.module)
    parser = benchmark_parser(benchmark, module)
    args = parser.parse_args(argv)
    if args.tiny:
        args = parser.parse_args([*module.TINY, *argv])  # the preset first: options given on the line win
    command = shlex.join([_shown(Path(sys.executable)), "-m", "bench", name, *argv])
    began = time.perf_counter()
    outcome: record.Outcome = module.run(args, command)
    wall_s = time.perf_counter() - began
    result = make_record(benchmark, args, outcome, command, wall_s)
    print()
    print(record.render(result["section"]))
    for note in outcome.notes:
        print(f"note: {note}")
    results_dir, markdown = destinations(args)
    if results_dir is not None:
        record.save(results_dir / f"{name}.json", result)
        print(f"written to {_shown(results_dir / f'{name}.json')}")
    if markdown is not None:
        write_region(markdown, result)
        print(f"rendered into {_shown(markdown)}")
    if not outcome.passed:
        print("FAILED: a correctness check did not hold (see the tables)", file=sys.stderr)
        return 1
    return 0


def destinations(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """Where the run is written: nowhere with --no-write; with --tiny only where the command line points,
    so that a smoke run never replaces recorded figures."""
    if args.no_write:
        return None, None
    if args.tiny:
        return args.results_dir, args.markdown
    return args.results_dir or RESULTS_DIR, args.markdown or RESULTS_MD


def make_record(
    benchmark: Benchmark, args: argparse.Namespace, outcome: record.Outcome, command: str, wall_s: float
) -> dict[str, Any]:
    machine = dict(outcome.machine)
    driver_options = ("tiny", "no_write", "results_dir", "markdown")
    return {
        "layout": record.LAYOUT,
        "benchmark": benchmark.name,
        "heading": benchmark.heading,
        "date": machine.pop("date"),
        "command": command,
        "machine": {key: machine[key] for key in ("nproc", "cpu", "memory", "software") if key in machine},
        "wall_s": round(wall_s, 1),
        "tiny": bool(args.tiny),
        "passed": outcome.passed,
        "notes": outcome.notes,
        "options": record.plain(args, skip=driver_options),
        "figures": outcome.figures,
        "section": record.blocks_of(outcome.section.strip("\n")),
    }


def write_region(markdown: Path, result: dict[str, Any]) -> None:
    """Re-renders the record's region; read right before writing, as other benchmarks write the same file."""
    text = markdown.read_text() if markdown.exists() else "# Benchmark results\n"
    markdown.write_text(record.replace_region(text, result))


def render_recorded(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench render", description="Re-render RESULTS.md from the JSON.")
    parser.add_argument("names", nargs="*", help="benchmarks (default: every recorded one)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--markdown", type=Path, default=RESULTS_MD)
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; one of: {', '.join(BENCHMARKS)}")
    for name in args.names or BENCHMARKS:
        path = args.results_dir / f"{name}.json"
        if not path.exists():
            if args.names:
                print(f"{_shown(path)}: no recorded run", file=sys.stderr)
                return 1
            continue
        write_region(args.markdown, record.load(path))
        print(f"{name}: rendered from {_shown(path)} into {_shown(args.markdown)}")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "list":
        width = max(map(len, BENCHMARKS))
        for benchmark in BENCHMARKS.values():
            print(f"{benchmark.name:<{width}}  {benchmark.summary}")
        return 0
    if name == "render":
        return render_recorded(rest)
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; one of: {', '.join(BENCHMARKS)} (or list, render)", file=sys.stderr)
        return 2
    return run_one(name, rest)


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    path = path.absolute()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
