"""The VampPrior top group of the NVAE (`model.prior: vamp`): its components and pseudo-images.

`models/nvae/model.py` (its module docstring) says how the top group's prior, KL and noise change; this
mixin holds what only the VampPrior needs: encoding the pseudo-images into the mixture's components
(μ_k, σ_k) with the encoder's running BN statistics, and the trainer's hooks for starting the
pseudo-images at training images. The mixing class provides `vamp`, `cfg`, `_encode`, `enc_samplers`
and `bn_layers`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from models.nvae.distributions import Normal


class VampTopMixin:
    """Methods of `NVAE` for a VampPrior top group (`self.vamp` is None for the standard prior)."""


    def _components(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top encoder features of the pseudo-images [K, C_top, h, w] → (μ_k, σ_k) [K, M] each, the
        Gaussians q₀(z_0 | u_k) flattened over the group's M = latents·h·w dimensions."""
        q = Normal.from_params(self.enc_samplers[0](top))
        return q.mu.flatten(1), q.sigma.flatten(1)

    @contextlib.contextmanager
    def _running_bn_statistics(self) -> Iterator[None]:
        """Inside the block every BN layer that was in train mode is in eval mode (normalizes with, and
        does not update, its running statistics); restored on exit."""
        switched = [layer for _, layer in self.bn_layers(generative_only=False) if layer.training]
        for layer in switched:
            layer.train(False)
        try:
            yield
        finally:
            for layer in switched:
                layer.train(True)

    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VampPrior's components (μ_k, σ_k) [K, M] each: the pseudo-images encoded with the encoder's
        BN layers in eval mode, whatever the model's mode (so generation never moves the statistics).
        Recomputed at every call, so it always reflects the current weights; differentiable in them."""
        if self.vamp is None:
            raise ValueError("prior_components: this NVAE has the standard top-group prior (model.prior=standard)")
        with self._running_bn_statistics():
            top, _ = self._encode(self.vamp.pseudo_inputs())
        return self._components(top)

    def pseudo_input_images(self) -> torch.Tensor:
        """The VampPrior's pseudo-images [K, C, H, W] in (−1, 1)."""
        return self.vamp.pseudo_inputs()

    @property
    def pseudo_inputs_from_data(self) -> int:
        """How many training images the trainer should hand to `init_pseudo_inputs` (0: none)."""
        return self.cfg.pseudo_inputs if self.vamp is not None and self.cfg.pseudo_init == "data" else 0

    def init_pseudo_inputs(self, images: torch.Tensor) -> None:
        """Start the pseudo-images at training images [K, C, H, W] in [−1, 1]."""
        self.vamp.initialize_from(images.float())
