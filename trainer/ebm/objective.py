"""The energy-training objective (VAEBM and the latent-space methods) and gradient clip, as pure functions."""
from __future__ import annotations

import torch


def ebm_loss(energy_pos: torch.Tensor, energy_neg: torch.Tensor, spectral: torch.Tensor,
             spectral_coeff: float, energy_reg_coeff: float = 0.0, slope_sq: torch.Tensor | None = None,
             slope_coeff: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """mean E(+) − mean E(−) + α_s·Σσ + α_r·mean(E(+)² + E(−)²) + γ·mean ‖∇E‖².

    The first three terms are VAEBM Eq. 7 with the spectral regularizer; the fourth is the energy
    regularization of the exponential-tilting paper (App. B, α_r = 0.1), which keeps energies near 0
    early in training; the last is the slope penalty (`input_slope_sq`, None when γ = 0), which keeps E
    from growing stiffer than the Langevin chains can follow (README, "25-Gaussians"). energy_pos: [B]
    energies of positives; energy_neg: [B] energies of Langevin samples (no gradient flows into the
    samples). Returns the loss and float terms for logging.
    """
    pos, neg = energy_pos.float().mean(), energy_neg.float().mean()
    loss = pos - neg + spectral_coeff * spectral.float()
    magnitude = (energy_pos.float() ** 2).mean() + (energy_neg.float() ** 2).mean()
    if energy_reg_coeff:
        loss = loss + energy_reg_coeff * magnitude
    pos, neg, spectral = pos.detach(), neg.detach(), spectral.detach()
    terms = {"energy_pos": float(pos), "energy_neg": float(neg), "energy_gap": float(neg - pos),
             "spectral": float(spectral), "energy_sq": float(magnitude.detach())}
    if slope_sq is not None:
        loss = loss + slope_coeff * slope_sq.float()
        terms["slope_sq"] = float(slope_sq.detach())
    return loss, terms


def grad_leaves(inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """Detached copies of energy inputs (a tensor or a list of per-group tensors) that require grad."""
    if isinstance(inputs, torch.Tensor):
        return inputs.detach().requires_grad_(True)
    return [t.detach().requires_grad_(True) for t in inputs]


def input_slope_sq(energies: torch.Tensor, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """mean over the batch of ‖∇_input E‖², summed over every input tensor (images [B, C, H, W], 2-D points
    [B, 2] or per-group latents), differentiable w.r.t. the energy's parameters (double backpropagation).
    `inputs` must require grad and `energies` [B] be computed from them."""
    tensors = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    grads = torch.autograd.grad(energies.float().sum(), tensors, create_graph=True)
    return sum(g.float().pow(2).flatten(1).sum(1) for g in grads).mean()


@torch.no_grad()
def clip_to_adam_rms(optimizer: torch.optim.Optimizer, n_std: float = 3.0, offset: float = 0.1) -> float:
    """Clamp each gradient element to ±(n_std·√(v / (1 − β2^t)) + offset), Adam's bias-corrected RMS
    of past gradients (Du & Mordatch 2019; VAEBM App. E). Parameters without Adam state yet (the
    first step) are not clipped. Returns the fraction of gradient elements that were clipped.
    """
    clipped, total = 0, 0
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for param in group["params"]:
            state = optimizer.state.get(param)
            if param.grad is None or not state or "exp_avg_sq" not in state:
                continue
            step = float(state["step"])
            bound = n_std * (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt() + offset
            clipped += int((param.grad.abs() > bound).sum())
            total += param.grad.numel()
            torch.maximum(torch.minimum(param.grad, bound), -bound, out=param.grad)
    return clipped / total if total else 0.0
