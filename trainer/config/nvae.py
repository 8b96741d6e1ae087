"""The NVAE pretraining config tree (and the VAEs of the toys and the VampPrior paper).

Each field's comment is its documentation. `validate()` raises ValueError starting with the field
name; `trainer.config.loader.validate` prefixes the section, so users see e.g. `train.max_steps must be > 0`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from models.configs import HVAEConfig, MLPVAEConfig
from models.nvae.config import NVAEConfig
from trainer.config.common import DataConfig, EvalConfig, TrainConfig
from trainer.errors import UserError


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
            size = self.data.image_size
            raise ValueError(f"data.image_size ({size}) must equal model.image_size ({self.model.image_size}): set "
                             f"both (data.image_size={size} model.image_size={size}), or neither with --data "
                             f"(the size is then read from the shards)")


def architecture_dict(name: str) -> dict:
    """Expand `model: <name>` in a preset into the registered NVAE architecture's fields."""
    from models.nvae.config import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise UserError(f"unknown model architecture '{name}' (known: {', '.join(sorted(ARCHITECTURES))})")
    return dataclasses.asdict(ARCHITECTURES[name])
