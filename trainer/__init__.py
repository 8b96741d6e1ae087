"""Training library: config tree, run directories, checkpoints, loops, Langevin sampler, replay buffer.

Kept import-light on purpose: `import trainer.errors` must not pull in torch or accelerate.
"""
