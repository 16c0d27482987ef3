"""The default job of `make run`: eidetic_tasks on split digits, quick and offline, against the started service.

`make run` starts the service and runs this with USE_DB=1 and EIDETIC_URL set, so the
run, its Task B activations and its quantile set land in the store; it prints the
comparison table (baseline vs eidetic). About 3.5 minutes on a busy 2-core machine. Extra
arguments go to eidetic_tasks and win over these defaults (e.g. `--dataset fashion`).
"""

from __future__ import annotations

import sys
from typing import Any

from model.experiments import eidetic_tasks

QUICK = ["--dataset", "digits", "--seed", "1", "--epochs", "3", "--out-dir", "outputs"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    extra = sys.argv[1:] if argv is None else argv
    return eidetic_tasks.main([*QUICK, *extra])


if __name__ == "__main__":
    main()
