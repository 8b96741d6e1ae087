"""Networks only: NVAE, energy networks, small VAEs and priors. No training code, no Accelerate.

Kept import-light: the inference-bundle loader must import only torch, safetensors and einops.
"""


def load_bundle(path, device="cpu", *, verify=True):
    """Load an inference bundle written by `scripts/export.py`; returns a `models.bundle.BundleSampler`.
    `verify=False` skips the SHA-256 check of its files (trusted bundles only; see `models/bundle.py`).

    Imported lazily so `import models` stays light (see `models/bundle.py`).
    """
    from models.bundle import load_bundle as _load_bundle

    return _load_bundle(path, device=device, verify=verify)
