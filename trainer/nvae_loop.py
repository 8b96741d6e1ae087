"""NVAE pretraining: one loop for one CPU, one GPU or many processes (`accelerate launch`).

Re-running the same command resumes from the newest complete checkpoint in the run directory:
weights, EMA, optimizer, loss scaler, step, every process's RNG streams and data-stream position. On
CPU in fp32 a resumed run reproduces an uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.nvae import NVAE
from trainer.checkpoint import Checkpoint, CheckpointSaver, latest_checkpoint, rng_state, set_rng_state
from trainer.config import save_config
from trainer.ema import EMA
from trainer.monitor import RunMonitor
from trainer.nvae_objective import balanced_kl, kl_balance_alphas, kl_warmup_coeff, nvae_loss, spectral_coeff
from trainer.runtime import (any_rank, make_accelerator, make_train_stream, peak_memory_mb, process_seed,
                             seed_everything, shard_directory)
from trainer.rundir import prepare_run_dir
from trainer.schedules import warmup_cosine_lr
from trainer.sections import NVAETrainingConfig

SAMPLE_TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0)


def train_nvae(cfg: NVAETrainingConfig, run_dir: Path) -> Path:
    """Train (or resume training) an NVAE; returns the path of the final checkpoint."""
    accelerator, accumulation = make_accelerator(cfg.train)
    run_dir = prepare_run_dir(run_dir, cfg, accelerator, kind="nvae")

    seed_everything(cfg.train.seed)  # identical initial weights on every process
    model = NVAE(cfg.model)
    ema = EMA(model, cfg.train.ema_decay)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps,
                                   weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    ema.shadow.to(accelerator.device)
    stream = make_train_stream(cfg.data, cfg.train.per_device_batch_size, cfg.train.seed, accelerator)
    fixed = fixed_inputs(net, shard_directory(cfg.data, accelerator), cfg.data.image_size, accelerator.device)

    step = 0
    checkpoint_path = latest_checkpoint(run_dir)
    if checkpoint_path is not None:
        step = restore(Checkpoint(checkpoint_path), net, ema, optimizer, accelerator, stream)
    else:
        seed_everything(process_seed(cfg.train.seed, accelerator.process_index))
    monitor = RunMonitor(run_dir, enabled=accelerator.is_main_process, resume_step=step)
    monitor.log(f"{'resuming from step ' + str(step) if step else 'starting'}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
                f"parameters, {accelerator.num_processes} process(es), accumulation {accumulation}, "
                f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}")
    saver = CheckpointSaver(run_dir, rank=accelerator.process_index, world_size=accelerator.num_processes,
                            is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                            keep=cfg.train.keep_checkpoints)
    save = lambda at_step: saver.save(at_step, shared=shared_state(net, ema, optimizer, accelerator, at_step),
                                      per_rank={"rng.pt": rng_state(), "data.json": stream.state_dict()})

    alphas = kl_balance_alphas(net.groups_per_scale_decoder_order).to(accelerator.device)
    batches = iter(stream)
    progress = tqdm(total=cfg.train.max_steps, initial=step, disable=not (accelerator.is_main_process and cfg.train.progress_bar),
                    unit="step", dynamic_ncols=True)
    window = {"images": 0, "time": time.perf_counter(), "skipped_updates": 0}
    last_saved = step if checkpoint_path is not None else -1
    stop_step = min(cfg.train.max_steps, cfg.train.halt_at_step or cfg.train.max_steps)

    while step < stop_step:
        lr = warmup_cosine_lr(step, lr=cfg.optim.lr, lr_min=cfg.optim.lr_min, warmup_steps=cfg.optim.warmup_steps,
                              total_steps=cfg.train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        beta = kl_warmup_coeff(step, cfg.train.max_steps, cfg.loss.kl_anneal_portion, cfg.loss.kl_const_portion,
                               cfg.loss.kl_min_coeff)
        lam = spectral_coeff(beta, cfg.loss.spectral_coeff_init, cfg.loss.spectral_coeff, cfg.loss.spectral_anneal)

        # One optimizer step over `accumulation` micro-batches; gradients sync on the last one only.
        for micro in range(accumulation):
            batch = next(batches)
            x = batch["image"].to(accelerator.device, non_blocking=True)
            sync = micro == accumulation - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                with accelerator.autocast():
                    output = model(x)
                    loss, terms = nvae_loss(output, beta, alphas if cfg.loss.kl_balance else None, lam, net.spectral_loss(), net.bn_loss())
                accelerator.backward(loss / accumulation)
            window["images"] += x.shape[0] * accelerator.num_processes
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), float("inf"))
        if any_rank(accelerator, not math.isfinite(float(grad_norm))):
            window["skipped_updates"] += 1  # a non-finite gradient: skip this update, keep going
        else:
            optimizer.step()
            ema.update(net)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        progress.update(1)

        if step % cfg.train.log_every == 0 or step == stop_step:
            elapsed = time.perf_counter() - window["time"]
            row = {"loss": float(loss.detach()), "recon": terms["recon"], "kl": terms["kl"], "nelbo": terms["nelbo"], "kl_coeff": beta,
                   "spectral_coeff": lam, "spectral": terms["spectral"], "bn": terms["bn"], "lr": lr,
                   "grad_norm": float(grad_norm), "img_per_s": window["images"] / max(elapsed, 1e-9),
                   "skipped_updates": window["skipped_updates"], "data/skipped_samples": stream.skipped_samples,
                   "peak_mem_mb": peak_memory_mb(accelerator.device)}
            monitor.stats(step, row, tb_tags={"data/skipped_samples": "data/skipped_samples",
                                              "img_per_s": "sys/img_per_s", "peak_mem_mb": "sys/peak_mem_mb"})
            monitor.scalars(step, per_group_scalars(output))
            progress.set_postfix(loss=f"{float(loss):.4g}", img_s=f"{row['img_per_s']:.1f}")
            window.update(images=0, time=time.perf_counter())
        if accelerator.is_main_process and (step == stop_step or (cfg.train.image_every and step % cfg.train.image_every == 0)):
            log_images(monitor, ema.shadow, fixed, step)
        if step % cfg.train.checkpoint_every == 0 or step == stop_step:
            save(step)
            last_saved = step

    if last_saved != step:
        save(step)
    progress.close()
    monitor.log(f"{'halted' if step < cfg.train.max_steps else 'finished'} at step {step}; checkpoint "
                f"{latest_checkpoint(run_dir)}")
    monitor.close()
    accelerator.end_training()
    return latest_checkpoint(run_dir)


def shared_state(net, ema: EMA, optimizer, accelerator, step: int) -> dict:
    state = {"model.safetensors": net.state_dict(), "ema.safetensors": ema.state_dict(),
             "optimizer.pt": optimizer.state_dict(), "state.json": {"step": step, "kind": "nvae"}}
    if accelerator.scaler is not None:
        state["scaler.pt"] = accelerator.scaler.state_dict()
    return state


def restore(checkpoint: Checkpoint, net, ema: EMA, optimizer, accelerator, stream) -> int:
    """Load everything a checkpoint holds; returns its step."""
    net.load_state_dict(checkpoint.tensors("model.safetensors"))
    ema.load_state_dict(checkpoint.tensors("ema.safetensors"))
    optimizer.load_state_dict(checkpoint.torch("optimizer.pt"))
    if accelerator.scaler is not None and checkpoint.has("scaler.pt"):
        accelerator.scaler.load_state_dict(checkpoint.torch("scaler.pt"))
    rank = accelerator.process_index
    if checkpoint.world_size != accelerator.num_processes:
        from trainer.errors import UserError

        raise UserError(f"checkpoint '{checkpoint.path}' was written by {checkpoint.world_size} process(es); "
                        f"this launch has {accelerator.num_processes}")
    stream.load_state_dict(checkpoint.json(f"rank-{rank}/data.json"))
    set_rng_state(checkpoint.torch(f"rank-{rank}/rng.pt"))
    return checkpoint.step


def fixed_inputs(net, shards: Path, image_size: int, device, count: int = 8) -> dict:
    """Fixed noise for sample grids and the first `count` images of the shard set for reconstructions.

    Drawn with their own generator and read with their own (evaluation) stream, so logging never
    moves the training RNG or the training stream.
    """
    from data.stream import EvalStream

    generator = torch.Generator().manual_seed(1234)
    eps = [torch.randn((count, *shape), generator=generator) for shape in net.latent_shapes]
    images = next(iter(EvalStream(shards, batch_size=count, rank=0, world_size=1, image_size=image_size)))["image"]
    return {"eps": [e.to(device) for e in eps], "images": images.to(device)}


@torch.no_grad()
def log_images(monitor: RunMonitor, ema_model, fixed: dict, step: int) -> None:
    """Reconstructions (top: data, bottom: decoder mean) and samples at temperatures 0.6–1.0 from
    fixed noise, one row per temperature, all with the EMA weights."""
    with torch.random.fork_rng(devices=[]):  # the posterior sample must not move the run's RNG
        reconstruction = ema_model(fixed["images"]).x_mean
    monitor.images("reconstructions", torch.cat([fixed["images"], reconstruction]), step, ncol=len(reconstruction))
    rows = [ema_model.decode(fixed["eps"], None, temperature=t).x_mean for t in SAMPLE_TEMPERATURES]
    monitor.images("samples/temperature_0.6-1.0", torch.cat(rows), step, ncol=fixed["eps"][0].shape[0])


def per_group_scalars(output) -> dict[str, float]:
    values = {}
    for index, (kl, per_channel) in enumerate(zip(output.kl_per_group, output.kl_per_channel)):
        values[f"kl/group_{index:02d}"] = float(kl.mean())
        values[f"active_units/group_{index:02d}"] = float((per_channel > 0.1).sum())
    values["active_units/total"] = sum(v for k, v in values.items() if k.startswith("active_units/"))
    return values
