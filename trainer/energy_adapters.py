"""Energy adapters live with the models (`models/adapters.py`: the bundle sampler needs them too);
re-exported here for the trainer's readers."""
from models.adapters import (  # noqa: F401
    ADAPTERS, METHODS, JointPriorEnergy, LatentTiltEnergy, NoiseEnergy, VAEBMEnergy, build_adapter,
)
