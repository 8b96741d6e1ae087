"""Config sections shared by the trainers (data, run bookkeeping) and the NVAE pretraining tree.

Each field's comment is its documentation. `validate()` raises ValueError starting with the field
name; `trainer.config.validate` prefixes the section, so users see e.g. `train.max_steps must be > 0`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models.hvae import HVAEConfig
from models.mlp_vae import MLPVAEConfig
from models.nvae.config import NVAEConfig
from trainer.eval_sections import EvalConfig

BUNDLED_DATASETS = ("digits", "photo-crops", "digits-train", "digits-test", "stacked-digits")
TOY_DATASETS = ("25gaussians", "swissroll")  # 2-D points, generated in memory
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


@dataclass
class DataConfig:
    dataset: str = "digits"          # bundled images (digits, photo-crops), a 2-D toy (25gaussians, swissroll),
                                     # or "shards" to read `shards`
    shards: str | None = None        # directory with index.json and tar shards (overrides `dataset`)
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
        return self.shards is None and self.dataset in TOY_DATASETS

    def validate(self) -> None:
        if self.shards is None and self.dataset == "shards":
            raise ValueError("shards is required by this preset: pass --data SHARDS_DIR (see scripts/make_shards.py)")
        if self.shards is None and self.dataset not in BUNDLED_DATASETS + TOY_DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(BUNDLED_DATASETS + TOY_DATASETS)} or set data.shards, "
                             f"got '{self.dataset}'")
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
    max_steps: int = 1000            # optimizer steps
    global_batch_size: int = 32      # images per optimizer step, all processes together
    per_device_batch_size: int = 32  # images per forward pass on one process; accumulation is derived
    seed: int = 0
    mixed_precision: str = "auto"    # auto (as launched), no, bf16, fp16 (with loss scaling)
    ema_decay: float = 0.999
    log_every: int = 10              # steps between stats.jsonl rows and TensorBoard scalars
    image_every: int = 500           # steps between TensorBoard image grids (0: only at the end)
    checkpoint_every: int = 1000     # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3        # newest complete checkpoints kept (at least 2)
    halt_at_step: int = 0            # if > 0: checkpoint and exit at this step without finishing (pauses, tests)
    progress_bar: bool = True
    sync_bn: bool = True             # NVAE, several processes: BatchNorm statistics over the whole global batch
                                     # (one all-reduce per BN layer, as the official NVAE); false: per process

    def validate(self) -> None:
        for name in ("max_steps", "global_batch_size", "per_device_batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.global_batch_size % self.per_device_batch_size:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"per_device_batch_size ({self.per_device_batch_size})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got '{self.mixed_precision}'")
        if self.keep_checkpoints < 2:
            raise ValueError(f"keep_checkpoints must be >= 2 (the newest may be mid-write), got {self.keep_checkpoints}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.image_every < 0 or self.halt_at_step < 0:
            raise ValueError("image_every and halt_at_step must be >= 0")


@dataclass
class NVAEOptimConfig:
    lr: float = 1e-2                 # Adamax peak learning rate
    lr_min: float = 1e-4             # end of the cosine decay
    warmup_steps: int = 100          # linear warm-up from 0
    weight_decay: float = 3e-4       # L2, added to the gradient (as Adamax in NVAE)
    eps: float = 1e-3                # Adamax eps (NVAE uses 1e-3)

    def validate(self) -> None:
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ValueError(f"lr must be > 0 and lr_min in [0, lr], got lr={self.lr}, lr_min={self.lr_min}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class NVAELossConfig:
    kl_anneal_portion: float = 0.3   # KL warm-up: β rises linearly over this fraction of max_steps
    kl_const_portion: float = 1e-4   # ...after holding at kl_min_coeff for this fraction
    kl_min_coeff: float = 1e-4
    kl_balance: bool = True          # KL balancing while β < 1
    spectral_coeff: float = 0.1      # λ for the spectral + BN penalty (final value when annealed)
    spectral_coeff_init: float = 10.0
    spectral_anneal: bool = False    # anneal λ geometrically from init to final with β

    def validate(self) -> None:
        if not 0 < self.kl_anneal_portion <= 1:
            raise ValueError(f"kl_anneal_portion must be in (0, 1], got {self.kl_anneal_portion}")
        if self.spectral_coeff < 0 or self.spectral_coeff_init < 0:
            raise ValueError("spectral_coeff and spectral_coeff_init must be >= 0")


@dataclass
class NVAETrainingConfig:
    """VAE pretraining: the NVAE on images, the small MLP VAE on 2-D toy points (`model.data_dim`), or the
    VampPrior paper's VAE/HVAE on binarized grey images (`model.levels`, `model.prior`)."""

    model: NVAEConfig | MLPVAEConfig | HVAEConfig = field(default_factory=NVAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: NVAEOptimConfig = field(default_factory=NVAEOptimConfig)
    loss: NVAELossConfig = field(default_factory=NVAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if isinstance(self.model, MLPVAEConfig):
            if not self.data.is_toy:
                raise ValueError("an MLP VAE (model.data_dim) trains on 2-D toy data: set data.dataset to "
                                 "25gaussians or swissroll")
            return
        if self.data.is_toy:
            raise ValueError(f"data.dataset '{self.data.dataset}' is 2-D toy data: use an MLP VAE model (see preset toy2d)")
        if isinstance(self.model, HVAEConfig) and self.loss.kl_balance:
            raise ValueError("loss.kl_balance must be false for a VAE/HVAE (model.levels): the VampPrior paper warms up "
                             "the plain KL")
        if self.data.image_size != self.model.image_size:
            raise ValueError(f"data.image_size ({self.data.image_size}) must equal model.image_size ({self.model.image_size})")
