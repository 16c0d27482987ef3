"""The Hebbian arms' memories in the store: kernel records, the replay reservoir in a memory bank
and latent features in a layer answer exactly as their in-memory forms, so a run gives the
same accuracy matrix with USE_DB on or off; and the reservoir policy is reservoir sampling."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from eidetic.client import EideticClient
from eidetic.config import ClientSettings
from model import data as datasets
from model.hebbian_cl import HebbianCLConfig, make_learner, make_tasks, run_continual
from model.kernel_plasticity import InMemoryKernelStatsSink, KernelStatsSink, NeuromodulationConfig
from model.replay import InMemoryLatentMemory, InMemoryReservoir, Reservoir, SampleBuffer
from model.softhebb_net import DIGITS8_NET, SoftHebbTraining
from model.store_kernel_stats import StoreKernelStatsSink
from model.store_replay import BankReservoir, StoredLatentMemory

TINY = HebbianCLConfig(
    net=DIGITS8_NET,
    training=SoftHebbTraining(readout_epochs=3, readout_batch_size=32),
    neuromodulation=NeuromodulationConfig(interval=5),
    n_tasks=2,
    backprop_epochs=1,
    latent_per_task=12,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[datasets.LabelledImages, datasets.LabelledImages]:
    return datasets.load_digits_28(train=True, size=8), datasets.load_digits_28(train=False, size=8)


@pytest.fixture
def client(service) -> Iterator[EideticClient]:
    with EideticClient(service.base_url, service.write_key) as client:
        yield client


def client_settings(service) -> ClientSettings:
    return ClientSettings(eidetic_url=service.base_url, eidetic_api_key=service.write_key, use_db=True)


# ---------------------------------------------------------------- the reservoir policy


def test_the_reservoir_keeps_everything_until_full_then_never_more_than_its_capacity():
    policy = Reservoir(capacity=5, seed=0)
    first = policy.plan(0, 3)
    assert (first.evicted, first.admitted) == ([], [0, 1, 2])
    filled = policy.plan(3, 2)
    assert (filled.evicted, filled.admitted) == ([], [0, 1])
    later = policy.plan(5, 40)
    assert 5 - len(later.evicted) + len(later.admitted) == 5
    assert later.admitted == sorted(later.admitted) and policy.seen == 45


def test_every_sample_of_the_stream_is_kept_with_probability_capacity_over_seen():
    capacity, stream, trials = 4, 20, 3000
    kept = np.zeros(stream)
    for seed in range(trials):
        buffer = InMemoryReservoir(capacity, seed)
        for start in range(0, stream, 5):  # offered in four batches, as tasks would
            ids = torch.arange(start, start + 5)
            buffer.extend(ids.float().view(-1, 1), ids)
        kept[buffer.contents()[1].numpy()] += 1
    frequency = kept / trials
    # capacity / stream = 0.2 for every sample; 3,000 trials give a standard error under 0.0075
    assert np.abs(frequency - capacity / stream).max() < 0.04


# ---------------------------------------------------------------- store forms equal memory forms


def test_the_bank_reservoir_holds_what_the_in_memory_reservoir_holds_in_the_same_order(client):
    in_memory = InMemoryReservoir(30, seed=3)
    stored = BankReservoir(client, "er-test", (1, 2, 3), capacity=30, seed=3)
    assert isinstance(stored, SampleBuffer)
    generator = torch.Generator().manual_seed(0)
    for task in range(4):
        samples = torch.randn(25, 1, 2, 3, generator=generator)
        labels = torch.full((25,), task)
        in_memory.extend(samples, labels)
        stored.extend(samples, labels)
        ours, theirs = in_memory.contents(), stored.contents()
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert client.get_bank(stored.bank_id)["size"] == 30
    assert set(theirs[1].tolist()) == {0, 1, 2, 3}  # every task has a share


def test_stored_latent_features_are_recalled_as_in_memory_by_task_and_sample_id(service, client):
    run = client.create_run("latent-test")
    stored = StoredLatentMemory(client, client_settings(service), run.id, "readout_inputs", dim=6)
    in_memory = InMemoryLatentMemory()
    generator = torch.Generator().manual_seed(1)
    try:
        for task in range(3):
            features = torch.randn(7, 6, generator=generator)
            labels = torch.randint(10, (7,), generator=generator)
            ids = torch.randperm(50, generator=generator)[:7]
            stored.add_task(task, features, labels, ids)
            in_memory.add_task(task, features, labels, ids)
        for tasks in ([0], [0, 2], [2, 1]):
            ours, theirs = in_memory.recall(tasks), stored.recall(tasks)
            assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        assert stored.recall([])[0].numel() == 0
    finally:
        stored.close()


def test_kernel_records_written_by_one_sink_are_read_by_another_process_bit_for_bit(client, service):
    run = client.create_run("sink-test")
    sink = StoreKernelStatsSink(client, run.id)
    assert isinstance(sink, KernelStatsSink)
    change, importance = torch.rand(16) / 3, torch.rand(16) * 1e4
    sink.record(0, "block0", change, importance, intervals=9)
    assert sink.read(1, "block0") is None and sink.read(0, "block1") is None
    with EideticClient(service.base_url, service.write_key) as elsewhere:
        found = StoreKernelStatsSink(elsewhere, run.id).read(0, "block0")
    assert found is not None
    assert torch.equal(found.kernel_change, change) and torch.equal(found.importance, importance)
    assert found.intervals == 9
    with pytest.raises(ValueError):
        sink.record(0, "block0", torch.zeros(3), torch.zeros(4))


# ---------------------------------------------------------------- whole arms: USE_DB on and off


@pytest.mark.parametrize(
    "arm", ["softhebb_plasticity", "backprop_er_20", "softhebb_replay", "softhebb_plasticity_replay"]
)
def test_an_arm_gives_the_same_accuracy_matrix_with_its_memories_in_the_store_or_not(service, client, digits, arm):
    tasks = make_tasks(*digits, n_tasks=2)
    local_sink = InMemoryKernelStatsSink()
    local = run_continual(make_learner(arm, TINY, local_sink), tasks)

    run = client.create_run(f"same-{arm}")
    store_sink = StoreKernelStatsSink(client, run.id)
    latent = StoredLatentMemory(client, client_settings(service), run.id, "readout_inputs", DIGITS8_NET_FEATURES)
    replay = BankReservoir(client, f"er-{arm}", (1, 8, 8), capacity=20, seed=TINY.seed)
    try:
        learner = make_learner(
            arm,
            TINY,
            store_sink,
            replay=replay if arm == "backprop_er_20" else None,
            latent=latent if arm.endswith("_replay") else None,
        )
        stored = run_continual(learner, tasks)
    finally:
        latent.close()

    assert np.array_equal(local.class_incremental, stored.class_incremental)
    assert np.array_equal(local.task_incremental, stored.task_incremental)
    if arm.startswith("softhebb"):
        for (task, layer), record in local_sink.records.items():
            found = store_sink.read(task, layer)
            assert found is not None and torch.equal(found.importance, record.importance)
            assert found.intervals == record.intervals > 0
        top = client.top_kernels(run.id, 0, "block0", ratio=0.25)
        assert len(top["kernels"]) == 4
        assert top["kernels"][0] == int(local_sink.records[(0, "block0")].importance.argmax())


DIGITS8_NET_FEATURES = 128  # 32 channels x 2 x 2 after the second block of DIGITS8_NET


# ---------------------------------------------------------------- the experiment's command line


def test_the_experiment_gives_the_same_metrics_with_use_db_on_or_off_and_records_its_runs(
    service, client, tmp_path, monkeypatch
):
    from model.experiments import hebbian_cl as experiment

    monkeypatch.setenv("EIDETIC_URL", service.base_url)
    monkeypatch.setenv("EIDETIC_API_KEY", service.write_key)
    argv = ["--dataset", "digits", "--seed", "0", "--arms", "softhebb_plasticity_replay", "backprop_er_20"]
    argv += ["--n-tasks", "2", "--train-per-class", "30", "--test-per-class", "10", "--latent-per-task", "6"]
    argv += ["--readout-epochs", "2", "--backprop-epochs", "1", "--no-sanity", "--no-progress"]
    off = experiment.main([*argv, "--no-use-db", "--out-dir", str(tmp_path / "off")])["digits"]
    on = experiment.main([*argv, "--use-db", "--out-dir", str(tmp_path / "on")])["digits"]

    def measured(run: dict) -> dict:
        return {name: value for name, value in run.items() if name not in ("seconds", "run_id")}

    assert [measured(run) for run in on["runs"]] == [measured(run) for run in off["runs"]]
    assert all(run["run_id"] is None for run in off["runs"])
    for run in on["runs"]:
        stored = client.get_run(run["run_id"])
        assert stored.status == "finished" and stored.config["arm"] == run["arm"]
    replay_run = on["runs"][0]["run_id"]
    assert len(client.kernel_records(replay_run)) == 4  # 2 tasks x 2 layers
    assert client.top_kernels(replay_run, 1, "block1", k=3)["n_kernels"] == 128
    assert client.find_bank(f"hebbian_cl-digits-backprop_er_20-s0-{_stamp(client, replay_run)}-reservoir")
    assert (tmp_path / "on" / "hebbian_cl_digits.json").exists()
    assert {p.name for p in (tmp_path / "on").glob("*.png")} >= {
        "hebbian_cl_digits_kernel_change.png",
        "hebbian_cl_digits_importance.png",
        "hebbian_cl_digits_first_layer.png",
        "hebbian_cl_digits_activation_maps.png",
    }
    assert experiment.table(on).count("|") > 10


def _stamp(client: EideticClient, run_id: int) -> str:
    return client.get_run(run_id).name.rsplit("-", 1)[1]
