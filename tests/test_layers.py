"""The CPU fast paths of `models/layers.py`. The depthwise convolution's own backward (`DepthwiseConv2d`): the
same gradients as `F.conv2d` (first and second order), taken by exactly the convs it is meant for, and by a whole
NVAE, whose gradients stay those of the oneDNN backward. `elu`: the values and gradients of `F.elu` (first and
second order), taken on the CPU only. `bench.py cpu-paths` runs and compares both paths with PyTorch's ops."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import run_script

from models.layers import ELU, Conv2d, DepthwiseConv2d, elu
from models.nvae import NVAE, NVAEConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = NVAEConfig(image_size=16, in_channels=3, channels_enc=8, channels_dec=8, num_latent_scales=2,
                  groups_per_scale=2, latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1)


@pytest.mark.parametrize("kernel,padding,dilation", [(5, 2, 1), (3, 1, 1), (3, 2, 2), (5, 1, 1), (3, 0, 1),
                                                     ((3, 5), (1, 2), (1, 1))])
def test_gradients_are_those_of_conv2d(kernel, padding, dilation):
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    kernel, padding, dilation = pair(kernel), pair(padding), pair(dilation)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 7, 8, dtype=torch.float64, generator=generator).requires_grad_(True)
    weight = torch.randn(4, 1, *kernel, dtype=torch.float64, generator=generator).requires_grad_(True)
    ours = lambda a, w: DepthwiseConv2d.apply(a, w, padding, dilation)  # noqa: E731
    assert torch.autograd.gradcheck(ours, (x, weight))
    assert torch.autograd.gradgradcheck(ours, (x, weight))  # double backpropagation (energy slope penalties)

    # And against oneDNN's in float32, channels-last as in the NVAE.
    x32 = x.detach().float().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w32 = weight.detach().float().requires_grad_(True)
    reference = F.conv2d(x32, w32, None, 1, padding, dilation, 4)
    grad_out = torch.randn(reference.shape, generator=generator)
    out = ours(x32, w32)
    torch.testing.assert_close(out, reference)
    for a, b in zip(torch.autograd.grad(out, (x32, w32), grad_out),
                    torch.autograd.grad(reference, (x32, w32), grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_plain_stride_one_depthwise_convs_on_the_cpu_take_it():
    def backward_of(conv: Conv2d, channels: int = 6, autocast: bool = False, dtype=torch.float32) -> str:
        x = torch.randn(2, channels, 8, 8, dtype=dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return type(conv.train()(x).grad_fn).__name__

    plain = dict(kernel_size=5, padding=2, groups=6, bias=False, weight_norm=False)
    assert backward_of(Conv2d(6, 6, **plain)) == "DepthwiseConv2dBackward"
    assert backward_of(Conv2d(6, 6, **plain), autocast=True) != "DepthwiseConv2dBackward"
    assert backward_of(Conv2d(6, 6, **plain).to(torch.bfloat16), dtype=torch.bfloat16) != "DepthwiseConv2dBackward"
    for other in (dict(plain, stride=2), dict(plain, bias=True), dict(plain, weight_norm=True),
                  dict(plain, groups=3), dict(plain, padding=5)):
        assert not Conv2d(6, 6, **other).fast_depthwise_grad, other
    assert not Conv2d(6, 12, **dict(plain, groups=6)).fast_depthwise_grad


def test_an_nvae_step_has_the_gradients_of_pytorchs_ops():
    torch.manual_seed(0)
    fast = NVAE(TINY).train()
    assert any(m.fast_depthwise_grad for m in fast.modules() if isinstance(m, Conv2d))
    assert any(isinstance(m, ELU) for m in fast.modules())
    slow = copy.deepcopy(fast)  # the same model with oneDNN's depthwise backward and F.elu
    for m in slow.modules():
        if isinstance(m, Conv2d):
            m.fast_depthwise_grad = False
        if isinstance(m, ELU):
            m.cpu_fast_path = False
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    grads = []
    for model in (fast, slow):
        torch.manual_seed(1)
        out = model(x)
        loss = -out.recon_log_prob.mean() + sum(k.mean() for k in out.kl_per_group) + 0.1 * model.spectral_loss()
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    depthwise = [n for n, m in fast.named_modules() if isinstance(m, Conv2d) and m.fast_depthwise_grad]
    assert all(f"{n}.weight" in grads[0] for n in depthwise)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_cpu_paths_bench_compares_both_paths():
    import json

    result = json.loads(run_script("bench.py", "cpu-paths", "--config", "digits", "--batch-size", "2",
                                   "--repeats", "2", "--steps", "1", "--warmup", "1", "--threads", "1")
                        .stdout.strip().splitlines()[-1])
    for path in ("depthwise", "elu"):
        shapes = result[path]["shapes"]
        assert shapes and all(s["max_rel_difference"] < 1e-5 and s["speedup"] > 0 for s in shapes), path
        assert result[path]["step_s_stock"] > 0 and result[path]["step_s_ours"] > 0, path
    assert all("kernel" in s for s in result["depthwise"]["shapes"])
    assert result["threads"] == 1


def test_elu_is_f_elu_on_the_cpu():
    generator = torch.Generator().manual_seed(0)
    # Both signs, around 0 (where exp(x) - 1 loses relative precision) and far out on both sides.
    x = torch.cat([torch.randn(2, 3, 8, 8, generator=generator) * 3,
                   torch.linspace(-1e-3, 1e-3, 384).view(2, 3, 8, 8), torch.full((2, 3, 8, 8), -30.0),
                   torch.full((2, 3, 8, 8), 30.0)]).contiguous(memory_format=torch.channels_last)
    ours_x, reference_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, reference = elu(ours_x), F.elu(reference_x)
    assert type(ours.grad_fn).__name__ == "_CPUELUBackward"
    assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1.2e-7)  # one rounding of exp(x) - 1
    grad_out = torch.randn(x.shape, generator=generator)
    torch.testing.assert_close(torch.autograd.grad(ours, ours_x, grad_out)[0],
                               torch.autograd.grad(reference, reference_x, grad_out)[0], rtol=1e-6, atol=2.4e-7)

    x64 = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    assert torch.autograd.gradcheck(elu, (x64,))
    assert torch.autograd.gradgradcheck(elu, (x64,))  # double backpropagation, as through F.elu
