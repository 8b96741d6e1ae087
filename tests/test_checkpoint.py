"""Checkpoints: complete or absent, pruned to k, safe to load, RNG state round-trips."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from trainer.errors import UserError
from trainer.run.checkpoint import (
    Checkpoint,
    CheckpointSaver,
    latest_checkpoint,
    list_checkpoints,
    read_torch,
    rng_state,
    set_rng_state,
)


def saver(run_dir, keep=2):
    return CheckpointSaver(run_dir, rank=0, world_size=1, is_main=True, barrier=lambda: None, keep=keep)


def test_save_load_and_prune(tmp_path):
    s = saver(tmp_path, keep=2)
    for step in (1, 2, 3):
        s.save(step, shared={"model.safetensors": {"w": torch.full((2,), float(step))}, "state.json": {"step": step}},
               per_rank={"rng.pt": rng_state(), "data.json": {"pos": step}})
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]
    checkpoint = Checkpoint(latest_checkpoint(tmp_path))
    assert checkpoint.path.name == "step-0000003"
    assert torch.equal(checkpoint.tensors("model.safetensors")["w"], torch.full((2,), 3.0))
    assert checkpoint.json("rank-0/data.json") == {"pos": 3}


def test_incomplete_checkpoint_is_ignored_and_cleaned(tmp_path):
    s = saver(tmp_path)
    s.save(5, shared={"state.json": {"step": 5}}, per_rank={})
    crashed = tmp_path / "checkpoints" / "step-0000010.tmp"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"half")
    no_manifest = tmp_path / "checkpoints" / "step-0000009"
    no_manifest.mkdir()
    assert latest_checkpoint(tmp_path).name == "step-0000005"
    s.save(10, shared={"state.json": {"step": 10}}, per_rank={})
    assert latest_checkpoint(tmp_path).name == "step-0000010"
    assert not crashed.exists()


def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    s = saver(tmp_path)
    s.save(1, shared={"state.json": {"step": 1}}, per_rank={})

    class Boom(Exception):
        pass

    def explode(*args, **kwargs):
        raise Boom()

    monkeypatch.setattr("trainer.run.checkpoint.save_file", explode)
    with pytest.raises(Boom):
        s.save(2, shared={"model.safetensors": {"w": torch.zeros(1)}}, per_rank={})
    assert latest_checkpoint(tmp_path).name == "step-0000001"


def test_rng_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "optimizer.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state": Payload()}, handle)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        read_torch(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a complete checkpoint"):
        Checkpoint(tmp_path)
