"""Run plumbing both loops share: the launch (Accelerator, seeds, streams), collective helpers, the run directory
and its lock, stop signals, checkpoints and their verification, monitoring, image grids, EMA, in-training FID and
divergence detection."""
