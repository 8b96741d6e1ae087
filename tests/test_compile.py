"""torch.compile(fullgraph=True): the NVAE training step and decode, the energy networks and one Langevin step
each trace as ONE graph (a graph break is an error under fullgraph) and are not recompiled across steps
(`error_on_recompile`), while the weights change in place as an optimizer changes them.

CPU, tiny configs, backend `aot_eager`: Dynamo's capture plus AOTAutograd's joint forward/backward trace
(functionalization, in-place buffer updates), run eagerly. Inductor's C++ code generation is left out: on
this project's shared 2-core machine (load 7–9) it had not compiled the tiny NVAE training step in 15 minutes.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import FAST, run_script
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend

from models.adapters import build_adapter
from models.energy import ConvEnergy, ConvLayout, MLPEnergy
from models.langevin import potential_gradient
from models.latent_energy import LatentEnergy
from models.nvae import NVAE, NVAEConfig
from trainer.nvae.objective import kl_balance_alphas, nvae_loss
from trainer.run.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# Tiny but complete: 2 scales, 2 groups each, flows, SE, residual posterior, 5-bit input.
TINY = NVAEConfig(image_size=16, channels_enc=8, channels_dec=8, num_latent_scales=2, groups_per_scale=2,
                  latents_per_group=4, cells_per_cond_enc=1, cells_per_cond_dec=1, num_flows=1, num_x_bits=5)
TINY_ENERGY = ConvLayout(8, 16, ((1, True), (2, False)))


@pytest.fixture(autouse=True)
def strict_dynamo():
    """A fresh Dynamo cache per test; any recompilation is an error."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def _compile(fn):
    """`fn` compiled as one graph, with a counter of the graphs Dynamo captured."""
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def _update(module: torch.nn.Module, seed: int) -> None:
    """An in-place change of every parameter, as an optimizer step makes (bumps their versions)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1e-3 * torch.randn(param.shape, generator=generator))


def _compiled_step_matches_eager(module, compiled, eager, x, step: int, loss_tol: tuple[float, float],
                                 grad_tol: tuple[float, float]) -> None:
    """`compiled(x)` and `eager(x)` from the same state of `module` (the global RNG reseeded; its state dict,
    BN statistics and power-iteration vectors included, restored before the eager pass): the same loss and
    gradients within (rtol, atol). Then an in-place update of the weights, as an optimizer step."""
    state = {k: v.clone() for k, v in module.state_dict().items()}
    results = []
    for fn in (compiled, eager):
        if fn is eager:
            module.load_state_dict(state)
        torch.manual_seed(step)
        module.zero_grad(set_to_none=True)
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    (loss, grads), (expected, expected_grads) = results
    torch.testing.assert_close(loss, expected, rtol=loss_tol[0], atol=loss_tol[1])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=grad_tol[0], atol=grad_tol[1])
    _update(module, step)


def _nvae_and_images(seed: int = 0) -> tuple[NVAE, torch.Tensor]:
    torch.manual_seed(seed)
    return NVAE(TINY).train(), torch.rand(4, 3, 16, 16) * 2 - 1


def test_nvae_training_step_compiles_as_one_graph():
    """Forward with fresh posterior noise, the NVAE loss with KL balancing, the spectral power iteration
    (buffers updated in place) and the BN penalty: one graph, the same loss and gradients as eager. The batch
    dimension is dynamic, so a batch of another size (a last partial batch) reuses the graph too."""
    model, x = _nvae_and_images()
    batches = [x, torch.rand(6, 3, 16, 16) * 2 - 1, x]
    for batch in batches:
        torch._dynamo.mark_dynamic(batch, 0)
    alphas = kl_balance_alphas(model.groups_per_scale_decoder_order)

    def training_loss(images: torch.Tensor) -> torch.Tensor:
        output = model(images)
        loss, _ = nvae_loss(output, 0.5, alphas, 0.1, model.spectral_loss(), model.bn_loss())
        return loss

    training_loss(x).backward()  # the first step (40 power iterations) runs eagerly, as in training
    compiled, counter = _compile(training_loss)
    for step, x in enumerate(batches):
        _compiled_step_matches_eager(model, compiled, training_loss, x, step, loss_tol=(1e-5, 1e-4),
                                     grad_tol=(1e-4, 1e-5))
    assert counter.frame_count == 1


def test_nvae_decode_compiles_as_one_graph():
    """decode(ε_z, ε_x, t): one graph for fresh noise at every call, the same samples as eager."""
    model, _ = _nvae_and_images()
    model.eval()
    compiled, counter = _compile(model.decode)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        eps_z = [torch.randn((4, *shape), generator=generator) for shape in model.latent_shapes]
        eps_x = torch.randn((4, *model.image_shape), generator=generator)
        got = compiled(eps_z, eps_x, temperature=0.7)
        expected = model.decode(eps_z, eps_x, temperature=0.7)
        torch.testing.assert_close(got.x_sample, expected.x_sample, rtol=1e-5, atol=1e-5)
        for z_got, z_expected in zip(got.z, expected.z):
            torch.testing.assert_close(z_got, z_expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("kind", ["conv", "mlp", "latent"])
def test_energy_networks_compile_as_one_graph(kind):
    """Energy forward + spectral loss + backward, weights updated between steps: one graph, eager's values."""
    torch.manual_seed(0)
    if kind == "conv":
        energy = ConvEnergy(TINY_ENERGY)
        energy.initialize_from_data(torch.rand(8, 3, 16, 16) * 2 - 1)  # data-dependent init runs eagerly
        inputs = lambda g: torch.rand((4, 3, 16, 16), generator=g) * 2 - 1  # noqa: E731
    elif kind == "mlp":
        energy = MLPEnergy(2, hidden=16, depth=2)
        inputs = lambda g: torch.randn((4, 2), generator=g)  # noqa: E731
    else:
        shapes = [(4, 2, 2), (4, 4, 4)]
        energy = LatentEnergy(shapes, hidden=8, depth=1)
        inputs = lambda g: [torch.randn((4, *s), generator=g) for s in shapes]  # noqa: E731

    def loss_of(x) -> torch.Tensor:
        return energy(x).mean() + 0.2 * energy.spectral_loss()

    generator = torch.Generator().manual_seed(1)
    loss_of(inputs(generator)).backward()  # warm power iteration, as after the first training step
    compiled, counter = _compile(loss_of)
    for step in range(3):
        _compiled_step_matches_eager(energy, compiled, loss_of, inputs(generator), step, loss_tol=(1e-5, 1e-5),
                                     grad_tol=(1e-4, 1e-6))
    assert counter.frame_count == 1


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_langevin_step_compiles_as_one_graph(autocast_dtype):
    """The differentiable part of a Langevin step (`potential_gradient`: decode ε → x, the energy of x,
    autograd.grad to ε, + ε) on the VAEBM adapter: one graph across steps, eager's energies and gradients."""
    model, _ = _nvae_and_images()
    vae = model.eval().requires_grad_(False)
    energy = ConvEnergy(TINY_ENERGY)
    energy.initialize_from_data(torch.rand(8, 3, 16, 16) * 2 - 1)
    energy.requires_grad_(False)
    adapter = build_adapter("vaebm", vae, energy, 1.0)
    eps = [n.requires_grad_(True) for n in adapter.initial_noise(4, torch.Generator().manual_seed(0),
                                                                  torch.device("cpu"))]
    moving = list(range(len(eps)))
    tolerance = {} if autocast_dtype is None else {"rtol": 2e-2, "atol": 2e-2}  # bf16: op order may differ
    with torch._dynamo.config.patch(trace_autograd_ops=True):  # autograd.grad inside the graph
        compiled, counter = _compile(potential_gradient)
        for _ in range(3):
            got_energy, got_grads = compiled(adapter, eps, moving, autocast_dtype)
            energy_value, grads = potential_gradient(adapter, eps, moving, autocast_dtype)
            torch.testing.assert_close(got_energy, energy_value, **(tolerance or {"rtol": 1e-5, "atol": 1e-5}))
            for got, expected in zip(got_grads, grads):
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, expected, **(tolerance or {"rtol": 1e-4, "atol": 1e-5}))
            with torch.no_grad():  # the Langevin update, in place on the chains
                for e, g in zip(eps, grads):
                    e.add_(g, alpha=-0.5e-3)
    assert counter.frame_count == 1


def _stats(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script", ["train_nvae.py", "train_vaebm.py"])
def test_train_compile_switch_trains_like_eager(script, tmp_path, cache_dir, nvae_run):
    """`train.compile=true` (backend aot_eager here, see the module docstring) through the training scripts: the
    same losses as the uncompiled run to float rounding, the same checkpoint keys, and the log says so."""
    common = ["--config", "digits", *(["--vae", str(nvae_run)] if script == "train_vaebm.py" else []), *FAST,
              "train.max_steps=2", "train.log_every=1", "train.image_every=0", f"data.cache_dir={cache_dir}"]
    run_script(script, *common[:2], "--run-dir", str(tmp_path / "eager"), *common[2:])
    run_script(script, *common[:2], "--run-dir", str(tmp_path / "compiled"), *common[2:], "train.compile=true",
               "train.compile_backend=aot_eager")
    assert "compiled (aot_eager)" in (tmp_path / "compiled" / "log.txt").read_text()
    eager, compiled = _stats(tmp_path / "eager"), _stats(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 2
    for a, b in zip(compiled, eager):
        terms = ("recon", "kl") if script == "train_nvae.py" else ("energy_pos", "energy_neg")
        for key in ("loss", "spectral", *terms):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a[key], b[key])
    weights = "model.safetensors" if script == "train_nvae.py" else "energy.safetensors"
    keys = [set(load_file(str(latest_checkpoint(tmp_path / run) / weights))) for run in ("eager", "compiled")]
    assert keys[0] == keys[1]


def test_train_compile_compiles_through_the_update_step():
    """`train.compile` reaches the training step itself: NVAEUpdate steps (through `bench_nvae`) capture
    graphs, and none without it. (The spectral regularizer compiles twice by design: its first call runs
    eagerly, so the recompile check is off here.)"""
    from trainer.bench.nvae import bench_nvae

    captured = {}
    with torch._dynamo.config.patch(error_on_recompile=False):
        for compiled in (False, True):
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            bench_nvae(TINY, batch_size=2, steps=1, warmup=1, compile=compiled, compile_backend="aot_eager")
            captured[compiled] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert captured[False] == 0 and captured[True] > 0
