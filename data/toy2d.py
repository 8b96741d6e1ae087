"""2-D toy distributions held in memory, and `ToyStream`, their exactly resumable batch stream.

- `Gaussians25`: an equal-weight mixture of 25 isotropic Gaussians centred on a 5×5 grid
  {-2, -1, 0, 1, 2}·spacing in each axis, component std `std`. The default std, √(e^0.1/(50π))·spacing
  ≈ 0.0839·spacing, is the one at which the true distribution's expected log-likelihood is the −1.10
  nats of VAEBM §5.4 (at spacing 1; see `expected_log_prob`). `log_prob` is exact.
- `SwissRoll`: the 2-D Swiss roll t·(cos t, sin t)/5 for t uniform in [1.5π, 4.5π], plus
  isotropic Gaussian noise. It has no closed-form density (no `log_prob`).

`ToyStream` yields {"x": FloatTensor [B, 2]} forever; batch b on rank r is drawn from a generator
seeded by (seed, rank, b), so its state is just the batch count and resume is exact.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from data.stream import derive_seed
from trainer.errors import UserError

# With modes 1/0.0839 ≈ 12 std apart the components barely overlap, so E[log p(x)] is that of one
# component minus log 25: −log 25 − log(2πσ²) − 1. Setting it to −1.10 gives σ² = e^0.1 / (50π).
DEFAULT_STD_FRACTION = math.sqrt(math.exp(0.1) / (50 * math.pi))  # ≈ 0.08388


class Gaussians25:
    """Mixture of 25 isotropic Gaussians on a 5×5 grid with `spacing` between neighbours."""

    def __init__(self, spacing: float = 1.0, std: float | None = None):
        if spacing <= 0 or (std is not None and std <= 0):
            raise UserError(f"25-Gaussians needs spacing > 0 and std > 0, got spacing={spacing}, std={std}")
        self.spacing = float(spacing)
        self.std = float(std) if std is not None else DEFAULT_STD_FRACTION * self.spacing
        grid = torch.arange(-2, 3, dtype=torch.float64) * self.spacing
        self.means = torch.cartesian_prod(grid, grid)  # [25, 2]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples → FloatTensor [n, 2]."""
        component = torch.randint(0, 25, (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[component] + self.std * noise).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log density: x [N, 2] → [N] (computed in float64, returned in x's dtype)."""
        diff = x.double()[:, None, :] - self.means[None, :, :]  # [N, 25, 2]
        per_component = (-0.5 * (diff ** 2).sum(-1) / self.std ** 2
                         - math.log(2 * math.pi * self.std ** 2))  # [N, 25]
        return (torch.logsumexp(per_component, dim=1) - math.log(25)).to(x.dtype)

    def expected_log_prob(self) -> float:
        """E_{x~p}[log p(x)] (minus the entropy) in nats, treating the components as disjoint.

        −log 25 − log(2πσ²) − 1. Every point keeps at least its own component's term, so this is a
        lower bound; at the default std the neglected overlap is about 1e−8 nats (numerical integration
        gives −1.0999999896), far under any Monte Carlo error. At std 0.2·spacing it is 0.06 nats off.
        """
        return -math.log(25) - math.log(2 * math.pi * self.std ** 2) - 1.0


class SwissRoll:
    """2-D Swiss roll: t·(cos t, sin t)/5, t ~ U[1.5π, 4.5π], plus N(0, noise²) per coordinate."""

    def __init__(self, noise: float = 0.05):
        if noise < 0:
            raise UserError(f"Swiss roll noise must be >= 0, got {noise}")
        self.noise = float(noise)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples → FloatTensor [n, 2] (roughly inside [-2, 2]²)."""
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
        points = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 5.0
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (points + self.noise * noise).float()


TOY_DISTRIBUTIONS = {"25gaussians": Gaussians25, "swissroll": SwissRoll}


def make_toy(name: str, **options) -> Gaussians25 | SwissRoll:
    """Build a toy distribution by name ("25gaussians" or "swissroll")."""
    if name not in TOY_DISTRIBUTIONS:
        raise UserError(f"unknown toy distribution {name!r}; choose one of {', '.join(TOY_DISTRIBUTIONS)}")
    return TOY_DISTRIBUTIONS[name](**options)


class ToyStream:
    """Infinite batches {"x": FloatTensor [B, 2]} with the TrainStream state/iteration contract."""

    def __init__(self, distribution, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.distribution, self.batch_size = distribution, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._batches = 0
        self.skipped_samples = 0  # same counters as TrainStream; a toy never skips

    @property
    def seen_samples(self) -> int:
        """Samples this process has drawn so far."""
        return self._batches * self.batch_size

    def state_dict(self) -> dict:
        """The stream's position and identity (seed, rank, world size), for checkpoints."""
        return {"batches": self._batches, "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; UserError if the checkpoint's seed, rank or world size differ."""
        for field, mine in (("seed", self.seed), ("rank", self.rank), ("world_size", self.world_size)):
            if state.get(field) != mine:
                raise UserError(f"cannot resume the toy stream: checkpoint has {field}={state.get(field)}, "
                                f"this run has {field}={mine}")
        self._batches = int(state["batches"])

    def batch(self, b: int) -> dict:
        """Batch number b of this rank: a pure function of (seed, rank, b)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "toy", self.rank, b))
        return {"x": self.distribution.sample(self.batch_size, generator)}

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self.batch(self._batches)
            self._batches += 1
            yield batch
