"""Experiment trackers beside TensorBoard (`train.log_with`): Accelerate's trackers, main process only.

    train.log_with=mlflow        MLFLOW_TRACKING_URI=http://mlflow:5000 (or file:/path/mlruns with
                                 MLFLOW_ALLOW_FILE_STORE=true) accelerate launch scripts/train_nvae.py ...
    train.log_with=wandb         WANDB_MODE=offline (or a logged-in account) ...

Each tracker gets the same scalars as TensorBoard under the same tags, at the same steps, and the image
grids: through its `log_images` where Accelerate has one (wandb, aim, clearml, swanlab), as the PNG file
under the artifact folder `samples/` for MLflow, and not at all for the others (comet_ml, dvclive, trackio:
scalars only). The resolved config goes in as hyperparameters (dotted keys) when a tracker run starts.
`stats.jsonl` stays the record of truth: a tracker keeps whatever the interrupted part of a resumed run
logged after its last checkpoint.

The loops finish the trackers with `accelerator.end_training()`. MLflow and wandb runs continue across
resumes: their run ids are kept in `RUN/trackers.json`. The others start a new run at each launch.
Trackers that want a folder (aim) write under `RUN/trackers/`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from models.files import atomic_write_json
from trainer.errors import UserError

ALWAYS_ON = "tensorboard"     # our own SummaryWriter (trainer/run/monitor.py), not Accelerate's
RUN_IDS = "trackers.json"     # {"mlflow": run id, "wandb": run id}: the runs a resumed launch continues
LIST_IMAGES = ("wandb", "swanlab")  # their log_images takes a list of images per tag; aim and clearml take one


def accelerate_trackers(log_with: list[str]) -> list[str]:
    """The names in `train.log_with` that Accelerate starts (TensorBoard is always ours); UserError when one
    is unknown to Accelerate or not installed."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [name for name in dict.fromkeys(log_with) if name != ALWAYS_ON]
    known = [str(t) for t in LoggerType if str(t) not in ("all", ALWAYS_ON)]
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise UserError(f"train.log_with: unknown tracker '{name}' (Accelerate knows {', '.join(known)}; "
                            f"TensorBoard is always on)")
        if name not in installed:
            hint = "pip install mlflow-skinny (or pip install -e '.[mlflow]')" if name == "mlflow" else \
                f"pip install {name}"
            raise UserError(f"train.log_with: {name} is not installed ({hint})")
    return names


def start_trackers(accelerator, run_dir: Path, project: str) -> list:
    """Start the Accelerator's trackers (main process) with the run's config; returns them."""
    run_dir = Path(run_dir)
    ids_path = run_dir / RUN_IDS
    run_ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    names = [str(t) for t in accelerator.log_with]
    init = {"mlflow": {"run_id": run_ids["mlflow"]} if "mlflow" in run_ids else {"run_name": run_dir.name},
            "wandb": {"name": run_dir.name, "dir": str(run_dir), "id": run_ids.get("wandb"), "resume": "allow"}}
    accelerator.init_trackers(project, init_kwargs={n: init[n] for n in names if n in init})
    trackers = list(accelerator.trackers)
    config = _flat(yaml.safe_load((run_dir / "config.yaml").read_text()))
    for tracker in trackers:
        if tracker.name not in run_ids:  # a continued MLflow run refuses changed parameters (e.g. halt_at_step)
            tracker.store_init_configuration(config)
    ids = {t.name: _run_id(t) for t in trackers if t.name in ("mlflow", "wandb")}
    if ids and ids != run_ids:
        atomic_write_json(ids_path, ids)
    return trackers


def log_scalars(trackers: list, values: dict[str, float], step: int) -> None:
    """Log scalar `values` at `step` to every tracker."""
    for tracker in trackers:
        tracker.log(values, step=step)


def log_image(trackers: list, tag: str, grid: np.ndarray, png: Path, step: int) -> None:
    """One image grid [H, W, 3] uint8 (also saved as `png`) to every tracker that takes images."""
    for tracker in trackers:
        if tracker.name == "mlflow":
            tracker.log_artifact(str(png), artifact_path="samples")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({tag: [grid] if tracker.name in LIST_IMAGES else grid}, step=step)


def _run_id(tracker) -> str:
    run = tracker.tracker
    return run.info.run_id if tracker.name == "mlflow" else run.id


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 0}} → {"train.seed": 0}; lists and None as text (what every tracker accepts)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out
