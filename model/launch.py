"""What `make run` does: the service on the embedded database, the default job against it, then keep serving.

The service runs in its own process (`eidetic up --no-auth` on loopback, as `make run`
is a local demo); the job runs with USE_DB on against it, prints its metrics, and the
service keeps serving (OpenAPI at /docs) until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

DEFAULT_JOB = "model.experiments.run_default"


def wait_ready(base_url: str, service: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"the service exited with code {service.returncode}; is port {base_url} in use?")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit("the service did not become ready in time")


def stop(service: subprocess.Popen) -> int:
    if service.poll() is None:
        service.send_signal(signal.SIGINT)
        try:
            return service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
    return service.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=int(os.environ.get("EIDETIC_PORT", 8000)))
    parser.add_argument("--data-dir", default=os.environ.get("EIDETIC_RUN_DATA_DIR", ".eidetic/pgdata"))
    parser.add_argument(
        "--job",
        default=os.environ.get("EIDETIC_JOB", DEFAULT_JOB),
        help="module (and its arguments) run with USE_DB on",
    )
    parser.add_argument("--exit-after-job", action="store_true", help="stop the service when the job ends")
    args = parser.parse_args(argv)

    Path(args.data_dir).parent.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{args.port}"
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    service = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "up",
            "--no-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(args.port),
            "--data-dir",
            args.data_dir,
        ],
        env=env,
    )
    try:
        wait_ready(base_url, service)
        print(
            f"\nEidetic is serving at {base_url} (OpenAPI at {base_url}/docs); running {args.job} with USE_DB=1\n",
            flush=True,
        )
        job_env = {**env, "USE_DB": "1", "EIDETIC_URL": base_url}
        job = subprocess.run([sys.executable, "-m", *shlex.split(args.job)], env=job_env)
        if job.returncode != 0:
            print(f"the job {args.job} failed with code {job.returncode}", file=sys.stderr)
        if args.exit_after_job:
            return job.returncode
        print(
            f"\nStill serving at {base_url} (OpenAPI at {base_url}/docs). Ctrl-C stops the service and its database.",
            flush=True,
        )
        service.wait()
        return job.returncode
    except KeyboardInterrupt:
        return 0
    finally:
        stop(service)


if __name__ == "__main__":
    sys.exit(main())
