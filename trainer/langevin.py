"""The Langevin sampler, re-exported: the implementation lives in `models/langevin.py`.

It moved to `models/` so the self-contained inference bundle (`models/bundle.py`) can run the one
sampler without importing the trainer. Every public name (and `_per_chain_sq_norm`) is re-exported
here, so `from trainer.langevin import langevin, PerChainNoise, ...` keeps working.
"""
from models.langevin import *  # noqa: F401,F403
from models.langevin import __all__  # noqa: F401
from models.langevin import _per_chain_sq_norm  # noqa: F401
