"""Replay buffer of latent noise ε_z for persistent Langevin chains (VAEBM App. E; README, Design).

After each training step the final ε_z of every chain is pushed; the next step starts each chain from a
stored entry with probability p (ramping linearly from 0 to max_p) and from fresh N(0, I) otherwise.
Only ε_z is stored: ε_x (pixel noise) is always drawn fresh, as in the paper.

Storage is preallocated, one tensor [capacity, *shape] per latent group, and used as a FIFO ring:
entry j of every group belongs to the same sample, so a sample's groups always stay together. Slots
0 … fill−1 hold valid entries (the ring fills from slot 0 and only wraps once full). One buffer per
rank; the trainer saves `state_dict()` in every checkpoint.
"""
from __future__ import annotations

from typing import Sequence

import torch


def replay_probability(step: int, max_p: float, anneal_steps: int) -> float:
    """Linear ramp p = max_p · min(1, step / anneal_steps); max_p at once if anneal_steps ≤ 0."""
    if anneal_steps <= 0:
        return max_p
    return max_p * min(1.0, max(0, step) / anneal_steps)


class ReplayBuffer:
    """FIFO ring of per-sample ε_z lists.

    Args:
        shapes: per-sample shape of each latent group's noise, e.g. [(20, 8, 8), (20, 16, 16)].
        capacity: number of samples kept (per rank); the oldest are evicted first.
        device: where the storage lives ("cpu" keeps GPU memory free; a CUDA device avoids copies).
        pin_memory: pin CPU storage for faster asynchronous copies to the GPU (ignored without CUDA).
    """

    def __init__(
        self,
        shapes: Sequence[Sequence[int]],
        capacity: int,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
    ):
        if capacity < 1:
            raise ValueError(f"replay buffer capacity must be positive, got {capacity}")
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.capacity = int(capacity)
        self.device = torch.device(device)
        self.pin_memory = bool(pin_memory) and self.device.type == "cpu" and torch.cuda.is_available()
        self.storage = [
            torch.zeros((self.capacity, *s), dtype=torch.float32, device=self.device, pin_memory=self.pin_memory)
            for s in self.shapes
        ]
        self.fill = 0  # number of valid entries, slots 0 … fill−1
        self.position = 0  # next slot to write (the oldest entry once full)

    def __len__(self) -> int:
        return self.fill

    @property
    def nbytes(self) -> int:
        """Bytes of preallocated storage (for logging)."""
        return sum(t.numel() * t.element_size() for t in self.storage)

    @torch.no_grad()
    def push(self, eps_z: Sequence[torch.Tensor]) -> None:
        """Store a batch: eps_z holds one tensor [B, *shape] per group. Overwrites the oldest once full."""
        if len(eps_z) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} latent groups, got {len(eps_z)}")
        batch = eps_z[0].shape[0]
        for t, s in zip(eps_z, self.shapes):
            if tuple(t.shape[1:]) != s or t.shape[0] != batch:
                raise ValueError(f"expected a tensor [{batch}, {', '.join(map(str, s))}], got {list(t.shape)}")
        if batch == 0:
            return
        skip = max(0, batch - self.capacity)  # a batch larger than the buffer: only its newest entries survive
        count = batch - skip
        slots = (self.position + skip + torch.arange(count)) % self.capacity
        slots = slots.to(self.device)
        for store, t in zip(self.storage, eps_z):
            store.index_copy_(0, slots, t[skip:].detach().to(self.device, torch.float32))
        self.position = (self.position + batch) % self.capacity
        self.fill = min(self.capacity, self.fill + batch)

    @torch.no_grad()
    def draw(
        self,
        batch_size: int,
        p: float,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[list[torch.Tensor], int]:
        """Initial ε_z for a batch of chains.

        Each chain is replayed with probability p (independent Bernoulli draws) and fresh N(0, I)
        otherwise; the replayed entries are distinct (drawn without replacement, so at most `fill`)
        and come first in the batch. An empty buffer gives all fresh noise.

        All randomness comes from `generator` (None: the global RNG), drawn on the generator's device,
        so the draw is reproducible from its state. Returns (one tensor [batch_size, *shape] per group
        on `device` (default: the storage device), number of replayed chains).
        """
        device = torch.device(device) if device is not None else self.device
        rng_device = generator.device if generator is not None else torch.device("cpu")
        chosen = torch.rand(batch_size, generator=generator, device=rng_device) < p
        num_replayed = min(int(chosen.sum()), self.fill)
        index = torch.randperm(self.fill, generator=generator, device=rng_device)[:num_replayed]
        index = index.to(self.device)
        out = []
        for store, s in zip(self.storage, self.shapes):
            fresh = torch.randn((batch_size - num_replayed, *s), generator=generator, device=rng_device)
            if self.pin_memory and device.type == "cuda":
                # Gather into pinned memory so the host-to-device copy can run asynchronously.
                replayed = torch.empty((num_replayed, *s), pin_memory=True)
                torch.index_select(store, 0, index, out=replayed)
                replayed = replayed.to(device, non_blocking=True)
            else:
                replayed = store.index_select(0, index).to(device)
            out.append(torch.cat([replayed, fresh.to(device)]))
        return out, num_replayed

    def state_dict(self) -> dict:
        """The filled part of the storage (CPU copies), fill and write position: restores exactly."""
        return {
            "shapes": [list(s) for s in self.shapes],
            "capacity": self.capacity,
            "fill": self.fill,
            "position": self.position,
            "storage": [t[: self.fill].cpu().clone() for t in self.storage],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the stored chains, fill and position; ValueError if the shapes or capacity differ."""
        shapes = [tuple(s) for s in state["shapes"]]
        if shapes != self.shapes or int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"replay buffer mismatch: checkpoint has shapes {shapes} and capacity {state['capacity']}, "
                f"this buffer {self.shapes} and {self.capacity}"
            )
        fill = int(state["fill"])
        for store, saved in zip(self.storage, state["storage"]):
            store.zero_()
            store[:fill].copy_(saved[:fill])
        self.fill = fill
        self.position = int(state["position"])
