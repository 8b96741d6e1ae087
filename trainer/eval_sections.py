"""The `eval` config section: FID on EMA weights at an interval during training.

    eval.fid_every=1000 eval.fid_samples=1000 eval.fid_weights=~/inception.pth eval.fid_ref=shards/cifar10

The scores go to TensorBoard (`eval/fid`, `eval/kid`) and stats.jsonl. FID from a few thousand samples
is biased upward against FID-50k: compare runs at the same `fid_samples`, never with the papers' numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.evaluation.inception import DEFAULT_WEIGHTS, HOW_TO_GET


@dataclass
class EvalConfig:
    fid_every: int = 0               # steps between FID/KID evaluations on the EMA weights (0: never)
    fid_samples: int = 1000          # samples per evaluation (the same noise every time)
    fid_weights: str | None = None   # torch-fidelity InceptionV3 weights (default ~/.cache/vaebm-trainer/fid/...;
                                     # make them offline with `evaluate.py fid-weights`)
    fid_ref: str | None = None       # reference shard set or image folder (default: the training shards)
    fid_batch_size: int = 50         # samples per sampling batch and per Inception forward
    fid_kid_subset_size: int = 1000  # KID subset size (capped at fid_samples)

    def validate(self) -> None:
        if self.fid_every < 0:
            raise ValueError(f"fid_every must be >= 0, got {self.fid_every}")
        if self.fid_samples < 2 or self.fid_batch_size < 1 or self.fid_kid_subset_size < 2:
            raise ValueError(f"fid_samples must be >= 2, fid_batch_size >= 1 and fid_kid_subset_size >= 2, got "
                             f"{self.fid_samples}, {self.fid_batch_size}, {self.fid_kid_subset_size}")
        weights = Path(self.fid_weights or DEFAULT_WEIGHTS).expanduser()
        if self.fid_every and not weights.is_file():  # fail before training starts, not at the first evaluation
            raise ValueError(f"fid_weights: {weights} does not exist; make it with: "
                             f"{HOW_TO_GET.replace('PATH', str(weights))}")
        if self.fid_every and self.fid_ref is not None and not Path(self.fid_ref).expanduser().exists():
            raise ValueError(f"fid_ref: {self.fid_ref} does not exist")
