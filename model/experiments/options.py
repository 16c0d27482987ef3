"""An experiment's options declared once, as a dataclass: its command line and its environment names come from it.

Each field is an option: its type and default are the dataclass's, its help (and an
environment name, other flags, choices, whether it sweeps) sit in the field's metadata,
written with `option(...)`:

    @dataclass(frozen=True)
    class TasksConfig:
        num_quantiles: int = option(4, env="NUM_QUANTILES", help="buckets per unit")
        seed: int = option(1, sweep=True, help="one or more seeds")

    command = CommandLine(TasksConfig, prog="python -m model.experiments.eidetic_tasks")
    parsed = command.parse(argv)      # parsed.configs: one per seed; parsed.settings: the store's
    command.to_argv(parsed.configs[0])  # back to flags: parse(to_argv(c)) gives c again

A value comes from, first to last: the flag, the environment, a `.env` file in the
working directory, the default. A swept option takes one or more values on the command
line and the parse gives one config per combination (first swept field outermost).

The store's own settings (USE_DB, EIDETIC_URL, ...) stay in `eidetic.ClientSettings`; the
flags named in `store_flags` override its fields (type and help taken from there).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import pydantic
from dotenv import dotenv_values

from eidetic.config import ClientSettings

__all__ = ["CommandLine", "OptionSpec", "Parsed", "config_json", "option"]

C = TypeVar("C")
T = TypeVar("T")

DEFAULT_STORE_FLAGS: Mapping[str, str] = {"use_db": "--use-db"}


def option(
    default: T,
    *,
    help: str = "",
    env: str | None = None,
    flags: Sequence[str] = (),
    choices: Sequence[Any] | None = None,
    sweep: bool = False,
) -> T:
    """A dataclass field that is also a command-line option.

    `flags` replaces the flag made from the field's name (`--field-name`); `env` names
    the environment variable (also read from `.env`) that sets it when no flag does;
    `sweep` lets the flag take several values, one run each.
    """
    if isinstance(default, (list, dict, set)):
        raise TypeError("an option's default is immutable (use a tuple)")
    metadata = {"help": help, "env": env, "flags": tuple(flags), "choices": choices, "sweep": sweep}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One field seen as an option: how argparse reads it and how it is written back."""

    name: str
    default: Any
    kind: type  # the scalar type argparse converts to
    optional: bool  # None is a value (X | None)
    many: bool  # a tuple field: one or more values
    flags: tuple[str, ...]
    help: str
    env: str | None
    choices: tuple[Any, ...] | None
    sweep: bool
    annotation: Any

    @property
    def is_bool(self) -> bool:
        return self.kind is bool and not self.many


@dataclasses.dataclass(frozen=True)
class Parsed(Generic[C]):
    """What a command line means: one config per run (swept options expanded) and the store's settings."""

    configs: list[C]
    settings: ClientSettings

    @property
    def config(self) -> C:
        """The first run's config (the only one when nothing is swept)."""
        return self.configs[0]

    def swept(self, name: str) -> list[Any]:
        """The distinct values a swept option takes, in command-line order."""
        return list(dict.fromkeys(getattr(config, name) for config in self.configs))


class CommandLine(Generic[C]):
    """The argparse parser of a config dataclass, and the way back from a config to its flags."""

    def __init__(
        self,
        config_type: type[C],
        *,
        prog: str | None = None,
        description: str | None = None,
        store_flags: Mapping[str, str] = DEFAULT_STORE_FLAGS,
    ) -> None:
        if not dataclasses.is_dataclass(config_type):
            raise TypeError(f"{config_type!r} is not a dataclass")
        self.config_type = config_type
        self.specs = specs_of(config_type)
        self.store_flags = dict(store_flags)
        self.parser = argparse.ArgumentParser(
            prog=prog, description=description or (config_type.__doc__ or "").strip().splitlines()[0]
        )
        for spec in self.specs:
            self.parser.add_argument(*spec.flags, dest=spec.name, default=argparse.SUPPRESS, **_argparse_options(spec))
        for field_name, flag in self.store_flags.items():
            self.parser.add_argument(flag, dest=f"store.{field_name}", default=None, **_store_options(field_name))

    def parse(
        self, argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None, dotenv: Path | None = None
    ) -> Parsed[C]:
        """Flags, then the environment, then `.env`, then the defaults; unknown flags exit with usage (code 2)."""
        given = vars(self.parser.parse_args(argv))
        sources = _environment(environ, dotenv)
        values: dict[str, Any] = {}
        for spec in self.specs:
            if spec.name in given:
                value = given[spec.name]
                values[spec.name] = tuple(value) if spec.many and not spec.sweep else value
            elif spec.env is not None and spec.env in sources:
                values[spec.name] = self._from_text(spec, sources[spec.env])
            else:
                values[spec.name] = [spec.default] if spec.sweep else spec.default
        swept = [spec.name for spec in self.specs if spec.sweep]
        fixed = {name: value for name, value in values.items() if name not in swept}
        try:
            configs = [
                self.config_type(**fixed, **dict(zip(swept, combination)))
                for combination in itertools.product(*(values[name] for name in swept))
            ]
        except ValueError as error:  # the config's own checks (__post_init__)
            self.parser.error(str(error))
        overrides = {
            name: given[f"store.{name}"] for name in self.store_flags if given.get(f"store.{name}") is not None
        }
        settings = ClientSettings().model_copy(update=overrides)
        return Parsed(configs, settings)

    def to_argv(self, config: C) -> list[str]:
        """The flags that give `config` back from `parse` (options left at their defaults are left out)."""
        argv: list[str] = []
        for spec in self.specs:
            value = getattr(config, spec.name)
            if value == spec.default:
                continue
            flag = spec.flags[0]
            if spec.is_bool:
                argv.append(flag if value else "--no-" + flag.removeprefix("--"))
            elif value is None:
                raise ValueError(f"{spec.name}=None cannot be given on the command line (its default is not None)")
            elif spec.many:
                argv += [flag, *(str(item) for item in value)]
            else:
                argv += [flag, str(value)]
        return argv

    def _from_text(self, spec: OptionSpec, text: str) -> Any:
        try:
            value = pydantic.TypeAdapter(spec.annotation).validate_python(text)
        except pydantic.ValidationError as error:
            self.parser.error(f"{spec.env}={text!r}: {error.errors()[0]['msg']}")
        if spec.choices is not None and value not in spec.choices:
            self.parser.error(f"{spec.env}={text!r}: choose from {', '.join(map(str, spec.choices))}")
        return [value] if spec.sweep else value


def specs_of(config_type: type) -> list[OptionSpec]:
    """Every field of the dataclass as an option (each needs a default)."""
    hints = typing.get_type_hints(config_type)
    specs = []
    for field in dataclasses.fields(config_type):
        if field.default is dataclasses.MISSING:
            raise TypeError(f"{config_type.__name__}.{field.name} needs a default to be an option")
        annotation = hints[field.name]
        kind, optional, many, literal = _unpack(annotation)
        metadata = field.metadata
        choices = metadata.get("choices") or literal
        if many and metadata.get("sweep"):
            raise TypeError(f"{config_type.__name__}.{field.name}: a swept option is a scalar (one value per run)")
        specs.append(
            OptionSpec(
                name=field.name,
                default=field.default,
                kind=kind,
                optional=optional,
                many=many,
                flags=tuple(metadata.get("flags") or ("--" + field.name.replace("_", "-"),)),
                help=metadata.get("help", ""),
                env=metadata.get("env"),
                choices=tuple(choices) if choices is not None else None,
                sweep=bool(metadata.get("sweep", False)),
                annotation=annotation,
            )
        )
    return specs


def config_json(config: Any) -> dict[str, Any]:
    """A config dataclass as JSON-able values (paths as strings, tuples as lists): a run's config in the store."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (tuple, list)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return {field.name: plain(getattr(config, field.name)) for field in dataclasses.fields(config)}


# ---------------------------------------------------------------- internals


def _unpack(annotation: Any) -> tuple[type, bool, bool, tuple[Any, ...] | None]:
    """(scalar type, None allowed, tuple of them, Literal values) of a field's annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) != 1:
            raise TypeError(f"an option is one type or that type | None, not {annotation}")
        optional, annotation = True, members[0]
        origin = typing.get_origin(annotation)
    many = False
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"a tuple option is tuple[X, ...], not {annotation}")
        many, annotation = True, args[0]
        origin = typing.get_origin(annotation)
    literal = None
    if origin is Literal:
        literal = typing.get_args(annotation)
        annotation = type(literal[0])
    if annotation not in (bool, int, float, str, Path):
        raise TypeError(f"an option is bool, int, float, str or Path (or a tuple or Literal of them), not {annotation}")
    return annotation, optional, many, literal


def _argparse_options(spec: OptionSpec) -> dict[str, Any]:
    where = f"; env {spec.env}" if spec.env else ""
    shown = list(spec.default) if spec.many and spec.default is not None else spec.default
    help_text = f"{spec.help} (default: {shown}{where})".strip()
    if spec.is_bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    options: dict[str, Any] = {"type": spec.kind, "help": help_text}
    if spec.choices is not None:
        options["choices"] = spec.choices
    if spec.many or spec.sweep:
        options["nargs"] = "+"
    return options


def _store_options(field_name: str) -> dict[str, Any]:
    field = ClientSettings.model_fields[field_name]
    kind, _optional, _many, literal = _unpack(field.annotation)
    help_text = f"{field.description or ''} Overrides the environment / .env.".strip()
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    return {"type": kind, "choices": literal, "help": help_text}


def _environment(environ: Mapping[str, str] | None, dotenv: Path | None) -> dict[str, str]:
    """`.env` (in the working directory unless given) under the environment, which wins."""
    path = dotenv if dotenv is not None else Path(".env")
    from_file = (
        {key: value for key, value in dotenv_values(path).items() if value is not None} if path.is_file() else {}
    )
    return {**from_file, **(os.environ if environ is None else environ)}
