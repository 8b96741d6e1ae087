"""Optional joint fine-tuning of the generator and inference network under the joint latent EBM prior
(Cui, Wu & Han 2023): after the two-stage default (energy on a frozen VAE), the VAE is trained too.

The model is p(x, z) = p_θ(x|z)·p_αβ(z) with p_αβ(z) = exp(−E_α(z))·p_β(z) / Z(α, β). Its negative ELBO,

    L = E_q[−log p_θ(x|z) + log q_ω(z|x) − log p_β(z) + E_α(z)] + log Z(α, β),

has, for the VAE's parameters (θ, β, ω), the gradient of the surrogate

    mean_x[recon + KL(q‖p_β) + E_α(z_q)]  +  mean_neg[log p_β(z−)]       (z− = Langevin samples, held fixed)

because ∇_β log Z = E_{p_αβ}[∇_β log p_β(z)]. The α part of L is the energy loss the EBM loop already
minimizes. Gradients go to the VAE only (`torch.autograd.grad`), are averaged across processes by hand
(the VAE is never wrapped by DDP: Langevin calls the bare module), and Adam steps the VAE.
"""
from __future__ import annotations

import torch


def finetune_loss(recon: torch.Tensor, kl: torch.Tensor, energy_of_posterior: torch.Tensor,
                  prior_log_prob_of_negatives: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The surrogate above from its per-sample parts: recon, kl, E_α(z_q) [B] and log p_β(z−) [B]."""
    nelbo_ebm = (recon + kl + energy_of_posterior).mean()
    loss = nelbo_ebm + prior_log_prob_of_negatives.mean()
    terms = {"finetune/recon": float(recon.detach().mean()), "finetune/kl": float(kl.detach().mean()),
             "finetune/energy_posterior": float(energy_of_posterior.detach().mean()),
             "finetune/log_prior_negatives": float(prior_log_prob_of_negatives.detach().mean())}
    return loss, terms


class GeneratorFinetuner:
    """Trains the VAE of a joint-prior run alongside its energy. The VAE stays in eval mode between steps
    (Langevin and positives use its running BN statistics); only the data's forward pass runs in train mode."""

    def __init__(self, vae: torch.nn.Module, lr: float, accelerator):
        if not hasattr(vae, "prior_log_prob"):
            raise ValueError(f"{type(vae).__name__} has no prior_log_prob: it cannot be fine-tuned under an energy prior")
        self.vae, self.accelerator = vae, accelerator
        self.params = [p for p in vae.parameters()]
        for p in self.params:
            p.requires_grad_(True)  # Langevin differentiates w.r.t. ε only, so nothing accumulates there
        self.optimizer = torch.optim.Adam(self.params, lr=lr)

    def step(self, x: torch.Tensor, z_negatives: list[torch.Tensor], energy: torch.nn.Module) -> dict[str, float]:
        """One VAE update on data x [B, ...] and Langevin latents z− (L × [B, ...]); returns log terms."""
        self.vae.train()
        try:
            output = self.vae(x)
            kl = torch.stack(output.kl_per_group, dim=1).sum(dim=1)
        finally:
            self.vae.eval()
        # ∇_β log Z = E_{p_αβ}[∇_β log p_β(z−)]: the prior the negatives were drawn from is the eval-mode one (running
        # BN statistics, as Langevin ran it), so its log-density is taken in eval mode too, which also keeps the
        # negatives from moving the BN statistics.
        log_prior_neg = self.vae.prior_log_prob([z.detach() for z in z_negatives])
        loss, terms = finetune_loss(-output.recon_log_prob, kl, energy(output.z), log_prior_neg)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for param, grad in zip(self.params, grads):
            grad = torch.zeros_like(param) if grad is None else grad
            param.grad = self.accelerator.reduce(grad, reduction="mean") if self.accelerator.num_processes > 1 else grad
        finite = all(torch.isfinite(p.grad).all() for p in self.params)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**terms, "finetune/loss": float(loss.detach()), "finetune/skipped": float(not finite)}

    def state_dict(self) -> dict:
        """The VAE optimizer's state, for checkpoints."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the VAE optimizer's state from a checkpoint."""
        self.optimizer.load_state_dict(state["optimizer"])
