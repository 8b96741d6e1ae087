"""NVAE pretraining: one loop for one CPU, one GPU or many processes (`accelerate launch`).

Re-running the same command resumes from the newest checkpoint in the run directory that verifies:
weights, EMA, optimizer, loss scaler, step, every process's RNG streams and data-stream position. On
CPU in fp32 a resumed run reproduces an uninterrupted one exactly. Non-finite losses, gradients or weights
for `divergence.patience` steps stop the run as diverged (`trainer/run/divergence.py`), as in energy training.

Several processes: gradients are averaged by DDP, BN statistics (`train.sync_bn`) and the KL-balancing
statistics cover the global batch. With `data.split=global` the data and the posterior noise are also
functions of the global sample index, so 2 processes with B/2 images each train like 1 process with B
(the same weights up to float rounding, tested). Image grids are computed by all processes, each its
share of the grid's columns, and written by the main process.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from data.stream import EvalStream, derive_seed
from models.adapters import NoiseEnergy
from models.nvae.cells import set_batchnorm_sync
from models.registry import build_vae, is_image_model
from trainer.config.nvae import NVAETrainingConfig
from trainer.errors import UserError
from trainer.nvae.objective import kl_balance_alphas, kl_warmup_coeff, nvae_loss, spectral_coeff
from trainer.nvae.schedules import warmup_cosine_lr
from trainer.run.checkpoint import (Checkpoint, CheckpointSaver, check_resumable, deepspeed_save,
                                    first_non_finite, latest_checkpoint, load_state, restore_process_state,
                                    rng_state, select_resume_checkpoint)
from trainer.run.collective import (BatchRows, any_rank, any_ranks, collective_rows, main_then_share,
                                    mean_across_processes, sliced_noise)
from trainer.run.divergence import Divergence, DivergenceDetector, stop_diverged
from trainer.run.ema import EMA
from trainer.run.fid import chain_sample_fn, log_fid, make_training_fid
from trainer.run.launch import (Launch, batch_inputs, compile_if_asked, make_accelerator, make_train_stream,
                                peak_memory_mb, process_seed, seed_everything, shard_directory)
from trainer.run.monitor import Progress, RunMonitor, parameter_count
from trainer.run.rundir import OwnedRun, own_run_dir

SAMPLE_TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0)


def train_nvae(cfg: NVAETrainingConfig, run_dir: Path, resume_from: Path | None = None) -> Path:
    """Train (or resume training) an NVAE; returns the path of the final checkpoint. `resume_from`: a
    checkpoint of this run to roll back to (later ones are dropped). Raises `TrainingDiverged`."""
    launch = make_accelerator(cfg.train, run_dir)
    with own_run_dir(run_dir, cfg, launch.accelerator, kind="nvae", resume_from=resume_from) as run:
        return _train_nvae(cfg, run, launch, resume_from)


def _train_nvae(cfg: NVAETrainingConfig, run: OwnedRun, launch: Launch, resume_from: Path | None) -> Path:
    # Launch.
    accelerator, run_dir = launch.accelerator, run.path

    # Model, EMA, optimizer, data.
    seed_everything(cfg.train.seed)  # identical initial weights on every process
    model = build_vae(cfg.model)
    if getattr(model, "pseudo_inputs_from_data", 0):  # VampPrior: pseudo-inputs start as training images
        model.init_pseudo_inputs(random_images(shard_directory(cfg.data, accelerator), cfg.data.image_size,
                                               model.pseudo_inputs_from_data, cfg.train.seed))
    ema = EMA(model, cfg.train.ema_decay)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps,
                                   weight_decay=cfg.optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    net = launch.unwrap(model)
    ema.shadow.to(accelerator.device)
    # Synchronized BN over the processes (the EMA copy runs in eval mode, on running statistics).
    set_batchnorm_sync(net, cfg.train.sync_bn and accelerator.num_processes > 1)
    if cfg.data.split == "global" and not takes_posterior_noise(net):
        raise UserError(f"data.split=global needs posterior noise per global sample, which "
                        f"{type(net).__name__} does not take; use data.split=shards")
    stream = make_train_stream(cfg.data, cfg.train.per_device_batch_size, cfg.train.seed, accelerator)
    fixed = None  # 2-D toys get no image grids
    if is_image_model(net):
        shards = shard_directory(cfg.data, accelerator)
        fixed = fixed_inputs(net, shards, cfg.data.image_size, accelerator.device)
    update = NVAEUpdate(model, net, ema, optimizer, launch, cfg,
                        rows=BatchRows.of(cfg.data, cfg.train.per_device_batch_size, accelerator),
                        alphas=kl_balance_alphas(net.groups_per_scale_decoder_order).to(accelerator.device),
                        reduce_mean=mean_across_processes(accelerator))  # KL balancing over the global batch
    run.prepare(cfg)  # everything that can fail at a start has loaded: now the run directory is written

    # Resume: from the newest checkpoint that verifies (the main process checks; failing ones go aside).
    step, notes = 0, []
    detector = DivergenceDetector(patience=cfg.divergence.patience)
    checkpoint_path = main_then_share(accelerator,
                                      lambda: resume_from or select_resume_checkpoint(run_dir, notes.append))
    if checkpoint_path is not None:
        step = restore(Checkpoint(checkpoint_path), model, ema, optimizer, launch, stream, cfg.train.seed,
                       detector)
    else:
        seed_everything(process_seed(cfg.train.seed, accelerator.process_index))
    monitor = RunMonitor(run_dir, enabled=accelerator.is_main_process, resume_step=step,
                         accelerator=accelerator, project=cfg.train.tracker_project)
    for note in notes:
        monitor.log(note)
    fid = make_training_fid(cfg, fixed is not None, accelerator, monitor.log)
    precision = str(launch.autocast_dtype or accelerator.mixed_precision)
    precision += " (DeepSpeed ZeRO)" if launch.deepspeed else ""
    precision += f", compiled ({cfg.train.compile_backend})" if cfg.train.compile else ""
    monitor.log(f"{'resuming from step ' + str(step) if step else 'starting'}: {parameter_count(net)}, "
                f"{accelerator.num_processes} process(es), accumulation {launch.accumulation}, "
                f"device {accelerator.device}, mixed precision {precision}")
    saver = CheckpointSaver(run_dir, rank=accelerator.process_index, world_size=accelerator.num_processes,
                            is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone,
                            keep=cfg.train.keep_checkpoints,
                            any_failed=lambda flag: any_rank(accelerator, flag))
    batches = iter(stream)
    stop_step = min(cfg.train.max_steps, cfg.train.halt_at_step or cfg.train.max_steps)
    progress = Progress(cfg.train.max_steps, step, accelerator.is_main_process and cfg.train.progress_bar)
    last_saved = step if checkpoint_path is not None else -1
    stop = None

    while step < stop_step:
        # Update.
        result = update.step(step, batches)
        progress.skipped_updates += result.skipped
        step += 1
        progress.step_done(result.images)

        # Divergence: non-finite loss or gradients (weights where a checkpoint is due), alike everywhere.
        # An fp16 overflow is the loss scaler's business (it lowers its scale; the weights are untouched), as
        # in the energy loop: only a non-finite loss or a skip without a scaler starts a bad streak.
        checkpoint_due = step % cfg.train.checkpoint_every == 0 or step == stop_step
        loss_bad, weights_bad = any_ranks(accelerator, [not math.isfinite(result.loss),
                                                        checkpoint_due and not weights_finite(update)])
        grads_bad = result.skipped and result.loss_scale is None
        divergence = detector.check_finite(step, math.nan if loss_bad else result.loss, not grads_bad,
                                           not weights_bad)

        # Report.
        if step % cfg.train.log_every == 0 or step == stop_step or divergence:
            row = log_row(result, progress, stream.skipped_samples, accelerator.device)
            monitor.stats(step, row, tb_tags={"data/skipped_samples": "data/skipped_samples",
                                              "img_per_s": "sys/img_per_s", "peak_mem_mb": "sys/peak_mem_mb"})
            monitor.scalars(step, per_group_scalars(result.output))
            progress.new_window(loss=f"{row['loss']:.4g}", img_s=f"{row['img_per_s']:.1f}")
        if divergence:
            progress.close()
            stop_diverged(divergence, run_dir, accelerator, monitor.log)

        # Image grids and FID, on the EMA weights (collective: every process computes a share).
        if fixed and (step == stop_step or (cfg.train.image_every and step % cfg.train.image_every == 0)):
            log_images(monitor, ema.shadow, fixed, step, accelerator)
        if fid is not None and fid.due(step, stop_step):
            vae = NoiseEnergy(ema.shadow, None)  # VAE samples: no energy, no Langevin
            samples = chain_sample_fn(vae, 0, 0.0, cfg.train.seed, accelerator.device)
            log_fid(monitor, step, fid.evaluate(samples))

        # Checkpoint (never inside a streak of bad steps: those may be the start of a divergence).
        stop = run.stop_reason()  # STOP file or a stop signal: checkpoint now, exit cleanly, resume on re-run
        if checkpoint_due and not detector.in_bad_streak:
            save_checkpoint(saver, step, update, stream, detector)
            last_saved = step
        if stop:
            monitor.log(f"stop requested ({stop}) at step {step}")
            break

    # Done. A run never ends with non-finite weights: however short its bad streak, that is a divergence.
    if last_saved != step and any_rank(accelerator, not weights_finite(update)):
        progress.close()
        weights = Divergence(step, step, "non-finite weights", math.nan)
        divergence = detector.unfinished_streak(step) or weights
        stop_diverged(divergence, run_dir, accelerator, monitor.log)
    if last_saved != step and not detector.in_bad_streak:
        save_checkpoint(saver, step, update, stream, detector)
    progress.close()
    state = "stopped" if stop else "halted" if step < cfg.train.max_steps else "finished"
    ended = "halted" if step < cfg.train.max_steps else "finished"
    line = f"{ended} at step {step}; checkpoint {latest_checkpoint(run_dir)}"
    monitor.log(line)
    run.end(state, step, line)
    monitor.close()
    accelerator.end_training()
    return latest_checkpoint(run_dir)


# ----------------------------------------------------------------------------------------------
# One optimizer step.


@dataclass
class StepResult:
    """What one optimizer step reports: the last micro-batch's loss, its terms and output, the schedules."""

    loss: float
    terms: dict[str, float]
    output: object          # the model's output of the last micro-batch (per-group KL for TensorBoard)
    lr: float
    beta: float             # KL warm-up coefficient
    spectral_coeff: float
    grad_norm: float
    images: int             # images in the step, all processes together
    skipped: int            # 1 if the update was skipped for a non-finite gradient (fp16: an overflow)
    loss_scale: float | None = None  # fp16: the loss scaler's scale after the step


class NVAEUpdate:
    """One NVAE optimizer step over `launch.accumulation` micro-batches: schedules, forward, loss, backward,
    Adamax step and EMA update. The training loop and `scripts/bench.py nvae` both call `step`."""

    def __init__(self, model, net, ema: EMA, optimizer, launch: Launch, cfg: NVAETrainingConfig, *,
                 rows: BatchRows, alphas: torch.Tensor, reduce_mean=None):
        self.model, self.net, self.ema, self.optimizer = model, net, ema, optimizer
        self.launch, self.cfg = launch, cfg
        self.rows, self.alphas, self.reduce_mean = rows, alphas, reduce_mean
        compile_if_asked(net, cfg.train)  # the EMA copy (image grids, FID) stays uncompiled

    def step(self, step: int, batches: Iterator[dict]) -> StepResult:
        """Take optimizer step number `step` (0-based) on the next micro-batches of `batches`."""
        cfg, launch, accelerator = self.cfg, self.launch, self.launch.accelerator
        lr = warmup_cosine_lr(step, lr=cfg.optim.lr, lr_min=cfg.optim.lr_min,
                              warmup_steps=cfg.optim.warmup_steps, total_steps=cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_cfg = cfg.loss
        beta = kl_warmup_coeff(step, cfg.train.max_steps, loss_cfg.kl_anneal_portion,
                               loss_cfg.kl_const_portion, loss_cfg.kl_min_coeff)
        lam = spectral_coeff(beta, loss_cfg.spectral_coeff_init, loss_cfg.spectral_coeff,
                             loss_cfg.spectral_anneal)

        # Gradients sync on the last micro-batch only (DeepSpeed's engine steps inside its `backward`).
        images = 0
        for micro in range(launch.accumulation):
            x = batch_inputs(next(batches)).to(accelerator.device, non_blocking=True)
            eps = posterior_noise(self.net, self.rows, cfg.train.seed, step, micro, accelerator.device) \
                if cfg.data.split == "global" else None
            with accelerator.accumulate(self.model):
                with launch.autocast():
                    output = self.model(x) if eps is None else self.model(x, posterior_eps=eps)
                    loss, terms = nvae_loss(output, beta, self.alphas if loss_cfg.kl_balance else None, lam,
                                            self.net.spectral_loss(), self.net.bn_loss(),
                                            reduce_mean=self.reduce_mean)
                accelerator.backward(loss)
            images += x.shape[0] * accelerator.num_processes

        skipped = 0
        if launch.deepspeed:
            grad_norm = self.model.get_global_grad_norm() or 0.0
            self.ema.update(self.net)
        else:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), float("inf"))  # unscaled (fp16)
            if accelerator.scaler is not None:  # fp16: the scaler skips an overflowed step, lowers its scale
                self.optimizer.step()
                skipped = int(self.optimizer.step_was_skipped)
            elif any_rank(accelerator, not math.isfinite(float(grad_norm))):
                skipped = 1  # a non-finite gradient: skip this update, keep going
            else:
                self.optimizer.step()
            if not skipped:
                self.ema.update(self.net)
            self.optimizer.zero_grad(set_to_none=True)
        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
        return StepResult(float(loss.detach()), terms, output, lr, beta, lam, float(grad_norm), images,
                          skipped, scale)


def log_row(result: StepResult, progress: Progress, skipped_samples: int, device) -> dict[str, float]:
    """One stats.jsonl row (README, "A run directory", lists its keys)."""
    return {"loss": result.loss, "recon": result.terms["recon"], "kl": result.terms["kl"],
            "nelbo": result.terms["nelbo"], "kl_coeff": result.beta, "spectral_coeff": result.spectral_coeff,
            "spectral": result.terms["spectral"], "bn": result.terms["bn"], "lr": result.lr,
            "grad_norm": result.grad_norm, "img_per_s": progress.images_per_second(),
            "skipped_updates": progress.skipped_updates, "data/skipped_samples": skipped_samples,
            "peak_mem_mb": peak_memory_mb(device),
            **({"loss_scale": result.loss_scale} if result.loss_scale is not None else {})}


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(saver: CheckpointSaver, step: int, update: NVAEUpdate, stream,
                    detector: DivergenceDetector | None = None) -> None:
    """Write checkpoint `step` of the training state `update` holds, collectively (every process calls it)."""
    launch = update.launch
    shared = shared_state(update.net, update.ema, update.optimizer, launch, step)
    if detector is not None:
        shared["state.json"]["divergence"] = detector.state_dict()
    saver.save(step, shared=shared, per_rank={"rng.pt": rng_state(), "data.json": stream.state_dict()},
               collective=deepspeed_save(update.model) if launch.deepspeed else None)


def weights_finite(update: NVAEUpdate) -> bool:
    """Whether the trained and the EMA weights are all finite (checked before a checkpoint is written)."""
    net, ema = update.net.state_dict(), update.ema.state_dict()
    return first_non_finite(net) is None and first_non_finite(ema) is None


def shared_state(net, ema: EMA, optimizer, launch: Launch, step: int) -> dict:
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


def restore(checkpoint: Checkpoint, model, ema: EMA, optimizer, launch: Launch, stream, seed: int = 0,
            detector: DivergenceDetector | None = None) -> int:
    """Load everything a checkpoint holds; returns its step.

    An imported checkpoint (`scripts/import_official.py`) holds no per-process state: it resumes on any
    number of processes with a fresh data stream and per-process seeds from `seed`.
    """
    accelerator = launch.accelerator
    check_resumable(checkpoint, launch, kind="nvae")
    net = launch.unwrap(model)
    if launch.deepspeed:
        # DeepSpeed reads its own shards (it unpickles them: resume only from runs you wrote).
        model.load_checkpoint(str(checkpoint.path / "deepspeed"), tag="state")
    else:
        checkpoint.load_into(net, "model.safetensors")
        load_state(optimizer, checkpoint.torch("optimizer.pt"), checkpoint.path / "optimizer.pt")
    checkpoint.load_into(ema.shadow, "ema.safetensors")
    if detector is not None and "divergence" in checkpoint.state():
        load_state(detector, checkpoint.state()["divergence"], checkpoint.path / "state.json")
    if accelerator.scaler is not None and checkpoint.has("scaler.pt"):
        load_state(accelerator.scaler, checkpoint.torch("scaler.pt"), checkpoint.path / "scaler.pt")
    rank = accelerator.process_index
    restore_process_state(checkpoint, rank, stream, process_seed(seed, rank))
    return checkpoint.step


# ----------------------------------------------------------------------------------------------
# Inputs: pseudo-inputs, fixed grids, posterior noise.


def random_images(shards: Path, image_size: int, count: int, seed: int, pool: int = 4096) -> torch.Tensor:
    """`count` images [count, C, H, W] picked at random (by `seed`) among the first `pool` of the shard set.

    The same on every process and for every run with this seed; reads its own stream and generator, so
    the training RNG and stream do not move. Fewer images than `count` is an error.
    """
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
    generator = torch.Generator().manual_seed(1234)
    eps = [torch.randn((count, *shape), generator=generator) for shape in net.latent_shapes]
    posterior_eps = [torch.randn((count, *shape), generator=generator) for shape in net.latent_shapes] \
        if takes_posterior_noise(net) else None  # then column i of every grid depends on i alone
    first = EvalStream(shards, batch_size=count, rank=0, world_size=1, image_size=image_size)
    images = next(iter(first))["image"]
    return {"eps": [e.to(device) for e in eps], "images": images.to(device),
            "posterior_eps": None if posterior_eps is None else [e.to(device) for e in posterior_eps]}


def takes_posterior_noise(net) -> bool:
    """Whether the model's training forward accepts its posterior noise (`posterior_eps`, the NVAE)."""
    return "posterior_eps" in inspect.signature(net.forward).parameters


def posterior_noise(net, rows: BatchRows, seed: int, step: int, micro: int, device) -> list[torch.Tensor]:
    """This process's rows of the posterior noise of global micro-batch (step, micro),
    L × [B, latents, h, w]: drawn for the whole global micro-batch from a generator seeded by
    (seed, step, micro), the same on every process, so sample i's noise does not depend on the number of
    processes (data.split=global)."""
    generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "posterior", step, micro))
    return sliced_noise(net.latent_shapes, rows, generator, device)


# ----------------------------------------------------------------------------------------------
# TensorBoard images and scalars.


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
        posterior_eps = [e[columns] for e in fixed["posterior_eps"]]
        return ema_model(fixed["images"][columns], posterior_eps=posterior_eps).x_mean

    def samples(columns: slice) -> torch.Tensor:  # [k, temperatures, C, H, W]
        eps = [e[columns] for e in fixed["eps"]]
        means = [ema_model.decode(eps, None, temperature=t).x_mean for t in SAMPLE_TEMPERATURES]
        return torch.stack(means, dim=1)

    count = len(fixed["images"])
    reconstruction = collective_rows(accelerator, count, reconstruct)
    grid = collective_rows(accelerator, count, samples).transpose(0, 1).flatten(0, 1)  # a row per temperature
    monitor.images("reconstructions", torch.cat([fixed["images"], reconstruction]), step, ncol=count)
    monitor.images("samples/temperature_0.6-1.0", grid, step, ncol=count)


def per_group_scalars(output) -> dict[str, float]:
    """KL and active units (KL per channel above 0.1) of each latent group, for TensorBoard."""
    values = {}
    for index, (kl, per_channel) in enumerate(zip(output.kl_per_group, output.kl_per_channel)):
        values[f"kl/group_{index:02d}"] = float(kl.detach().mean())
        values[f"active_units/group_{index:02d}"] = float((per_channel > 0.1).sum())
    values["active_units/total"] = sum(v for k, v in values.items() if k.startswith("active_units/"))
    return values
