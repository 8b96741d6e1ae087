"""Run plumbing both loops share: the launch (Accelerator, seeds, streams), collective helpers, the run directory,
checkpoints, monitoring, image grids, EMA, in-training FID and divergence detection."""
