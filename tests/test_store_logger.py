"""The store logger: a run created with its config, metrics merged in, finished or failed; nothing without USE_DB."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest

from eidetic.config import ClientSettings
from model.experiments.options import option
from model.experiments.store_logger import RunLogger, StepSink, StoreLogger, open_run


@dataclass(frozen=True)
class Config:
    dataset: str = option("digits")
    widths: tuple[int, ...] = option((4, 8))
    out_dir: Path = option(Path("outputs"))


@pytest.fixture
def store(service, monkeypatch) -> ClientSettings:
    for name in ("USE_DB", "DATABASE_URL", "EIDETIC_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    return ClientSettings(use_db=True, eidetic_url=service.base_url, eidetic_api_key=service.write_key)


def stored_run(api, run_id: int) -> dict:
    return api.get(f"/v1/runs/{run_id}").json()


def test_a_run_is_created_with_its_config_and_finished_with_its_metrics(store, api):
    with open_run(store, "logged", Config()) as logger:
        assert isinstance(logger, StoreLogger) and logger.enabled
        during = stored_run(api, logger.run_id)
        logger.log({"loss": np.float32(0.5), "accuracy": [0.25, float("nan")]})
        logger.log({"test_accuracy": 0.75}, key="epoch_0")
        logger.log({"test_accuracy": 0.8}, key="epoch_0")  # the same key again: replaced
        StepSink(logger, "glom/epoch_").record({"train_loss": 1.5}, 2)
    assert during["status"] == "running" and during["name"] == "logged"
    assert during["config"] == {"dataset": "digits", "widths": [4, 8], "out_dir": "outputs"}
    run = stored_run(api, logger.run_id)
    assert run["status"] == "finished"
    assert run["metrics"] == {
        "loss": 0.5,
        "accuracy": [0.25, None],  # NaN is not JSON: null
        "epoch_0": {"test_accuracy": 0.8},
        "glom/epoch_2": {"train_loss": 1.5},
    }


class Interrupted(Exception):
    pass


def test_a_run_that_raises_is_marked_failed_and_the_error_goes_on(store, api):
    with pytest.raises(Interrupted), open_run(store, "crashing", {"epochs": 3}) as logger:
        logger.log({"epoch_0": {"loss": 2.0}})
        raise Interrupted
    run = stored_run(api, logger.run_id)
    assert (run["status"], run["config"], run["metrics"]) == ("failed", {"epochs": 3}, {"epoch_0": {"loss": 2.0}})


def test_a_resumed_run_is_the_same_run_running_again(store, api):
    with pytest.raises(Interrupted), open_run(store, "resumable", Config()) as first:
        first.log({"loss": 1.0}, key="epoch_0")
        raise Interrupted
    with open_run(store, "ignored", Config(), resume_run_id=first.run_id) as again:
        assert again.run_id == first.run_id and stored_run(api, first.run_id)["status"] == "running"
        again.log({"loss": 0.5}, key="epoch_1")
    run = stored_run(api, first.run_id)
    assert run["status"] == "finished" and run["name"] == "resumable"
    assert run["metrics"] == {"epoch_0": {"loss": 1.0}, "epoch_1": {"loss": 0.5}}


def test_layers_and_writers_of_the_run(store, service):
    with open_run(store, "with a layer", Config()) as logger:
        layer_id = logger.create_layer("penultimate", 3)
        with logger.open_writer(layer_id) as writer:
            writer.write(np.ones((5, 3), dtype=np.float32), task="A")
    with psycopg.connect(service.database_url) as conn:
        rows = conn.execute("SELECT count(*) FROM activations WHERE layer_id = %s", (layer_id,)).fetchone()[0]
    assert rows == 5


def test_without_use_db_the_logger_accepts_everything_and_sends_nothing(store, api):
    before = api.get("/v1/runs").json()["runs"]
    with open_run(ClientSettings(use_db=False, eidetic_url="http://127.0.0.1:9"), "nowhere", Config()) as logger:
        assert type(logger) is RunLogger and not logger.enabled
        logger.log({"loss": 1.0})
        StepSink(logger).record({"loss": 1.0}, 0)
        assert logger.run_id is None and logger.client is None
        assert logger.create_layer("penultimate", 3) is None
        with pytest.raises(RuntimeError, match="USE_DB"):
            logger.open_writer(1)
    assert api.get("/v1/runs").json()["runs"] == before
