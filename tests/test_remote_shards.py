"""Shards beyond a local folder (data.sources): webdataset reads ours, HTTP on loopback, pipe: commands,
the shard cache, and shards that vanish or break off mid-read."""
from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import FAST, run_script
from helpers.http_shards import ShardServer
from PIL import Image
from safetensors.torch import load_file
from test_stream import make_stream, take  # the same stream settings as the folder tests

from data.bundled import materialize_shards
from data.shards import write_shards
from data.sources import ShardLocation, shard_location
from data.stream import EvalStream
from trainer.errors import UserError
from trainer.run.checkpoint import latest_checkpoint, read_torch

ALL_KEYS = {f"{i:09d}" for i in range(1797)}
SHARDS = 15  # digits: 14 shards of 128 and one of 5
pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http:// with curl")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(folder holding digits-8/, a running ShardServer over it)."""
    root = tmp_path_factory.mktemp("www")
    materialize_shards("digits", 8, root)
    with ShardServer(root) as server:
        yield root, server


def assert_same_batches(expected: list[dict], got: list[dict]) -> None:
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_make_shards_output_reads_back_with_plain_webdataset(tmp_path):
    """scripts/make_shards.py writes through webdataset's TarWriter; a plain WebDataset pipeline reads it."""
    source = tmp_path / "images"
    source.mkdir()
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(source / f"img{i}.png")
    out = tmp_path / "out"
    run_script("make_shards.py", "--input", str(source), "--output", str(out), "--size", "16",
               "--samples-per-shard", "3")
    index = json.loads((out / "index.json").read_text())
    urls = str(out / "shard-{000000..000002}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(7)]
    assert [s["json"]["name"] for s in samples] == [f"img{i}.png" for i in range(7)]
    ours = next(iter(EvalStream(out, batch_size=7, rank=0, world_size=1, image_size=16)))
    theirs = torch.from_numpy(np.stack([s["png"] for s in samples])).permute(0, 3, 1, 2)
    assert torch.equal(((ours["image"] + 1) * 127.5).round().to(torch.uint8), theirs)
    assert len(index["shards"]) == 3 and index["num_samples"] == 7


def test_writer_is_deterministic_with_fixed_member_metadata(tmp_path):
    """The same samples give byte-identical shards; members keep the order image, .cls, .json."""
    rng = np.random.default_rng(1)
    samples = [(f"{i:09d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), {"cls": i % 3, "name": f"n{i}"})
               for i in range(5)]
    first, second = write_shards(samples, tmp_path / "a", size=8), write_shards(samples, tmp_path / "b", size=8)
    assert first["shards"] == second["shards"]
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.png", "000000000.cls", "000000000.json"]
    assert {(m.mtime, m.mode, m.uname, m.gname, m.uid, m.gid) for m in members} == {(0, 0o644, "", "", 0, 0)}


def test_labelled_shards_read_back_with_plain_webdataset(served):
    root, _ = served
    urls = str(root / "digits-8" / "shard-{000000..000014}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    ours = list(EvalStream(root / "digits-8", batch_size=1797, rank=0, world_size=1, image_size=8))[0]
    assert [s["__key__"] for s in samples] == ours["key"]
    assert [s["cls"] for s in samples] == ours["label"].tolist()


def test_http_prefix_streams_and_resumes_exactly_as_the_folder(served):
    root, server = served
    folder, url = root / "digits-8", server.url("digits-8/")
    reference = take(make_stream(folder), 20)
    remote = make_stream(url)
    assert_same_batches(reference[:12], take(remote, 12))
    resumed = make_stream(folder)  # the state holds positions only: it moves between locations
    resumed.load_state_dict(json.loads(json.dumps(remote.state_dict())))
    assert_same_batches(reference[12:], take(resumed, 8))
    assert server.requests["/digits-8/index.json"] >= 1 and server.requests["/digits-8/shard-000000.tar"] >= 1
    evaluated = list(EvalStream(url + "index.json", batch_size=500, rank=1, world_size=2, image_size=8))
    expected = list(EvalStream(folder, batch_size=500, rank=1, world_size=2, image_size=8))
    assert_same_batches(expected, evaluated)


def test_pipe_command_pattern_with_index(served, tmp_path, caplog):
    root, server = served
    folder = root / "digits-8"
    location = shard_location(f"pipe:cat {folder}/shard-{{000000..000014}}.tar", str(folder / "index.json"))
    assert isinstance(location, ShardLocation)
    expected = list(EvalStream(folder, batch_size=400, rank=0, world_size=1, image_size=8))
    assert_same_batches(expected, list(EvalStream(location, batch_size=400, rank=0, world_size=1, image_size=8)))
    stream = make_stream(location, epochs=1, num_workers=2)
    keys = [key for batch in stream for key in batch["key"]]
    assert sorted(keys) == sorted(ALL_KEYS) and stream.skipped_samples == 0
    # A command that fails for one shard: its samples are skipped, counted and named by the index entry.
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "shard-000003.tar").unlink()
    failing = ShardLocation(f"pipe:cat {copy}/shard-{{000000..000014}}.tar 2>/dev/null", str(copy / "index.json"))
    stream = make_stream(failing, epochs=1, num_workers=0, max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        keys = [key for batch in stream for key in batch["key"]]
    assert ALL_KEYS - set(keys) == {f"{i:09d}" for i in range(384, 512)} and stream.skipped_samples == 128
    assert "shard-000003.tar: unreadable after 0 of 128" in caplog.text
    # An http index with http shards named by a pattern.
    pattern = ShardLocation(server.url("digits-8/shard-{000000..000014}.tar"), server.url("digits-8/index.json"))
    assert_same_batches(expected, list(EvalStream(pattern, batch_size=400, rank=0, world_size=1, image_size=8)))


def test_bad_locations_are_user_errors(served, tmp_path):
    root, server = served
    folder = root / "digits-8"
    with pytest.raises(UserError, match="set data.index"):
        make_stream(f"pipe:cat {folder}/shard-{{000000..000014}}.tar")
    with pytest.raises(UserError, match="expands to 14 URLs but .* lists 15 shards"):
        make_stream(ShardLocation(f"pipe:cat {folder}/shard-{{000000..000013}}.tar", str(folder / "index.json")))
    with pytest.raises(UserError, match="does not contain 'shard-000000.tar'"):
        make_stream(ShardLocation(f"pipe:cat {folder}/shard-{{000001..000015}}.tar", str(folder / "index.json")))
    with pytest.raises(UserError, match="index .*nowhere/index.json could not be read"):
        make_stream(server.url("nowhere/"))
    with pytest.raises(UserError, match="no handler for s3://.*pipe:"):
        make_stream("s3://bucket/chq256/")
    (tmp_path / "index.json").write_text("{}")
    with pytest.raises(UserError, match="missing or invalid field 'num_samples'"):
        make_stream(ShardLocation(f"pipe:cat {folder}/shard-000000.tar", f"pipe:cat {tmp_path}/index.json"))


def test_missing_curl_is_a_user_error(served, monkeypatch):
    _, server = served
    monkeypatch.setattr("data.sources.shutil.which", lambda name: None)
    with pytest.raises(UserError, match="opens http:// URLs with curl, which is not installed"):
        make_stream(server.url("digits-8/"))


def test_remote_shard_set_as_fid_reference_reads_the_folder_images(served, tmp_path):
    """In-training FID's default reference is the training data, wherever it lives."""
    from trainer.metrics.image_sets import open_image_set

    root, server = served
    folder = open_image_set(root / "digits-8", max_images=300)
    remote = open_image_set(shard_location(server.url("digits-8/"), cache_dir=str(tmp_path)), max_images=300)
    assert remote.identity() == folder.identity()  # same content, same cached reference statistics
    assert all(torch.equal(a, b) for a, b in zip(folder.batches(128), remote.batches(128), strict=True))
    assert len(list(tmp_path.iterdir())) == 3  # 300 images: the first three shards were fetched


def test_cache_fetches_each_shard_once_and_checks_its_digest(served, tmp_path):
    root, server = served
    index = json.loads((root / "digits-8" / "index.json").read_text())
    cache = tmp_path / "cache"
    before = dict(server.requests)
    stream = make_stream(shard_location(server.url("digits-8/"), cache_dir=str(cache)), epochs=3, num_workers=2)
    keys = [key for batch in stream for key in batch["key"]]
    assert len(keys) == 3 * 1797 and set(keys) == ALL_KEYS and stream.skipped_samples == 0
    for entry in index["shards"]:  # three epochs, one download each
        assert server.requests[f"/digits-8/{entry['name']}"] - before.get(f"/digits-8/{entry['name']}", 0) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{e['sha256']}.tar" for e in index["shards"])
    copy = cache / f"{index['shards'][4]['sha256']}.tar"
    assert copy.read_bytes() == (root / "digits-8" / "shard-000004.tar").read_bytes()

    # A download that does not match the index is deleted and its samples skipped; the next epoch fetches again.
    fresh = tmp_path / "fresh"
    server.faults["/digits-8/shard-000002.tar"] = ["garbled"]
    stream = make_stream(shard_location(server.url("digits-8/"), cache_dir=str(fresh)), num_workers=0, epochs=2,
                         max_skip_fraction=0.5, batch_size=100)
    keys = [key for batch in stream for key in batch["key"]]
    lost = {f"{i:09d}" for i in range(256, 384)}
    assert stream.skipped_samples == 128 and len(keys) == 2 * 1797 - 128
    assert all(keys.count(key) == 1 for key in lost) and set(keys) == ALL_KEYS
    assert sorted(p.name for p in fresh.iterdir()) == sorted(f"{e['sha256']}.tar" for e in index["shards"])


@pytest.mark.parametrize("workers", [0, 2])
def test_vanished_and_broken_shards_are_skipped_counted_and_retried(served, workers, caplog):
    """Epoch 0: shard 3 answers 404 and shard 5 breaks off halfway; epoch 1 reads both again."""
    _, server = served
    server.faults["/digits-8/shard-000003.tar"] = ["missing"]
    server.faults["/digits-8/shard-000005.tar"] = ["cut"]
    stream = make_stream(server.url("digits-8/"), num_workers=workers, epochs=2, max_skip_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="data.stream"):
        keys = [key for batch in stream for key in batch["key"]]
    once = {key for key in ALL_KEYS if keys.count(key) == 1}
    assert set(keys) == ALL_KEYS  # every sample came back in the second epoch
    assert {f"{i:09d}" for i in range(384, 512)} <= once  # all of shard 3 was lost in epoch 0
    cut = once - {f"{i:09d}" for i in range(384, 512)}
    assert cut and all(640 <= int(key) < 768 for key in cut) and f"{767:09d}" in cut  # the tail of shard 5
    assert stream.skipped_samples == len(once) and stream.seen_samples == 2 * 1797
    assert len(keys) == 2 * 1797 - len(once)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "shard-000003.tar: unreadable after 0 of 128" in messages and "shard-000005.tar" in messages
    assert not server.faults["/digits-8/shard-000003.tar"] and not server.faults["/digits-8/shard-000005.tar"]


def _final_state(run_dir: Path):
    checkpoint = latest_checkpoint(run_dir)
    return (load_file(str(checkpoint / "model.safetensors")), load_file(str(checkpoint / "ema.safetensors")),
            read_torch(checkpoint / "optimizer.pt")["state"])


@pytest.mark.slow
def test_nvae_trained_over_http_and_resumed_equals_the_folder_run(tmp_path):
    """CPU fp32: NVAE on digits from a folder (6 steps) and from HTTP on loopback (halted at step 3, then
    resumed, remote shards cached on disk) end with bit-identical weights, EMA and optimizer state."""
    www = tmp_path / "www"
    folder = materialize_shards("digits", 32, www)
    common = [*FAST, "train.max_steps=6", "train.checkpoint_every=100", "train.image_every=0", "data.num_workers=2"]
    run_script("train_nvae.py", "--config", "digits", "--run-dir", str(tmp_path / "folder"), "--data", str(folder),
               *common)
    with ShardServer(www) as server:
        remote = ["--config", "digits", "--run-dir", str(tmp_path / "http"), "--data", server.url(folder.name + "/"),
                  *common, f"data.shard_cache={tmp_path / 'cache'}"]
        run_script("train_nvae.py", *remote, "train.halt_at_step=3")
        assert latest_checkpoint(tmp_path / "http").name == "step-0000003"
        result = run_script("train_nvae.py", *remote)
    assert "resuming from step 3" in result.stderr
    assert server.requests[f"/{folder.name}/index.json"] >= 2
    assert all(count == 1 for path, count in server.requests.items() if path.endswith(".tar"))
    straight, resumed = _final_state(tmp_path / "folder"), _final_state(tmp_path / "http")
    for a, b in zip(straight[:2], resumed[:2]):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    for index in straight[2]:
        for name, value in straight[2][index].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed[2][index][name])), (index, name)
