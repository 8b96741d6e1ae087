"""TrainStream / EvalStream over real digits shards, and the 2-D toy distributions."""
from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from data.bundled import materialize_shards
from data.stream import EvalStream, TooManySkippedError, TrainStream
from data.toy2d import Gaussians25, SwissRoll, ToyStream
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ALL_KEYS = {f"{i:09d}" for i in range(1797)}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return materialize_shards("digits", 8, tmp_path_factory.mktemp("cache"))


def make_stream(shards, **overrides) -> TrainStream:
    options = dict(batch_size=64, seed=7, rank=0, world_size=1, num_workers=2, image_size=8, hflip=True)
    options.update(overrides)
    return TrainStream(shards, **options)


def take(stream: TrainStream, n: int) -> list[dict]:
    batches = iter(stream)
    out = list(itertools.islice(batches, n))
    batches.close()  # stops the workers; the stream's state stays at what we received
    return out


@pytest.mark.slow
def test_two_ranks_two_workers_under_torchrun_read_every_key_once(digits, tmp_path):
    out = tmp_path / "keys.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "helpers" / "stream_worker_keys.py"), str(digits), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    gathered = json.loads(out.read_text())
    assert [g["rank"] for g in gathered] == [0, 1] and gathered[0]["pid"] != gathered[1]["pid"]
    keys = [key for g in gathered for key in g["keys"]]
    assert len(keys) == len(set(keys)) == 1797
    assert set(keys) == ALL_KEYS
    assert all(g["seen"] == len(g["keys"]) > 0 for g in gathered)


def test_each_epoch_covers_all_keys_in_a_new_order(digits):
    stream = make_stream(digits, num_workers=0, batch_size=100, epochs=2)
    keys = [key for batch in stream for key in batch["key"]]
    first, second = keys[:1797], keys[1797:]
    assert set(first) == set(second) == ALL_KEYS and len(second) == 1797
    assert first != second


@pytest.mark.parametrize("workers,k,more", [(2, 3, 4), (2, 31, 6), (0, 5, 3)])
def test_resume_continues_exactly(digits, workers, k, more):
    """(2, 31, 6) crosses an epoch boundary on both workers (about 14 batches per worker epoch)."""
    reference = take(make_stream(digits, num_workers=workers), k + more)
    first = make_stream(digits, num_workers=workers)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches"] == k and first.seen_samples == 64 * k
    resumed = make_stream(digits, num_workers=workers)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[k:], take(resumed, more), strict=True):
        assert expected["key"] == got["key"]
        assert torch.equal(expected["image"], got["image"])
        assert torch.equal(expected["label"], got["label"])
    assert resumed.state_dict()["batches"] == k + more


def test_state_counts_only_what_the_caller_received(digits):
    stream = make_stream(digits)
    (batch,) = take(stream, 1)
    state = stream.state_dict()
    assert state["workers"] == [{"epoch": 0, "cursor": 64}, {"epoch": 0, "cursor": 0}]
    assert state["next_worker"] == 1 and state["batches"] == 1
    assert batch["image"].shape == (64, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["label"].dtype == torch.long


def test_resume_with_other_layout_is_a_user_error(digits):
    stream = make_stream(digits)
    take(stream, 1)
    with pytest.raises(UserError, match="num_workers=2.*num_workers=1"):
        make_stream(digits, num_workers=1).load_state_dict(stream.state_dict())
    with pytest.raises(UserError, match="world_size"):
        make_stream(digits, world_size=2).load_state_dict(stream.state_dict())


def test_hflip_is_deterministic_and_flips_some(digits):
    plain = take(make_stream(digits, num_workers=0, hflip=False), 2)
    flipped = take(make_stream(digits, num_workers=0), 2)
    again = take(make_stream(digits, num_workers=0), 2)
    flips = 0
    for a, b, c in zip(plain, flipped, again):
        assert a["key"] == b["key"] and torch.equal(b["image"], c["image"])
        for x, y in zip(a["image"], b["image"]):
            same, mirrored = torch.equal(x, y), torch.equal(x.flip(-1), y)
            assert same or mirrored
            flips += mirrored and not same
    assert 30 < flips < 98


def _corrupt_copy(digits: Path, target: Path) -> str:
    """Copy the shards; cut shard 3 in the middle of a member; garble one PNG in shard 5."""
    shutil.copytree(digits, target)
    shard3 = target / "shard-000003.tar"
    shard3.write_bytes(shard3.read_bytes()[: shard3.stat().st_size // 2 + 700])
    shard5 = target / "shard-000005.tar"
    bad_key = f"{5 * 128 + 17:09d}"
    rewritten = target / "rewritten.tar"
    with tarfile.open(shard5) as src, tarfile.open(rewritten, "w") as dst:
        for member in src:
            payload = src.extractfile(member).read()
            if member.name == f"{bad_key}.png":
                payload = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
                member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    rewritten.replace(shard5)
    return bad_key


def test_truncated_shard_and_corrupt_sample_are_skipped_and_counted(digits, tmp_path, caplog):
    broken = tmp_path / "broken"
    bad_key = _corrupt_copy(digits, broken)
    stream = make_stream(broken, epochs=1, max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        keys = [key for batch in stream for key in batch["key"]]
    lost = ALL_KEYS - set(keys)
    assert len(keys) == len(set(keys)) and bad_key in lost
    assert 50 < len(lost) < 70  # the corrupt sample and the second half of shard 3
    assert all(384 <= int(key) < 512 for key in lost - {bad_key})
    assert stream.skipped_samples == len(lost) and stream.seen_samples == 1797
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "shard-000003.tar" in messages and bad_key in messages

    strict = make_stream(broken, epochs=1)  # default max_skip_fraction=0.01 < 60/1797
    with pytest.raises(TooManySkippedError, match="max_skip_fraction=0.01"):
        for _ in strict:
            pass


def test_bad_layouts_are_user_errors(digits):
    with pytest.raises(UserError, match=r"15 shards.*4 x 4 = 16"):
        make_stream(digits, world_size=4, num_workers=4)
    with pytest.raises(UserError, match="8x8 but image_size is 32"):
        make_stream(digits, image_size=32)


def test_eval_stream_reads_each_sample_once_in_order(digits):
    per_rank = []
    for rank in range(3):
        stream = EvalStream(digits, batch_size=100, rank=rank, world_size=3, image_size=8)
        batches = list(stream)
        assert len(batches) == len(stream) and all(len(b["key"]) == 100 for b in batches[:-1])
        per_rank.append([key for b in batches for key in b["key"]])
    for rank, keys in enumerate(per_rank):
        expected = [f"{i:09d}" for shard in range(rank, 15, 3) for i in range(shard * 128, min(shard * 128 + 128, 1797))]
        assert keys == expected
    assert sorted(k for keys in per_rank for k in keys) == sorted(ALL_KEYS)


def test_25_gaussians_density_integrates_to_one_and_samples_match():
    mixture = Gaussians25(spacing=1.0)
    step = 0.02  # a quarter of the component std: the midpoint rule is then very accurate
    axis = torch.arange(-3.0, 3.0, step, dtype=torch.float64) + step / 2
    grid = torch.cartesian_prod(axis, axis)
    mass = mixture.log_prob(grid).exp().sum().item() * step * step
    assert abs(mass - 1.0) < 1e-3
    x = mixture.sample(25_000, torch.Generator().manual_seed(0)).double()
    nearest = torch.cdist(x, mixture.means).argmin(dim=1)
    residual = x - mixture.means[nearest]
    assert abs(residual.std().item() - 0.084) < 0.003
    assert torch.bincount(nearest, minlength=25).min() > 850  # every mode is used, about equally
    far = torch.tensor([[10.0, 10.0]])
    assert mixture.log_prob(far).item() < -1000 and math.isfinite(mixture.log_prob(far).item())


def test_toy_stream_resumes_exactly_and_ranks_differ():
    roll = SwissRoll()
    stream = ToyStream(roll, batch_size=16, seed=1, rank=0, world_size=2)
    reference = list(itertools.islice(iter(stream), 5))
    assert reference[0]["x"].shape == (16, 2) and stream.state_dict()["batches"] == 5
    resumed = ToyStream(roll, batch_size=16, seed=1, rank=0, world_size=2)
    resumed.load_state_dict({**stream.state_dict(), "batches": 3})
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(reference[3:], itertools.islice(iter(resumed), 2)))
    other_rank = ToyStream(roll, batch_size=16, seed=1, rank=1, world_size=2)
    assert not torch.equal(next(iter(other_rank))["x"], reference[0]["x"])


def test_global_split_gives_every_rank_its_rows_of_the_same_global_batches(digits):
    """split=global: rank r's batch b is rows [r·B, (r+1)·B) of batch b of a 1-process stream with the
    global batch size, whatever the number of processes (workers, shuffle and flips included)."""
    reference = take(make_stream(digits, batch_size=48, split="global"), 5)
    assert [b["key"] for b in reference] == [b["key"] for b in take(make_stream(digits, batch_size=48), 5)]
    per_rank = [take(make_stream(digits, batch_size=16, rank=r, world_size=3, split="global"), 5) for r in range(3)]
    for b, expected in enumerate(reference):
        parts = [per_rank[r][b] for r in range(3)]
        assert sum((p["key"] for p in parts), []) == expected["key"]
        assert torch.equal(torch.cat([p["image"] for p in parts]), expected["image"])
        assert torch.equal(torch.cat([p["label"] for p in parts]), expected["label"])
    shards_mode = take(make_stream(digits, batch_size=16, rank=1, world_size=3), 1)[0]
    assert shards_mode["key"] != per_rank[1][0]["key"]  # the default splits the shards instead


def test_global_split_resumes_exactly_and_checks_the_split(digits):
    options = dict(batch_size=16, rank=1, world_size=2, split="global")
    reference = take(make_stream(digits, **options), 7)
    first = make_stream(digits, **options)
    take(first, 4)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_stream(digits, **options)
    resumed.load_state_dict(state)
    assert [b["key"] for b in take(resumed, 3)] == [b["key"] for b in reference[4:]]
    with pytest.raises(UserError, match="split=global, this run has split=shards"):
        make_stream(digits, batch_size=16, rank=1, world_size=2).load_state_dict(state)
    # Only the workers read shards: 15 shards serve 8 workers on any number of processes.
    make_stream(digits, world_size=4, num_workers=8, split="global")
    with pytest.raises(UserError, match="split must be one of"):
        make_stream(digits, split="interleaved")


def test_global_split_last_partial_batch_is_cut_the_same_way(digits):
    """A finite stream: every rank yields the same number of batches, the rows of each global batch."""
    batches = [list(make_stream(digits, num_workers=0, batch_size=500, rank=r, world_size=2, epochs=1, split="global"))
               for r in range(2)]
    # 1797 = 1000 + 797: rank 0 gets 500 + 500, rank 1 gets 500 + 297.
    assert [[len(b["key"]) for b in mine] for mine in batches] == [[500, 500], [500, 297]]
    assert {k for mine in batches for b in mine for k in b["key"]} == ALL_KEYS


def _decompression_bomb() -> bytes:
    """A 12,000 × 12,000 PNG of about 140 KB: 144 M pixels once decoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (12000, 12000), 0).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_an_oversized_image_in_a_shard_is_skipped_without_being_decoded(digits, tmp_path, monkeypatch):
    """The stream reads a sample's header first and decodes only an image of the shards' S × S: a
    decompression bomb is skipped and counted like any undecodable sample, never decoded."""
    from PIL import ImageFile

    bombed = tmp_path / "bombed"
    shutil.copytree(digits, bombed)
    bomb_key, bomb = f"{17:09d}", _decompression_bomb()
    shard = bombed / "shard-000000.tar"
    rewritten = bombed / "rewritten.tar"
    with tarfile.open(shard) as src, tarfile.open(rewritten, "w") as dst:
        for member in src:
            payload = src.extractfile(member).read()
            if member.name == f"{bomb_key}.png":
                payload, member.size = bomb, len(bomb)
            dst.addfile(member, io.BytesIO(payload))
    rewritten.replace(shard)
    decoded = []
    original_load = ImageFile.ImageFile.load

    def recording_load(image):
        decoded.append(image.size[0] * image.size[1])
        return original_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    stream = make_stream(bombed, epochs=1, num_workers=0, max_skip_fraction=0.5)
    keys = [key for batch in stream for key in batch["key"]]
    assert bomb_key not in keys and len(keys) == 1796 and stream.skipped_samples == 1
    assert decoded and max(decoded) == 8 * 8
