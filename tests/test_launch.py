"""`make run`'s launcher: the service on the embedded database, a job with USE_DB on against it."""

import os
import subprocess
import sys

import pytest

from tests.conftest import free_port


@pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")), reason="make run uses the embedded server, which DATABASE_URL replaces"
)
def test_the_launcher_serves_and_runs_the_job_against_the_store(tmp_path):
    port = free_port()
    job = f"model.experiments.stream_demo --epochs 1 --no-progress --out-dir {tmp_path / 'out'}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model.launch",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "pg"),
            "--job",
            job,
            "--exit-after-job",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Eidetic is serving at http://127.0.0.1:{port}" in result.stdout
    assert "rows stored" in result.stdout  # the job wrote to the store it was given
    assert (tmp_path / "out" / "stream_demo.json").exists()
