"""Checkpoints: complete or absent, pruned to k, safe to load, RNG state round-trips; verified before trusted,
a corrupt one moved aside; a full device reported in one line."""
import errno
import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import pytest
import torch

from trainer.errors import UserError, no_space_path
from trainer.run.checkpoint import (
    Checkpoint,
    CheckpointSaver,
    CorruptCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    read_torch,
    remove_stale_temporaries,
    rng_state,
    select_resume_checkpoint,
    set_rng_state,
    verify_checkpoint,
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


# ---- Verified before trusted; a corrupt newest checkpoint falls back (issue: checkpoints) ----------------------

def _good_checkpoints(run_dir, steps=(2, 4)):
    s = saver(run_dir, keep=5)
    for step in steps:
        s.save(step, shared={"model.safetensors": {"w": torch.full((64,), float(step))},
                             "optimizer.pt": {"state": {0: {"v": torch.ones(256)}}, "param_groups": []},
                             "state.json": {"step": step, "kind": "nvae"}},
               per_rank={"rng.pt": rng_state(), "data.json": {"pos": step}})
    return run_dir / "checkpoints" / f"step-{steps[-1]:07d}"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite_manifest(checkpoint, change):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    change(manifest)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _consistent(checkpoint, name, payload: bytes):
    """Replace a file and fix its manifest entry: only the value checks can catch it then."""
    (checkpoint / name).write_bytes(payload)
    _rewrite_manifest(checkpoint, lambda m: (m["bytes"].__setitem__(name, len(payload)),
                                             m["sha256"].__setitem__(name, hashlib.sha256(payload).hexdigest())))


def _nan_weights(checkpoint):
    buffer = io.BytesIO()
    from safetensors.torch import save
    buffer.write(save({"w": torch.full((64,), float("nan"))}))
    _consistent(checkpoint, "model.safetensors", buffer.getvalue())


CORRUPTIONS = {
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has"),
    "truncated optimizer": (lambda c: _truncate(c / "optimizer.pt"), "optimizer.pt has"),
    "flipped bytes": (lambda c: (c / "optimizer.pt").write_bytes(bytes(255 - b for b in
                                                                     (c / "optimizer.pt").read_bytes())),
                      "optimizer.pt does not match its SHA-256"),
    "missing file": (lambda c: (c / "rank-0" / "rng.pt").unlink(), "rank-0/rng.pt is missing"),
    "non-UTF-8 state.json": (lambda c: _consistent(c, "state.json", b"\xff\xfe{"), "state.json' is not valid JSON"),
    "state.json a bare number": (lambda c: _consistent(c, "state.json", b"7"), "state.json is not the state of step"),
    "manifest without a field": (lambda c: _rewrite_manifest(c, lambda m: m.pop("world_size")), "no valid world_size"),
    "manifest of another step": (lambda c: _rewrite_manifest(c, lambda m: m.__setitem__("step", 9)), "says step 9"),
    "manifest lists a file outside": (lambda c: _rewrite_manifest(c, lambda m: m["files"].append("../x")),
                                      "outside the checkpoint"),
    "NaN-filled weights": (_nan_weights, "tensor 'w' of model.safetensors is not finite"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_checkpoint_fails_verification_in_one_line(tmp_path, corruption):
    damage, message = CORRUPTIONS[corruption]
    newest = _good_checkpoints(tmp_path)
    verify_checkpoint(newest)  # intact: passes
    damage(newest)
    with pytest.raises(CorruptCheckpoint, match=re.escape(message)) as failure:
        verify_checkpoint(newest)
    assert "\n" not in str(failure.value)


def test_the_newest_checkpoint_that_verifies_is_chosen_and_the_others_moved_aside(tmp_path):
    newest = _good_checkpoints(tmp_path, steps=(2, 4, 6))
    _truncate(newest / "model.safetensors")
    _truncate(tmp_path / "checkpoints" / "step-0000004" / "optimizer.pt")
    said = []
    chosen = select_resume_checkpoint(tmp_path, said.append)
    assert chosen.name == "step-0000002"
    moved = sorted(p.name for p in (tmp_path / "checkpoints" / "corrupt").iterdir())
    assert moved == ["step-0000004-wrong-size", "step-0000006-wrong-size"]  # moved aside, not deleted
    assert len(said) == 2 and all("failed verification" in line and "\n" not in line for line in said)
    _truncate(chosen / "model.safetensors")  # none verifies now: refuse rather than silently start over
    with pytest.raises(UserError, match="no checkpoint of run .* verifies"):
        select_resume_checkpoint(tmp_path, said.append)


def test_checkpoints_record_sizes_and_digests(tmp_path):
    newest = _good_checkpoints(tmp_path)
    manifest = json.loads((newest / "manifest.json").read_text())
    assert set(manifest["sha256"]) == set(manifest["files"]) == set(manifest["bytes"])
    weights = (newest / "model.safetensors").read_bytes()
    assert manifest["sha256"]["model.safetensors"] == hashlib.sha256(weights).hexdigest()


def test_non_finite_weights_are_never_written(tmp_path):
    s = saver(tmp_path)
    with pytest.raises(UserError, match="not finite"):
        s.save(3, shared={"model.safetensors": {"w": torch.tensor([1.0, float("inf")])}, "state.json": {"step": 3}},
               per_rank={})
    assert list_checkpoints(tmp_path) == [] and not list((tmp_path / "checkpoints").glob("*"))


# ---- A full device: one line naming the path, nothing left behind (issue: full disk) -------------------------

def test_a_full_device_is_reported_as_no_space_naming_the_path(tmp_path, monkeypatch):
    """torch.save reports a full device as a C++ stream error; safetensors wraps the OS error: both become
    OSError(ENOSPC) naming the file, the temporary is removed, and the user sees one line."""
    from models.files import atomic_write

    def torch_stream_failure(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1300032 vs 1299924") \
            from RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr("models.files.shutil.disk_usage", lambda folder: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OSError) as failure:
        atomic_write(tmp_path / "optimizer.pt", torch_stream_failure)
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(tmp_path / "optimizer.pt")
    assert list(tmp_path.iterdir()) == []
    assert no_space_path(failure.value) == str(tmp_path / "optimizer.pt")

    def safetensors_failure(tmp):
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")

    monkeypatch.setattr("models.files.shutil.disk_usage", lambda folder: shutil._ntuple_diskusage(100, 0, 100))
    with pytest.raises(OSError, match="No space left"):
        atomic_write(tmp_path / "model.safetensors", safetensors_failure)


def test_a_process_that_cannot_write_makes_every_process_fail_the_save(tmp_path):
    """The other processes learn of the failure at the next phase (no one waits at a barrier forever); the
    staging folder goes, the complete checkpoint stays."""
    _good_checkpoints(tmp_path, steps=(2,))
    others_failed = {"flag": True}
    other_rank = CheckpointSaver(tmp_path, rank=1, world_size=2, is_main=False, barrier=lambda: None, keep=2,
                                 any_failed=lambda flag: flag or others_failed["flag"])
    (tmp_path / "checkpoints" / "step-0000004.tmp").mkdir()
    with pytest.raises(UserError, match="another process failed"):
        other_rank.save(4, shared={}, per_rank={"data.json": {"pos": 4}})
    main = CheckpointSaver(tmp_path, rank=0, world_size=2, is_main=True, barrier=lambda: None, keep=2,
                           any_failed=lambda flag: flag or others_failed["flag"])
    with pytest.raises(UserError, match="another process failed"):
        main.save(4, shared={"state.json": {"step": 4}}, per_rank={})
    assert not (tmp_path / "checkpoints" / "step-0000004.tmp").exists()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    verify_checkpoint(tmp_path / "checkpoints" / "step-0000002")


def test_stale_temporaries_of_any_step_are_removed(tmp_path):
    _good_checkpoints(tmp_path, steps=(2,))
    leftovers = [tmp_path / "checkpoints" / "step-0000009.tmp", tmp_path / ".config.tmp-99999.yaml",
                 tmp_path / "checkpoints" / "step-0000002" / ".state.tmp-123.json",
                 tmp_path / "samples" / ".grid.tmp-5.png"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half")
    for path in leftovers[1:]:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(map(str, removed)) == sorted(map(str, leftovers))
    assert not any(p.exists() for p in leftovers)
    verify_checkpoint(tmp_path / "checkpoints" / "step-0000002")  # the complete checkpoint is untouched
