"""NVAE objective functions on hand-computed cases, and a smoke run of the training-step benchmark."""
from __future__ import annotations

import math

import pytest
import torch

from models.nvae import NVAEConfig
from models.nvae.model import NVAEOutput
from trainer.bench.nvae import bench_nvae
from trainer.nvae.objective import (
    balanced_kl,
    kl_balance_alphas,
    kl_warmup_coeff,
    nvae_loss,
    spectral_coeff,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: 2 threads thrash on a shared 2-core box


def test_kl_warmup_coeff_values():
    total = 1000  # c·T = 0.1 steps, a·T = 300 steps
    assert kl_warmup_coeff(0, total) == pytest.approx(1e-4)  # clamped at the floor
    assert kl_warmup_coeff(150, total) == pytest.approx((150 - 0.1) / 300)
    assert kl_warmup_coeff(300, total) == pytest.approx((300 - 0.1) / 300)
    assert kl_warmup_coeff(301, total) == 1.0
    assert kl_warmup_coeff(10_000, total) == 1.0
    assert kl_warmup_coeff(50, 100, anneal_portion=0.5, const_portion=0.1, min_coeff=0.2) == pytest.approx(0.8)
    assert kl_warmup_coeff(5, 100, anneal_portion=0.5, const_portion=0.1, min_coeff=0.2) == 0.2


def test_kl_balance_alphas():
    torch.testing.assert_close(kl_balance_alphas([5, 5, 5]), torch.tensor([1.0] * 5 + [4.0] * 5 + [16.0] * 5))
    torch.testing.assert_close(kl_balance_alphas([4] * 5), torch.tensor([4.0**i for i in range(5) for _ in range(4)]))
    torch.testing.assert_close(kl_balance_alphas([30]), torch.ones(30))
    # ada_groups in decoder order [1, 2]: 1/1 and 4/2 → 1, 2, 2.
    torch.testing.assert_close(kl_balance_alphas([1, 2]), torch.tensor([1.0, 2.0, 2.0]))


def test_balanced_kl_hand_computed():
    kl = [torch.tensor([1.0, 3.0], requires_grad=True), torch.tensor([4.0, 4.0], requires_grad=True)]
    alphas = torch.tensor([1.0, 4.0])
    total, gammas = balanced_kl(kl, alphas, kl_coeff=0.5)
    # k = (2.01, 4.01); k/α = (2.01, 1.0025); γ = that / its mean.
    ratio = torch.tensor([2.01, 4.01 / 4])
    expected_gammas = ratio / ratio.mean()
    torch.testing.assert_close(gammas, expected_gammas)
    assert gammas.mean().item() == pytest.approx(1.0) and not gammas.requires_grad
    torch.testing.assert_close(total, expected_gammas[0] * kl[0].detach() + expected_gammas[1] * kl[1].detach())
    total.sum().backward()  # gradient flows through KL only, scaled by the (constant) γ's
    torch.testing.assert_close(kl[0].grad, expected_gammas[0].expand(2))
    # After the warm-up (β = 1), or with balancing off: the plain sum.
    for alphas_or_none, beta in ((alphas, 1.0), (None, 0.5)):
        plain, ones = balanced_kl(kl, alphas_or_none, kl_coeff=beta)
        torch.testing.assert_close(plain, torch.tensor([5.0, 7.0]))
        torch.testing.assert_close(ones, torch.ones(2))


def test_spectral_coeff_anneal_endpoints():
    assert spectral_coeff(0.0, init=10.0, final=1e-2, anneal=True) == pytest.approx(10.0)
    assert spectral_coeff(1.0, init=10.0, final=1e-2, anneal=True) == pytest.approx(1e-2)
    assert spectral_coeff(0.5, init=10.0, final=1e-2, anneal=True) == pytest.approx(math.sqrt(10.0 * 1e-2))
    assert spectral_coeff(0.3, init=10.0, final=1e-2, anneal=False) == 1e-2
    assert spectral_coeff(0.0, init=10.0, final=0.0, anneal=True) == pytest.approx(10.0)
    assert spectral_coeff(1.0, init=10.0, final=0.0, anneal=True) == 0.0


def _fake_output(recon, kls):
    x = torch.zeros(len(recon), 1, 2, 2)
    return NVAEOutput(
        x_mean=x, x_log_sigma=x, recon_log_prob=torch.tensor(recon, requires_grad=True),
        kl_per_group=[torch.tensor(k, requires_grad=True) for k in kls],
        kl_per_channel=[torch.tensor([0.5, 0.05]), torch.tensor([0.2, 0.3])], z=[],
    )


def test_nvae_loss_hand_computed():
    out = _fake_output([-10.0, -20.0], [[1.0, 3.0], [4.0, 4.0]])
    spectral, bn = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0)
    loss, terms = nvae_loss(out, 1.0, torch.tensor([1.0, 4.0]), 0.1, spectral, bn)
    # mean(recon + KL) = mean(10 + 5, 20 + 7) = 21, plus 0.1·(2 + 3).
    assert loss.item() == pytest.approx(21.5)
    assert float(terms["recon"]) == pytest.approx(15.0) and float(terms["kl"]) == pytest.approx(6.0)
    assert float(terms["nelbo"]) == pytest.approx(21.0) and float(terms["active_units"]) == 3.0
    assert {"kl_balanced", "spectral", "bn", "kl_coeff", "spectral_coeff"} <= terms.keys()
    loss.backward()
    assert spectral.grad.item() == pytest.approx(0.1)
    torch.testing.assert_close(out.recon_log_prob.grad, torch.tensor([-0.5, -0.5]))
    # β scales the balanced KL: at β = 0.5 with balancing, loss = mean(recon + 0.5·Σγ·KL) + λ·(…).
    out = _fake_output([-10.0, -20.0], [[1.0, 3.0], [4.0, 4.0]])
    loss, terms = nvae_loss(out, 0.5, torch.tensor([1.0, 4.0]), 0.0, spectral, bn)
    balanced, _ = balanced_kl(out.kl_per_group, torch.tensor([1.0, 4.0]), 0.5)
    assert loss.item() == pytest.approx((15.0 + 0.5 * balanced.mean()).item())


def test_bench_nvae_smoke():
    cfg = NVAEConfig(image_size=16, channels_enc=8, channels_dec=8, num_latent_scales=2, groups_per_scale=1,
                     latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1)
    result = bench_nvae(cfg, batch_size=2, steps=1, warmup=1)
    assert {"img_per_s", "step_s", "peak_mem_mb", "params_m", "batch_size", "resolution"} <= result.keys()
    assert result["img_per_s"] > 0 and result["step_s"] > 0 and result["peak_mem_mb"] >= 0
    assert result["batch_size"] == 2 and result["resolution"] == 16 and result["params_m"] > 0
