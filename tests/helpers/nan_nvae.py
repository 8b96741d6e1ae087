"""Test driver: train_nvae.py whose weights turn NaN after the optimizer's 4th step (one parameter filled with NaN).

Usage: python tests/helpers/nan_nvae.py [train_nvae.py arguments], also under `accelerate launch`. With
checkpoint_every=2 the step-4 checkpoint is due right after the weights went bad, and every later loss is NaN.
"""
import runpy
import sys
from pathlib import Path

import torch

original_step = torch.optim.Adamax.step
steps = {"count": 0}


def poisoned_step(self, *args, **kwargs):
    result = original_step(self, *args, **kwargs)
    steps["count"] += 1
    if steps["count"] >= 4:
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
    return result


torch.optim.Adamax.step = poisoned_step
script = Path(__file__).resolve().parents[2] / "scripts" / "train_nvae.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
