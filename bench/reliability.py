"""Reliability: crashes and freezes mid-ingest, then the service under a bounded mixed load.

Faults (tests/fault_kit.py; PostgreSQL and the API are this script's own child processes,
on a fresh data directory, the API with a 2 s request deadline): --trials trials of each of

1. postgres_kill: SIGKILL to the postmaster and all its backends at once while --writers
   writers send numbered batches over REST, then PostgreSQL restarted on the same data
   after --outage seconds;
2. api_kill: SIGKILL to the API process mid-ingest, then the API restarted after --outage seconds;
3. postgres_freeze: SIGSTOP to the postmaster and its backends for --freeze seconds, then SIGCONT
   (the API is not restarted).

After each, the database is read directly: every acknowledged batch must be stored whole
(lost: acknowledged, not stored; partial: stored in part or with other content;
duplicated: rows stored twice), then every unacknowledged batch is sent again until
acknowledged and the whole set audited again. Recovery is the time from the faulted
process answering again (PostgreSQL accepting connections, the API answering /healthz,
or the SIGCONT) to the first batch acknowledged through the service.

Anchor: the fault trials again (--anchor-trials of each) with the API of an earlier revision
(--anchor, default 41c8613: before fail-fast), from `git archive` into a temporary directory.

Mixed load: --clients clients, each sending one request at a time (closed loop) for
--load-seconds, cycling through ingest, JSON page, Arrow stream, summary, exact quantiles,
bank search and bank write, against a fresh service with default settings.

Usage: .venv/bin/python -m bench reliability [--trials 10 --anchor-trials 3 --load-seconds 30 --no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx
import numpy as np
import pyarrow as pa

from bench.common import load_words, machine_facts
from bench.record import Outcome, plain
from eidetic.wire.formats import ARROW_STREAM
from tests.fault_kit import (
    FAULTS,
    Answer,
    ApiChild,
    TrialResult,
    fault_bed,
    fill_layer,
    ingest_trial,
    make_batch,
)

DEADLINE_S = 2.0
FAULT_SETTINGS = {"request_timeout_s": str(DEADLINE_S), "cancel_grace_s": "0.5"}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q, method="inverted_cdf")) if values else float("nan")


@dataclass
class FaultFigures:
    fault: str
    trials: list[TrialResult] = field(default_factory=list)

    def total(self, name: str, when: str = "during") -> int:
        return sum(len(getattr(getattr(trial, when), name)) for trial in self.trials)

    @property
    def refusals(self) -> list[float]:
        """Seconds to a 503 once the database was known down (PostgreSQL kill) or frozen past the deadline."""
        settle = 0.5 if self.fault == "postgres_kill" else DEADLINE_S + 0.2
        return [
            answer.seconds
            for trial in self.trials
            for answer in trial.answers
            if answer.status == 503 and trial.struck + settle < answer.started < trial.back
        ]

    @property
    def longest_during_fault(self) -> float:
        """The longest any request took to be answered while the fault lasted."""
        return max(
            (
                answer.seconds
                for trial in self.trials
                for answer in trial.answers
                if answer.status is not None
                and answer.started + answer.seconds >= trial.struck
                and answer.started < trial.back
            ),
            default=float("nan"),
        )

    def row(self) -> str:
        recovery = [trial.recovery_s for trial in self.trials]
        refusals = self.refusals
        cells = [
            self.fault,
            str(len(self.trials)),
            str(sum(trial.during.acknowledged for trial in self.trials)),
            str(self.total("lost")),
            str(self.total("partial")),
            f"{self.total('duplicated')} / {self.total('duplicated', 'after')}",
            str(sum(trial.resent for trial in self.trials)),
            str(sum(trial.resent_already_stored for trial in self.trials)),
            "yes" if all(t.after.sound and t.after.stored == t.after.sent for t in self.trials) else "NO",
            f"{statistics.median(recovery):.2f} / {max(recovery):.2f}",
            f"{1000 * percentile(refusals, 99):.0f} / {1000 * max(refusals):.0f} ms" if refusals else "-",
            f"{self.longest_during_fault:.2f} s",
        ]
        return "| " + " | ".join(cells) + " |"


def run_faults(
    trials: int, writers: int, rows: int, dim: int, before: int, outage_s: float, freeze_s: float, code: Path = REPO
) -> list[FaultFigures]:
    figures = {fault: FaultFigures(fault) for fault in FAULTS}
    with fault_bed(FAULT_SETTINGS, api_code=code) as bed:
        for trial_no in range(trials):
            for fault in FAULTS:  # interleaved, so a slow spell of the machine hits every fault alike
                bed.ensure_running()
                trial = ingest_trial(
                    bed,
                    fault,
                    writers=writers,
                    rows=rows,
                    dim=dim,
                    acknowledged_first=before,
                    outage_s=outage_s,
                    freeze_s=freeze_s,
                )
                figures[fault].trials.append(trial)
                print(
                    f"{'' if code == REPO else 'anchor '}{fault} trial {trial_no + 1}: "
                    f"acknowledged {trial.during.acknowledged}, "
                    f"lost {len(trial.during.lost)}, partial {len(trial.during.partial)}, "
                    f"resent {trial.resent} ({trial.resent_already_stored} already stored), "
                    f"recovery {trial.recovery_s:.2f} s",
                    flush=True,
                )
    return list(figures.values())


@contextlib.contextmanager
def source_tree(revision: str) -> Iterator[Path]:
    """Another revision's source tree (git archive into a temporary directory), for the anchor's API."""
    directory = Path(tempfile.mkdtemp(prefix=f"eidetic-anchor-{revision}-"))
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def fault_table(figures: list[FaultFigures]) -> list[str]:
    return [
        "| fault | trials | acknowledged | lost | partial | duplicated (before / after resend) | resent | "
        "of which already stored | final set complete, once | recovery s (median / max) | "
        "503 while down: p99 / max | longest answer during the fault |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[figure.row() for figure in figures],
    ]


KINDS = ("ingest", "read_json", "read_arrow", "summary", "quantiles", "bank_search", "bank_write")


@dataclass
class LoadTarget:
    api: ApiChild
    run_id: int
    read_layer: int
    read_rows: int
    write_layer: int
    bank_id: int
    dim: int


def prepare_load(api: ApiChild, dim: int, read_rows: int, bank_items: int) -> LoadTarget:
    with api.client(timeout=120) as client:
        run_id = client.post("/v1/runs", json={"name": "mixed-load", "config": {}}).json()["id"]
        layers = [
            client.post(f"/v1/runs/{run_id}/layers", json={"name": name, "dim": dim}).json()["id"]
            for name in ("read", "write")
        ]
        fill_layer(api, run_id, layers[0], n_batches=read_rows // 2000, rows=2000, dim=dim)
        bank = client.post(
            "/v1/memory-banks",
            json={"name": "mixed-load", "dim": dim, "metric": "cosine", "capacity": 10 * bank_items, "policy": "none"},
        )
        assert bank.status_code == 201, bank.text
        bank_id = bank.json()["id"]
        keys = np.random.default_rng(1).standard_normal((bank_items, dim)).astype(np.float32)
        for start in range(0, bank_items, 1000):
            chunk = keys[start : start + 1000]
            items = [{"key": key.tolist(), "label": int(i % 10)} for i, key in enumerate(chunk, start)]
            answer = client.post(f"/v1/memory-banks/{bank_id}/items", json={"items": items})
            assert answer.status_code == 200, answer.text
    return LoadTarget(api, run_id, layers[0], read_rows // 2000 * 2000, layers[1], bank_id, dim)


def one_request(client: httpx.Client, target: LoadTarget, kind: str, client_no: int, seq: int) -> bool:
    """Sends one request of the kind; True when it succeeded in full."""
    layer = f"/v1/runs/{target.run_id}/layers/{target.read_layer}"
    rng = np.random.default_rng([client_no, seq])
    if kind == "ingest":
        batch = make_batch(100 + client_no, seq, 500, target.dim)
        answer = client.post(
            f"/v1/runs/{target.run_id}/layers/{target.write_layer}/activations",
            content=batch.body,
            headers={"content-type": ARROW_STREAM},
        )
        return answer.status_code == 201
    if kind == "read_json":
        answer = client.get(f"{layer}/activations", params={"limit": 500, "label": int(rng.integers(0, 4))})
        return answer.status_code == 200
    if kind == "read_arrow":
        answer = client.get(f"{layer}/activations", params={"format": "arrow", "limit": 5000})
        return answer.status_code == 200 and pa.ipc.open_stream(answer.content).read_all().num_rows == 5000
    if kind == "summary":
        return client.get(f"{layer}/summary").status_code == 200
    if kind == "quantiles":
        return client.post(f"{layer}/quantiles", json={"n_quantiles": 10, "method": "exact"}).status_code == 201
    if kind == "bank_search":
        queries = rng.standard_normal((32, target.dim)).astype(np.float32).tolist()
        answer = client.post(f"/v1/memory-banks/{target.bank_id}/search", json={"queries": queries, "k": 10})
        return answer.status_code == 200
    items = [{"key": key.tolist(), "label": int(rng.integers(0, 10))} for key in rng.standard_normal((16, target.dim))]
    return client.post(f"/v1/memory-banks/{target.bank_id}/items", json={"items": items}).status_code == 200


def run_mixed_load(target: LoadTarget, clients: int, seconds: float) -> list[tuple[Answer, bool]]:
    answers: list[tuple[Answer, bool]] = []
    lock = threading.Lock()
    ends_at = time.monotonic() + seconds

    def work(client_no: int) -> None:
        with target.api.client(timeout=120) as client:
            seq = 0
            while time.monotonic() < ends_at:
                kind = KINDS[(client_no + seq) % len(KINDS)]
                started = time.monotonic()
                try:
                    ok = one_request(client, target, kind, client_no, seq)
                except (httpx.HTTPError, pa.ArrowInvalid):
                    ok = False
                with lock:
                    answers.append((Answer(kind, None, time.monotonic() - started, started), ok))
                seq += 1

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def load_table(answers: list[tuple[Answer, bool]], seconds: float) -> list[str]:
    lines = ["| request | requests | errors | per second | p50 | p99 |", "|---|---|---|---|---|---|"]
    for kind in KINDS:
        mine = [(answer, ok) for answer, ok in answers if answer.kind == kind]
        latency = [1000 * answer.seconds for answer, _ in mine]
        errors = sum(not ok for _, ok in mine)
        lines.append(
            f"| {kind} | {len(mine)} | {errors} | {len(mine) / seconds:.1f} | "
            f"{percentile(latency, 50):.0f} ms | {percentile(latency, 99):.0f} ms |"
        )
    total_errors = sum(not ok for _, ok in answers)
    lines.append(f"| all | {len(answers)} | {total_errors} | {len(answers) / seconds:.1f} | | |")
    return lines


def fault_figures(figures: list[FaultFigures]) -> dict[str, list[dict]]:
    """Every trial's audit and timing per fault; the answers by count only."""
    return {
        figure.fault: [{**plain(trial, skip=("answers",)), "answers": len(trial.answers)} for trial in figure.trials]
        for figure in figures
    }


def load_figures(answers: list[tuple[Answer, bool]], seconds: float) -> dict[str, dict]:
    """Per request kind: how many, how many failed, and the latency percentiles in milliseconds."""
    summary = {}
    for kind in KINDS:
        latency = [1000 * answer.seconds for answer, _ in answers if answer.kind == kind]
        errors = sum(not ok for answer, ok in answers if answer.kind == kind)
        summary[kind] = {
            "requests": len(latency),
            "errors": errors,
            "per_s": len(latency) / seconds,
            "p50_ms": plain(percentile(latency, 50)),
            "p99_ms": plain(percentile(latency, 99)),
        }
    return summary


def complete(figures: list[FaultFigures]) -> bool:
    """After the resend every batch is stored whole, exactly once: the check a reliability run must pass."""
    return all(t.after.sound and t.after.stored == t.after.sent for figure in figures for t in figure.trials)


# Options of a smoke run: one short trial of each fault, no anchor, two seconds of mixed load.
TINY = shlex.split(
    "--trials 1 --writers 2 --rows 20 --dim 4 --before 5 --outage 1 --freeze 1 --clients 2 --load-seconds 2 --anchor ''"
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials of each fault")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=200, help="rows per batch")
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--before", type=int, default=100, help="batches acknowledged before the fault strikes")
    parser.add_argument("--outage", type=float, default=5.0, help="seconds a killed process stays down")
    parser.add_argument("--freeze", type=float, default=3.0, help="seconds PostgreSQL stays frozen")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--anchor", default="41c8613", help="revision whose API runs the anchor's trials ('' for none)")
    parser.add_argument("--anchor-trials", type=int, default=3)
    return parser


def run(args: argparse.Namespace, command: str) -> Outcome:
    load_before = os.getloadavg()[0]
    started = time.monotonic()

    shape = (args.writers, args.rows, args.dim, args.before, args.outage, args.freeze)
    figures = run_faults(args.trials, *shape)
    anchor: list[FaultFigures] = []
    if args.anchor:
        with source_tree(args.anchor) as code:
            anchor = run_faults(args.anchor_trials, *shape, code)
    with fault_bed({}) as bed:
        target = prepare_load(bed.api, dim=32, read_rows=20_000, bank_items=2000)
        answers = run_mixed_load(target, args.clients, args.load_seconds)

    facts = machine_facts(command, f"Python {sys.version.split()[0]}")
    lines = [
        f"- Date: {facts['date']}",
        f"- Machine: {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']} memory, no GPU; {facts['software']}",
        f"- Command: `{facts['command']}` (wall {time.monotonic() - started:.0f} s)",
        "- PostgreSQL (the embedded wheel's binaries) and the API (`python -m app.cli serve`) are the script's own "
        "child processes on a fresh data directory (tests/fault_kit.py); "
        f"{load_words(load_before, os.getloadavg()[0])}.",
        "",
        f"Faults mid-ingest: {args.writers} writers sending batches of {args.rows} x {args.dim} (Arrow) without "
        f"pause, the fault struck once {args.before} were acknowledged, the API with a {DEADLINE_S:g} s request deadline and default probing (0.25 s while down, "
        f"1 s heartbeat, 1 s probe timeout); a killed process restarted after {args.outage:g} s, PostgreSQL frozen "
        f"for {args.freeze:g} s.",
        "",
        *fault_table(figures),
        "",
        *(
            [
                f"Anchor: the same trials with the API of revision {args.anchor} (before fail-fast: requests wait on "
                "the pool up to the deadline, the pool reconnects with its own backoff, the deadline leaves the "
                "statement running). Its recovery depends on where PostgreSQL's return falls in the pool's "
                "reconnection backoff (attempts 1, 2, 4 ... s apart), so it varies widely from trial to trial:",
                "",
                *fault_table(anchor),
                "",
            ]
            if anchor
            else []
        ),
        "Lost: acknowledged, not stored. Partial: a batch stored in part or with other content. Resent: batches "
        "without a 2xx (503, cut off, refused), sent again with the same batch id until acknowledged; "
        '"already stored" ones were answered `200 duplicate` (their first attempt had committed: the outcome '
        "a 503 leaves unknown). Recovery: from PostgreSQL accepting connections / the API answering /healthz "
        "/ the SIGCONT to the first batch acknowledged through the service. 503 while down: requests answered "
        "once the service could know (0.5 s after the kill; past the deadline for a freeze).",
        "",
        f"Mixed load: {args.clients} clients, one request at a time each, for {args.load_seconds:g} s against a "
        "fresh service (default settings); ingest 500 x 32 per batch, a JSON page of 500 rows (label filter), an "
        "Arrow stream of 5,000 rows, a summary and exact quantiles (Q=10) of a 20,000 x 32 layer, a search of 32 "
        "queries (k=10, HNSW) in a 2,000-item bank and a write of 16 items to it. Errors: anything but the "
        "expected 2xx with a complete body.",
        "",
        *load_table(answers, args.load_seconds),
        "",
    ]
    measured = {
        "faults": fault_figures(figures),
        "anchor": fault_figures(anchor),
        "mixed_load": load_figures(answers, args.load_seconds),
    }
    passed = complete(figures)  # the anchor's revision is measured, not judged
    return Outcome("\n".join(lines), measured, facts, passed=passed)


if __name__ == "__main__":
    from bench.__main__ import main

    sys.exit(main(["reliability", *sys.argv[1:]]))
