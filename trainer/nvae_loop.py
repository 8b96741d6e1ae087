"""NVAE pretraining: one loop for one CPU, one GPU or many processes (`accelerate launch`).

Re-running the same command resumes from the newest complete checkpoint in the run directory:
weights, EMA, optimizer, loss scaler, step, every process's RNG streams and data-stream position. On
CPU in fp32 a resumed run reproduces an uninterrupted one exactly.

Several processes: gradients are averaged by DDP, BN statistics (`train.sync_bn`) and the KL-balancing
statistics cover the global batch. With `data.split=global` the data and the posterior noise are also
functions of the global sample index, so 2 processes with B/2 images each train like 1 process with B
(the same weights up to float rounding, tested). Image grids are computed by all processes, each its
share of the grid's columns, and written by the main process.
"""
from __future__ import annotations

import inspect
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from models.nvae.cells import set_batchnorm_sync
from models.registry import build_vae, is_image_model
from trainer.checkpoint import Checkpoint, CheckpointSaver, latest_checkpoint, rng_state, set_rng_state
from trainer.config import save_config
from trainer.ema import EMA
from trainer.errors import UserError
from trainer.evaluation.fid import vae_sample_fn
from trainer.fid_monitor import log_fid, make_training_fid
from trainer.monitor import RunMonitor
from trainer.nvae_objective import balanced_kl, kl_balance_alphas, kl_warmup_coeff, nvae_loss, spectral_coeff
from trainer.runtime import (BatchRows, any_rank, batch_inputs, collective_rows, make_accelerator, make_train_stream,
                             mean_across_processes, peak_memory_mb, process_seed, seed_everything, shard_directory,
                             sliced_noise)
from trainer.rundir import prepare_run_dir, stop_requested
from trainer.schedules import warmup_cosine_lr
from trainer.sections import NVAETrainingConfig

SAMPLE_TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0)


def train_nvae(cfg: NVAETrainingConfig, run_dir: Path) -> Path:
    """Train (or resume training) an NVAE; returns the path of the final checkpoint."""
    launch = make_accelerator(cfg.train)
    accelerator, accumulation = launch.accelerator, launch.accumulation
    run_dir = prepare_run_dir(run_dir, cfg, accelerator, kind="nvae")

    seed_everything(cfg.train.seed)  # identical initial weights on every process
    model = build_vae(cfg.model)
    if getattr(model, "pseudo_inputs_from_data", 0):  # VampPrior: pseudo-inputs start as training images
        model.init_pseudo_inputs(random_images(shard_directory(cfg.data, accelerator), cfg.data.image_size,
                                               model.pseudo_inputs_from_data, cfg.train.seed))
    ema = EMA(model, cfg.train.ema_decay)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps,
                                   weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = accelerator.unwrap_model(model)
    ema.shadow.to(accelerator.device)
    set_batchnorm_sync(net, cfg.train.sync_bn and accelerator.num_processes > 1)  # the EMA copy runs in eval mode
    rows = BatchRows.of(cfg.data, cfg.train.per_device_batch_size, accelerator)
    if cfg.data.split == "global" and not takes_posterior_noise(net):
        raise UserError(f"data.split=global needs posterior noise per global sample, which {type(net).__name__} "
                        f"does not take; use data.split=shards")
    reduce_mean = mean_across_processes(accelerator)  # KL-balancing statistics over the global batch
    stream = make_train_stream(cfg.data, cfg.train.per_device_batch_size, cfg.train.seed, accelerator)
    fixed = fixed_inputs(net, shard_directory(cfg.data, accelerator), cfg.data.image_size, accelerator.device) \
        if is_image_model(net) else None  # 2-D toys get no image grids

    step = 0
    checkpoint_path = latest_checkpoint(run_dir)
    if checkpoint_path is not None:
        step = restore(Checkpoint(checkpoint_path), model, ema, optimizer, launch, stream, cfg.train.seed)
    else:
        seed_everything(process_seed(cfg.train.seed, accelerator.process_index))
    monitor = RunMonitor(run_dir, enabled=accelerator.is_main_process, resume_step=step)
    fid = make_training_fid(cfg, fixed is not None, accelerator, monitor.log)
    monitor.log(f"{'resuming from step ' + str(step) if step else 'starting'}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
                f"parameters, {accelerator.num_processes} process(es), accumulation {accumulation}, "
                f"device {accelerator.device}, mixed precision "
                f"{launch.autocast_dtype or accelerator.mixed_precision}{' (DeepSpeed ZeRO)' if launch.deepspeed else ''}")
    saver = CheckpointSaver(run_dir, rank=accelerator.process_index, world_size=accelerator.num_processes,
                            is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                            keep=cfg.train.keep_checkpoints)
    save = lambda at_step: saver.save(at_step, shared=shared_state(net, ema, optimizer, launch, at_step),
                                      per_rank={"rng.pt": rng_state(), "data.json": stream.state_dict()},
                                      collective=deepspeed_save(model) if launch.deepspeed else None)

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
        # (Under DeepSpeed the engine steps inside `backward` on that last micro-batch.)
        for micro in range(accumulation):
            x = batch_inputs(next(batches)).to(accelerator.device, non_blocking=True)
            eps = posterior_noise(net, rows, cfg.train.seed, step, micro, accelerator.device) \
                if cfg.data.split == "global" else None
            with accelerator.accumulate(model):
                with launch.autocast():
                    output = model(x) if eps is None else model(x, posterior_eps=eps)
                    loss, terms = nvae_loss(output, beta, alphas if cfg.loss.kl_balance else None, lam,
                                            net.spectral_loss(), net.bn_loss(), reduce_mean=reduce_mean)
                accelerator.backward(loss)
            window["images"] += x.shape[0] * accelerator.num_processes
        if launch.deepspeed:
            grad_norm = model.get_global_grad_norm() or 0.0
            ema.update(net)
        else:
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
            progress.set_postfix(loss=f"{float(loss.detach()):.4g}", img_s=f"{row['img_per_s']:.1f}")
            window.update(images=0, time=time.perf_counter())
        if fixed and (step == stop_step or (cfg.train.image_every and step % cfg.train.image_every == 0)):
            log_images(monitor, ema.shadow, fixed, step, accelerator)  # collective: every process computes a share
        if fid is not None and fid.due(step, stop_step):  # collective, on the EMA weights
            log_fid(monitor, step, fid.evaluate(vae_sample_fn(ema.shadow, cfg.train.seed)))
        if step % cfg.train.checkpoint_every == 0 or step == stop_step:
            save(step)
            last_saved = step
        if stop_requested(run_dir, accelerator):  # preemption: checkpoint now, exit cleanly, resume on re-run
            monitor.log(f"stop requested ({run_dir / 'STOP'}) at step {step}")
            break

    if last_saved != step:
        save(step)
    progress.close()
    monitor.log(f"{'halted' if step < cfg.train.max_steps else 'finished'} at step {step}; checkpoint "
                f"{latest_checkpoint(run_dir)}")
    monitor.close()
    accelerator.end_training()
    return latest_checkpoint(run_dir)


def shared_state(net, ema: EMA, optimizer, launch, step: int) -> dict:
    """Files the main process writes. Under DeepSpeed (ZeRO-2, fp32 engine) the module's weights are
    complete on every rank, so model.safetensors is the consolidated model; the optimizer's shards
    are in `deepspeed/`, written collectively by the engine."""
    state = {"model.safetensors": net.state_dict(), "ema.safetensors": ema.state_dict(),
             "state.json": {"step": step, "kind": "nvae", "deepspeed": launch.deepspeed}}
    if not launch.deepspeed:
        state["optimizer.pt"] = optimizer.state_dict()
    if launch.accelerator.scaler is not None:
        state["scaler.pt"] = launch.accelerator.scaler.state_dict()
    return state


def deepspeed_save(engine):
    """The collective part of a checkpoint under DeepSpeed: the engine's own sharded state."""
    return lambda staging: engine.save_checkpoint(str(staging / "deepspeed"), tag="state")


def restore(checkpoint: Checkpoint, model, ema: EMA, optimizer, launch, stream, seed: int = 0) -> int:
    """Load everything a checkpoint holds; returns its step.

    An imported checkpoint (`scripts/import_official.py`) holds no per-process state: it resumes on any
    number of processes with a fresh data stream and per-process seeds from `seed`.
    """
    accelerator = launch.accelerator
    imported = "imported" in checkpoint.json("state.json")
    if checkpoint.world_size != accelerator.num_processes and not imported:
        raise UserError(f"checkpoint '{checkpoint.path}' was written by {checkpoint.world_size} process(es); "
                        f"this launch has {accelerator.num_processes}")
    was_deepspeed = bool(checkpoint.json("state.json").get("deepspeed", False))
    if was_deepspeed != launch.deepspeed:
        raise UserError(f"checkpoint '{checkpoint.path}' was written {'with' if was_deepspeed else 'without'} "
                        f"DeepSpeed; resume it the same way (or start a new run from its weights)")
    net = accelerator.unwrap_model(model)
    if launch.deepspeed:
        # DeepSpeed reads its own shards (it unpickles them: resume only from runs you wrote).
        model.load_checkpoint(str(checkpoint.path / "deepspeed"), tag="state")
    else:
        net.load_state_dict(checkpoint.tensors("model.safetensors"))
        optimizer.load_state_dict(checkpoint.torch("optimizer.pt"))
    ema.load_state_dict(checkpoint.tensors("ema.safetensors"))
    if accelerator.scaler is not None and checkpoint.has("scaler.pt"):
        accelerator.scaler.load_state_dict(checkpoint.torch("scaler.pt"))
    rank = accelerator.process_index
    if imported:
        seed_everything(process_seed(seed, rank))
        return checkpoint.step
    stream.load_state_dict(checkpoint.json(f"rank-{rank}/data.json"))
    set_rng_state(checkpoint.torch(f"rank-{rank}/rng.pt"))
    return checkpoint.step


def random_images(shards: Path, image_size: int, count: int, seed: int, pool: int = 4096) -> torch.Tensor:
    """`count` images [count, C, H, W] picked at random (by `seed`) among the first `pool` of the shard set.

    The same on every process and for every run with this seed; reads its own stream and generator, so
    the training RNG and stream do not move. Fewer images than `count` is an error.
    """
    from data.stream import EvalStream

    images = []
    for batch in EvalStream(shards, batch_size=256, rank=0, world_size=1, image_size=image_size):
        images.append(batch["image"])
        if sum(len(b) for b in images) >= pool:
            break
    images = torch.cat(images)[:pool]
    if len(images) < count:
        raise UserError(f"model.pseudo_inputs ({count}) exceeds the {len(images)} images of {shards}")
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]]


def fixed_inputs(net, shards: Path, image_size: int, device, count: int = 8) -> dict:
    """Fixed noise for sample grids and the first `count` images of the shard set for reconstructions.

    Drawn with their own generator and read with their own (evaluation) stream, so logging never
    moves the training RNG or the training stream.
    """
    from data.stream import EvalStream

    generator = torch.Generator().manual_seed(1234)
    eps = [torch.randn((count, *shape), generator=generator) for shape in net.latent_shapes]
    posterior_eps = [torch.randn((count, *shape), generator=generator) for shape in net.latent_shapes] \
        if takes_posterior_noise(net) else None  # then column i of every grid depends on i alone
    images = next(iter(EvalStream(shards, batch_size=count, rank=0, world_size=1, image_size=image_size)))["image"]
    return {"eps": [e.to(device) for e in eps], "images": images.to(device),
            "posterior_eps": None if posterior_eps is None else [e.to(device) for e in posterior_eps]}


def takes_posterior_noise(net) -> bool:
    """Whether the model's training forward accepts its posterior noise (`posterior_eps`, the NVAE)."""
    return "posterior_eps" in inspect.signature(net.forward).parameters


def posterior_noise(net, rows: BatchRows, seed: int, step: int, micro: int, device) -> list[torch.Tensor]:
    """This process's rows of the posterior noise of global micro-batch (step, micro), L × [B, latents, h, w]:
    drawn for the whole global micro-batch from a generator seeded by (seed, step, micro), the same on
    every process, so sample i's noise does not depend on the number of processes (data.split=global)."""
    from data.stream import derive_seed

    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "posterior", step, micro))
    return sliced_noise(net.latent_shapes, rows, generator, device)


@torch.no_grad()
def log_images(monitor: RunMonitor, ema_model, fixed: dict, step: int, accelerator) -> None:
    """Reconstructions (top: data, bottom: decoder mean) and samples at temperatures 0.6–1.0 from
    fixed noise, one row per temperature, all with the EMA weights.

    Collective: every process computes its share of the columns, the main process writes the grids.
    """
    def reconstruct(columns: slice) -> torch.Tensor:  # [k, C, H, W]
        if fixed["posterior_eps"] is None:
            with torch.random.fork_rng(devices=[]):  # the posterior sample must not move the run's RNG
                return ema_model(fixed["images"][columns]).x_mean
        return ema_model(fixed["images"][columns], posterior_eps=[e[columns] for e in fixed["posterior_eps"]]).x_mean

    def samples(columns: slice) -> torch.Tensor:  # [k, temperatures, C, H, W]
        eps = [e[columns] for e in fixed["eps"]]
        return torch.stack([ema_model.decode(eps, None, temperature=t).x_mean for t in SAMPLE_TEMPERATURES], dim=1)

    count = len(fixed["images"])
    reconstruction = collective_rows(accelerator, count, reconstruct)
    grid = collective_rows(accelerator, count, samples).transpose(0, 1).flatten(0, 1)  # one row per temperature
    monitor.images("reconstructions", torch.cat([fixed["images"], reconstruction]), step, ncol=count)
    monitor.images("samples/temperature_0.6-1.0", grid, step, ncol=count)


def per_group_scalars(output) -> dict[str, float]:
    values = {}
    for index, (kl, per_channel) in enumerate(zip(output.kl_per_group, output.kl_per_channel)):
        values[f"kl/group_{index:02d}"] = float(kl.detach().mean())
        values[f"active_units/group_{index:02d}"] = float((per_channel > 0.1).sum())
    values["active_units/total"] = sum(v for k, v in values.items() if k.startswith("active_units/"))
    return values
