"""Test driver: train_vaebm.py with the energy network's output scaled by 1e6 after its 4th loss pass.

Usage: python tests/helpers/explode_vaebm.py [train_vaebm.py arguments]. Loss passes are recognized by their
batch (positives and negatives concatenated: 2 × per-device batch); Langevin passes are not scaled.
"""
import runpy
import sys
from pathlib import Path

import models.energy as energy_module

original_forward = energy_module.ConvEnergy.forward
loss_passes = {"count": 0}


def exploding_forward(self, x):
    out = original_forward(self, x)
    if self.training and x.shape[0] == 16:
        loss_passes["count"] += 1
    return out * 1e6 if loss_passes["count"] > 4 else out


energy_module.ConvEnergy.forward = exploding_forward
script = Path(__file__).resolve().parents[2] / "scripts" / "train_vaebm.py"
sys.argv = [str(script), *sys.argv[1:]]
runpy.run_path(str(script), run_name="__main__")
