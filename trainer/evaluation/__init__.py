"""Evaluation experiments behind `scripts/evaluate.py NAME ...`.

Each experiment is a module of this package with
    add_arguments(parser)             its own flags (the shared ones are added by the script), and
    run(args, report) -> dict         the experiment; returns the flat JSON result {key: number | str | list}.
`report` is an `ExperimentReport` (see `trainer/evaluation/report.py`): it owns the working directory,
the TensorBoard writer and the log, so experiments never write results themselves.
Modules are imported lazily: `evaluate.py fid` does not import what `modes` needs.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

# name on the command line → module under trainer/evaluation/ (one line each; keep sorted by paper section)
EXPERIMENTS: dict[str, str] = {
    "fid": "fid",
    "fid-weights": "fid_weights",
    "toy-likelihood": "toy_likelihood",
    "modes": "modes",
    "fd-digits": "fd_digits",
    "ood": "ood",
    "latent-tilting": "latent_tilting",
    "vampprior": "vampprior",
    "joint-prior": "joint_prior",
}


def experiment_module(name: str):
    """The module implementing experiment `name` (imported on first use)."""
    return importlib.import_module(f"trainer.evaluation.{EXPERIMENTS[name]}")


def summary(name: str) -> str:
    """The first line of experiment `name`'s docstring, read from its source without importing it (nor torch)."""
    spec = importlib.util.find_spec(f"trainer.evaluation.{EXPERIMENTS[name]}")
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.split("\n")[0]


def available() -> list[str]:
    """Experiments whose module exists in this checkout."""
    found = []
    for name, module in EXPERIMENTS.items():
        if importlib.util.find_spec(f"trainer.evaluation.{module}") is not None:
            found.append(name)
    return found
