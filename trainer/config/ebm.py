"""The energy-training config tree: an energy on a frozen VAE, trained by one loop for every method
(VAEBM paper Table 8; latent tilting and the joint latent prior as in README, "Energy methods on the same
machinery")."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.configs import LAYOUTS, METHODS, EnergyNetConfig
from trainer.config.common import MAX_COEFF, DataConfig, EvalConfig, TrainConfig

LANGEVIN_AUTOCAST = ("no", "bf16")
NEGATIVES = ("langevin", "resample")
LATENT_METHODS = ("latent-tilting", "joint-prior")  # energies whose papers compare with the VAE's own sampler


@dataclass
class VAERef:
    """The frozen VAE an energy trains against: run or checkpoint, weights, temperature, fine-tuning, BN stats."""

    path: str | None = None          # NVAE run directory or checkpoint directory (--vae)
    weights: str = "ema"             # ema (default) or raw weights of the NVAE checkpoint
    temperature: float = 1.0         # prior and decoder temperature of T(ε) during training
    finetune: bool = False           # joint-prior only: also train the VAE under the energy prior (joint
                                     # fine-tuning of generator and inference network; default two-stage)
    finetune_lr: float = 1e-5        # Adam learning rate of the VAE when finetune is on
    bn_temperature: float | str | None = "auto"  # NVAE: readjust the generative path's BN statistics at this
                                     # temperature BEFORE energy training, and train, sample, export with them
                                     # (README, "BN statistics of an energy"). null: the statistics as trained.
                                     # auto: vae.temperature for latent-tilting and joint-prior on a frozen VAE
                                     # (the base their papers compare with is NVAE's sampler, which readjusts),
                                     # null for vaebm (the VAEBM paper trains on the NVAE as trained) and with
                                     # finetune (the fine-tuned VAE's statistics move with its weights)
    bn_passes: int = 500             # readjustment passes (NVAE's sampler: 500) ...
    bn_batch_size: int = 16          # ... of this many samples (NVAE's sampler: 16) ...
    bn_seed: int = 0                 # ... drawn from a generator with this seed (the run records a digest of the
                                     # statistics and keeps them in every checkpoint: resume and export reuse them)

    def validate(self) -> None:
        """Check the VAE path, weights choice, temperature, fine-tuning rate and BN readjustment settings."""
        if self.path is None:
            raise ValueError("path is required: pass --vae NVAE_RUN_DIR_OR_CHECKPOINT")
        if self.weights not in ("ema", "raw"):
            raise ValueError(f"weights must be 'ema' or 'raw', got '{self.weights}'")
        if not 0 < self.temperature <= 10:
            raise ValueError(f"temperature must be in (0, 10], got {self.temperature}")
        if not 0 < self.finetune_lr <= 1:
            raise ValueError(f"finetune_lr must be in (0, 1], got {self.finetune_lr}")
        if isinstance(self.bn_temperature, str) and self.bn_temperature != "auto":
            raise ValueError(f"bn_temperature must be a number, auto or null, got '{self.bn_temperature}'")
        if isinstance(self.bn_temperature, float) and not self.bn_temperature > 0:
            raise ValueError(f"bn_temperature must be > 0, got {self.bn_temperature}")
        if self.bn_passes < 1 or self.bn_batch_size < 1:
            raise ValueError(f"bn_passes and bn_batch_size must be >= 1, got {self.bn_passes}, {self.bn_batch_size}")
        if self.finetune and isinstance(self.bn_temperature, float):
            raise ValueError("bn_temperature: a fine-tuned VAE trains its BN statistics with its weights; set "
                             "vae.bn_temperature=null (or auto) with vae.finetune=true")

    def bn_temperature_for(self, method: str) -> float | None:
        """The temperature the frozen VAE's BN statistics are readjusted at before energy training (None: as
        trained), with `auto` resolved for `method` (see `bn_temperature`)."""
        if self.bn_temperature != "auto":
            return self.bn_temperature
        return self.temperature if method in LATENT_METHODS and not self.finetune else None


@dataclass
class EBMOptimConfig:
    """Energy optimizer: Adam settings, element-wise gradient clip, spectral, energy and slope regularizer weights."""

    lr: float = 4e-5                 # learning rate (Table 8: constant)
    lr_schedule: str = "constant"    # constant, or cosine: decays from lr to lr_min at train.max_steps
    lr_min: float = 0.0              # end of the cosine decay
    beta1: float = 0.99
    beta2: float = 0.999
    weight_decay: float = 3e-5       # L2, as Adam's weight_decay
    clip_std: float = 3.0            # element-wise clip at clip_std·√(bias-corrected v) + clip_offset; 0 disables
    clip_offset: float = 0.1
    spectral_coeff: float = 0.2      # α_s on the sum of spectral norms of the energy's convs
    energy_reg_coeff: float = 0.0    # α_r on mean(E(+)² + E(−)²) (exponential tilting App. B: 0.1)
    slope_coeff: float = 0.0         # γ on mean ‖∇_x E(x)‖² over positives and negatives: a local Lipschitz
                                     # control that keeps E as smooth as the chains can follow (toy2d preset)

    def validate(self) -> None:
        """Check the learning rate, betas, weight decay, and that clip and regularizer coefficients are in range."""
        if not 0 < self.lr <= 1:
            raise ValueError(f"lr must be in (0, 1], got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(f"lr_min must be in [0, lr], got {self.lr_min}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if not 0 <= self.weight_decay <= 1:
            raise ValueError(f"weight_decay must be in [0, 1], got {self.weight_decay}")
        for name in ("clip_std", "clip_offset", "spectral_coeff", "energy_reg_coeff", "slope_coeff"):
            if not 0 <= getattr(self, name) <= MAX_COEFF:
                raise ValueError(f"{name} must be in [0, {MAX_COEFF:g}], got {getattr(self, name)}")


@dataclass
class LangevinConfig:
    """Langevin negatives: steps, step size, precision, test-time steps, exact resampling, tail and resampled starts."""

    steps: int = 10                  # K, Langevin steps per training iteration
    step_size: float = 8e-5          # η (the injected noise has std √η)
    use_mu_cd: bool = False          # negatives = decoder mean instead of a decoder sample
    autocast: str = "no"             # bf16: generator and energy forward passes in bf16, ε stays fp32
    sample_steps: int = 16           # test-time Langevin steps (exported to bundles)
    negatives: str = "langevin"      # langevin: the chains above. resample: EXACT draws from the model (importance
                                     # resampling of `resample_pool` fresh VAE samples by exp(−E)), a reference
                                     # trainer for 2-D toys that shows what the objective reaches without a sampler
    resample_pool: int = 16384       # VAE samples per resampled batch (negatives: resample)
    tail_fraction: float = 0.0       # share of each batch's fresh chains whose ε_z starts from N(0, tail_std² I), the
                                     # prior's tails: negatives where chains from N(0, I) never go, so the energy
                                     # cannot dig wells there (README, "Energy methods"); 0: every chain from N(0, I)
    tail_std: float = 2.0            # initial std of those chains (test-time chains always start from N(0, I))
    metropolis: bool = False         # Metropolis-adjusted steps (MALA): each update is accepted or refused, so chains
                                     # never climb an energy too stiff for η (README, "25-Gaussians")
    start_pool: int = 1              # fresh chains start from prior draws importance-resampled by exp(−E): start_pool
                                     # candidates per fresh chain, so their modes come in the model's proportions,
                                     # which local steps cannot fix (README, "25-Gaussians"); 1: plain N(0, I) draws;
                                     # with tail_fraction, the tail chains come first and are not resampled

    def validate(self) -> None:
        """Check step counts, negatives mode, resample pool, step size, tail fraction and std, and autocast mode."""
        if self.steps < 1 or self.sample_steps < 0:
            raise ValueError("steps must be >= 1 and sample_steps >= 0")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got '{self.negatives}'")
        if self.resample_pool < 1:
            raise ValueError(f"resample_pool must be >= 1, got {self.resample_pool}")
        if self.start_pool < 1:
            raise ValueError(f"start_pool must be >= 1, got {self.start_pool}")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")
        if not 0.0 <= self.tail_fraction <= 1.0 or not self.tail_std > 0:
            raise ValueError(f"tail_fraction must be in [0, 1] and tail_std > 0, got {self.tail_fraction}, "
                             f"{self.tail_std}")
        if self.autocast not in LANGEVIN_AUTOCAST:
            raise ValueError(f"autocast must be one of {', '.join(LANGEVIN_AUTOCAST)}, got '{self.autocast}'")


@dataclass
class ReplayConfig:
    """Replay buffer of persistent ε_z chains: capacity and the annealed replay probability."""

    enabled: bool = False            # persistent chains: initialize ε_z from a replay buffer
    capacity: int = 10000            # entries in total, split evenly across processes
    max_p: float = 0.6               # replay probability reached after anneal_steps
    anneal_steps: int = 5000

    def validate(self) -> None:
        """Check that capacity >= 1, anneal_steps >= 0 and max_p is in [0, 1]."""
        if self.capacity < 1 or self.anneal_steps < 0 or not 0 <= self.max_p <= 1:
            raise ValueError("capacity must be >= 1, anneal_steps >= 0 and max_p in [0, 1]")


@dataclass
class DivergenceConfig:
    """Divergence guard of energy training: energy and gap thresholds and the patience for bad steps."""

    max_abs_energy: float = 1e4      # |mean E+| or |mean E−| beyond this counts as a bad step
    max_energy_gap: float = 1e3      # |mean E+ − mean E−| beyond this counts as a bad step
    patience: int = 5                # consecutive bad steps (or non-finite steps) that mean divergence

    def validate(self) -> None:
        """Check that both thresholds are in (0, 1e30] and patience >= 1."""
        if not (0 < self.max_abs_energy <= 1e30 and 0 < self.max_energy_gap <= 1e30) or self.patience < 1:
            raise ValueError("max_abs_energy and max_energy_gap must be in (0, 1e30] and patience >= 1")


@dataclass
class VAEBMTrainingConfig:
    """Energy training (VAEBM, latent tilting, joint prior) against a frozen VAE: the whole config tree."""

    method: str = "vaebm"            # vaebm (pixel energy, moves ε_z and ε_x), latent-tilting (energy on the
                                     # decoder mean, moves ε_z), joint-prior (energy on the latents, moves ε_z)
    energy: EnergyNetConfig = field(default_factory=EnergyNetConfig)
    vae: VAERef = field(default_factory=VAERef)
    data: DataConfig = field(default_factory=DataConfig)
    optim: EBMOptimConfig = field(default_factory=EBMOptimConfig)
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data_init_batches: int = 5       # batches stacked for the energy's data-dependent init

    def validate(self) -> None:
        """Check the method against the energy kind, fine-tuning, layout, init batches, tail starts, resampling, and the
        slope penalty against fp16 and compile."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if (self.method == "joint-prior") != (self.energy.kind == "latent"):
            raise ValueError(f"energy.kind '{self.energy.kind}' does not fit method '{self.method}': the joint prior "
                             "scores latents (energy.kind latent); the other methods score data (conv or mlp)")
        if self.vae.finetune and self.method != "joint-prior":
            raise ValueError(f"vae.finetune is for method joint-prior (the VAE stays frozen for {self.method})")
        if self.energy.kind == "conv" and self.energy.layout not in LAYOUTS:
            raise ValueError(f"energy.layout must be one of {', '.join(sorted(LAYOUTS))}, got '{self.energy.layout}'")
        if self.data_init_batches < 1:
            raise ValueError("data_init_batches must be >= 1")
        if self.langevin.tail_fraction and (self.replay.enabled or self.langevin.negatives != "langevin"):
            raise ValueError("langevin.tail_fraction starts fresh Langevin chains from the prior's tails: it needs "
                             "replay.enabled=false and langevin.negatives=langevin")
        if self.optim.slope_coeff and self.train.mixed_precision == "fp16":
            raise ValueError("optim.slope_coeff differentiates E twice, and its inner gradient would run in fp16 "
                             "without the loss scaler: use train.mixed_precision=bf16 or no")
        if self.optim.slope_coeff and self.train.compile and self.train.compile_backend != "eager":
            raise ValueError("optim.slope_coeff needs double backpropagation through the energy, which torch.compile's "
                             "AOTAutograd backends do not support: train.compile=false (or compile_backend=eager)")
        if self.langevin.negatives == "resample" and not (self.data.is_toy and self.method == "vaebm"):
            raise ValueError("langevin.negatives=resample (exact negatives by importance resampling) is a reference "
                             "for VAEBM on 2-D toy data only: in images the pool it needs is astronomically large")
