"""Continual-learning metrics on accuracy matrices worked out by hand."""

from __future__ import annotations

import math

import pytest

from model.cl_metrics import (
    ContinualMetrics,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)

# R[i][j]: accuracy on task j after training tasks 0..i
R = [
    [0.90, 0.10, 0.20],
    [0.70, 0.80, 0.30],
    [0.50, 0.60, 0.95],
]
INITIAL = [0.10, 0.10, 0.25]


def test_average_accuracy_is_the_mean_over_the_tasks_seen_so_far():
    assert average_accuracy(R) == pytest.approx((0.50 + 0.60 + 0.95) / 3)  # GEM's ACC
    assert average_accuracy(R, after=1) == pytest.approx((0.70 + 0.80) / 2)
    assert average_accuracy(R, after=0) == pytest.approx(0.90)


def test_backward_transfer_compares_each_task_at_the_end_with_just_after_learning_it():
    assert backward_transfer(R) == pytest.approx(((0.50 - 0.90) + (0.60 - 0.80)) / 2)  # -0.3


def test_forward_transfer_compares_each_task_just_before_learning_it_with_the_untrained_model():
    assert forward_transfer(R, INITIAL) == pytest.approx(((0.10 - 0.10) + (0.30 - 0.25)) / 2)  # 0.025


def test_forgetting_measures_from_the_best_accuracy_a_task_ever_had():
    assert forgetting(R) == pytest.approx(((0.90 - 0.50) + (0.80 - 0.60)) / 2)  # 0.3
    assert forgetting(R, after=1) == pytest.approx(0.90 - 0.70)


def test_forgetting_and_backward_transfer_differ_when_a_task_peaks_later():
    peaked = [
        [0.50, 0.00, 0.00],
        [0.80, 0.70, 0.00],
        [0.60, 0.70, 0.90],
    ]
    assert backward_transfer(peaked) == pytest.approx(((0.60 - 0.50) + (0.70 - 0.70)) / 2)  # +0.05
    assert forgetting(peaked) == pytest.approx(((0.80 - 0.60) + (0.70 - 0.70)) / 2)  # +0.10


def test_two_tasks_the_experiments_case():
    two = [[0.96, 0.00], [0.40, 0.85]]
    metrics = ContinualMetrics.of(two, [0.05, 0.02])
    assert metrics.average_accuracy == pytest.approx((0.40 + 0.85) / 2)
    assert metrics.backward_transfer == pytest.approx(0.40 - 0.96)
    assert metrics.forgetting == pytest.approx(0.96 - 0.40)
    assert metrics.forward_transfer == pytest.approx(0.00 - 0.02)
    assert set(metrics.as_dict()) == {"average_accuracy", "backward_transfer", "forward_transfer", "forgetting"}


def test_one_task_has_no_transfer_and_no_forgetting():
    metrics = ContinualMetrics.of([[0.7]], [0.1])
    assert metrics.average_accuracy == pytest.approx(0.7)
    assert all(math.isnan(v) for v in (metrics.backward_transfer, metrics.forward_transfer, metrics.forgetting))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        average_accuracy([[0.1, 0.2]])
    with pytest.raises(ValueError):
        forward_transfer(R, [0.1, 0.2])
    with pytest.raises(ValueError):
        forgetting(R, after=3)
