"""BatchNorm re-adjustment for low-temperature sampling, and a per-temperature statistics cache.

At temperature t < 1 the decoder sees activations with a different spread than the posterior
samples it was trained on, so NVAE re-estimates the BN running statistics of the generative path
by sampling at t in train mode (as the official sampler: 500 passes of batch 16, momentum 0.05, under no_grad;
encoder statistics untouched). README, Inference bundles: the re-adjusted statistics are cached per temperature
and travel in checkpoints and bundles, so sampling never repeats the 500 passes.

The cache is exported as a flat dict of tensors, `t0.70/<module path>.running_mean`, which
safetensors can store directly.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

# Submodules of `NVAE` that make up the generative path and hold BN layers: the decoder tower
# cells and the postprocess cells (the prior convs and the output conv have no BN).
GENERATIVE_PREFIXES = ("decoder_groups.", "decoder_up.", "postprocess.")
_STAT_NAMES = ("running_mean", "running_var")


def temperature_key(temperature: float) -> str:
    """Cache prefix for a temperature: 't0.70' (two decimals unless more are needed)."""
    if abs(temperature - round(temperature, 2)) < 1e-9:
        return f"t{temperature:.2f}"
    return f"t{temperature:.6g}"


class BNStatisticsMixin:
    """Mixed into `NVAE`; expects `self.sample(n, temperature, generator)` and `self._bn_cache`."""

    _bn_cache: dict[str, dict[str, torch.Tensor]]

    def bn_layers(self, generative_only: bool = True) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        """(module path, BN module) pairs, optionally only those on the generative path."""
        layers = []
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                if not generative_only or name.startswith(GENERATIVE_PREFIXES):
                    layers.append((name, module))
        return layers

    @torch.no_grad()
    def readjust_bn(
        self, temperature: float, passes: int = 500, batch_size: int = 16, generator: torch.Generator | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Re-estimate the generative-path BN running statistics at `temperature`.

        The whole model goes to eval mode, the generative-path BN layers to train mode, `sample`
        runs `passes` times under no_grad, and the model ends in eval mode. `progress(passes done)`
        is called after every pass (the caller reports; models never log).
        """
        self.eval()  # type: ignore[attr-defined]
        for _, layer in self.bn_layers(generative_only=True):
            layer.train()
        for done in range(1, passes + 1):
            self.sample(batch_size, temperature=temperature, generator=generator)  # type: ignore[attr-defined]
            if progress is not None:
                progress(done)
        self.eval()  # type: ignore[attr-defined]

    def bn_statistics(self, generative_only: bool = True) -> dict[str, torch.Tensor]:
        """Copies of the BN running statistics: {'<module path>.running_mean': Tensor, ...}."""
        stats = {}
        for name, layer in self.bn_layers(generative_only):
            for stat in _STAT_NAMES:
                stats[f"{name}.{stat}"] = getattr(layer, stat).detach().clone()
        return stats

    @torch.no_grad()
    def load_bn_statistics(self, stats: dict[str, torch.Tensor]) -> None:
        """Copy statistics from `bn_statistics` back in place; unknown keys raise KeyError."""
        layers = dict(self.bn_layers(generative_only=False))
        for key, value in stats.items():
            name, _, stat = key.rpartition(".")
            if name not in layers or stat not in _STAT_NAMES:
                raise KeyError(f"no BatchNorm statistic {key!r} in this model")
            getattr(layers[name], stat).copy_(value)

    @contextlib.contextmanager
    def temperature_statistics(
        self, temperature: float, passes: int = 500, batch_size: int = 16, generator: torch.Generator | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[None]:
        """Within the block, the generative-path BN layers use the statistics re-adjusted for
        `temperature` (computed with `readjust_bn` and cached on first use, reporting to `progress`); on
        exit the original statistics come back. Leaves the model in eval mode when it had to re-adjust.
        """
        key = temperature_key(temperature)
        original = self.bn_statistics(generative_only=True)
        try:
            if key not in self._bn_cache:
                self.readjust_bn(temperature, passes=passes, batch_size=batch_size, generator=generator,
                                 progress=progress)
                self._bn_cache[key] = self.bn_statistics(generative_only=True)
            else:
                self.load_bn_statistics(self._bn_cache[key])
            yield
        finally:
            self.load_bn_statistics(original)

    def adopt_bn_statistics(self, temperature: float, stats: dict[str, torch.Tensor]) -> None:
        """Make `stats` (from `bn_statistics`, readjusted at `temperature`) this model's statistics and its cached
        ones for `temperature`: a model an energy was trained on with readjusted statistics samples with exactly
        those, with Langevin or without."""
        self.load_bn_statistics(stats)
        self._bn_cache[temperature_key(temperature)] = {name: value.detach().clone() for name, value in stats.items()}

    def cached_temperatures(self) -> list[float]:
        """Temperatures whose re-adjusted statistics are cached."""
        return sorted(float(key[1:]) for key in self._bn_cache)

    def bn_cache_state(self) -> dict[str, torch.Tensor]:
        """The cache as one flat dict of tensors, keys 't0.70/<module path>.running_mean'."""
        return {f"{key}/{name}": value for key, stats in self._bn_cache.items() for name, value in stats.items()}

    def load_bn_cache_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the cache with the contents of `bn_cache_state()` output."""
        known = {name for name, _ in self.bn_layers(generative_only=False)}
        cache: dict[str, dict[str, torch.Tensor]] = {}
        for flat_key, value in state.items():
            key, sep, name = flat_key.partition("/")
            if not sep or not key.startswith("t") or name.rpartition(".")[0] not in known:
                raise KeyError(f"not a BN-cache entry of this model: {flat_key!r}")
            float(key[1:])  # raises ValueError on a malformed temperature
            cache.setdefault(key, {})[name] = value.detach().clone()
        self._bn_cache = cache
