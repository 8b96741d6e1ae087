"""Energy training against a frozen VAE: VAEBM (paper §3.2, App. E) and, through the same loop, the
latent-space methods of DESIGN §2 (`method`: vaebm, latent-tilting, joint-prior; `models/adapters.py`).

Each iteration: initial noise (ε_z from the replay buffer with probability p, else fresh; ε_x always
fresh where the method moves it) → K Langevin steps on U(ε) = E_ψ(part of T_θ(ε)) + ½‖ε‖² → negatives
(what the energy scores of the final ε) → loss mean E(+) − mean E(−) + α_s·Σσ + α_r·(E(+)² + E(−)²) →
element-wise clip → Adam step → push ε_z. Positives are data (VAEBM, tilting) or z ~ q(z|x) (joint prior).

Chains are independent across processes (their noise is seeded per (seed, rank, step)); the energy's
gradients are all-reduced by DDP. With `data.split=global` every process draws the chains' noise for the
whole global micro-batch from a generator seeded per (seed, step) and keeps its rows, so without the
replay buffer (whose entries are per process) 2 processes with B/2 chains each train like 1 process with
B (tested). Image grids are computed by all processes, each its share of the chains. Re-running the
command resumes; a diverged run is never resumed into (see `trainer/divergence.py` and `resume_from`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.energy import build_energy
from models.registry import is_image_model
from trainer.checkpoint import Checkpoint, CheckpointSaver, latest_checkpoint, rng_state, set_rng_state
from trainer.divergence import DivergenceDetector
from trainer.energy_adapters import NoiseEnergy, build_adapter
from trainer.joint_finetune import GeneratorFinetuner
from trainer.errors import UserError
from trainer.evaluation.fid import langevin_sample_fn
from trainer.fid_monitor import log_fid, make_training_fid
from trainer.langevin import PerChainNoise, langevin
from trainer.monitor import RunMonitor
from trainer.nvae_loop import deepspeed_save
from trainer.replay import ReplayBuffer, replay_probability
from trainer.rundir import mark_diverged, prepare_run_dir, stop_requested
from trainer.runtime import (BatchRows, SlicedNoise, any_rank, batch_inputs, collective_rows, make_accelerator,
                             make_train_stream, mean_across_ranks, peak_memory_mb, process_seed, seed_everything,
                             sliced_noise)
from trainer.vae_source import load_frozen_vae
from trainer.vaebm_objective import clip_to_adam_rms, ebm_loss
from trainer.vaebm_sections import VAEBMTrainingConfig

GRID_CHAINS = 8


def train_vaebm(cfg: VAEBMTrainingConfig, run_dir: Path, resume_from: Path | None = None) -> Path | None:
    """Train (or resume) a VAEBM energy network; returns the final checkpoint (None if diverged)."""
    launch = make_accelerator(cfg.train)
    accelerator, accumulation = launch.accelerator, launch.accumulation
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    run_dir = prepare_run_dir(run_dir, cfg, accelerator, kind="vaebm", section="energy", resume_from=resume_from)

    vae, vae_checkpoint = load_frozen_vae(cfg.vae.path, cfg.vae.weights, device)  # never wrapped or trained
    seed_everything(cfg.train.seed)
    energy = build_energy(cfg.energy, vae.z_shapes)  # a latent energy scores z, not the noise
    optimizer = torch.optim.Adam(energy.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                 weight_decay=cfg.optim.weight_decay)
    energy, optimizer = accelerator.prepare(energy, optimizer)
    net = accelerator.unwrap_model(energy)  # Langevin runs on the bare module, never through DDP/DeepSpeed
    adapter = build_adapter(cfg.method, vae, net, cfg.vae.temperature)
    finetuner = GeneratorFinetuner(vae, cfg.vae.finetune_lr, accelerator) if cfg.vae.finetune else None
    buffer = ReplayBuffer(vae.latent_shapes, capacity=-(-cfg.replay.capacity // world),
                          pin_memory=device.type == "cuda") if cfg.replay.enabled else None
    detector = DivergenceDetector(cfg.divergence.max_abs_energy, cfg.divergence.max_energy_gap, cfg.divergence.patience)
    stream = make_train_stream(cfg.data, cfg.train.per_device_batch_size, cfg.train.seed, accelerator)
    batches = iter(stream)
    rows = BatchRows.of(cfg.data, cfg.train.per_device_batch_size, accelerator)  # this process's chains
    noise_rank = rank if cfg.data.split == "shards" else 0  # global: the same chain noise on every process

    step, checkpoint_path = 0, resume_from or latest_checkpoint(run_dir)
    if checkpoint_path is not None:
        step = restore(Checkpoint(checkpoint_path), energy, optimizer, buffer, detector, stream, launch, cfg.train.seed,
                       finetuner)
        batches = iter(stream)
    else:
        seed_everything(process_seed(cfg.train.seed, rank))
        init = torch.cat([batch_inputs(next(batches)) for _ in range(cfg.data_init_batches)]).to(device)
        net.initialize_from_data(adapter.positives(init))  # statistics all-reduced across processes
    monitor = RunMonitor(run_dir, enabled=accelerator.is_main_process, resume_step=step)
    fid = make_training_fid(cfg, is_image_model(vae), accelerator, monitor.log)
    monitor.log(f"{'resuming from step ' + str(step) if step else 'starting'} {cfg.method}: energy {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
                f"parameters, VAE {vae_checkpoint}, {world} process(es), accumulation {accumulation}, device {device}"
                + (f", replay buffer {buffer.nbytes / 2**20:.1f} MB per process" if buffer else ""))
    saver = CheckpointSaver(run_dir, rank=rank, world_size=world, is_main=accelerator.is_main_process,
                            barrier=accelerator.wait_for_everyone, keep=cfg.train.keep_checkpoints)

    def save(at_step: int) -> None:
        per_rank = {"rng.pt": rng_state(), "data.json": stream.state_dict()}
        if buffer is not None:
            per_rank["replay.pt"] = buffer.state_dict()
        shared = {"energy.safetensors": net.state_dict(),
                  "state.json": {"step": at_step, "kind": "vaebm", "vae_checkpoint": str(vae_checkpoint),
                                 "divergence": detector.state_dict(), "deepspeed": launch.deepspeed}}
        if not launch.deepspeed:
            shared["optimizer.pt"] = optimizer.state_dict()
        if finetuner is not None:  # the fine-tuned VAE travels with the energy (export reads it from here)
            shared.update({"vae.safetensors": vae.state_dict(), "vae_optimizer.pt": finetuner.state_dict()})
        saver.save(at_step, shared=shared, per_rank=per_rank,
                   collective=deepspeed_save(energy) if launch.deepspeed else None)

    autocast_dtype = torch.bfloat16 if cfg.langevin.autocast == "bf16" else None
    progress = tqdm(total=cfg.train.max_steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and cfg.train.progress_bar))
    window = {"images": 0, "time": time.perf_counter(), "skipped_updates": 0}
    last_saved = step if checkpoint_path is not None else -1
    stop_step = min(cfg.train.max_steps, cfg.train.halt_at_step or cfg.train.max_steps)

    while step < stop_step:
        p = replay_probability(step, cfg.replay.max_p, cfg.replay.anneal_steps) if buffer else 0.0
        generator = torch.Generator(device=device).manual_seed(process_seed(cfg.train.seed, noise_rank) + 1_000_003 * step)
        for micro in range(accumulation):
            x_pos = batch_inputs(next(batches)).to(device, non_blocking=True)
            batch = x_pos.shape[0]
            chains, negatives = negative_samples(adapter, buffer, batch, p, generator, cfg.langevin, autocast_dtype, rows)
            with torch.no_grad():  # joint prior: z ~ q(z|x), its noise drawn per global sample like the chains'
                posterior_eps = sliced_noise(vae.latent_shapes, rows, generator, device) \
                    if adapter.positives_need_noise else None
                positives = adapter.positives(x_pos, posterior_eps)
            with accelerator.accumulate(energy):
                with launch.autocast():
                    energies = energy(adapter.concat(positives, negatives))  # one pass: DDP sees one forward per backward
                    loss, terms = ebm_loss(energies[:batch], energies[batch:], net.spectral_loss(), cfg.optim.spectral_coeff,
                                           cfg.optim.energy_reg_coeff)
                accelerator.backward(loss)
            if buffer is not None:
                buffer.push(adapter.latent_noise(chains.noise))
            window["images"] += batch * world

        if launch.deepspeed:  # the engine has stepped inside backward (its own clipping, if configured)
            grads_finite, clip_fraction = not any_rank(accelerator, not math.isfinite(float(loss.detach()))), 0.0
        else:
            grads_finite = not any_rank(accelerator, not all(torch.isfinite(param.grad).all() for param in net.parameters()
                                                             if param.grad is not None))
            clip_fraction = clip_to_adam_rms(optimizer.optimizer, cfg.optim.clip_std, cfg.optim.clip_offset) \
                if cfg.optim.clip_std > 0 else 0.0
            if grads_finite and math.isfinite(float(loss.detach())):
                optimizer.step()
            else:
                window["skipped_updates"] += 1  # a single non-finite step is skipped and counted
            optimizer.zero_grad(set_to_none=True)
        finetune_terms = finetuner.step(x_pos, negatives, net) if finetuner is not None else {}
        step += 1
        progress.update(1)

        terms = mean_across_ranks(accelerator, terms)  # every process takes the same divergence decision
        divergence = detector.check(step, terms["energy_pos"], terms["energy_neg"], grads_finite)
        if step % cfg.train.log_every == 0 or step == stop_step or divergence:
            elapsed = time.perf_counter() - window["time"]
            row = {"loss": float(loss.detach()), **terms, "langevin_grad_norm": float(chains.grad_norm.mean()),
                   "langevin_energy_first": float(chains.energy[0]), "langevin_energy_last": float(chains.energy[-1]),
                   "replay_fill": len(buffer) if buffer else 0, "replay_p": p, "clip_fraction": clip_fraction,
                   "img_per_s": window["images"] / max(elapsed, 1e-9), "skipped_updates": window["skipped_updates"],
                   "data/skipped_samples": stream.skipped_samples, "peak_mem_mb": peak_memory_mb(device),
                   "replay_mem_mb": buffer.nbytes / 2**20 if buffer else 0.0, **finetune_terms}
            monitor.stats(step, row, tb_tags={"data/skipped_samples": "data/skipped_samples", "img_per_s": "sys/img_per_s",
                                              "peak_mem_mb": "sys/peak_mem_mb", "replay_mem_mb": "sys/replay_mem_mb"})
            monitor.scalars(step, {f"langevin/energy_step_{k:02d}": float(e) for k, e in enumerate(chains.energy)})
            progress.set_postfix(gap=f"{terms['energy_gap']:.3g}", img_s=f"{row['img_per_s']:.1f}")
            window.update(images=0, time=time.perf_counter())
        if divergence:
            handle_divergence(divergence, run_dir, accelerator, monitor)
            progress.close()
            monitor.close()
            return None
        if is_image_model(vae) and (step == stop_step or (cfg.train.image_every and step % cfg.train.image_every == 0)):
            log_chain_images(monitor, adapter, cfg, step, device, accelerator)  # collective
        if fid is not None and fid.due(step, stop_step):  # collective: samples after test-length Langevin
            log_fid(monitor, step, fid.evaluate(langevin_sample_fn(
                adapter, cfg.langevin.sample_steps or cfg.langevin.steps, cfg.langevin.step_size, cfg.train.seed, device)))
        if (step % cfg.train.checkpoint_every == 0 or step == stop_step) and not detector.in_bad_streak:
            save(step)
            last_saved = step
        if stop_requested(run_dir, accelerator):  # preemption: checkpoint now, exit cleanly, resume on re-run
            monitor.log(f"stop requested ({run_dir / 'STOP'}) at step {step}")
            break

    if last_saved != step and not detector.in_bad_streak:
        save(step)
    progress.close()
    monitor.log(f"{'halted' if step < cfg.train.max_steps else 'finished'} at step {step}; checkpoint "
                f"{latest_checkpoint(run_dir)}")
    monitor.close()
    accelerator.end_training()
    return latest_checkpoint(run_dir)


def negative_samples(adapter: NoiseEnergy, buffer: ReplayBuffer | None, batch: int, p: float,
                     generator: torch.Generator, langevin_cfg, autocast_dtype=None, rows: BatchRows | None = None):
    """Initial noise (ε_z from the buffer with probability p, else fresh; ε_x, where the method moves it,
    always fresh), K Langevin steps, and the negatives: what the energy scores of the final noise (for
    VAEBM x− [B, C, H, W], the decoder mean with `use_mu_cd`, else the sample).

    `rows`: this process's chains of the global micro-batch (data.split=global); fresh and Langevin noise
    are drawn for all `rows.total` chains and sliced. Default: the `batch` chains are this process's own.
    """
    device = generator.device
    rows = rows or BatchRows(0, batch, batch)
    if buffer is not None:  # per-process entries: these chains depend on the number of processes
        eps_z, _ = buffer.draw(batch, p, generator, device)
        noise = adapter.chain_noise(eps_z, generator)
    else:
        noise = [n[rows.start:rows.stop] for n in adapter.initial_noise(rows.total, generator, device)]
    chains = langevin(noise, adapter, langevin_cfg.steps, langevin_cfg.step_size, SlicedNoise(generator, rows),
                      autocast_dtype=autocast_dtype)
    with torch.no_grad():
        negatives = adapter.negatives(chains.noise, use_mean=langevin_cfg.use_mu_cd)
    return chains, negatives


def restore(checkpoint: Checkpoint, energy, optimizer, buffer, detector, stream, launch, seed: int = 0,
            finetuner: GeneratorFinetuner | None = None) -> int:
    """Load everything an energy checkpoint holds (replay buffers and RNG per process, the fine-tuned VAE
    when there is one); returns its step.

    An imported checkpoint (`scripts/import_official.py`) holds no per-process state: it resumes on any
    number of processes with a fresh data stream, an empty replay buffer and per-process seeds from `seed`.
    """
    accelerator = launch.accelerator
    imported = "imported" in checkpoint.json("state.json")
    if checkpoint.world_size != accelerator.num_processes and not imported:
        raise UserError(f"checkpoint '{checkpoint.path}' was written by {checkpoint.world_size} process(es); "
                        f"this launch has {accelerator.num_processes}")
    if bool(checkpoint.json("state.json").get("deepspeed", False)) != launch.deepspeed:
        raise UserError(f"checkpoint '{checkpoint.path}' must be resumed with the same launcher (DeepSpeed or not)")
    net = accelerator.unwrap_model(energy)
    net.load_state_dict(checkpoint.tensors("energy.safetensors"))  # includes spectral u/v and data-init flags
    if launch.deepspeed:
        energy.load_checkpoint(str(checkpoint.path / "deepspeed"), tag="state")
    else:
        optimizer.load_state_dict(checkpoint.torch("optimizer.pt"))
    detector.load_state_dict(checkpoint.json("state.json")["divergence"])
    if finetuner is not None and not imported:  # an imported energy starts fine-tuning from the VAE of vae.path
        if not checkpoint.has("vae.safetensors"):
            raise UserError(f"checkpoint '{checkpoint.path}' has no fine-tuned VAE but vae.finetune is true")
        finetuner.vae.load_state_dict(checkpoint.tensors("vae.safetensors"))
        finetuner.load_state_dict(checkpoint.torch("vae_optimizer.pt"))
    rank = accelerator.process_index
    if imported:
        seed_everything(process_seed(seed, rank))
        return checkpoint.step
    if buffer is not None:
        if not checkpoint.has(f"rank-{rank}/replay.pt"):
            raise UserError(f"checkpoint '{checkpoint.path}' has no replay buffer but replay.enabled is true")
        buffer.load_state_dict(checkpoint.torch(f"rank-{rank}/replay.pt"))
    stream.load_state_dict(checkpoint.json(f"rank-{rank}/data.json"))
    set_rng_state(checkpoint.torch(f"rank-{rank}/rng.pt"))
    return checkpoint.step


def handle_divergence(divergence, run_dir: Path, accelerator, monitor: RunMonitor) -> None:
    """Stop: mark the run diverged and drop checkpoints from the bad streak on (none are written in it)."""
    if accelerator.is_main_process:
        mark_diverged(run_dir, divergence)
    monitor.log(f"{divergence.message()}; stopped. The run is marked diverged; checkpoints before step "
                f"{divergence.onset} are kept. Resume from one with changed settings: --resume-from CHECKPOINT")
    accelerator.wait_for_everyone()


@torch.no_grad()
def before_after_langevin(adapter: NoiseEnergy, count: int, steps: int, step_size: float, seed: int,
                          device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder means [count, C, H, W] of VAE samples and of the same chains after `steps` Langevin steps,
    for chains start … start+count−1.

    Chain i depends only on (seed, i): its initial noise and its Langevin noise have their own seeds.
    """
    chain_noise = PerChainNoise.for_indices(seed, start, count)
    noise = chain_noise.initial(adapter.chain_shapes, device)
    with torch.enable_grad():
        chains = langevin(noise, adapter, steps, step_size, chain_noise)
    return adapter.images(noise), adapter.images(chains.noise)


def log_chain_images(monitor: RunMonitor, adapter: NoiseEnergy, cfg: VAEBMTrainingConfig, step: int, device,
                     accelerator) -> None:
    """VAE samples (top row) beside the same chains after test-length Langevin (bottom), fixed noise.
    Collective: every process runs its share of the chains, the main process writes the grid."""
    def before_and_after(chains: slice) -> torch.Tensor:  # [k, 2, C, H, W]
        before, after = before_after_langevin(adapter, chains.stop - chains.start,
                                              cfg.langevin.sample_steps or cfg.langevin.steps, cfg.langevin.step_size,
                                              seed=4321, device=device, start=chains.start)
        return torch.stack([before, after], dim=1)

    grid = collective_rows(accelerator, GRID_CHAINS, before_and_after).transpose(0, 1).flatten(0, 1)
    monitor.images("chains/vae_then_langevin", grid, step, ncol=GRID_CHAINS)


def load_trained_energy(run_dir: Path, device, latent_shapes=None) -> torch.nn.Module:
    """The energy network of a VAEBM run's newest checkpoint, in eval mode with requires_grad off.
    A latent energy (joint prior) needs the shapes of the VAE's latents (`vae.z_shapes`)."""
    from trainer.config import from_dict, read_yaml

    checkpoint_path = latest_checkpoint(run_dir)
    if checkpoint_path is None:
        raise UserError(f"VAEBM run '{run_dir}' has no complete checkpoint")
    cfg = from_dict(VAEBMTrainingConfig, {"energy": read_yaml(Path(run_dir) / "config.yaml")["energy"]})
    net = build_energy(cfg.energy, latent_shapes)
    net.load_state_dict(Checkpoint(checkpoint_path).tensors("energy.safetensors"))
    return net.to(device).eval().requires_grad_(False)
