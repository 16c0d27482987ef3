"""The stream demo: trains the same with USE_DB on or off, and stores every penultimate activation once."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the demo trains a torch model (the [train] extra)")
pytest.importorskip("sklearn", reason="the demo's data is scikit-learn's bundled digits (the [train] extra)")

from model.experiments import stream_demo


@pytest.fixture
def store_env(service, monkeypatch, tmp_path):
    """The demo's settings point at the test service; no outer USE_DB and no .env of the checkout."""
    for name in ("USE_DB", "DATABASE_URL", "EIDETIC_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EIDETIC_URL", service.base_url)
    monkeypatch.setenv("EIDETIC_API_KEY", service.write_key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_demo_streams_every_activation_and_trains_the_same_without_the_store(store_env, capsys) -> None:
    common = ["--epochs", "1", "--no-progress"]
    offline = stream_demo.main([*common, "--no-use-db", "--out-dir", str(store_env / "offline")])
    online = stream_demo.main([*common, "--use-db", "--out-dir", str(store_env / "online"), "--run-name", "demo"])

    assert online["train_loss"] == offline["train_loss"]
    assert online["test_accuracy"] == offline["test_accuracy"] > 0.5

    n_train = 1437  # 80 % of the 1797 bundled digits
    assert online["summary"]["rows"] == n_train
    assert len(online["summary"]["mean"]) == stream_demo.DemoConfig().hidden
    assert online["writer"]["rows_sent"] == online["writer"]["rows_queued"] == n_train
    assert online["writer"]["rows_failed"] == 0

    written = json.loads((store_env / "online" / "stream_demo.json").read_text())
    assert written["run_id"] == online["run_id"] and written["use_db"] is True
    assert "layer summary" in capsys.readouterr().out
