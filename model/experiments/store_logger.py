"""One logger for every experiment's run: created in the store with its config, metrics merged in, then closed.

    with open_run(settings, name, config) as logger:      # a RunLogger: no-op when USE_DB is off
        layer_id = logger.create_layer("penultimate", 64)   # None when off
        ...
        logger.log({"test_accuracy": 0.97})                 # merged into the run's metrics
        logger.log(epoch_metrics, key="epoch_3")            # under one key (given again: replaced)
    # finished on a clean exit, failed when an exception leaves the block

`RunLogger` is the no-op logger (USE_DB off): the same calls, nothing sent, so an
experiment has one code path and the same results either way. `StoreLogger` records into
the store through `eidetic.EideticClient`; `logger.client` (None when off) is there for
what only the store does (quantile sets, memory banks, layer summaries).
`StepSink(logger, prefix)` turns it into the `record(metrics, step)` sink the training
loops call once per epoch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import PurePath
from types import TracebackType
from typing import Any

from eidetic.client import EideticClient
from eidetic.config import ClientSettings
from eidetic.writer import ActivationWriter, open_writer
from model.experiments.options import config_json

__all__ = ["RunLogger", "StepSink", "StoreLogger", "jsonable", "open_run"]


class RunLogger:
    """The logger of a run kept nowhere (USE_DB off): every call is accepted and does nothing."""

    run_id: int | None = None
    name: str | None = None
    client: EideticClient | None = None

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def log(self, metrics: Mapping[str, Any], *, key: str | None = None) -> None:
        """Merges `metrics` into the run's (under `key` when given); a key given again replaces its value."""

    def create_layer(self, name: str, dim: int, **options: Any) -> int | None:
        """A layer of the run for activations; its id (None: no store)."""
        return None

    def open_writer(self, layer_id: int) -> ActivationWriter:
        raise RuntimeError("no store: USE_DB is off")

    def finish(self) -> None:
        """Marks the run finished."""

    def fail(self) -> None:
        """Marks the run failed."""

    def close(self) -> None:
        """Releases the connection (the run's status is left as it is)."""

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.finish()
            else:
                self.fail()
        finally:
            self.close()


class StoreLogger(RunLogger):
    """A run in the Eidetic store: its config, metrics and status, over one client."""

    def __init__(self, client: EideticClient, run_id: int, name: str, settings: ClientSettings) -> None:
        self.client = client
        self.run_id = run_id
        self.name = name
        self.settings = settings
        self._closed = False

    @classmethod
    def start(
        cls, settings: ClientSettings, name: str, config: Any, *, resume_run_id: int | None = None
    ) -> StoreLogger:
        """A new run (status running) with `config` (a dataclass or a mapping) as its config JSON, or, with
        `resume_run_id`, that run again, set back to running."""
        client = EideticClient.from_settings(settings)
        try:
            if resume_run_id is not None:
                run = client.set_run_status(resume_run_id, "running")
            else:
                run = client.create_run(name, _config_of(config))
        except BaseException:
            client.close()
            raise
        return cls(client, run.id, run.name, settings)

    def log(self, metrics: Mapping[str, Any], *, key: str | None = None) -> None:
        assert self.client is not None and self.run_id is not None
        values = jsonable(dict(metrics))
        self.client.record_metrics(self.run_id, values if key is None else {key: values})

    def create_layer(self, name: str, dim: int, **options: Any) -> int:
        assert self.client is not None and self.run_id is not None
        return self.client.create_layer(self.run_id, name, dim, **options).id

    def open_writer(self, layer_id: int) -> ActivationWriter:
        """A writer into one of the run's layers (close it, or use it as a context manager)."""
        assert self.run_id is not None
        return open_writer(self.run_id, layer_id, self.settings)

    def finish(self) -> None:
        self._status("finished")

    def fail(self) -> None:
        self._status("failed")

    def close(self) -> None:
        if self.client is not None and not self._closed:
            self.client.close()
            self._closed = True

    def _status(self, status: str) -> None:
        assert self.client is not None and self.run_id is not None
        self.client.set_run_status(self.run_id, status)


def open_run(settings: ClientSettings, name: str, config: Any, *, resume_run_id: int | None = None) -> RunLogger:
    """The run's logger: in the store with USE_DB (settings.use_db), else the no-op one."""
    if not settings.use_db:
        return RunLogger()
    return StoreLogger.start(settings, name, config, resume_run_id=resume_run_id)


class StepSink:
    """`record(metrics, step)` (the training loops' metric sink) as one logged key per step: f"{prefix}{step}"."""

    def __init__(self, logger: RunLogger, prefix: str = "step_") -> None:
        self.logger = logger
        self.prefix = prefix

    def record(self, metrics: Mapping[str, Any], step: int) -> None:
        self.logger.log(metrics, key=f"{self.prefix}{step}")


def jsonable(value: Any) -> Any:
    """Plain JSON values: numpy and torch scalars and arrays become numbers and lists, NaN and inf become null."""
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars, tensors
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return value


def _config_of(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return config_json(config)
    return jsonable(dict(config))
