"""The config tree: typed dataclasses, YAML presets, dotted command-line overrides.

    cfg = load_config(NVAETrainingConfig, "digits", ["train.max_steps=50", "optim.lr=3e-3"])

A preset is `trainer/presets/<kind>/<name>.yaml`, or any YAML path. In a preset, `model:` may be an
architecture name from the model registry (e.g. `model: celebahq256`) instead of a mapping; the
resolved config written to a run directory always spells everything out. Everything is validated
before anything runs: an unknown key, a value of the wrong type or a bad value raises `UserError`
naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from models.files import atomic_write_text
from trainer.errors import UserError, one_line, short_repr

PRESET_DIR = Path(__file__).parents[1] / "presets"  # trainer/presets/<kind>/<name>.yaml


# ----------------------------------------------------------------------------------------------
# Generic dataclass <-> dict conversion with validation.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type `tp`, or raise UserError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        classes = [o for o in options if dataclasses.is_dataclass(o)]
        if classes and isinstance(value, dict):
            # A union of sections (e.g. NVAE or MLP-VAE model): the one whose fields cover the most keys.
            best = max(classes, key=lambda c: len(set(value) & {f.name for f in dataclasses.fields(c)}))
            return from_dict(best, value, prefix=key)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"bad value {short_repr(value)} for config key '{key}'")
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list, got {short_repr(value)}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' expects a mapping, got {short_repr(value)}")
        return from_dict(tp, value, prefix=key)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config key '{key}' expects true/false, got {short_repr(value)}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' expects an integer, got {short_repr(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' expects an integer, got {short_repr(value)}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise UserError(f"config key '{key}' expects a number, got {short_repr(value)}")
        if not math.isfinite(number):  # NaN or infinity would pass every range check written as a comparison
            raise UserError(f"config key '{key}' must be a finite number, got {short_repr(value)}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}' expects a string, got {short_repr(value)}")
    raise UserError(f"config key '{key}' has unsupported type {_type_name(tp)}")


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and bad values raise UserError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise UserError(f"unknown config key {short_repr(key)}{did_you_mean(str(name), cls, prefix)}")
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without a default
        raise UserError(f"config section '{prefix or '<root>'}': {err}") from None


def did_you_mean(name: str, cls: type, prefix: str = "") -> str:
    """` (did you mean 'train.max_steps'?)` for a misspelt key of section `cls`, or a key put in the wrong section."""
    dotted = lambda key: f"{prefix}.{key}" if prefix else key
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    close = difflib.get_close_matches(name, fields, n=1)
    if close:
        return f" (did you mean '{dotted(close[0])}'?)"
    hints = typing.get_type_hints(cls)
    for field in fields:  # e.g. `max_steps=5` for `train.max_steps=5`
        sections = [t for t in typing.get_args(hints[field]) or (hints[field],) if dataclasses.is_dataclass(t)]
        if any(name in {f.name for f in dataclasses.fields(section)} for section in sections):
            return f" (did you mean '{dotted(field)}.{name}'?)"
    return ""


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a dataclass tree (YAML- and JSON-serializable)."""
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.max_steps=50` -> ("train.max_steps", 50). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"override {short_repr(text)} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {short_repr(text)} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


# ----------------------------------------------------------------------------------------------
# Presets.


def list_presets(kind: str) -> list[str]:
    """Names of the presets of one kind (a folder under trainer/presets/), sorted."""
    return sorted(p.stem for p in (PRESET_DIR / kind).glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    """A YAML mapping from `path`, with errors naming the file."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"cannot read config file '{path}': {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level")
    return data


def resolve_preset(kind: str, preset_or_path: str) -> tuple[dict, str]:
    """The raw dict of a preset name or YAML path, and a description of where it came from."""
    candidate = Path(preset_or_path)
    if preset_or_path.endswith((".yaml", ".yml")) or candidate.is_file():
        if not candidate.is_file():
            raise UserError(f"config file '{preset_or_path}' does not exist")
        return read_yaml(candidate), str(candidate)
    preset = PRESET_DIR / kind / f"{preset_or_path}.yaml"
    if not preset.is_file():
        presets = list_presets(kind)
        close = difflib.get_close_matches(preset_or_path, presets, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"unknown preset '{preset_or_path}' ({hint}known: {', '.join(presets)}; or give a .yaml path)")
    return read_yaml(preset), f"preset {kind}/{preset_or_path}"


def load_config(cls: type, kind: str, preset_or_path: str, overrides: list[str] = (), *,
                expand: dict[str, Any] | None = None) -> Any:
    """Resolve preset + overrides into a validated `cls` instance.

    `expand` maps a top-level section name to a function name -> dict, used to expand a string
    section (e.g. `model: celebahq256`) into a mapping before overrides apply.
    """
    raw, _ = resolve_preset(kind, preset_or_path)
    raw = _expand_named_sections(raw, expand or {})
    for text in overrides:
        key, value = parse_override(text)
        top = key.split(".")[0]
        if top in (expand or {}) and key == top and isinstance(value, str):
            raw[top] = value
            raw = _expand_named_sections(raw, expand)
            continue
        _set_dotted(raw, key, value)
    cfg = from_dict(cls, raw)
    validate(cfg)
    return cfg


def _expand_named_sections(raw: dict, expand: dict[str, Any]) -> dict:
    raw = dict(raw)
    for section, resolver in expand.items():
        value = raw.get(section)
        if isinstance(value, str):
            raw[section] = resolver(value)
        elif isinstance(value, dict) and isinstance(value.get("base"), str):
            base = resolver(value["base"])
            raw[section] = _deep_merge(base, {k: v for k, v in value.items() if k != "base"})
    return raw


def validate(cfg: Any, prefix: str = "") -> None:
    """Call `validate()` on every dataclass in the tree, turning ValueError into UserError."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{field.name}.")
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as err:
            message = one_line(str(err), 300)
            raise UserError(f"{prefix}{message}" if prefix and not message.startswith(prefix) else message) from None


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
