"""An experiment's options, declared once in a dataclass: defaults, flags, environment names, sweeps, and back."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import pytest

from model.experiments.options import CommandLine, config_json, option


@dataclass(frozen=True)
class Example:
    """An example experiment."""

    dataset: str = option("digits", choices=("digits", "fashion"), help="the data")
    num_quantiles: int = option(4, env="NUM_QUANTILES", help="buckets per unit")
    rate: float = option(0.5)
    column: Literal["pixel", "patch"] = option("pixel")
    widths: tuple[int, ...] = option((32, 64))
    test_limit: int | None = option(None)
    out_dir: Path = option(Path("outputs"))
    save_model: bool = option(False)
    progress: bool = option(True)
    verbose: bool = option(False, env="VERBOSE")
    threshold: float = option(0.85, flags=("--threshold", "--confidence-threshold"))
    memory: str = option("cached", choices=("cached", "trainable", "none"), sweep=True)
    seed: int = option(1, sweep=True)

    def __post_init__(self) -> None:
        if self.num_quantiles < 1:
            raise ValueError("num_quantiles is at least 1")


COMMAND = CommandLine(Example, prog="example")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No USE_DB from outside and no .env of the checkout: the working directory is empty."""
    for name in ("USE_DB", "NUM_QUANTILES", "VERBOSE", "EIDETIC_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def test_no_flags_and_no_environment_give_the_dataclass_defaults():
    parsed = COMMAND.parse([])
    assert parsed.configs == [Example()]
    assert parsed.settings.use_db is False


def test_flags_set_every_kind_of_option():
    parsed = COMMAND.parse(
        [
            "--dataset",
            "fashion",
            "--num-quantiles",
            "8",
            "--column",
            "patch",
            "--widths",
            "4",
            "8",
            "16",
            "--test-limit",
            "20",
            "--out-dir",
            "runs/x",
            "--save-model",
            "--no-progress",
            "--confidence-threshold",
            "0.9",
        ]
    )
    assert parsed.config == Example(
        dataset="fashion",
        num_quantiles=8,
        column="patch",
        widths=(4, 8, 16),
        test_limit=20,
        out_dir=Path("runs/x"),
        save_model=True,
        progress=False,
        threshold=0.9,
    )
    assert COMMAND.parse(["--threshold", "0.7"]).config.threshold == 0.7  # either flag of the option


def test_a_config_written_back_as_flags_parses_to_itself():
    config = Example(
        dataset="fashion",
        num_quantiles=2,
        rate=0.25,
        column="patch",
        widths=(1,),
        test_limit=5,
        out_dir=Path("elsewhere"),
        save_model=True,
        progress=False,
        verbose=True,
        threshold=0.5,
        memory="none",
        seed=7,
    )
    argv = COMMAND.to_argv(config)
    assert "--no-progress" in argv and "--save-model" in argv
    assert COMMAND.parse(argv).configs == [config]
    assert COMMAND.to_argv(Example()) == []  # defaults need no flags


def test_environment_names_set_options_below_the_flags_and_above_dot_env(monkeypatch, tmp_path):
    assert COMMAND.parse([], environ={"NUM_QUANTILES": "8", "VERBOSE": "yes"}).config == Example(
        num_quantiles=8, verbose=True
    )
    (tmp_path / ".env").write_text("NUM_QUANTILES=3\nVERBOSE=on\n")
    assert COMMAND.parse([]).config == Example(num_quantiles=3, verbose=True)  # .env in the working directory
    monkeypatch.setenv("NUM_QUANTILES", "5")
    assert COMMAND.parse([]).config.num_quantiles == 5  # the environment wins over .env
    assert COMMAND.parse(["--num-quantiles", "6"]).config.num_quantiles == 6  # a flag wins over both


def test_store_flags_override_the_store_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("USE_DB", "1")
    assert COMMAND.parse([]).settings.use_db is True
    assert COMMAND.parse(["--no-use-db"]).settings.use_db is False
    with_transport = CommandLine(Example, store_flags={"use_db": "--use-db", "eidetic_transport": "--transport"})
    assert with_transport.parse(["--transport", "direct"]).settings.eidetic_transport == "direct"
    with pytest.raises(SystemExit):
        with_transport.parse(["--transport", "carrier-pigeon"])


def test_swept_options_give_one_config_per_combination_first_field_outermost():
    parsed = COMMAND.parse(["--memory", "cached", "none", "--seed", "1", "2", "3", "--rate", "0.1"])
    assert [(c.memory, c.seed) for c in parsed.configs] == [
        ("cached", 1),
        ("cached", 2),
        ("cached", 3),
        ("none", 1),
        ("none", 2),
        ("none", 3),
    ]
    assert {c.rate for c in parsed.configs} == {0.1}
    assert parsed.swept("memory") == ["cached", "none"] and parsed.swept("seed") == [1, 2, 3]


@pytest.mark.parametrize(
    "argv",
    [
        ["--no-such-option", "1"],
        ["--dataset", "imagenet"],  # not a choice
        ["--num-quantiles", "four"],
        ["--num-quantiles", "0"],  # the config's own check
        ["--memory", "cached", "elephant"],
    ],
)
def test_unknown_flags_and_bad_values_are_refused_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMAND.parse(argv)
    assert exit_info.value.code == 2 and "usage: example" in capsys.readouterr().err


def test_bad_environment_values_are_refused_naming_the_variable(capsys):
    with pytest.raises(SystemExit):
        COMMAND.parse([], environ={"NUM_QUANTILES": "many"})
    assert "NUM_QUANTILES='many'" in capsys.readouterr().err


def test_help_shows_each_options_default_and_environment_name():
    text = COMMAND.parser.format_help()
    assert "buckets per unit (default: 4; env NUM_QUANTILES)" in " ".join(text.split())
    assert "--use-db" in text and "An example experiment." in text


def test_options_must_be_declared_with_defaults_of_plain_immutable_types():
    with pytest.raises(TypeError):
        option([1, 2])

    @dataclass(frozen=True)
    class NoDefault:
        epochs: int

    @dataclass(frozen=True)
    class Nested:
        inner: dict = option(None)  # type: ignore[assignment]

    for config_type in (NoDefault, Nested):
        with pytest.raises(TypeError):
            CommandLine(config_type)


def test_a_config_becomes_the_runs_config_json():
    assert config_json(Example()) == {
        **{field.name: getattr(Example(), field.name) for field in fields(Example)},
        "widths": [32, 64],
        "out_dir": "outputs",
    }


# ------------------------------------------------------------------ the experiments


def test_every_experiment_keeps_its_flags_and_environment_names(monkeypatch):
    pytest.importorskip("torch", reason="the experiments import torch (the [train] extra)")
    from model.experiments import eidetic_tasks, glom, memory_classifier, stream_demo

    monkeypatch.setenv("TASK_A_SUBSET_CARDINALITY", "32")
    monkeypatch.setenv("NUM_QUANTILES", "3")
    monkeypatch.setenv("DEVICE", "cpu")
    tasks = eidetic_tasks.COMMAND.parse(
        shlex.split(
            "--dataset fashion --seed 1 2 --epochs 1 --batch-size 8 --test-batch-size 100 --lr 0.5 --gamma 0.9 "
            "--test-limit 20 --data-dir d --out-dir o --log-file l --save-model --use-db --run-name r --no-progress"
        )
    )
    assert [c.seed for c in tasks.configs] == [1, 2] and tasks.settings.use_db is True
    assert (tasks.config.task_a_subset_cardinality, tasks.config.num_quantiles) == (32, 3)
    assert tasks.config.task_b_subset_cardinality == 1000 and tasks.config.data_dir == Path("d")

    memory = memory_classifier.COMMAND.parse(
        shlex.split(
            "--memory cached trainable none --dataset digits --data-dir d --seed 1 2 3 --memory-size 64 "
            "--threshold 0.9 "
            "--similarity-threshold 0.8 --epochs 2 --batch-size 32 --memory-loss-weight 0.3 --temperature 0.2 "
            "--lr 0.01 --backbone small_cnn --backbone-weights w.pt --widths 4 8 --train-limit 128 --test-limit 48 "
            "--speed-batches 1 --device cpu --threads 1 --out-dir o --no-use-db --run-name r --bank-name b --resume "
            "--no-progress"
        )
    )
    assert len(memory.configs) == 9 and memory.config.widths == (4, 8) and memory.config.confidence_threshold == 0.9
    assert memory_classifier.COMMAND.parse([]).config.device == "auto"

    demo = stream_demo.COMMAND.parse(
        shlex.split(
            "--epochs 1 --batch-size 8 --lr 0.1 --hidden 16 --seed 2 --out-dir o --use-db --transport direct "
            "--run-name r --no-progress"
        )
    )
    assert demo.config.hidden == 16 and demo.settings.eidetic_transport == "direct"

    g = glom.COMMAND.parse(
        shlex.split(
            "--dataset digits8 --arms glom cnn --levels 3 --dim 10 --iterations 2 --column patch --patch-size 4 "
            "--hidden 8 --beta 2 --window-inputs --noise-std 0.1 --denoise --checkpointing --epochs 1 --batch-size 4 "
            "--lr 0.1 --seed 3 --device cpu --train-limit 16 --test-limit 8 --island-images 2 --island-threshold 0.8 "
            "--out-dir o --no-progress"
        )
    )
    assert g.config.arms == ("glom", "cnn") and g.config.glom().levels == 3 and g.config.training().seed == 3
