"""Fréchet distance between two feature sets (the distance behind FID), computed carefully.

    fd = frechet_distance(features_a, features_b)        # [N, D] and [M, D] → float

The Fréchet (2-Wasserstein) distance between the Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂) fitted to the sets:

    FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½

The usual code calls scipy.linalg.sqrtm on the non-symmetric product Σ₁Σ₂ and discards the imaginary
part it picks up from round-off. Here both square roots are of symmetric positive semi-definite
matrices, taken by eigen-decomposition in float64 with round-off negatives clipped to zero: no complex
numbers, and exact for singular covariances (fewer samples than dimensions, dead ReLU features).
"""
from __future__ import annotations

import numpy as np


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] in float64 (unbiased covariance, N − 1)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix [D, D] (eigenvalues below 0 clipped to 0)."""
    symmetric = (np.asarray(matrix, dtype=np.float64) + np.asarray(matrix, dtype=np.float64).T) / 2
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_gaussians(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means [D], covariances [D, D]."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, {sigma2.shape}")
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1  # symmetric PSD, with the same eigenvalues as Σ₁Σ₂
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross)
    return max(distance, 0.0)  # a distance; round-off can leave −1e-12 for identical sets


def frechet_distance(features1: np.ndarray, features2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to features1 [N, D] and features2 [M, D]."""
    return frechet_distance_gaussians(*gaussian_statistics(features1), *gaussian_statistics(features2))
