"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

What `docker compose up` promises: `db` is the official pgvector image with its data in a
named volume and a pg_isready health check; `api` is built from the Dockerfile, waits for a
healthy `db`, reaches it with db's own credentials and publishes 8000; the image runs
`eidetic serve` (a console script of this distribution) as a non-root user, without torch.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
MAKEFILE = ROOT / "Makefile"

_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# ---------------------------------------------------------------- compose


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads(PYPROJECT.read_text())


def interpolate(value, variables: dict[str, str] | None = None):
    """Compose's `${VAR:-default}` substitution, with the defaults (not this shell's environment)."""
    variables = variables or {}
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        return variables.get(name) or match.group("default") or ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open() as handle:
        return interpolate(yaml.safe_load(handle))


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    """A service's environment, written as a mapping or as a list of NAME=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def depends_on(service: dict) -> dict[str, str]:
    """Each dependency and its condition (the list form means service_started)."""
    needs = service.get("depends_on") or {}
    if isinstance(needs, list):
        return {name: "service_started" for name in needs}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in needs.items()}


def published_ports(service: dict) -> set[tuple[str, str]]:
    """(host port, container port) pairs, from the short or the long syntax."""
    pairs = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            pairs.add((str(port.get("published", "")), str(port["target"])))
            continue
        mapping = str(port).split("/")[0]
        parts = mapping.rsplit(":", 2)
        if len(parts) == 1:
            pairs.add(("", parts[0]))
        else:
            pairs.add((parts[-2], parts[-1]))
    return pairs


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) pairs, from the short or the long syntax."""
    mounts = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            mounts.append((volume.get("source", ""), volume["target"]))
        else:
            source, target = str(volume).split(":")[:2]
            mounts.append((source, target))
    return mounts


def healthcheck_command(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test")
    assert test, "no health check"
    if isinstance(test, str):
        return test
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def test_db_and_api_start_by_default_and_trainer_is_opt_in(services: dict) -> None:
    assert {"db", "api", "trainer"} <= set(services)
    assert "profiles" not in services["db"]
    assert "profiles" not in services["api"]
    assert services["trainer"]["profiles"] == ["trainer"]


def test_db_is_the_official_pgvector_image(services: dict) -> None:
    assert re.fullmatch(r"pgvector/pgvector:pg\d+(\.\d+)?(-\w+)?", services["db"]["image"])


def test_db_keeps_its_data_in_a_named_volume(compose: dict, services: dict) -> None:
    major = int(re.search(r":pg(\d+)", services["db"]["image"]).group(1))
    # The postgres images moved PGDATA under a versioned folder of /var/lib/postgresql at 18.
    data_dir = "/var/lib/postgresql" if major >= 18 else "/var/lib/postgresql/data"
    named = set(compose.get("volumes") or {})
    assert any(source in named and target == data_dir for source, target in volume_mounts(services["db"])), (
        f"db needs a named volume at {data_dir}; has {volume_mounts(services['db'])}"
    )


def test_db_has_postgres_credentials_and_a_pg_isready_health_check(services: dict) -> None:
    env = environment(services["db"])
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env.get(name), f"db needs {name}"
    command = healthcheck_command(services["db"])
    assert re.search(r"\bpg_isready\b", command)
    assert "-U" in command and "-d" in command


def test_api_is_built_from_the_dockerfile_without_extras(services: dict) -> None:
    build = services["api"]["build"]
    build = {"context": build} if isinstance(build, str) else build
    assert (ROOT / build["context"]).resolve() == ROOT
    assert (ROOT / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert not (build.get("args") or {}).get("EXTRAS"), "the API image must not install extras (torch)"


def test_api_waits_for_a_healthy_db(services: dict) -> None:
    assert depends_on(services["api"]).get("db") == "service_healthy"


def test_api_publishes_port_8000(services: dict) -> None:
    assert ("8000", "8000") in published_ports(services["api"])


def test_api_database_url_is_db_with_db_credentials(services: dict) -> None:
    db = environment(services["db"])
    url = urlsplit(environment(services["api"])["DATABASE_URL"])
    assert url.scheme in ("postgresql", "postgres", "postgresql+psycopg")
    assert url.hostname == "db"
    assert url.port in (None, 5432)
    assert url.username == db["POSTGRES_USER"]
    assert url.password == db["POSTGRES_PASSWORD"]
    assert url.path == "/" + db["POSTGRES_DB"]


def test_api_health_check_asks_the_service_itself(services: dict) -> None:
    command = healthcheck_command(services["api"])
    assert re.search(r"http://(127\.0\.0\.1|localhost):8000/(healthz|readyz)", command)
    assert "curl" not in command and "wget" not in command, "python:*-slim has neither curl nor wget"


def test_trainer_builds_the_train_extra_and_writes_through_the_api(services: dict) -> None:
    trainer = services["trainer"]
    assert "train" in trainer["build"]["args"]["EXTRAS"].split(",")
    assert trainer.get("image") != services["api"].get("image"), "the two builds would overwrite one image"
    env = environment(trainer)
    assert env["USE_DB"] == "1"
    url = urlsplit(env["EIDETIC_URL"])
    assert (url.hostname, url.port) == ("api", 8000)
    assert "DATABASE_URL" not in env, "the trainer talks to the API; a DATABASE_URL would bypass it"
    assert depends_on(trainer).get("api") == "service_healthy"


def test_trainer_runs_the_job_of_make_run(services: dict) -> None:
    """`make run` starts the launcher, which runs DEFAULT_JOB against the service; the trainer runs that job."""
    from model.launch import DEFAULT_JOB

    recipe = re.search(r"^run:.*\n((?:\t.*\n?)+)", MAKEFILE.read_text(), re.MULTILINE)
    assert recipe, "the Makefile has no `run` target"
    assert "-m model.launch" in recipe.group(1), f"`make run` does not start the launcher: {recipe.group(1)!r}"
    trainer = services["trainer"]
    command = trainer["command"] if isinstance(trainer["command"], str) else " ".join(trainer["command"])
    assert f"-m {DEFAULT_JOB}" in command


CITUS_NODES = ("citus-coordinator", "citus-worker-1", "citus-worker-2")
CITUS_SERVICES = (*CITUS_NODES, "citus-register", "citus-migrate", "api-citus")
CITUS_DOCKERFILE = ROOT / "docker" / "citus.Dockerfile"


def test_the_citus_profile_is_opt_in(services: dict) -> None:
    assert set(CITUS_SERVICES) <= set(services)
    for name in CITUS_SERVICES:
        assert services[name]["profiles"] == ["citus"], name


def test_citus_nodes_are_the_citus_image_with_pgvector(compose: dict, services: dict) -> None:
    text = CITUS_DOCKERFILE.read_text()
    assert re.search(r"^ARG CITUS_IMAGE=citusdata/citus:\d+\.\d+", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{CITUS_IMAGE\}", text, re.MULTILINE)
    assert "postgresql-${PG_MAJOR}-pgvector" in text
    assert "CREATE EXTENSION IF NOT EXISTS vector" in text and "/docker-entrypoint-initdb.d/" in text
    named = set(compose.get("volumes") or {})
    for name in CITUS_NODES:
        node = services[name]
        assert (ROOT / node["build"]["context"] / node["build"]["dockerfile"]).resolve() == CITUS_DOCKERFILE
        assert "max_prepared_transactions=100" in node["command"], "Citus commits across workers in two phases"
        assert any(source in named and target == "/var/lib/postgresql/data" for source, target in volume_mounts(node))
        assert re.search(r"\bpg_isready\b.*-h 127\.0\.0\.1", healthcheck_command(node))
        assert environment(node) == environment(services["citus-coordinator"]), "one set of credentials"


def test_citus_register_adds_every_worker_to_the_coordinator(services: dict) -> None:
    register = services["citus-register"]
    assert depends_on(register) == dict.fromkeys(
        ("citus-coordinator", "citus-worker-1", "citus-worker-2"), "service_healthy"
    )
    assert environment(register)["PGHOST"] == "citus-coordinator"
    ((source, target),) = volume_mounts(register)
    script = (ROOT / source).read_text()
    assert target in " ".join(register["command"])
    assert "citus_set_coordinator_host('citus-coordinator', 5432)" in script
    for worker in ("citus-worker-1", "citus-worker-2"):
        assert f"citus_add_node('{worker}', 5432)" in script
    assert "pg_dist_authinfo" in script, "the nodes must be able to log in to each other"


def test_api_citus_serves_the_distributed_layout_from_the_coordinator(services: dict) -> None:
    migrate, api = services["citus-migrate"], services["api-citus"]
    arguments = build_parser().parse_args(migrate["command"])
    assert (arguments.command, arguments.distribute) == ("migrate", True)
    assert depends_on(migrate) == {"citus-register": "service_completed_successfully"}
    assert depends_on(api) == {"citus-migrate": "service_completed_successfully"}
    coordinator = environment(services["citus-coordinator"])
    for service in (migrate, api):
        url = urlsplit(environment(service)["DATABASE_URL"])
        assert (url.hostname, url.port) == ("citus-coordinator", 5432)
        assert (url.username, url.password) == (coordinator["POSTGRES_USER"], coordinator["POSTGRES_PASSWORD"])
        assert url.path == "/" + coordinator["POSTGRES_DB"]
        assert service["image"] == services["api"]["image"]
    assert ("8001", "8000") in published_ports(api)
    assert re.search(r"http://127\.0\.0\.1:8000/readyz", healthcheck_command(api))


@pytest.mark.skipif(
    shutil.which("docker-compose") is None and shutil.which("docker") is None, reason="no docker client here"
)
def test_compose_client_accepts_the_file() -> None:
    """`docker compose config -q` (or the standalone docker-compose) validates without an engine."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        if subprocess.run([*command, "version"], capture_output=True, timeout=60).returncode != 0:
            continue
        checked = subprocess.run(
            [*command, "-f", str(COMPOSE_FILE), "--profile", "trainer", "--profile", "citus", "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert checked.returncode == 0, checked.stderr
        return
    pytest.skip("no docker compose client here")


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The JSON array of ENTRYPOINT / CMD (the shell form is split like a shell would)."""
        text = self.arguments.strip()
        return json.loads(text) if text.startswith("[") else shlex.split(text)


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined and comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, arguments = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[list[Instruction]]]:
    """Global ARG defaults (before the first FROM), then each stage's instructions (FROM first)."""
    global_args, found = {}, []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            found.append([instruction])
        elif found:
            found[-1].append(instruction)
        elif instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            global_args[name] = default.strip("\"'")
    return global_args, found


def arg_defaults(stage: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for instruction in stage:
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            defaults[name] = default.strip("\"'")
    return defaults


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(dockerfile: list[Instruction]) -> list[Instruction]:
    return stages(dockerfile)[1][-1]


def last(stage: list[Instruction], keyword: str) -> Instruction | None:
    found = [instruction for instruction in stage if instruction.keyword == keyword]
    return found[-1] if found else None


def test_image_is_python_3_11_slim(dockerfile: list[Instruction], final_stage: list[Instruction]) -> None:
    global_args, _ = stages(dockerfile)
    base = interpolate(final_stage[0].arguments.split()[0], global_args)
    assert base == "python:3.11-slim"


def test_image_runs_eidetic_serve_on_all_interfaces_port_8000(final_stage: list[Instruction]) -> None:
    entrypoint = last(final_stage, "ENTRYPOINT")
    cmd = last(final_stage, "CMD")
    argv = (entrypoint.exec_form() if entrypoint else []) + (cmd.exec_form() if cmd else [])
    assert argv[:2] == ["eidetic", "serve"], argv
    assert argv[2:] == ["--host", "0.0.0.0", "--port", "8000"], argv
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)


def test_eidetic_is_a_console_script_of_this_distribution() -> None:
    scripts = pyproject()["project"]["scripts"]
    assert scripts["eidetic"] == "app.cli:main"


def test_image_installs_no_train_extra_by_default(dockerfile: list[Instruction]) -> None:
    _, found = stages(dockerfile)
    for stage in found:
        assert arg_defaults(stage).get("EXTRAS", "") == ""
    installs = [i.arguments for i in dockerfile if i.keyword == "RUN" and "pip install" in i.arguments]
    assert installs, "the Dockerfile installs nothing with pip"
    for command in installs:
        assert "train" not in command and "torch" not in command, command
    assert any(re.search(r"pip install \.(\s|;|$)", command) for command in installs), "no plain `pip install .`"


def test_image_copies_what_the_package_needs(dockerfile: list[Instruction]) -> None:
    project = pyproject()
    packages = [pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = set()
    for instruction in dockerfile:
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from"):
            copied.update(part.strip("./") for part in instruction.arguments.split()[:-1])
    assert {"pyproject.toml", project["project"]["readme"], *packages} <= copied
    ignored = {line.strip().strip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    assert {".venv", ".git"} <= ignored
    assert not ignored & {"pyproject.toml", project["project"]["readme"], *packages}


def test_image_runs_as_a_non_root_user(final_stage: list[Instruction]) -> None:
    user = last(final_stage, "USER")
    assert user is not None
    assert user.arguments.split(":")[0] not in ("root", "0")


def test_image_health_check_uses_python_against_healthz(final_stage: list[Instruction]) -> None:
    health = last(final_stage, "HEALTHCHECK")
    assert health is not None
    command = health.arguments.split("CMD", 1)[1]
    assert "python" in command and "http://127.0.0.1:8000/healthz" in command
    assert "curl" not in command and "wget" not in command
    assert last(final_stage, "EXPOSE").arguments.split() == ["8000"]
