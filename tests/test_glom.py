"""GLOM: columns of level embeddings, attention over the toroidal neighbourhood, the vote, and that it learns."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="GLOM is a torch module (the [train] extra)")

from model.data import load_digits_28
from model.glom import (
    Glom,
    GlomConfig,
    attention_average,
    attention_weights,
    neighbourhood,
    vote,
    window_offsets,
)
from model.glom_training import ListSink, TrainConfig, evaluate, seeded, train
from model.small_cnn import SmallCNN, matched_width, parameter_count

CORNER_TO_OPPOSITE = window_offsets(3).index((-1, -1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**options) -> GlomConfig:
    return GlomConfig(**{"levels": 3, "iterations": 3, "hidden": 8, **options})


def test_pixel_columns_hold_one_column_of_levels_per_pixel() -> None:
    model = Glom(tiny())
    output = model(torch.randn(2, 1, 6, 5), keep_states=True)
    assert output.state.shape == (2, 3, 10, 6, 5)
    assert output.class_scores.shape == (2, 3, 10, 6, 5)
    assert output.states.shape == (2, 3, 3, 10, 6, 5)
    assert torch.equal(output.states[:, -1], output.state)
    assert output.prediction().shape == (2,)


def test_patch_columns_hold_one_column_per_patch() -> None:
    model = Glom(tiny(column="patch", patch_size=4, in_channels=3))
    output = model(torch.randn(2, 3, 8, 12))
    assert output.state.shape == (2, 3, 10, 2, 3)
    with pytest.raises(ValueError, match="patches"):
        tiny(column="patch", patch_size=3).grid(8, 8)


def test_the_input_level_is_never_updated() -> None:
    model = Glom(tiny()).train()
    images = torch.randn(2, 1, 5, 5)
    output = model(images, keep_states=True)
    embedded = model.embed(images)
    for t in range(3):
        assert torch.equal(output.states[:, t, 0], embedded)


def test_attention_weights_sum_to_one_over_the_neighbourhood() -> None:
    embeddings = torch.randn(2, 3, 4, 5, 6)  # (B, L, D, H, W)
    for toroidal in (True, False):
        weights = attention_weights(embeddings, beta=2.0, window=3, toroidal=toroidal)
        assert weights.shape == (2, 3, 9, 5, 6)
        assert torch.allclose(weights.sum(dim=2), torch.ones(2, 3, 5, 6))
        assert (weights >= 0).all()


def test_attention_weights_are_the_softmax_of_beta_times_dot_products() -> None:
    embeddings = torch.randn(4, 5, 5)  # (D, H, W)
    weights = attention_weights(embeddings, beta=0.5)
    centre = embeddings[:, 2, 2]
    logits = torch.stack([0.5 * centre @ embeddings[:, 2 + dy, 2 + dx] for dy, dx in window_offsets(3)])
    assert torch.allclose(weights[:, 2, 2], torch.softmax(logits, dim=0), atol=1e-6)


def test_the_toroidal_neighbourhood_wraps_around_the_edges() -> None:
    grid = torch.arange(20.0).view(1, 4, 5)
    neighbours, inside = neighbourhood(grid, window=3, toroidal=True)
    assert neighbours[CORNER_TO_OPPOSITE, 0, 0, 0] == grid[0, 3, 4]  # up-left of the top-left corner
    assert inside.all()
    neighbours, inside = neighbourhood(grid, window=3, toroidal=False)
    assert not inside[CORNER_TO_OPPOSITE, 0, 0]
    assert neighbours[CORNER_TO_OPPOSITE, 0, 0, 0] == 0


def test_a_corner_attends_to_the_opposite_corner_only_when_toroidal() -> None:
    embeddings = torch.zeros(2, 4, 4)
    embeddings[:, 0, 0] = embeddings[:, 3, 3] = torch.tensor([3.0, 0.0])  # two agreeing far corners
    wrapped = attention_weights(embeddings, beta=1.0, toroidal=True)
    assert wrapped[CORNER_TO_OPPOSITE, 0, 0] > 0.45  # shared with itself: both logits are 9
    flat = attention_weights(embeddings, beta=1.0, toroidal=False)
    assert flat[CORNER_TO_OPPOSITE, 0, 0] == 0
    average = attention_average(embeddings, beta=1.0, toroidal=True)
    assert average[0, 0, 0] > 2.5  # pulled toward the agreeing neighbours (itself and across the wrap)


def test_the_concat_variant_ignores_attention_and_the_attention_variant_does_not() -> None:
    images = torch.randn(2, 1, 5, 5)

    def final_state(**options) -> torch.Tensor:
        with seeded(0):
            model = Glom(tiny(**options)).eval()
        return model(images).state

    assert not torch.allclose(final_state(lateral="attention"), final_state(lateral="concat"))
    assert not torch.allclose(final_state(lateral="attention", beta=0.1), final_state(lateral="attention", beta=5.0))
    assert torch.equal(final_state(lateral="concat", beta=0.1), final_state(lateral="concat", beta=5.0))
    assert parameter_count(Glom(tiny(lateral="concat"))) > parameter_count(Glom(tiny(lateral="attention")))


def test_window_inputs_let_every_network_read_the_neighbourhood() -> None:
    with seeded(0):
        model = Glom(tiny(lateral="concat", window_inputs=True))
    assert model(torch.randn(2, 1, 5, 4)).state.shape == (2, 3, 10, 5, 4)
    assert model.bottom_up.net[0].in_channels == 2 * 9 * 10  # two level pairs, nine neighbours of ten dims
    assert parameter_count(model) > parameter_count(Glom(tiny(lateral="concat")))


def test_the_vote_is_the_most_common_location_argmax() -> None:
    scores = torch.zeros(2, 3, 2, 2)
    scores[0, 1, :, :] = 1.0
    scores[0, 2, 0, 0] = 5.0  # one location disagrees strongly, three vote class 1
    scores[1, 0, 0, :] = scores[1, 2, 1, :] = 1.0  # a 2-2 tie goes to the lower class
    assert vote(scores).tolist() == [1, 0]


def test_checkpointing_computes_the_same_loss_and_gradients() -> None:
    images, labels = torch.randn(2, 1, 4, 4), torch.tensor([1, 2])
    gradients = []
    for checkpointing in (False, True):
        with seeded(0):
            model = Glom(tiny(noise_std=0.0, checkpointing=checkpointing)).train()
        loss = model.loss(images, labels)
        loss.backward()
        gradients.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = gradients
    assert torch.allclose(loss_a, loss_b)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


def test_denoising_reconstructs_the_input_columns() -> None:
    model = Glom(tiny(column="patch", patch_size=2, denoise=True)).train()
    images = torch.randn(2, 1, 6, 6)
    assert model(images).reconstruction.shape == (2, 4, 3, 3)  # one value per pixel of each 2x2 patch
    plain = Glom(tiny(column="patch", patch_size=2)).train()
    with seeded(0):
        with_denoising = model.loss(images, torch.tensor([0, 1]))
    assert torch.isfinite(with_denoising) and with_denoising > 0
    assert plain(images).reconstruction is None


def test_a_linear_head_reads_classes_from_any_top_dimension() -> None:
    with pytest.raises(ValueError, match="n_classes"):
        GlomConfig(dim=6)
    output = Glom(tiny(dim=6, linear_head=True))(torch.randn(1, 1, 4, 4))
    assert output.state.shape[2] == 6 and output.class_scores.shape[2] == 10


def tiny_digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits_28(True, size=8)
    return digits.normalised()[:n], digits.labels[:n]


def test_a_tiny_glom_overfits_twenty_digits() -> None:
    images, labels = tiny_digits(20)
    config = TrainConfig(epochs=60, batch_size=20, lr=1e-2, seed=0)
    with seeded(config.seed):
        model = Glom(GlomConfig(levels=3, iterations=4, hidden=32, column="patch", patch_size=4))
    history = train(model, images, labels, config)
    assert history[-1].train_loss < history[0].train_loss / 2
    assert evaluate(model, images, labels, config).accuracy >= 0.9


def test_evaluation_reports_accuracy_after_every_iteration_and_metrics_reach_the_sink() -> None:
    images, labels = tiny_digits(8)
    sink = ListSink()
    config = TrainConfig(epochs=2, batch_size=4, seed=1)
    with seeded(config.seed):
        model = Glom(tiny(column="patch", patch_size=4))
    history = train(model, images, labels, config, test=(images, labels), sink=sink)
    assert len(history[-1].test.accuracy_by_iteration) == 3
    assert history[-1].test.accuracy == history[-1].test.accuracy_by_iteration[-1]
    assert [step for step, _ in sink.records] == [0, 1]
    assert {"train_loss", "test_accuracy", "test_accuracy_iteration_3"} <= sink.records[-1][1].keys()


def test_training_is_reproducible_from_the_seed() -> None:
    images, labels = tiny_digits(8)
    losses = []
    for _ in range(2):
        config = TrainConfig(epochs=2, batch_size=4, seed=3)
        with seeded(config.seed):
            model = Glom(tiny(column="patch", patch_size=4))
        losses.append([record.train_loss for record in train(model, images, labels, config)])
    assert losses[0] == losses[1]


def test_the_cnn_baseline_matches_the_glom_parameter_count_and_learns() -> None:
    glom_parameters = parameter_count(Glom(GlomConfig()))
    cnn = SmallCNN(width=matched_width(glom_parameters))
    assert abs(parameter_count(cnn) - glom_parameters) / glom_parameters < 0.25
    images, labels = tiny_digits(20)
    config = TrainConfig(epochs=30, batch_size=20, lr=1e-2, seed=0)
    with seeded(config.seed):
        cnn = SmallCNN(width=8)
    history = train(cnn, images, labels, config)
    assert history[-1].train_loss < history[0].train_loss
    assert evaluate(cnn, images, labels, config).accuracy_by_iteration is None


def test_the_experiment_writes_results_a_plot_and_islands(tmp_path) -> None:
    from model.experiments import glom as experiment

    summary = experiment.main(
        [
            "--dataset",
            "digits8",
            "--iterations",
            "2",
            "--levels",
            "3",
            "--hidden",
            "8",
            "--column",
            "patch",
            "--epochs",
            "1",
            "--train-limit",
            "16",
            "--test-limit",
            "8",
            "--island-images",
            "2",
            "--out-dir",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert set(summary["results"]) == {"glom", "glom-concat", "cnn"}
    assert len(summary["results"]["glom"]["accuracy_by_iteration"]) == 2
    assert (tmp_path / "results.json").exists() and (tmp_path / "accuracy_by_iteration.png").stat().st_size > 0
    assert set(np.load(tmp_path / "islands.npz")["level"]) <= {0, 1, 2}
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_with_use_db_the_experiment_records_its_run_and_every_epoch_in_the_store(tmp_path, service, api) -> None:
    from eidetic.config import ClientSettings
    from model.experiments import glom as experiment

    config = experiment.GlomExperimentConfig(
        arms=("glom", "cnn"),
        iterations=2,
        levels=2,
        hidden=8,
        column="patch",
        epochs=2,
        train_limit=16,
        test_limit=8,
        island_images=0,
        out_dir=tmp_path,
        run_name="glom-tiny",
        progress=False,
    )
    settings = ClientSettings(use_db=True, eidetic_url=service.base_url, eidetic_api_key=service.write_key)
    summary = experiment.run_experiment(config, settings)
    (run,) = [run for run in api.get("/v1/runs").json()["runs"] if run["name"] == "glom-tiny"]
    assert run["status"] == "finished" and run["config"]["arms"] == ["glom", "cnn"]
    assert sorted(run["metrics"]) == ["cnn/epoch_0", "cnn/epoch_1", "glom/epoch_0", "glom/epoch_1", "results"]
    assert run["metrics"]["results"]["glom"]["test_accuracy"] == summary["results"]["glom"]["test_accuracy"]
