"""A small CNN digit classifier on scikit-learn's digits: the judge of the digit experiments.

    judge = load_or_train_classifier(size=16, seed=0, cache_dir=models_dir)   # trained once, then cached
    judge.accuracy                         # on the held-out `digits-test` split
    digits = judge.predict(gray)           # gray uint8 [N, S, S] → [N] in 0..9
    feats = judge.features(gray)           # [N, 64] penultimate-layer features (Fréchet distance)

It trains on `digits-train` only (`data.bundled.digits_split`, the split every experiment uses), at the
image size of the VAEs it judges, with random shifts of up to one source pixel (the digits are 8×8
upsampled, so one source pixel is size/8 pixels) as the only augmentation, and is tested on
`digits-test`. `modes` classifies each channel of a stacked-digit sample on its own; `fd-digits` and
`ood` take the grey image (the mean of the three channels, equal for real digits).

The weights and the accuracy are cached in `cache_dir/digit-classifier-<size>-s<seed>/` (safetensors +
JSON, written into a temporary folder and renamed into place), so the experiments share one classifier.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 64  # width of the penultimate layer
EPOCHS, BATCH, LR = 20, 64, 2e-3


class DigitNet(nn.Module):
    """conv 32 → conv 32 → pool → conv 64 → pool → fc 64 (features) → fc 10; input [B, 1, S, S] in [−1, 1]."""

    def __init__(self, size: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (size // 4) ** 2, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] → [B, FEATURES]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] → logits [B, 10]."""
        return self.head(self.body(x))


def to_gray(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images [N, S, S], [N, 1, S, S] or [N, 3, S, S] (channel mean) → float [N, 1, S, S] in [−1, 1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, S, S], [N, 1, S, S] or [N, 3, S, S], got {tuple(x.shape)}")
    return x.mean(dim=1, keepdim=True) / 127.5 - 1.0


def _shifted(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image [B, 1, S, S] moved by its own random offset in [−max_shift, max_shift]² (background fill)."""
    size = x.shape[-1]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets.tolist())])


@dataclass
class DigitClassifier:
    """A trained `DigitNet` (eval mode) with its held-out accuracy."""

    net: DigitNet
    size: int
    accuracy: float
    test_count: int

    @torch.no_grad()
    def logits(self, images, batch_size: int = 512) -> torch.Tensor:
        """Class logits [N, 10] of uint8 images (grey or RGB, see `to_gray`), in chunks of `batch_size`."""
        x = to_gray(images)
        return torch.cat([self.net(chunk) for chunk in x.split(batch_size)])

    def predict(self, images) -> np.ndarray:
        """Digit labels [N] (int64) of uint8 images (see `to_gray` for the accepted shapes)."""
        return self.logits(images).argmax(dim=1).numpy().astype(np.int64)

    @torch.no_grad()
    def features(self, images, batch_size: int = 512) -> np.ndarray:
        """Penultimate-layer features [N, FEATURES] (float64) of uint8 images."""
        x = to_gray(images)
        return torch.cat([self.net.features(chunk) for chunk in x.split(batch_size)]).double().numpy()


def train_classifier(size: int, seed: int = 0, epochs: int = EPOCHS) -> DigitClassifier:
    """Train on digits-train, test on digits-test (see the module docstring). A few seconds at 16×16."""
    from data.bundled import load_digits_split

    train_images, train_labels = load_digits_split("train", size)
    test_images, test_labels = load_digits_split("test", size)
    x, y = to_gray(train_images[..., 0]), torch.as_tensor(train_labels)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the initial weights
    net = DigitNet(size)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * -(-len(x) // BATCH))
    max_shift = max(1, size // 8)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(net(_shifted(x[batch], max_shift, generator)), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval().requires_grad_(False)
    judge = DigitClassifier(net, size, 0.0, len(test_labels))
    judge.accuracy = float((judge.predict(test_images[..., 0]) == test_labels).mean())
    return judge


def load_or_train_classifier(size: int, seed: int, cache_dir: Path, log=print) -> DigitClassifier:
    """The classifier for (size, seed) from `cache_dir`, trained and cached there on first use."""
    from safetensors.torch import load_file, save_file

    folder = Path(cache_dir) / f"digit-classifier-{size}-s{seed}"
    if (folder / "info.json").is_file():
        info = json.loads((folder / "info.json").read_text())
        net = DigitNet(size)
        net.load_state_dict(load_file(str(folder / "weights.safetensors")))
        return DigitClassifier(net.eval().requires_grad_(False), size, info["accuracy"], info["test_count"])
    log(f"training the digit classifier ({size}×{size}, seed {seed}) on digits-train")
    judge = train_classifier(size, seed)
    log(f"digit classifier: {100 * judge.accuracy:.2f}% on the {judge.test_count} held-out digits")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        save_file({k: v.contiguous() for k, v in judge.net.state_dict().items()}, str(staging / "weights.safetensors"))
        info = {"size": size, "seed": seed, "accuracy": judge.accuracy, "test_count": judge.test_count,
                "features": FEATURES, "epochs": EPOCHS}
        (staging / "info.json").write_text(json.dumps(info, indent=1) + "\n")  # written last: marks completeness
        try:
            os.rename(staging, folder)
        except OSError:  # another process cached it first; theirs is as good
            if not (folder / "info.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return judge
