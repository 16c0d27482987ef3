"""The package boundary: `eidetic` is what a training script imports; app/ and model/ stay on their sides.

- eidetic/ imports nothing of app/ or model/ (its direct transport loads the service only
  when a writer chooses it, inside eidetic/direct.py);
- model/ imports eidetic, never app; app/ imports nothing of model/ and never torch;
- `import eidetic` loads neither psycopg nor torch; `import eidetic.torch` loads torch but
  nothing of the service;
- installed for real (not editable) in a fresh virtual environment, the writer works from a
  folder that holds its own model.py, app.py and model/.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import make_layer, stored_rows

REPO = Path(__file__).resolve().parent.parent
LAZY_SERVICE_MODULES = {REPO / "eidetic" / "direct.py"}


def imported_packages(path: Path) -> set[str]:
    """The top-level names a module imports, wherever the import statement stands."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(folder: str, forbidden: set[str], exempt: set[Path] = frozenset()) -> dict[str, set[str]]:
    found = {}
    for path in sorted((REPO / folder).rglob("*.py")):
        if path in exempt:
            continue
        bad = imported_packages(path) & forbidden
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


def test_eidetic_imports_nothing_of_the_service_or_the_models():
    assert offenders("eidetic", {"app", "model", "migrations"}, LAZY_SERVICE_MODULES) == {}


def test_model_uses_eidetic_never_app():
    assert offenders("model", {"app", "migrations"}) == {}


def test_app_imports_nothing_of_model_and_never_torch():
    assert offenders("app", {"model", "torch", "torchvision"}) == {}


def test_the_direct_transport_is_the_one_place_eidetic_reaches_the_service():
    assert imported_packages(REPO / "eidetic" / "direct.py") & {"app"} == {"app"}
    writer_source = (REPO / "eidetic" / "writer.py").read_text()
    assert "from eidetic.direct import" in writer_source.split("def open_writer", 1)[1], (
        "imported lazily, in open_writer"
    )


def run_python(code: str, cwd: Path = REPO, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_eidetic_loads_neither_psycopg_nor_torch():
    done = run_python(
        """
        import sys
        import eidetic
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"psycopg", "torch", "app", "model", "pgvector"})
        assert not loaded, loaded
        assert callable(eidetic.open_writer) and eidetic.EideticClient and eidetic.ClientSettings
        """
    )
    assert done.returncode == 0, done.stderr


def test_import_eidetic_torch_needs_torch_and_nothing_of_the_service():
    done = run_python(
        """
        import sys
        import eidetic.torch
        assert "torch" in sys.modules
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"psycopg", "app", "model", "pgvector", "fastapi"})
        assert not loaded, loaded
        assert eidetic.torch.QuantileCache and eidetic.torch.MemoryCache
        """
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory) -> Path:
    """A fresh virtual environment with `pip install '.[train]'` (a built wheel, not an editable link)."""
    source = tmp_path_factory.mktemp("source")  # a copy: building in place would leave build/ in the repo
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    venv = tmp_path_factory.mktemp("fresh-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-compile",
            f"{source}[train]",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return python


def test_a_training_project_with_its_own_model_and_app_writes_through_the_installed_package(
    installed_python, service, api, tmp_path
):
    project = tmp_path / "project"
    (project / "model").mkdir(parents=True)
    shadow = "raise RuntimeError('the training project\\'s own {} was imported by eidetic')\n"
    (project / "model.py").write_text(shadow.format("model.py"))
    (project / "model" / "__init__.py").write_text(shadow.format("model/"))
    (project / "app.py").write_text(shadow.format("app.py"))
    run_id, layer_id = make_layer(api, dim=4)
    (project / "train.py").write_text(
        textwrap.dedent(
            f"""
            import sys
            import numpy as np
            import eidetic

            assert "site-packages" in eidetic.__file__, eidetic.__file__
            settings = eidetic.ClientSettings(eidetic_url={service.base_url!r}, eidetic_api_key={service.write_key!r})
            with eidetic.open_writer({run_id}, {layer_id}, settings=settings, batch_rows=64) as writer:
                for step in range(5):
                    writer.write(np.full((50, 4), step, dtype=np.float32), step=step, label=np.arange(50) % 10)
            print("sent", writer.stats().rows_sent)
            """
        )
    )
    done = subprocess.run([str(installed_python), "train.py"], cwd=project, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sent 250" in done.stdout
    assert stored_rows(service.database_url, layer_id) == 250
