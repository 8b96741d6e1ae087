"""The training scripts' command line: `--config`, `--run-dir`, `--data`, `--print-config`, `key=value` overrides,
and the config they resolve to, fitted to the data it will read (README, "Your own images").

Import-light on purpose: `--help`, `--print-config` and every config error answer without importing torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import typing
from typing import Callable

from trainer.errors import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_STOPPED, TrainingDiverged, TrainingStopped,
                            UserError, no_space_path, one_line, write_launcher_note)
from trainer.run.host_memory import keep_freed_host_memory
from trainer.run.threads import configure_cpu_threads

IMAGE_SIZE_KEYS = ("data.image_size", "model.image_size")


def training_parser(description: str, kind: str) -> argparse.ArgumentParser:
    """The arguments `train_nvae.py` (kind "nvae") and `train_vaebm.py` ("vaebm") share; help lists presets and keys."""
    parser = argparse.ArgumentParser(description=description, epilog=_epilog(kind),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset name (listed below) or a YAML file")
    parser.add_argument("--run-dir", default=None, help="run directory (required unless --print-config); "
                                                        "re-running the command resumes it")
    parser.add_argument("--data", default=None, help="shards from scripts/make_shards.py (sets data.shards): a folder, a "
                                                     "URL prefix, or a brace pattern / pipe: command with data.index=...; "
                                                     "the image size is read from its index.json")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit: trains nothing, writes nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=50")
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; `--run-dir` is required unless `--print-config` (an argparse error, exit code 2)."""
    args = parser.parse_args(argv)
    if args.run_dir is None and not args.print_config:
        parser.error("the following arguments are required: --run-dir")
    return args


def training_config(kind: str, args: argparse.Namespace, extra_overrides: list[str] = ()):
    """The validated config of a training command line, fitted to its data.

    The image size comes from the shards' index.json unless the command line sets `data.image_size` /
    `model.image_size`; a contradiction names the overrides that fix it. The model's channels are
    checked against the data's, and stored paths are made absolute (a run's config.yaml means the same
    from any directory).
    """
    from trainer.config.loader import load_config, parse_override, resolve_preset

    overrides = [*args.overrides, *([f"data.shards={args.data}"] if args.data else []), *extra_overrides]
    cls, expand = config_class(kind)
    given = dict(parse_override(text) for text in overrides)  # the last value of each key wins
    size = shard_image_size(str(given["data.shards"])) if given.get("data.shards") is not None else None
    if size is not None:
        for key in IMAGE_SIZE_KEYS:
            if isinstance(given.get(key), int) and given[key] != size:  # other values: load_config names the type
                raise mismatch_error(given["data.shards"], size, given[key], [k for k in IMAGE_SIZE_KEYS if k in given])
        raw_model = resolve_preset(kind, args.config)[0].get("model")
        takes_size = ["data.image_size"] + (["model.image_size"] if kind == "nvae" and not _is_mlp(raw_model) else [])
        overrides += [f"{key}={size}" for key in takes_size if key not in given]  # last: after any `model=NAME`
    cfg = load_config(cls, kind, args.config, overrides, expand=expand)
    check_image_size(cfg)  # a config file's data.shards
    check_channels(cfg, kind)
    return absolute_paths(cfg)


def config_class(kind: str):
    """(config class, `expand` of `load_config`) of a training kind: "nvae" or "vaebm"."""
    if kind == "nvae":
        from trainer.config.nvae import NVAETrainingConfig, architecture_dict

        return NVAETrainingConfig, {"model": architecture_dict}
    from trainer.config.ebm import VAEBMTrainingConfig

    return VAEBMTrainingConfig, None


def print_config(cfg) -> None:
    """The resolved config as YAML on stdout, exactly as a run directory's config.yaml would hold it."""
    import yaml

    from trainer.config.loader import to_dict

    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Fitting the config to its data.


def is_remote(location: str) -> bool:
    """A URL or a `pipe:` command rather than a local path (kept as written, never made absolute)."""
    return "://" in location or location.startswith("pipe:")


def shard_image_size(shards: str) -> int | None:
    """The image side recorded in a local shard set's index.json (None for a remote one)."""
    if is_remote(str(shards)):
        return None
    from data.shards import read_index

    return read_index(os.path.expanduser(str(shards)))["size"]


def check_image_size(cfg) -> None:
    """Refuse a data.image_size that contradicts the shards' index.json."""
    size = shard_image_size(cfg.data.shards) if cfg.data.shards is not None else None
    if size is not None and cfg.data.image_size != size:
        raise mismatch_error(cfg.data.shards, size, cfg.data.image_size, [])


def mismatch_error(shards, size: int, image_size: int, keys: list[str]) -> UserError:
    """The error for shards of `size` read at `image_size`, naming the overrides that fix it."""
    by = f" (set by {' and '.join(keys)})" if keys else ""
    leave = "leave the image size out to take the shards' (or set" if keys else "set"
    return UserError(f"shards in '{shards}' are {size}x{size} but the image size is {image_size}{by}; {leave} "
                     f"data.image_size={size} model.image_size={size}{')' if keys else ''}, or pack the images "
                     f"again with make_shards.py --size {image_size}")


def check_channels(cfg, kind: str) -> None:
    """Image models must take the channels the data streams yield (shards and bundled sets are read as RGB)."""
    from data.shards import IMAGE_CHANNELS

    if cfg.data.is_toy:
        return
    key, channels = ("model.in_channels", getattr(cfg.model, "in_channels", None)) if kind == "nvae" else \
        ("energy.in_channels", cfg.energy.in_channels if cfg.energy.kind == "conv" else None)
    if channels is not None and channels != IMAGE_CHANNELS:
        raise UserError(f"{key} is {channels} but the training images have {IMAGE_CHANNELS} channels (shards and "
                        f"bundled datasets are read as RGB, grey images replicated); set {key}={IMAGE_CHANNELS}")


# Config keys holding local paths, by section: stored absolute, so `export.py` and resumed runs find them
# from any working directory.
PATH_KEYS = {"data": ("shards",), "vae": ("path",), "eval": ("fid_ref", "fid_weights")}


def absolute_paths(cfg):
    """A copy of `cfg` whose local paths (PATH_KEYS) are absolute; URLs and unset paths stay as they are."""
    changes = {}
    for section, names in PATH_KEYS.items():
        values = getattr(cfg, section, None)
        if values is None:
            continue
        fixed = {name: os.path.abspath(os.path.expanduser(value)) for name in names
                 if isinstance(value := getattr(values, name), str) and value and not is_remote(value)}
        changes[section] = dataclasses.replace(values, **fixed)
    return dataclasses.replace(cfg, **changes)


def _is_mlp(raw_model) -> bool:
    """A preset's model section describing the 2-D toys' MLP VAE (which has no image size)."""
    return isinstance(raw_model, dict) and "data_dim" in raw_model


# ----------------------------------------------------------------------------------------------
# Help text.


def _epilog(kind: str) -> str:
    """Presets and config keys, for `--help`."""
    from trainer.config.loader import list_presets

    cls, _ = config_class(kind)
    wrap = lambda text: textwrap.fill(text, width=110, subsequent_indent="      ", break_on_hyphens=False)
    lines = [wrap(f"presets (--config NAME, trainer/presets/{kind}/): {', '.join(list_presets(kind))}"), "",
             "config keys (override any with key=value; --print-config shows a preset's values):"]
    for section, keys in config_keys(cls):
        lines.append(wrap(f"  {section}: {', '.join(keys)}"))
    if kind == "nvae":
        from models.nvae.config import ARCHITECTURES

        lines.append(wrap(f"  model=NAME takes a whole architecture: {', '.join(sorted(ARCHITECTURES))}"))
    return "\n".join(lines)


def config_keys(cls) -> list[tuple[str, list[str]]]:
    """(section, its keys) of a config class, top-level keys under "top level"; a union lists its first class."""
    hints = typing.get_type_hints(cls)
    top, sections = [], []
    for field in dataclasses.fields(cls):
        section = next((t for t in typing.get_args(hints[field.name]) or (hints[field.name],)
                        if dataclasses.is_dataclass(t)), None)
        if section is None:
            top.append(field.name)
        else:
            sections.append((field.name, [f.name for f in dataclasses.fields(section)]))
    return ([("top level", top)] if top else []) + sections


# ----------------------------------------------------------------------------------------------
# The scripts' entry point.


def run_cli(main: Callable[[], int | None]) -> None:
    """Set the CPU thread policy (before torch loads, `trainer/run/threads.py`) and keep freed host memory for
    reuse (`trainer/run/host_memory.py`), run `main()`, and turn `UserError` (exit 2), a full device (exit 2)
    and `TrainingDiverged` (exit 3) into one `error: <message>` line on stderr, `TrainingStopped` (exit 4) into
    one `stopped: <message>` line, the last thing printed (README, "Exit codes")."""
    try:
        configure_cpu_threads()
        keep_freed_host_memory()
        code = main()
    except UserError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    except TrainingDiverged as err:
        _fail(EXIT_DIVERGED, str(err))
    except TrainingStopped as err:
        _fail(EXIT_STOPPED, str(err), prefix="stopped")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        path = no_space_path(err)
        if path is None:
            raise
        _fail(EXIT_BAD_INPUT, f"no space left on the device{f' writing {path!r}' if path else ''}: "
                              f"free some space and re-run")
    # Exit at once: interpreter teardown of thousands of imported modules (torch, deepspeed, ...)
    # takes tens of seconds on a loaded machine, which delays requeues after preemption. Everything
    # the scripts write is closed or flushed by now (files are written atomically).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def _fail(code: int, message: str, prefix: str = "error") -> None:
    line = f"{prefix}: {one_line(message)}"
    write_launcher_note(code, line)
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
