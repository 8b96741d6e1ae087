"""Metric library: torch-fidelity's InceptionV3 offline (`inception`), the Fréchet distance (`frechet`), FID/KID
with a cached reference (`fid`) and the image sets they read (`image_sets`)."""
