"""The spectral regularizer against the implementation it replaced (a copy of it is kept below as the
reference): the same loss, gradients and power-iteration state, to float rounding, while it reuses the
kernels of the forward pass (`Conv2d.regularized_weight`) and never a stale one."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.energy import ConvEnergy, ConvLayout
from models.layers import Conv2d
from models.nvae import NVAE, NVAEConfig
from models.spectral import collect_convs

TINY = NVAEConfig(image_size=16, channels_enc=8, channels_dec=8, num_latent_scales=2, groups_per_scale=2,
                  latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1, num_flows=1)
ENERGY_LAYOUT = ConvLayout(8, 16, ((1, True), (2, False), (2, True)))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_spectral_loss(regularizer) -> torch.Tensor:
    """`SpectralRegularizer.forward` as it was before the forward's kernels were reused (kept verbatim,
    less the docstring): every kernel normalized afresh, einsum power iterations."""
    iterations = regularizer.iterations if bool(regularizer.warm) else regularizer.first_iterations
    total = None
    for index, members in enumerate(regularizer._groups):
        weights = torch.stack([conv.effective_weight().flatten(1) for conv in members])  # [G, R, C]
        u, v = getattr(regularizer, f"u{index}"), getattr(regularizer, f"v{index}")
        with torch.no_grad():
            w = weights.detach().float()
            for _ in range(iterations):
                v = F.normalize(torch.einsum("gr,grc->gc", u, w), dim=1, eps=1e-3)
                u = F.normalize(torch.einsum("grc,gc->gr", w, v), dim=1, eps=1e-3)
            getattr(regularizer, f"u{index}").copy_(u)
            getattr(regularizer, f"v{index}").copy_(v)
        sigma = torch.einsum("gr,grc,gc->g", u.to(weights.dtype), weights, v.to(weights.dtype))
        total = sigma.sum() if total is None else total + sigma.sum()
    regularizer.warm.fill_(True)
    return total


def _nvae() -> tuple[NVAE, torch.Tensor]:
    torch.manual_seed(0)
    return NVAE(TINY).train(), torch.rand(4, 3, 16, 16) * 2 - 1


def _energy() -> tuple[ConvEnergy, torch.Tensor]:
    torch.manual_seed(0)
    return ConvEnergy(ENERGY_LAYOUT).train(), torch.rand(4, 3, 16, 16) * 2 - 1


def _forward_term(model, x: torch.Tensor) -> torch.Tensor:
    """A scalar of the forward pass (the NVAE's posterior sample is seeded, so both copies draw alike)."""
    torch.manual_seed(7)
    if isinstance(model, NVAE):
        out = model(x)
        return -out.recon_log_prob.mean() + sum(kl.mean() for kl in out.kl_per_group)
    return model(x).mean()


def _compare_one_pass(new, ref, x) -> None:
    """Forward, spectral loss and backward on both copies; assert equal losses, gradients and u/v buffers."""
    results = []
    for model, spectral_fn in ((new, lambda m: m.spectral_loss()),
                               (ref, lambda m: reference_spectral_loss(m.spectral))):
        model.zero_grad(set_to_none=True)
        forward = _forward_term(model, x)  # the forward runs first, as in the training loops
        spectral = spectral_fn(model)
        (forward + 3.0 * spectral).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        buffers = {name: b.clone() for name, b in model.spectral.named_buffers()}
        results.append((spectral.detach(), grads, buffers))
    (s_new, g_new, b_new), (s_ref, g_ref, b_ref) = results
    torch.testing.assert_close(s_new, s_ref, rtol=1e-6, atol=0)
    assert g_new.keys() == g_ref.keys()
    # The power iteration multiplies in another order than the reference (vᵀwᵀ for w v), so u and v differ
    # by float rounding, which the iteration amplifies where a kernel's top two singular values are close
    # (up to 1e-5 on the tiny NVAE); a wrong kernel, a stale one or a missing gradient differs at O(1).
    for name in g_ref:  # gradients from the forward and the spectral term, through the same kernels
        torch.testing.assert_close(g_new[name], g_ref[name], rtol=1e-4, atol=5e-5, msg=name)
    assert b_new.keys() == b_ref.keys()
    for name in b_ref:  # u, v and the warm flag
        torch.testing.assert_close(b_new[name], b_ref[name], rtol=1e-4, atol=5e-5, msg=name)
    assert bool(b_new["warm"])


def _perturb(model, seed: int) -> None:
    """An in-place update of every parameter, like an optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-2 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("build", [_nvae, _energy], ids=["nvae", "energy"])
def test_spectral_loss_matches_the_reference(build):
    """First call (40 iterations), then two warm calls (4 each) after parameter updates, on the NVAE and an
    energy network: loss, every gradient and the power-iteration buffers equal the reference's."""
    new, x = build()
    ref = copy.deepcopy(new)
    for call in range(3):
        _compare_one_pass(new, ref, x)
        _perturb(new, seed=call)
        _perturb(ref, seed=call)


def test_forward_kernels_are_reused_while_their_graph_lives():
    """The regularizer gets the very kernels of the live forward graph; after backward, under no_grad, after
    an in-place weight update (without a new forward) or in a copy it gets freshly computed ones."""
    model, x = _nvae()
    convs = [conv for conv in collect_convs(model) if conv.use_weight_norm]
    assert convs

    alive = _forward_term(model, x)  # the graph lives while its output does (not backpropagated yet)
    kernels = [conv.regularized_weight() for conv in convs]
    assert all(k is conv._forward_weight[0]() for k, conv in zip(kernels, convs))
    assert all(k.grad_fn is not None for k in kernels)

    # A weight updated in place after the forward: the stale kernel must not be handed out.
    with torch.no_grad():
        convs[0].weight.mul_(2.0)
        convs[1].log_weight_norm.add_(0.5)
    for conv in convs[:2]:
        fresh = conv.regularized_weight()
        assert fresh is not conv._forward_weight[0]()
        torch.testing.assert_close(fresh, conv.effective_weight(), rtol=0, atol=0)
    del kernels, alive

    copied = copy.deepcopy(model)  # a copy never points at the original's kernels
    assert all(conv._forward_weight is None for conv in collect_convs(copied) if isinstance(conv, Conv2d))

    loss = _forward_term(model, x)
    loss.backward()  # the graph is freed: the weak references die with it
    assert all(conv._forward_weight[0]() is None for conv in convs)
    with torch.no_grad():
        _forward_term(model, x)
    assert all(conv._forward_weight[0]() is None for conv in convs)


def test_spectral_loss_with_gradient_checkpointing_matches_the_reference():
    """Under activation checkpointing the forward's kernels are not kept; the loss is recomputed, the same."""
    new, x = _nvae()
    new.gradient_checkpointing = True
    ref = copy.deepcopy(new)
    _compare_one_pass(new, ref, x)


def test_power_iteration_state_round_trips_and_warm_flag_is_read_after_load():
    """A regularizer loaded from a warm state dict runs the warm iteration count; loading a cold one
    into a warm regularizer makes it run the first-call count again (as the reference does)."""
    model, x = _energy()
    cold = copy.deepcopy(model.state_dict())
    model.spectral_loss()
    warm = copy.deepcopy(model.state_dict())

    for state in (warm, cold):
        model.load_state_dict(state)
        ref = copy.deepcopy(model)
        spectral, reference = model.spectral_loss(), reference_spectral_loss(ref.spectral)
        torch.testing.assert_close(spectral, reference, rtol=1e-6, atol=0)
        for name, buffer in ref.spectral.named_buffers():
            torch.testing.assert_close(model.spectral.get_buffer(name), buffer, rtol=1e-6, atol=1e-6)
