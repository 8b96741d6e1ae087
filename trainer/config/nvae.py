"""The NVAE pretraining config tree (and the VAEs of the toys and the VampPrior paper).

Each field's comment is its documentation. `validate()` raises ValueError starting with the field
name; `trainer.config.loader.validate` prefixes the section, so users see e.g. `train.max_steps must be > 0`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from models.configs import HVAEConfig, MLPVAEConfig
from models.nvae.config import NVAEConfig
from trainer.config.common import MAX_COEFF, DataConfig, EvalConfig, TrainConfig
from trainer.errors import UserError


@dataclass
class NVAEOptimConfig:
    """NVAE optimizer: Adamax with linear warm-up and cosine decay, weight decay and eps."""

    lr: float = 1e-2                 # Adamax peak learning rate
    lr_min: float = 1e-4             # end of the cosine decay
    warmup_steps: int = 100          # linear warm-up from 0
    weight_decay: float = 3e-4       # L2, added to the gradient (as Adamax in NVAE)
    eps: float = 1e-3                # Adamax eps (NVAE uses 1e-3)

    def validate(self) -> None:
        """Check lr in (0, 1], lr_min in [0, lr], warmup_steps >= 0, weight_decay in [0, 1] and eps in (0, 1]."""
        if not 0 < self.lr <= 1 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ValueError(f"lr must be in (0, 1] and lr_min in [0, lr], got lr={self.lr}, lr_min={self.lr_min}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.weight_decay <= 1:
            raise ValueError(f"weight_decay must be in [0, 1], got {self.weight_decay}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must be in (0, 1], got {self.eps}")


@dataclass
class NVAELossConfig:
    """NVAE loss schedule: KL warm-up and balancing, and the (optionally annealed) spectral + BN penalty."""

    kl_anneal_portion: float = 0.3   # KL warm-up: β rises linearly over this fraction of max_steps
    kl_const_portion: float = 1e-4   # ...after holding at kl_min_coeff for this fraction
    kl_min_coeff: float = 1e-4
    kl_balance: bool = True          # KL balancing while β < 1
    spectral_coeff: float = 0.1      # λ for the spectral + BN penalty (final value when annealed)
    spectral_coeff_init: float = 10.0
    spectral_anneal: bool = False    # anneal λ geometrically from init to final with β

    def validate(self) -> None:
        """Check the KL warm-up fractions and coefficient are in range and the spectral coefficients <= MAX_COEFF."""
        if not 0 < self.kl_anneal_portion <= 1:
            raise ValueError(f"kl_anneal_portion must be in (0, 1], got {self.kl_anneal_portion}")
        if not 0 <= self.kl_const_portion <= 1 or not 0 <= self.kl_min_coeff <= 1:
            raise ValueError(f"kl_const_portion and kl_min_coeff must be in [0, 1], got {self.kl_const_portion}, "
                             f"{self.kl_min_coeff}")
        if not (0 <= self.spectral_coeff <= MAX_COEFF and 0 <= self.spectral_coeff_init <= MAX_COEFF):
            raise ValueError(f"spectral_coeff and spectral_coeff_init must be in [0, {MAX_COEFF:g}], got "
                             f"{self.spectral_coeff}, {self.spectral_coeff_init}")


@dataclass
class NVAEDivergenceConfig:
    """Divergence guard of VAE pretraining: how many consecutive non-finite steps mean divergence."""

    patience: int = 5                # consecutive steps with a non-finite loss or gradient (or non-finite weights
                                     # at a checkpoint) that mean divergence; a single one is skipped and counted

    def validate(self) -> None:
        """Check that patience >= 1."""
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")


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
    divergence: NVAEDivergenceConfig = field(default_factory=NVAEDivergenceConfig)

    def validate(self) -> None:
        """Check the model kind fits the data (MLP VAE for toys), no KL balancing for HVAE, equal image sizes."""
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
