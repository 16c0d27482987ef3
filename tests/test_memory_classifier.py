"""The memory classifier experiment end to end: tiny runs, the same results with the store or without, resume."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch

from eidetic.client import EideticClient
from eidetic.config import ClientSettings
from model.enhanced_classifier import BackboneUnavailable, make_backbone
from model.experiments import memory_classifier as experiment
from model.experiments.memory_classifier import MemoryClassifierConfig, load_data, run_once

TINY = MemoryClassifierConfig(
    dataset="digits",
    memory_size=48,
    epochs=2,
    batch_size=32,
    widths=(4, 8),
    train_limit=128,
    test_limit=48,
    eval_batch_size=48,
    speed_batches=1,
    speed_repeats=1,
    device="cpu",
    progress=False,
)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", None, TINY.train_limit, TINY.test_limit)


@pytest.fixture
def store_settings(service, monkeypatch) -> ClientSettings:
    monkeypatch.setenv("USE_DB", "1")
    monkeypatch.setenv("EIDETIC_URL", service.base_url)
    monkeypatch.setenv("EIDETIC_API_KEY", service.write_key)
    return ClientSettings()


def history(result: dict) -> list[dict]:
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in result["epochs"]]


def test_the_command_line_runs_every_memory_kind_and_writes_metrics_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("USE_DB", "0")
    metrics = experiment.main(
        [
            "--dataset",
            "digits",
            "--memory",
            "cached",
            "trainable",
            "none",
            "--epochs",
            "2",
            "--memory-size",
            "64",
            "--widths",
            "4",
            "8",
            "--train-limit",
            "128",
            "--test-limit",
            "48",
            "--speed-batches",
            "1",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
            "--threshold",
            "0.9",
            "--similarity-threshold",
            "0.8",
        ]
    )
    saved = json.loads((tmp_path / "memory_classifier_digits.json").read_text())
    assert saved["summary"].keys() == {"cached", "trainable", "none"} == metrics["summary"].keys()
    assert saved["config"]["confidence_threshold"] == 0.9 and saved["config"]["similarity_threshold"] == 0.8
    for kind in ("cached", "trainable", "none"):
        assert (tmp_path / f"memory_classifier_digits_{kind}.png").stat().st_size > 10_000
    for run in saved["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [0, 1]
        final = run["final"]
        assert 0 <= final["test_accuracy"] <= 1 and 0 <= final["memory_path_share"] <= 1
        assert final["memory_items"] == (0 if run["memory"] == "none" else 64)  # 128 samples fill 64 slots
        speed = run["speed"]
        assert speed["feature_ms"] > 0 and speed["head_ms"] > 0
        if run["memory"] == "none":
            assert speed["retrieval_ms"] is None and final["memory_path_share"] == 0
        else:
            assert speed["memory_path_ms"] == pytest.approx(speed["feature_ms"] + speed["retrieval_ms"])


@pytest.mark.parametrize("kind", ["cached", "trainable"])
def test_results_are_the_same_with_the_store_or_without_and_the_run_is_recorded(kind, digits, store_settings, tmp_path):
    config = replace(TINY, memory=kind)
    without = run_once(replace(config, out_dir=tmp_path / "off"), ClientSettings(use_db=False), digits)
    stored = run_once(replace(config, out_dir=tmp_path / "on"), store_settings, digits)
    assert history(stored) == history(without)
    with EideticClient.from_settings(store_settings) as client:
        run = client.get_run(stored["run_id"])
        assert run.status == "finished" and run.config["memory"] == kind
        recorded = client.request("GET", f"/v1/runs/{run.id}").json()["metrics"]
        assert sorted(recorded) == [f"epoch_{epoch}" for epoch in range(config.epochs)]
        assert recorded[f"epoch_{config.epochs - 1}"]["test_accuracy"] == stored["epochs"][-1]["test_accuracy"]
        banks = {bank["name"]: bank for bank in client.list_banks()}
    bank = banks[stored["bank_name"] if kind == "cached" else f"{stored['bank_name']}@{config.epochs - 1}"]
    assert bank["size"] == stored["final"]["memory_items"]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind, use_db", [("trainable", True), ("cached", True), ("trainable", False)])
def test_an_interrupted_run_resumes_where_it_stopped(kind, use_db, digits, request, tmp_path, monkeypatch):
    settings = request.getfixturevalue("store_settings") if use_db else ClientSettings(use_db=False)
    config = replace(TINY, memory=kind)
    straight = run_once(replace(config, out_dir=tmp_path / "straight"), settings, digits)

    train_epoch = experiment.train_epoch

    def stop_at_the_second_epoch(model, data, config, optimizer, scheduler, epoch, bar):
        if epoch == 1:
            raise Interrupted
        return train_epoch(model, data, config, optimizer, scheduler, epoch, bar)

    monkeypatch.setattr(experiment, "train_epoch", stop_at_the_second_epoch)
    with pytest.raises(Interrupted):
        run_once(replace(config, out_dir=tmp_path / "resumed"), settings, digits)
    monkeypatch.setattr(experiment, "train_epoch", train_epoch)
    resumed = run_once(replace(config, out_dir=tmp_path / "resumed", resume=True), settings, digits)
    assert resumed["resumed_from_epoch"] == 0
    assert history(resumed) == history(straight)
    if use_db:
        with EideticClient.from_settings(settings) as client:
            assert client.get_run(resumed["run_id"]).status == "finished"


def test_a_timm_backbone_without_timm_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(BackboneUnavailable, match="pip install timm"):
        make_backbone("resnet18", 3)
    backbone, features = make_backbone("small_cnn", 3, (8, 16))
    assert features == 16 and backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
