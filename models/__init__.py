"""Networks only: NVAE, energy networks, small VAEs and priors. No training code, no Accelerate.

Kept import-light: the inference-bundle loader must import only torch, safetensors and einops.
"""
