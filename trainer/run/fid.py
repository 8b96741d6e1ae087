"""FID/KID during training (`eval.fid_every`), computed collectively: every process draws its share of the
samples, the shares are gathered, and the main process scores them and logs `eval/fid`, `eval/kid`.

The main process alone holds the Inception extractor and the reference statistics (built on first use and
cached per shard set, see trainer/metrics/fid.py). Sample i depends only on (seed, i), so the images, and
hence the scores, do not depend on the number of processes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from data.sources import ShardLocation
from models.langevin import seeded_chains
from models.sampler import to_uint8
from trainer.run.collective import collective_rows


class TrainingFid:
    """In-training FID/KID: when it is due, and the collective evaluation (main process scores)."""

    def __init__(self, eval_cfg, reference: Path | ShardLocation, cache_dir: Path, accelerator,
                 log: Callable[[str], None]):
        self.cfg, self.accelerator = eval_cfg, accelerator
        self.evaluator = None
        if accelerator.is_main_process:
            from trainer.metrics.fid import FidEvaluator

            self.evaluator = FidEvaluator(eval_cfg.fid_ref or reference, eval_cfg.fid_weights, accelerator.device,
                                          eval_cfg.fid_batch_size, cache_dir=cache_dir,
                                          kid_subset_size=eval_cfg.fid_kid_subset_size, log=log)

    def due(self, step: int, stop_step: int) -> bool:
        """True at every `fid_every` steps and at the final step (never if FID is off)."""
        return bool(self.cfg.fid_every) and (step % self.cfg.fid_every == 0 or step == stop_step)

    @torch.no_grad()
    def evaluate(self, sample_fn: Callable[[int, int], torch.Tensor]) -> dict[str, float] | None:
        """Collective: `sample_fn(start, count)` → images [count, C, H, W] in [−1, 1]. Returns the scores on
        the main process, None elsewhere. The global RNG streams are left as they were."""
        n, batch = self.cfg.fid_samples, self.cfg.fid_batch_size

        def share(rows: slice) -> torch.Tensor:
            parts = [to_uint8(sample_fn(start, min(batch, rows.stop - start))) for start in range(rows.start, rows.stop, batch)]
            return torch.cat(parts).to(self.accelerator.device)

        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            images = collective_rows(self.accelerator, n, share).cpu()
        if self.evaluator is None:
            return None
        scores = self.evaluator.evaluate(lambda start, count: images[start:start + count], n)
        return {"eval/fid": float(scores["fid"]), "eval/kid": float(scores["kid"])}


def chain_sample_fn(adapter, steps: int, step_size: float, seed: int, device,
                    metropolis: bool = False) -> Callable[[int, int], torch.Tensor]:
    """`sample_fn(start, count)` for `TrainingFid.evaluate`: decoder means [count, C, H, W] of chains start …
    start+count−1 after `steps` Langevin steps on the energy `adapter` (0: VAE samples, for which any adapter
    over the VAE serves, e.g. `NoiseEnergy(vae, None)`). Chain i depends only on (seed, i)."""
    def sample(start: int, count: int) -> torch.Tensor:
        _, final = seeded_chains(adapter, start, count, seed=seed, steps=steps, step_size=step_size, device=device,
                                 metropolis=metropolis)
        return adapter.images(final)

    return sample


def make_training_fid(cfg, image_model: bool, accelerator, log) -> TrainingFid | None:
    """The FID monitor of a run (None when `eval.fid_every` is 0 or the model makes no images). Collective:
    every process must call it (finding the training shards may materialize a bundled set)."""
    from trainer.run.launch import shard_directory

    if not cfg.eval.fid_every or not image_model:
        return None
    reference = Path(cfg.eval.fid_ref) if cfg.eval.fid_ref else shard_directory(cfg.data, accelerator)
    return TrainingFid(cfg.eval, reference, Path(cfg.data.cache_dir).expanduser() / "fid", accelerator, log)


def log_fid(monitor, step: int, scores: dict[str, float] | None) -> None:
    """A stats.jsonl row and the TensorBoard scalars `eval/fid`, `eval/kid` (main process; None elsewhere)."""
    if scores is not None:
        monitor.stats(step, scores, tb_tags={key: key for key in scores})
