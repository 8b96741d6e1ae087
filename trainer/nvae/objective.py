"""The NVAE training objective as pure functions, as the official NVAE code computes it. No state: the trainer passes
the step, the model output and the regularizer values in.

    β   = kl_warmup_coeff(step, total_steps)
    λ   = spectral_coeff(β, init, final, anneal)
    loss, terms = nvae_loss(model(x), β, alphas, λ, model.spectral_loss(), model.bn_loss())

loss = mean over the batch of [−log p(x|z) + β·balanced_KL] + λ·(spectral + bn).

In a multi-process run the trainer passes `reduce_mean` (a mean over the processes), so the KL
balancing coefficients come from the global batch, as on one process holding all of it.
"""
from __future__ import annotations

from typing import Callable

import torch

from models.nvae.model import NVAEOutput


def kl_warmup_coeff(
    step: int, total_steps: int, anneal_portion: float = 0.3, const_portion: float = 1e-4, min_coeff: float = 1e-4
) -> float:
    """KL warm-up β (NVAE's warm-up schedule): max(min((step − c·T)/(a·T), 1), β_min), T = total_steps.

    β is held at β_min for the first c·T steps, then rises linearly to 1 over a·T steps.
    """
    if anneal_portion <= 0:
        return 1.0
    ramp = (step - const_portion * total_steps) / (anneal_portion * total_steps)
    return max(min(ramp, 1.0), min_coeff)


def kl_balance_alphas(groups_per_scale_in_decoder_order: list[int]) -> torch.Tensor:
    """Per-group KL-balancing weights α_l (NVAE's KL balancing), decoder order (top scale first).

    A group at decoder scale i (0 = lowest resolution) with n_i groups at that scale gets
    α = 4^i / n_i: its spatial area relative to the top scale, shared among the scale's groups.
    Rescaled so that min α = 1. Example: [5, 5, 5] → 1 ×5, 4 ×5, 16 ×5.
    """
    alphas = [4.0**i / n for i, n in enumerate(groups_per_scale_in_decoder_order) for _ in range(n)]
    alphas_t = torch.tensor(alphas, dtype=torch.float32)
    return alphas_t / alphas_t.min()


def balanced_kl(
    kl_per_group: list[torch.Tensor], alphas: torch.Tensor | None, kl_coeff: float,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_l γ_l·KL_l per sample [B], and the γ's [L] (detached). β is *not* applied here.

    While β = kl_coeff < 1 (the warm-up), γ_l ∝ (mean_batch |KL_l| + 0.01)/α_l, normalized to
    mean 1, so groups that carry more KL per unit of area are pushed harder and no group
    collapses early. Afterwards, or with alphas=None (balancing off), γ = 1: the plain sum.
    `reduce_mean` maps the batch means [L] to their mean over the processes (equal batches: the
    global batch mean); None on one process.
    """
    kl = torch.stack(kl_per_group, dim=1)  # [B, L]
    if alphas is not None and kl_coeff < 1.0:
        per_group = kl.detach().abs().mean(dim=0)
        if reduce_mean is not None:
            per_group = reduce_mean(per_group)
        per_group = per_group + 0.01
        gammas = per_group / alphas.to(device=kl.device, dtype=kl.dtype)
        gammas = gammas / gammas.mean()
    else:
        gammas = torch.ones(kl.shape[1], device=kl.device, dtype=kl.dtype)
    return (kl * gammas).sum(dim=1), gammas


def spectral_coeff(kl_coeff: float, init: float, final: float, anneal: bool) -> float:
    """λ of the spectral + BN penalty (NVAE's spectral regularization).

    With `anneal`, a geometric interpolation that follows the KL warm-up:
    λ = exp((1 − β)·ln λ_init + β·ln λ_final) = λ_init^(1−β)·λ_final^β, so λ = λ_init at β = 0 and
    λ_final at β = 1 (the power form also covers λ_final = 0). Without it, λ = λ_final.
    """
    if not anneal:
        return final
    beta = min(max(kl_coeff, 0.0), 1.0)
    return init ** (1.0 - beta) * final**beta


def nvae_loss(
    output: NVAEOutput,
    kl_coeff: float,
    alphas: torch.Tensor | None,
    spectral_coeff: float,
    spectral_term: torch.Tensor,
    bn_term: torch.Tensor,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = mean_batch[−log p(x|z) + β·balanced_KL] + λ·(spectral + bn)  (the official NVAE objective).

    `alphas` from `kl_balance_alphas`, or None to switch KL balancing off. `reduce_mean`: see
    `balanced_kl` (the KL-balancing statistics over all processes).

    Returns the scalar loss and detached 0-dim tensors for logging: `recon` (−log p(x|z)),
    `kl` (unbalanced Σ_l KL_l), `kl_balanced`, `nelbo` (recon + kl, the unbalanced bound, nats per
    image), `spectral`, `bn`, `kl_coeff`, `spectral_coeff`, `active_units` (latent channels with
    batch-mean KL > 0.1) and `gamma_max`. All per-image terms are batch means.
    """
    recon = -output.recon_log_prob  # [B]
    if alphas is None:  # KL balancing switched off: the plain sum
        kl_bal = torch.stack(output.kl_per_group, dim=1).sum(dim=1)
        gammas = torch.ones(len(output.kl_per_group))
    else:
        kl_bal, gammas = balanced_kl(output.kl_per_group, alphas, kl_coeff, reduce_mean)
    kl = torch.stack(output.kl_per_group, dim=1).sum(dim=1)  # [B]
    loss = (recon + kl_coeff * kl_bal).mean() + spectral_coeff * (spectral_term + bn_term)
    active = torch.stack([(c.detach() > 0.1).sum() for c in output.kl_per_channel]).sum()  # no host sync
    terms = {
        "loss": loss.detach(),
        "recon": recon.detach().mean(),
        "kl": kl.detach().mean(),
        "kl_balanced": kl_bal.detach().mean(),
        "nelbo": (recon + kl).detach().mean(),
        "spectral": spectral_term.detach(),
        "bn": bn_term.detach(),
        "kl_coeff": torch.tensor(float(kl_coeff)),
        "spectral_coeff": torch.tensor(float(spectral_coeff)),
        "active_units": active.float(),
        "gamma_max": gammas.detach().max(),
    }
    return loss, terms
