"""The eidetic_tasks experiment end to end (tiny): the same metrics with USE_DB on and off, recorded in the store."""

from __future__ import annotations

import gzip
import json

import numpy as np
import psycopg
import pytest

torch = pytest.importorskip("torch", reason="the experiment trains a torch model (the [train] extra)")
pytest.importorskip("sklearn", reason="the offline data is scikit-learn's bundled digits (the [train] extra)")

from model import data  # noqa: E402
from model.experiments import eidetic_tasks  # noqa: E402
from tests.helpers import stored_rows  # noqa: E402

TINY = {"TASK_A_SUBSET_CARDINALITY": "32", "TASK_B_SUBSET_CARDINALITY": "24", "NUM_QUANTILES": "3", "DEVICE": "cpu"}
ARGS = ["--dataset", "digits", "--epochs", "1", "--test-limit", "20", "--no-progress"]


@pytest.fixture
def experiment_env(service, monkeypatch, tmp_path):
    """Settings point at the test service; nothing from an outer environment or a .env of the checkout."""
    for name in ("USE_DB", "DATABASE_URL", "EIDETIC_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EIDETIC_URL", service.base_url)
    monkeypatch.setenv("EIDETIC_API_KEY", service.write_key)
    for name, value in TINY.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_use_db_on_and_off_give_the_same_metrics_and_the_store_holds_the_run(
    experiment_env, service, monkeypatch, capsys
):
    monkeypatch.setenv("USE_DB", "0")
    offline = eidetic_tasks.main([*ARGS, "--out-dir", "offline"])
    monkeypatch.setenv("USE_DB", "1")
    online = eidetic_tasks.main([*ARGS, "--out-dir", "online", "--run-name", "tiny", "--save-model"])

    (off,), (on,) = offline["runs"], online["runs"]
    assert on["quantiles"]["boundaries_sha"] == off["quantiles"]["boundaries_sha"]
    assert on["quantiles"]["rows"] == off["quantiles"]["rows"] == 24
    assert on["arms"] == off["arms"]
    assert set(on["arms"]) == {"baseline", "eidetic"} and on["arms"]["eidetic"]["n_quantiles"] == 3
    assert (
        on["arms"]["eidetic"]["trainable_parameters"]
        == 3 * on["arms"]["baseline"]["trainable_parameters"]
        == 3 * 36 * 36
    )
    # the Task A phase is shared: both arms start Task B from the same accuracies
    assert on["arms"]["baseline"]["accuracy_matrix"][0] == on["arms"]["eidetic"]["accuracy_matrix"][0]

    # the metrics follow from each arm's accuracy matrix (two tasks)
    for arm in on["arms"].values():
        for view in (arm, arm["task_aware"]):
            (a_a, b_a), (a_b, b_b) = view["accuracy_matrix"]
            assert view["backward_transfer"] == pytest.approx(a_b - a_a)
            assert view["forgetting"] == pytest.approx(a_a - a_b)
            assert view["forward_transfer"] == pytest.approx(b_a - view["initial_accuracy"][1])
            assert view["average_accuracy"] == pytest.approx((a_b + b_b) / 2)
        assert arm["task_aware"]["accuracy_matrix"][0][0] >= arm["accuracy_matrix"][0][0]

    # the store: one finished run, its EideticIndexed layer holding every Task B row, one exact quantile set
    assert off["quantiles"]["set_id"] is None and on["quantiles"]["set_id"] is not None
    assert stored_rows(service.database_url, on["layer_id"]) == 24
    with psycopg.connect(service.database_url) as conn:
        name, status, config = conn.execute(
            "SELECT name, status, config FROM runs WHERE id = %s", (on["run_id"],)
        ).fetchone()
        tasks = conn.execute("SELECT DISTINCT task FROM activations WHERE layer_id = %s", (on["layer_id"],)).fetchall()
    assert (name, status, config["num_quantiles"], config["dataset"]) == ("tiny", "finished", 3, "digits")
    assert tasks == [("B",)]

    # what it writes: JSON, PNG, benchmark.log lines, saved models, the printed table
    written = json.loads((experiment_env / "online" / "eidetic_tasks_digits.json").read_text())
    assert written["runs"][0]["run_id"] == on["run_id"] and written["use_db"] is True
    assert (experiment_env / "online" / "eidetic_tasks_digits.png").stat().st_size > 10_000
    assert len(list((experiment_env / "online").glob("*.pt"))) == 2
    log = (experiment_env / "benchmark.log").read_text()
    assert log.count("arm=eidetic Q=3 view=single_head") == 2
    printed = capsys.readouterr().out
    assert "forgetting" in printed and "baseline" in printed and "task-aware" in printed


def test_one_quantile_runs_the_baseline_alone():
    assert eidetic_tasks.TasksConfig(num_quantiles=1).arms == {"baseline": 1}
    assert eidetic_tasks.TasksConfig(num_quantiles=8).arms == {"baseline": 1, "eidetic": 8}


def test_the_summary_gives_mean_and_spread_over_seeds():
    def fake_run(accuracy: float) -> dict:
        arm = {
            "accuracy_matrix": [[accuracy, 0.0], [0.0, accuracy]],
            "average_accuracy": accuracy / 2,
            "backward_transfer": -accuracy,
            "forward_transfer": 0.0,
            "forgetting": accuracy,
        }
        return {"arms": {"baseline": {**arm, "task_aware": arm}}}

    summary = eidetic_tasks.summarise([fake_run(0.6), fake_run(0.8), fake_run(1.0)])
    for view in ("single_head", "task_aware"):
        forgetting = summary[view]["baseline"]["forgetting"]
        assert forgetting["mean"] == pytest.approx(0.8) and forgetting["std"] == pytest.approx(0.2)
        assert (forgetting["min"], forgetting["max"]) == (0.6, 1.0)
    one_seed = eidetic_tasks.summarise([fake_run(0.5)])
    assert one_seed["single_head"]["baseline"]["acc_A_after_A"]["std"] == 0.0


# ------------------------------------------------------------------ data


def test_task_labels_follow_the_seeds_layout(monkeypatch):
    config = eidetic_tasks.TasksConfig(dataset="digits", task_a_subset_cardinality=30, task_b_subset_cardinality=20)
    task_a, task_b = eidetic_tasks.load_tasks(config)
    assert task_a.outputs == (26, 27, 28, 29, 30) and task_b.outputs == (0, 1, 2, 3, 4)
    assert set(task_a.train_labels.tolist()) <= set(task_a.outputs) and set(task_b.test_labels.tolist()) <= set(
        task_b.outputs
    )
    assert (len(task_a.train_labels), len(task_b.train_labels)) == (30, 20)
    assert task_a.train_images.shape[1:] == (1, 28, 28)
    raw = data.load_digits_28(train=True)
    assert torch.equal(raw.labels[task_a.train_ids], task_a.train_labels - 26)


def test_idx_files_read_back(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header + images.tobytes())
    assert np.array_equal(data.read_idx(path), images)
    (tmp_path / "bad").write_bytes(header + images.tobytes()[:-1])
    with pytest.raises(ValueError):
        data.read_idx(tmp_path / "bad")


def test_missing_data_sets_say_how_to_get_them(tmp_path):
    with pytest.raises(data.DatasetUnavailable, match="nothing is downloaded"):
        data.load_mnist(tmp_path, train=True)
    with pytest.raises(data.DatasetUnavailable, match="dataset-fashion-mnist"):
        data.load_fashion_mnist(None, train=True, debian_dir=tmp_path)
