"""Eidetic and Indexed layers: bucket-selected weights, recorded from outside, quantiles (local = service), freezing."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the layers are torch modules (the [train] extra)")

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from torch import nn

from eidetic.client import EideticClient
from eidetic.config import ClientSettings
from eidetic.torch.quantile_cache import QuantileCache, local_boundaries
from eidetic.writer import open_writer
from model.layers import (
    EideticIndexedLinear,
    EideticLinear,
    IndexedLinear,
    bucket_linear,
    freeze_all_but,
    indexed_parameters,
)
from model.recording import ActivationRecorder, ListSink, ReservoirSink, TeeSink, WriterSink
from tests.helpers import stored_rows


def slow_bucket_linear(x, buckets, bucket_weights, bias):
    """The seed's loops: each input unit i of each sample adds x[b, i] * W[bucket[b, i], i, :]."""
    out = torch.zeros(x.shape[0], bucket_weights.shape[2], dtype=x.dtype)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            out[b] += x[b, i] * bucket_weights[int(buckets[b, i]), i]
    return out + bias


def indexed(n_in: int, n_out: int, n_quantiles: int, seed: int = 0, dtype=torch.float32) -> IndexedLinear:
    """An indexed layer whose bucket slices all differ (as after some training)."""
    torch.manual_seed(seed)
    layer = IndexedLinear(n_in, n_out, n_quantiles).to(dtype)
    layer.build_index()
    with torch.no_grad():
        layer.bucket_weights.add_(torch.randn_like(layer.bucket_weights))
    return layer


# ------------------------------------------------------------------ bucket selection


@hsettings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    n_in=st.integers(1, 5),
    n_out=st.integers(1, 4),
    n_quantiles=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_each_input_unit_uses_the_weight_row_of_its_own_bucket(batch, n_in, n_out, n_quantiles, seed):
    layer = indexed(n_in, n_out, n_quantiles, seed, torch.float64)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n_in, generator=generator, dtype=torch.float64)
    buckets = torch.randint(0, n_quantiles, (batch, n_in), generator=generator)
    expected = slow_bucket_linear(x, buckets, layer.bucket_weights.detach(), layer.bias.detach())
    torch.testing.assert_close(layer(x, buckets), expected, rtol=1e-12, atol=1e-12)


def test_any_batch_size_including_one_and_empty():
    layer = indexed(6, 3, 4)
    for batch in (0, 1, 7, 257):
        x = torch.randn(batch, 6)
        buckets = torch.randint(0, 4, (batch, 6))
        assert layer(x, buckets).shape == (batch, 3)
    with pytest.raises(ValueError):
        layer(torch.randn(2, 6))  # several quantiles need buckets
    with pytest.raises(ValueError):
        layer(torch.randn(2, 6), torch.zeros(2, 5, dtype=torch.long))


def test_bucket_selection_is_autograd_correct():
    layer = indexed(5, 4, 3, dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    buckets = torch.randint(0, 3, (6, 5))
    weights = layer.bucket_weights.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: bucket_linear(x, buckets, w, b), (x, weights, bias))
    assert torch.autograd.gradgradcheck(lambda x, w, b: bucket_linear(x, buckets, w, b), (x, weights, bias))


def test_a_bucket_slice_gets_gradient_only_from_the_units_that_fell_in_it():
    layer = indexed(4, 2, 3)
    buckets = torch.tensor([[0, 0, 1, 1]])
    layer(torch.ones(1, 4), buckets).sum().backward()
    grad = layer.bucket_weights.grad
    assert grad[2].abs().sum() == 0  # nobody used bucket 2
    assert grad[0, 2:].abs().sum() == 0 and grad[1, :2].abs().sum() == 0
    assert torch.equal(grad[0, :2], torch.ones(2, 2)) and torch.equal(grad[1, 2:], torch.ones(2, 2))


# ------------------------------------------------------------------ one quantile, index building


def test_with_one_quantile_it_is_exactly_a_plain_linear_layer():
    torch.manual_seed(3)
    layer = IndexedLinear(36, 20, 1)
    plain = nn.Linear(36, 20)
    plain.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(64, 36)
    assert torch.equal(layer(x), plain(x))  # before the index is built
    layer.build_index()
    for batch in (1, 5, 64):
        assert torch.equal(layer(x[:batch]), plain(x[:batch]))
        assert torch.equal(layer(x[:batch], torch.zeros(batch, 36, dtype=torch.long)), plain(x[:batch]))


def test_building_the_index_copies_the_trained_weights_into_every_bucket():
    torch.manual_seed(4)
    layer = IndexedLinear(7, 3, 5)
    assert not layer.is_indexed and torch.count_nonzero(layer.bucket_weights) == 0
    layer.build_index()
    assert layer.is_indexed and layer.bucket_weights.shape == (5, 7, 3)
    for q in range(5):
        assert torch.equal(layer.bucket_weights[q], layer.weight.T)
    # so, right after building, any buckets give the trained layer's function
    x = torch.randn(9, 7)
    buckets = torch.randint(0, 5, (9, 7))
    torch.testing.assert_close(layer(x, buckets), nn.functional.linear(x, layer.weight, layer.bias))
    assert layer.state_dict()["index_built"].item() is True


def test_allocating_bucket_slices_does_not_move_the_random_state():
    torch.manual_seed(0)
    one = IndexedLinear(8, 8, 1)
    after_one = torch.rand(1)
    torch.manual_seed(0)
    many = IndexedLinear(8, 8, 16)
    assert torch.equal(torch.rand(1), after_one) and torch.equal(one.weight, many.weight)


# ------------------------------------------------------------------ freezing


def test_freezing_leaves_only_the_indexed_weights_trainable():
    torch.manual_seed(5)
    model = nn.ModuleDict(
        {"front": nn.Linear(4, 6), "eidetic": EideticIndexedLinear(6, 6, 3), "indexed": IndexedLinear(6, 2, 3)}
    )
    model["indexed"].build_index()
    trainable = freeze_all_but(model, indexed_parameters(model))
    assert trainable == [model["indexed"].bucket_weights]  # the eidetic layer's index is not built
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["indexed.bucket_weights"]

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adadelta(trainable, lr=1.0)
    x = model["front"](torch.randn(8, 4))
    hidden, _buckets = model["eidetic"](x)
    model["indexed"](hidden, torch.randint(0, 3, (8, 6))).pow(2).sum().backward()
    optimizer.step()
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed == ["indexed.bucket_weights"]


# ------------------------------------------------------------------ recording from outside


def test_a_layer_with_no_recorder_computes_its_outputs_and_holds_no_store():
    torch.manual_seed(6)
    layer = EideticIndexedLinear(5, 4, 3)
    x = torch.randn(8, 5)
    out, buckets = layer(x)
    assert buckets is None  # no quantiles installed yet
    torch.testing.assert_close(out, nn.functional.linear(x, layer.weight, layer.bias))
    assert not layer._forward_hooks and not layer.pre_bias._forward_hooks
    held = [value for value in vars(layer).values() if type(value).__module__.startswith("eidetic")]
    assert held == []  # no client, writer or settings inside the layer


def test_a_recorder_with_a_list_sink_keeps_exactly_the_pre_bias_outputs_and_their_metadata():
    torch.manual_seed(6)
    layer = EideticLinear(5, 4)
    batches = [torch.randn(16, 5) for _ in range(3)]
    sink = ListSink()
    with ActivationRecorder(layer, {"pre_bias": sink}, task="B") as recorder:
        for step, x in enumerate(batches):
            recorder.annotate(sample_id=torch.arange(16) + 16 * step, step=step)
            layer(x)
        layer(batches[0])  # not annotated: recorded with no metadata
    assert torch.equal(sink.values(), torch.cat([nn.functional.linear(x, layer.weight) for x in batches + batches[:1]]))
    assert [batch.task for batch in sink.batches] == ["B"] * 4
    assert [batch.metadata.get("step") for batch in sink.batches] == [0, 1, 2, None]
    assert torch.equal(sink.batches[2].metadata["sample_id"], torch.arange(32, 48))
    assert recorder.rows_seen == recorder.rows_recorded == {"pre_bias": 64}

    layer(batches[0])  # detached on exit: nothing more is recorded
    assert len(sink.batches) == 4 and not layer.pre_bias._forward_hooks


def test_recording_does_not_change_what_a_model_computes():
    torch.manual_seed(7)
    model = nn.ModuleDict({"eidetic": EideticLinear(3, 4), "indexed": EideticIndexedLinear(4, 2, 2)})
    model["indexed"].build_index()
    x, incoming = torch.randn(6, 4), torch.randint(0, 2, (6, 4))
    plain = model["indexed"](x, incoming)
    eidetic_sink, indexed_sink = ListSink(), ListSink()
    with ActivationRecorder(model, {"eidetic.pre_bias": eidetic_sink, "indexed.pre_bias": indexed_sink}):
        recorded = model["indexed"](x, incoming)
    assert torch.equal(recorded[0], plain[0]) and not eidetic_sink.batches
    expected = bucket_linear(x, incoming, model["indexed"].bucket_weights).detach()
    assert torch.equal(indexed_sink.values(), expected)  # the bucket-selected pre-bias outputs


def test_any_module_can_be_recorded_and_unknown_names_are_refused():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    sink = ListSink()
    x = torch.randn(5, 3)
    with ActivationRecorder(model, {"1": sink}):
        model(x)
    assert torch.equal(sink.values(), model(x).detach())
    with pytest.raises(AttributeError):
        ActivationRecorder(model, {"2": ListSink()})


def test_a_tee_sends_the_same_rows_to_every_sink():
    layer = EideticLinear(2, 3)
    first, second = ListSink(), ReservoirSink(3, capacity=100)
    with ActivationRecorder(layer, {"pre_bias": TeeSink(first, second)}):
        layer(torch.randn(7, 2))
    assert torch.equal(first.values(), second.values())


def test_sampling_at_a_rate_is_reproducible_and_leaves_the_global_random_state_alone():
    def record(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(11)
        layer = EideticLinear(3, 3)
        sink = ListSink()
        with ActivationRecorder(layer, {"pre_bias": sink}, sample_rate=0.25, seed=seed):
            for _ in range(20):
                layer(torch.randn(50, 3))
        return sink.values(), torch.rand(1)

    first, after_first = record(seed=1)
    again, after_again = record(seed=1)
    other, _ = record(seed=2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 150 < first.shape[0] < 350  # about a quarter of 1000 rows
    torch.manual_seed(11)
    EideticLinear(3, 3)
    [torch.randn(50, 3) for _ in range(20)]
    assert torch.equal(after_first, torch.rand(1)) and torch.equal(after_first, after_again)


def test_the_reservoir_is_a_bounded_uniform_sample():
    """Algorithm R applied batch by batch equals Algorithm R applied row by row with the same draws."""
    capacity, units = 7, 2
    reservoir = ReservoirSink(units, capacity, seed=3)
    rows = torch.arange(60, dtype=torch.float32).repeat(units, 1).T
    for start in range(0, 60, 13):
        reservoir.write(rows[start : start + 13])
    assert reservoir.rows_kept == capacity and reservoir.rows_offered == 60

    reference = list(rows[:capacity])
    generator = torch.Generator().manual_seed(3)
    seen = capacity
    for start in range(0, 60, 13):
        batch = rows[start : start + 13]
        overflow = batch[max(0, capacity - start) :]
        if len(overflow) == 0:
            continue
        draws = torch.rand(len(overflow), generator=generator, dtype=torch.float64)
        for row, draw in zip(overflow, draws):
            slot = int(draw * (seen + 1))
            if slot < capacity:
                reference[slot] = row
            seen += 1
    assert torch.equal(reservoir.values(), torch.stack(reference))

    # uniform: over many seeds every row is kept about capacity/60 of the time
    counts = torch.zeros(60)
    for seed in range(300):
        sample = ReservoirSink(1, capacity, seed=seed)
        sample.write(torch.arange(60, dtype=torch.float32).unsqueeze(1))
        counts[sample.values().squeeze(1).long()] += 1
    expected = 300 * capacity / 60
    assert counts[:30].sum() == pytest.approx(30 * expected, rel=0.15)
    assert counts[30:].sum() == pytest.approx(30 * expected, rel=0.15)


# ------------------------------------------------------------------ buckets


def test_installed_quantiles_make_the_layer_emit_the_buckets_of_its_pre_bias_outputs():
    torch.manual_seed(6)
    layer = EideticLinear(5, 4)
    sink = ListSink()
    with ActivationRecorder(layer, {"pre_bias": sink}):
        for _ in range(3):
            layer(torch.randn(16, 5))
    layer.quantiles = cache = QuantileCache(local_boundaries(sink.values(), 4))
    probe = torch.randn(10, 5)
    out, buckets = layer(probe)
    pre_bias = nn.functional.linear(probe, layer.weight)
    assert torch.equal(buckets, cache.bucketize(pre_bias))
    torch.testing.assert_close(out, pre_bias + layer.bias)
    assert buckets.dtype == torch.long and int(buckets.min()) >= 0 and int(buckets.max()) <= 3


def test_one_quantile_needs_no_boundaries_and_every_value_is_in_bucket_zero():
    layer = EideticLinear(4, 3)
    layer.quantiles = QuantileCache(torch.empty(3, 0))
    _, buckets = layer(torch.randn(5, 4))
    assert torch.equal(buckets, torch.zeros(5, 3, dtype=torch.long))


# ------------------------------------------------------------------ the store


def test_the_service_computes_the_same_boundaries_as_a_local_reservoir(service, api, monkeypatch):
    for name in ("USE_DB", "DATABASE_URL", "EIDETIC_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    settings = ClientSettings(eidetic_url=service.base_url, eidetic_api_key=service.write_key, writer_batch_rows=100)
    torch.manual_seed(8)
    layer = EideticIndexedLinear(6, 5, 4)
    inputs = [torch.randn(64, 6) for _ in range(5)]
    with EideticClient.from_settings(settings) as client:
        run = client.create_run("layers", {})
        stored = client.create_layer(run.id, "eidetic_indexed", 5)
        with open_writer(run.id, stored.id, settings) as writer:
            with ActivationRecorder(layer, {"pre_bias": WriterSink(writer)}, task="B") as recorder:
                for step, x in enumerate(inputs):
                    recorder.annotate(
                        sample_id=torch.arange(64) + 64 * step, label=torch.zeros(64, dtype=torch.long), step=step
                    )
                    layer(x)
            with ActivationRecorder(layer, {"pre_bias": WriterSink(writer)}, task="A"):
                layer(torch.randn(30, 6) + 100)  # another task's rows: stored, but filtered out below
        answer = client.compute_quantiles(run.id, stored.id, 4, "exact", task="B")
        remote = QuantileCache.from_quantile_set(answer, torch.device("cpu"))
        assert remote.set_id is not None and remote.version == 1
        assert stored_rows(service.database_url, stored.id) == 64 * 5 + 30

    # the same Task B rows, recorded with no store: the local reservoir gives the very same boundaries
    reservoir = ReservoirSink(5, capacity=1000)
    with ActivationRecorder(layer, {"pre_bias": reservoir}):
        for x in inputs:
            layer(x)
    assert reservoir.rows_kept == 64 * 5
    local = local_boundaries(reservoir.values(), 4)
    assert torch.equal(local, remote.boundaries)
    assert np.all(np.diff(remote.boundaries.numpy(), axis=1) >= 0)
