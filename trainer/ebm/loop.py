"""Energy training against a frozen VAE: VAEBM (paper §3.2, App. E) and, through the same loop, the
latent-space methods (`method`: vaebm, latent-tilting, joint-prior; `models/adapters.py`; README,
"Energy methods on the same machinery").

Each iteration: initial noise (ε_z from the replay buffer with probability p, else fresh, a share
`langevin.tail_fraction` of it from the prior's tails; ε_x always fresh where the method moves it)
→ K Langevin steps on U(ε) = E_ψ(part of T_θ(ε)) + ½‖ε‖² → negatives (what the energy scores of
the final ε) → loss mean E(+) − mean E(−) + α_s·Σσ + α_r·(E(+)² + E(−)²) + γ·‖∇E‖²
→ element-wise clip → Adam step → push ε_z. Positives are data (VAEBM, tilting) or z ~ q(z|x) (joint prior).

Chains are independent across processes (their noise is seeded per (seed, rank, step)); the energy's
gradients are all-reduced by DDP. With `data.split=global` every process draws the chains' noise for the
whole global micro-batch from a generator seeded per (seed, step) and keeps its rows, so without the
replay buffer (whose entries are per process) 2 processes with B/2 chains each train like 1 process with
B (tested). Image grids are computed by all processes, each its share of the chains. Re-running the
command resumes from the newest checkpoint that verifies, against the VAE checkpoint the run pinned at its
first start (`trainer/ebm/sources.py`); a diverged run is never resumed into (see
`trainer/run/divergence.py` and `resume_from`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from models.adapters import NoiseEnergy, build_adapter
from models.energy import build_energy
from models.langevin import LangevinResult, seeded_chains
from models.registry import is_image_model
from trainer.config.ebm import VAEBMTrainingConfig
from trainer.ebm.finetune import GeneratorFinetuner
from trainer.ebm.negatives import negative_samples
from trainer.ebm.objective import clip_to_adam_rms, ebm_loss, grad_leaves, input_slope_sq
from trainer.ebm.replay import ReplayBuffer, replay_probability
from trainer.ebm.sources import FrozenBN, check_vae_fits_data, frozen_bn, load_frozen_vae, pin_vae
from trainer.errors import UserError
from trainer.nvae.schedules import warmup_cosine_lr
from trainer.run.checkpoint import (Checkpoint, CheckpointSaver, check_resumable, deepspeed_save,
                                    first_non_finite, is_imported, latest_checkpoint, load_state,
                                    restore_process_state, rng_state, select_resume_checkpoint)
from trainer.run.collective import (BatchRows, any_rank, collective_rows, main_then_share,
                                    mean_across_ranks, sliced_noise, tensor_broadcaster)
from trainer.run.divergence import Divergence, DivergenceDetector, stop_diverged
from trainer.run.fid import chain_sample_fn, log_fid, make_training_fid
from trainer.run.launch import (Launch, batch_inputs, compile_if_asked, make_accelerator, make_train_stream,
                                peak_memory_mb, process_seed, seed_everything)
from trainer.run.monitor import Progress, RunMonitor, parameter_count
from trainer.run.rundir import OwnedRun, own_run_dir

GRID_CHAINS = 8
GRID_SEED = 4321  # the fixed chains of the before/after-Langevin grids


def divergence_hint(cfg: VAEBMTrainingConfig) -> str:
    """What to change after an energy diverged. A latent energy (joint prior, latent tilting) also diverges when
    `langevin.step_size` is too small for its chains to move: the energy grows its gradient until they do, and past
    the divergence guard (README, "Full-mode results", the joint-prior digits entry)."""
    hint = "lower optim.lr or langevin.steps"
    if cfg.method != "vaebm":
        hint += f", or raise langevin.step_size ({cfg.langevin.step_size:g}) if the chains barely move"
    return hint


def train_vaebm(cfg: VAEBMTrainingConfig, run_dir: Path, resume_from: Path | None = None,
                vae_changed_ok: bool = False) -> Path:
    """Train (or resume) an energy on a frozen VAE; returns the final checkpoint. Raises `TrainingDiverged`
    when the run diverges. `vae_changed_ok`: resume against a VAE other than the one the run pinned."""
    launch = make_accelerator(cfg.train, run_dir)
    fp16 = launch.accelerator.mixed_precision == "fp16" or launch.autocast_dtype == torch.float16
    if cfg.optim.slope_coeff and fp16:
        # The config check catches train.mixed_precision=fp16; this catches fp16 chosen by the launcher.
        raise UserError("optim.slope_coeff differentiates E twice, and its inner gradient would run in fp16 without "
                        "the loss scaler: launch with --mixed_precision bf16 or no")
    with own_run_dir(run_dir, cfg, launch.accelerator, kind="vaebm", section="energy",
                     resume_from=resume_from) as run:
        return _train_vaebm(cfg, run, launch, resume_from, vae_changed_ok)


def _train_vaebm(cfg: VAEBMTrainingConfig, run: OwnedRun, launch: Launch, resume_from: Path | None,
                 vae_changed_ok: bool) -> Path:
    # Launch.
    accelerator, run_dir = launch.accelerator, run.path
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # The checkpoint to resume from (verified; failing ones moved aside) and the VAE it pinned, both
    # decided by the main process.
    notes: list[str] = []
    checkpoint_path = main_then_share(accelerator,
                                      lambda: resume_from or select_resume_checkpoint(run_dir, notes.append))
    checkpoint = Checkpoint(checkpoint_path) if checkpoint_path is not None else None
    pinned = checkpoint.state() if checkpoint is not None else None  # vae_checkpoint, vae_weights, vae_sha256
    vae_pin = main_then_share(accelerator, lambda: pin_vae(cfg.vae.path, cfg.vae.weights, pinned,
                                                           vae_changed_ok, notes.append))
    vae_checkpoint = Path(vae_pin["vae_checkpoint"])

    # The frozen VAE, the energy, its optimizer, the replay buffer, data.
    vae, _ = load_frozen_vae(vae_checkpoint, cfg.vae.weights, device)  # never wrapped or trained
    check_vae_fits_data(vae, cfg.data, cfg.vae.path)
    # The BN statistics the energy trains with (README, "BN statistics of an energy"): readjusted once, or the
    # ones the checkpoint being resumed kept, so the energy, its chains, grids, FID and export all share them.
    bn = frozen_bn(vae, cfg, checkpoint_path, tensor_broadcaster(accelerator),
                   log=accelerator.print)
    seed_everything(cfg.train.seed)
    energy = build_energy(cfg.energy, vae.z_shapes)  # a latent energy scores z, not the noise
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    optimizer = torch.optim.Adam(energy.parameters(), lr=cfg.optim.lr, betas=betas,
                                 weight_decay=cfg.optim.weight_decay)
    energy, optimizer = accelerator.prepare(energy, optimizer)
    net = launch.unwrap(energy)  # Langevin runs on the bare module, never through DDP/DeepSpeed
    adapter = build_adapter(cfg.method, vae, net, cfg.vae.temperature)
    finetuner = GeneratorFinetuner(vae, cfg.vae.finetune_lr, accelerator) if cfg.vae.finetune else None
    buffer = None
    if cfg.replay.enabled:
        buffer = ReplayBuffer(vae.latent_shapes, capacity=-(-cfg.replay.capacity // world),
                              pin_memory=device.type == "cuda")
    detector = DivergenceDetector(cfg.divergence.max_abs_energy, cfg.divergence.max_energy_gap,
                                  cfg.divergence.patience)
    stream = make_train_stream(cfg.data, cfg.train.per_device_batch_size, cfg.train.seed, accelerator)
    batches = iter(stream)
    rows = BatchRows.of(cfg.data, cfg.train.per_device_batch_size, accelerator)  # this process's chains
    noise_rank = rank if cfg.data.split == "shards" else 0  # global: the same chain noise on every process
    update = EnergyUpdate(energy, net, optimizer, adapter, buffer, finetuner, launch, cfg, rows=rows,
                          noise_rank=noise_rank)
    run.prepare(cfg)  # everything that can fail at a start has loaded: now the run directory is written

    # Resume, or initialize the energy from data.
    step = 0
    if checkpoint is not None:
        step = restore(checkpoint, energy, optimizer, buffer, detector, stream, launch, cfg.train.seed,
                       finetuner)
        batches = iter(stream)
    else:
        seed_everything(process_seed(cfg.train.seed, rank))
        init = torch.cat([batch_inputs(next(batches)) for _ in range(cfg.data_init_batches)]).to(device)
        net.initialize_from_data(adapter.positives(init))  # statistics all-reduced across processes
    monitor = RunMonitor(run_dir, enabled=accelerator.is_main_process, resume_step=step,
                         accelerator=accelerator, project=cfg.train.tracker_project)
    for note in notes:
        monitor.log(note)
    fid = make_training_fid(cfg, is_image_model(vae), accelerator, monitor.log)
    replay = f", replay buffer {buffer.nbytes / 2**20:.1f} MB per process" if buffer else ""
    monitor.log(f"{'resuming from step ' + str(step) if step else 'starting'} {cfg.method}: energy "
                f"{parameter_count(net)}, VAE {vae_checkpoint} ({bn.describe()}), {world} process(es), "
                f"accumulation {launch.accumulation}, device {device}{replay}"
                f"{f', compiled ({cfg.train.compile_backend})' if cfg.train.compile else ''}")
    saver = CheckpointSaver(run_dir, rank=rank, world_size=world, is_main=accelerator.is_main_process,
                            barrier=accelerator.wait_for_everyone, keep=cfg.train.keep_checkpoints,
                            any_failed=lambda flag: any_rank(accelerator, flag))
    stop_step = min(cfg.train.max_steps, cfg.train.halt_at_step or cfg.train.max_steps)
    progress = Progress(cfg.train.max_steps, step, accelerator.is_main_process and cfg.train.progress_bar)
    last_saved = step if checkpoint is not None else -1
    stop = None
    test_steps = cfg.langevin.sample_steps or cfg.langevin.steps

    while step < stop_step:
        # Langevin negatives and the update.
        result = update.step(step, batches)
        progress.skipped_updates += result.skipped
        step += 1
        progress.step_done(result.images)

        # Divergence: decided on energies averaged over the processes (and, where a checkpoint is due, the
        # weights), so every process stops together.
        terms = mean_across_ranks(accelerator, result.terms)
        checkpoint_due = step % cfg.train.checkpoint_every == 0 or step == stop_step
        weights_bad = checkpoint_due and any_rank(accelerator, not weights_finite(update))
        divergence = detector.check(step, terms["energy_pos"], terms["energy_neg"], result.grads_finite,
                                    not weights_bad)

        # Report.
        if step % cfg.train.log_every == 0 or step == stop_step or divergence:
            row = log_row(result, terms, buffer, progress, stream.skipped_samples, device)
            monitor.stats(step, row, tb_tags={"data/skipped_samples": "data/skipped_samples",
                                              "img_per_s": "sys/img_per_s", "peak_mem_mb": "sys/peak_mem_mb",
                                              "replay_mem_mb": "sys/replay_mem_mb"})
            energies = {f"langevin/energy_step_{k:02d}": float(e) for k, e in enumerate(result.chains.energy)}
            monitor.scalars(step, energies)
            progress.new_window(gap=f"{terms['energy_gap']:.3g}", img_s=f"{row['img_per_s']:.1f}")
        if divergence:
            progress.close()
            stop_diverged(divergence, run_dir, accelerator, monitor.log, divergence_hint(cfg))

        # Image grids and FID after test-length Langevin (collective: each process runs a share).
        grid_due = step == stop_step or (cfg.train.image_every and step % cfg.train.image_every == 0)
        if is_image_model(vae) and grid_due:
            log_chain_images(monitor, adapter, test_steps, cfg.langevin.step_size, cfg.langevin.metropolis, step,
                             device, accelerator)
        if fid is not None and fid.due(step, stop_step):
            samples = chain_sample_fn(adapter, test_steps, cfg.langevin.step_size, cfg.train.seed, device,
                                      cfg.langevin.metropolis)
            log_fid(monitor, step, fid.evaluate(samples))

        # Checkpoint (never inside a streak of bad steps: those may be the start of a divergence).
        stop = run.stop_reason()  # STOP file or a stop signal: checkpoint now, exit cleanly, resume on re-run
        if checkpoint_due and not detector.in_bad_streak:
            save_checkpoint(saver, step, update, detector, stream, vae_pin, bn)
            last_saved = step
        if stop:
            monitor.log(f"stop requested ({stop}) at step {step}")
            break

    # Done. A run never ends with non-finite weights: however short its bad streak, that is a divergence.
    if last_saved != step and any_rank(accelerator, not weights_finite(update)):
        progress.close()
        weights = Divergence(step, step, "non-finite weights", math.nan)
        stop_diverged(detector.unfinished_streak(step) or weights, run_dir, accelerator, monitor.log,
                      divergence_hint(cfg))
    if last_saved != step and not detector.in_bad_streak:
        save_checkpoint(saver, step, update, detector, stream, vae_pin, bn)
    progress.close()
    ended = "halted" if step < cfg.train.max_steps else "finished"
    line = f"{ended} at step {step}; checkpoint {latest_checkpoint(run_dir)}"
    monitor.log(line)
    run.end("stopped" if stop else ended, step, line)
    monitor.close()
    accelerator.end_training()
    return latest_checkpoint(run_dir)


# ----------------------------------------------------------------------------------------------
# One training iteration.


@dataclass
class StepResult:
    """What one energy-training iteration reports (the last micro-batch's loss and chains)."""

    loss: float
    terms: dict[str, float]      # energy_pos, energy_neg, energy_gap, spectral, energy_sq (, slope_sq)
    chains: LangevinResult       # the last micro-batch's chains, with per-step diagnostics
    replay_p: float
    clip_fraction: float
    grads_finite: bool
    images: int                  # positives in the iteration, all processes together
    skipped: int                 # 1 if the update was skipped for non-finite values (fp16: an overflow)
    lr: float                    # the energy's learning rate in this iteration
    finetune_terms: dict[str, float] = field(default_factory=dict)
    loss_scale: float | None = None  # fp16: the loss scaler's scale after the step


class EnergyUpdate:
    """One energy-training iteration over `launch.accumulation` micro-batches: Langevin negatives, the energy
    loss, backward, the element-wise clip, the Adam step, the replay push and (joint prior, `vae.finetune`)
    the VAE's update. The training loop and `scripts/bench.py vaebm-step` both call `step`."""

    def __init__(self, energy, net, optimizer, adapter: NoiseEnergy, buffer: ReplayBuffer | None,
                 finetuner: GeneratorFinetuner | None, launch: Launch, cfg: VAEBMTrainingConfig, *,
                 rows: BatchRows, noise_rank: int):
        self.energy, self.net, self.optimizer, self.adapter = energy, net, optimizer, adapter
        self.buffer, self.finetuner, self.launch, self.cfg = buffer, finetuner, launch, cfg
        self.rows, self.noise_rank = rows, noise_rank
        self.autocast_dtype = torch.bfloat16 if cfg.langevin.autocast == "bf16" else None
        compile_if_asked(net, cfg.train)  # Langevin calls the same (compiled) module

    def step(self, step: int, batches: Iterator[dict]) -> StepResult:
        """Take iteration number `step` (0-based) on the next micro-batches of `batches`."""
        cfg, launch, accelerator, adapter = self.cfg, self.launch, self.launch.accelerator, self.adapter
        device = accelerator.device
        p = replay_probability(step, cfg.replay.max_p, cfg.replay.anneal_steps) if self.buffer else 0.0
        seed = process_seed(cfg.train.seed, self.noise_rank) + 1_000_003 * step
        generator = torch.Generator(device=device).manual_seed(seed)
        # The config sets the rate of every iteration, not the optimizer state a checkpoint restored: a run
        # resumed with another optim.lr (README, "Divergence") trains at it. A function of the step alone.
        lr = cfg.optim.lr
        if cfg.optim.lr_schedule == "cosine":
            lr = warmup_cosine_lr(step, lr=cfg.optim.lr, lr_min=cfg.optim.lr_min, warmup_steps=0,
                                  total_steps=cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        images = 0
        for micro in range(launch.accumulation):
            x_pos = batch_inputs(next(batches)).to(device, non_blocking=True)
            batch = x_pos.shape[0]
            chains, negatives = negative_samples(adapter, self.buffer, batch, p, generator, cfg.langevin,
                                                 self.autocast_dtype, self.rows)
            with torch.no_grad():  # joint prior: z ~ q(z|x), noise drawn per global sample like the chains'
                posterior_eps = None
                if adapter.positives_need_noise:
                    posterior_eps = sliced_noise(adapter.vae.latent_shapes, self.rows, generator, device)
                positives = adapter.positives(x_pos, posterior_eps)
            with accelerator.accumulate(self.energy):
                with launch.autocast():
                    # One pass over positives and negatives: DDP sees one forward per backward.
                    inputs = adapter.concat(positives, negatives)
                    if cfg.optim.slope_coeff:  # the slope penalty differentiates E w.r.t. its inputs
                        inputs = grad_leaves(inputs)
                    energies = self.energy(inputs)
                    slope_sq = input_slope_sq(energies, inputs) if cfg.optim.slope_coeff else None
                    loss, terms = ebm_loss(energies[:batch], energies[batch:], self.net.spectral_loss(),
                                           cfg.optim.spectral_coeff, cfg.optim.energy_reg_coeff, slope_sq,
                                           cfg.optim.slope_coeff)
                accelerator.backward(loss)
            if self.buffer is not None:
                self.buffer.push(adapter.latent_noise(chains.noise))
            images += batch * accelerator.num_processes

        loss_finite = math.isfinite(float(loss.detach()))
        if launch.deepspeed:  # the engine has stepped inside backward (its own clipping, if configured)
            grads_finite, clip_fraction, skipped = not any_rank(accelerator, not loss_finite), 0.0, 0
        else:
            accelerator.unscale_gradients(self.optimizer)  # fp16: clip true gradients against Adam's v
            grads = [param.grad for param in self.net.parameters() if param.grad is not None]
            grads_finite = not any_rank(accelerator, not all(torch.isfinite(g).all() for g in grads))
            clip_fraction = 0.0
            if cfg.optim.clip_std > 0:
                clip_fraction = clip_to_adam_rms(self.optimizer.optimizer, cfg.optim.clip_std,
                                                 cfg.optim.clip_offset)
            if accelerator.scaler is not None:
                # fp16: the scaler skips an overflowed step and lowers its scale. Overflows are its business,
                # not a sign of divergence (non-finite energies still are).
                self.optimizer.step()
                skipped, grads_finite = int(self.optimizer.step_was_skipped), True
            else:
                skipped = 0 if grads_finite and loss_finite else 1  # one non-finite step: skipped, counted
                if not skipped:
                    self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finetune_terms = self.finetuner.step(x_pos, negatives, self.net) if self.finetuner is not None else {}
        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
        return StepResult(float(loss.detach()), terms, chains, p, clip_fraction, grads_finite, images,
                          skipped, lr, finetune_terms, scale)


def log_row(result: StepResult, terms: dict[str, float], buffer: ReplayBuffer | None, progress: Progress,
            skipped_samples: int, device) -> dict[str, float]:
    """One stats.jsonl row (README, "A run directory", lists its keys); `terms` are process averages."""
    chains = result.chains
    return {"loss": result.loss, **terms, "langevin_grad_norm": float(chains.grad_norm.mean()),
            "langevin_energy_first": float(chains.energy[0]),
            "langevin_energy_last": float(chains.energy[-1]),
            **({"langevin_acceptance": float(chains.acceptance.mean())} if len(chains.acceptance) else {}),
            **({"langevin_start_ess": chains.start_ess} if chains.start_ess is not None else {}),
            "replay_fill": len(buffer) if buffer else 0, "replay_p": result.replay_p,
            "clip_fraction": result.clip_fraction, "lr": result.lr, "img_per_s": progress.images_per_second(),
            "skipped_updates": progress.skipped_updates, "data/skipped_samples": skipped_samples,
            "peak_mem_mb": peak_memory_mb(device), "replay_mem_mb": buffer.nbytes / 2**20 if buffer else 0.0,
            **result.finetune_terms,
            **({"loss_scale": result.loss_scale} if result.loss_scale is not None else {})}


# ----------------------------------------------------------------------------------------------
# Checkpoints and divergence.


def save_checkpoint(saver: CheckpointSaver, step: int, update: EnergyUpdate, detector: DivergenceDetector,
                    stream, vae_pin: dict, bn: FrozenBN | None = None) -> None:
    """Write checkpoint `step` of the training state `update` holds, collectively (every process calls it).
    `vae_pin`: the frozen VAE's checkpoint, weights and SHA-256 (`trainer/ebm/sources.py`), for state.json;
    `bn`: the frozen VAE's BN statistics the energy trains with (kept when readjusted)."""
    bn = bn or FrozenBN()
    per_rank = {"rng.pt": rng_state(), "data.json": stream.state_dict()}
    if update.buffer is not None:
        per_rank["replay.pt"] = update.buffer.state_dict()
    shared = {"energy.safetensors": update.net.state_dict(),
              "state.json": {"step": step, "kind": "vaebm", **vae_pin, "vae_bn": bn.record,
                             "divergence": detector.state_dict(), "deepspeed": update.launch.deepspeed},
              **bn.checkpoint_files()}
    if not update.launch.deepspeed:
        shared["optimizer.pt"] = update.optimizer.state_dict()
    if update.launch.accelerator.scaler is not None:
        shared["scaler.pt"] = update.launch.accelerator.scaler.state_dict()
    if update.finetuner is not None:  # the fine-tuned VAE travels with the energy (export reads it from here)
        shared.update({"vae.safetensors": update.adapter.vae.state_dict(),
                       "vae_optimizer.pt": update.finetuner.state_dict()})
    saver.save(step, shared=shared, per_rank=per_rank,
               collective=deepspeed_save(update.energy) if update.launch.deepspeed else None)


def restore(checkpoint: Checkpoint, energy, optimizer, buffer, detector, stream, launch: Launch,
            seed: int = 0, finetuner: GeneratorFinetuner | None = None) -> int:
    """Load everything an energy checkpoint holds (replay buffers and RNG per process, the fine-tuned VAE
    when there is one); returns its step.

    An imported checkpoint (`scripts/import_official.py`) holds no per-process state: it resumes on any
    number of processes with a fresh data stream, an empty replay buffer and per-process seeds from `seed`.
    """
    accelerator = launch.accelerator
    check_resumable(checkpoint, launch, kind="vaebm")
    imported = is_imported(checkpoint)
    net = launch.unwrap(energy)
    checkpoint.load_into(net, "energy.safetensors")  # includes spectral u/v and data-init flags
    if launch.deepspeed:
        energy.load_checkpoint(str(checkpoint.path / "deepspeed"), tag="state")
    else:
        load_state(optimizer, checkpoint.torch("optimizer.pt"), checkpoint.path / "optimizer.pt")
    load_state(detector, checkpoint.state().get("divergence"), checkpoint.path / "state.json")
    if accelerator.scaler is not None and checkpoint.has("scaler.pt"):
        accelerator.scaler.load_state_dict(checkpoint.torch("scaler.pt"))
    if finetuner is not None and not imported:  # an imported energy fine-tunes the VAE of vae.path
        if not checkpoint.has("vae.safetensors"):
            raise UserError(f"checkpoint '{checkpoint.path}' has no fine-tuned VAE but vae.finetune is true")
        checkpoint.load_into(finetuner.vae, "vae.safetensors")
        load_state(finetuner, checkpoint.torch("vae_optimizer.pt"), checkpoint.path / "vae_optimizer.pt")
    rank = accelerator.process_index
    if buffer is not None and not imported:
        if not checkpoint.has(f"rank-{rank}/replay.pt"):
            raise UserError(f"checkpoint '{checkpoint.path}' has no replay buffer but replay.enabled is true")
        replay = checkpoint.rank_file(rank, "replay.pt")
        load_state(buffer, checkpoint.torch(f"rank-{rank}/replay.pt"), replay)
    restore_process_state(checkpoint, rank, stream, process_seed(seed, rank))
    return checkpoint.step


def weights_finite(update: EnergyUpdate) -> bool:
    """Whether the energy's weights (and a fine-tuned VAE's) are all finite (checked before a checkpoint)."""
    nets = [update.net] + ([update.adapter.vae] if update.finetuner is not None else [])
    return all(first_non_finite(net.state_dict()) is None for net in nets)


# ----------------------------------------------------------------------------------------------
# TensorBoard images.


@torch.no_grad()
def log_chain_images(monitor: RunMonitor, adapter: NoiseEnergy, steps: int, step_size: float, metropolis: bool,
                     step: int, device, accelerator) -> None:
    """VAE samples (top row) beside the same chains after `steps` Langevin steps (bottom), fixed noise.
    Collective: every process runs its share of the chains, the main process writes the grid."""
    def before_and_after(chains: slice) -> torch.Tensor:  # [k, 2, C, H, W]
        initial, final = seeded_chains(adapter, chains.start, chains.stop - chains.start, seed=GRID_SEED,
                                       steps=steps, step_size=step_size, device=device, metropolis=metropolis)
        return torch.stack([adapter.images(initial), adapter.images(final)], dim=1)

    grid = collective_rows(accelerator, GRID_CHAINS, before_and_after).transpose(0, 1).flatten(0, 1)
    monitor.images("chains/vae_then_langevin", grid, step, ncol=GRID_CHAINS)
