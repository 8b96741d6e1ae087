"""Shard writing, index validation and the bundled datasets (data.shards, data.bundled)."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import bundled
from data.bundled import load_digits_images, load_photo_crops, materialize_shards
from data.shards import make_shards_from_path, read_index, write_shards
from trainer.errors import UserError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    return materialize_shards("digits", 16, tmp_path_factory.mktemp("cache"))


def _tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_digits_shards_and_index_are_consistent(digits_dir):
    index = json.loads((digits_dir / "index.json").read_text())
    assert index["num_samples"] == 1797 and index["size"] == 16 and index["format"] == "png"
    assert index["has_labels"] is True
    assert [s["num_samples"] for s in index["shards"]] == [128] * 14 + [1797 - 14 * 128]
    keys = []
    for entry in index["shards"]:
        shard = digits_dir / entry["name"]
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == entry["sha256"]
        names = _tar_names(shard)
        shard_keys = sorted({name.split(".", 1)[0] for name in names})
        assert len(shard_keys) == entry["num_samples"]
        assert {name.split(".", 1)[1] for name in names} == {"png", "cls"}
        keys += shard_keys
    assert len(set(keys)) == 1797
    assert all("." not in key and key.isdigit() for key in keys)
    assert sorted(p.name for p in digits_dir.iterdir()) == sorted([s["name"] for s in index["shards"]] + ["index.json"])


def test_digit_labels_and_pixels_survive_the_round_trip(digits_dir):
    images, labels = load_digits_images(16)
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 2]).all() and images.max() == 255 and images.min() == 0
    with tarfile.open(digits_dir / "shard-000001.tar") as tar:
        png = tar.extractfile("000000130.png").read()
        cls = tar.extractfile("000000130.cls").read()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), images[130])
    assert int(cls) == labels[130]


def test_materialize_reuses_existing_set(digits_dir):
    before = (digits_dir / "index.json").stat().st_mtime_ns
    assert materialize_shards("digits", 16, digits_dir.parent) == digits_dir
    assert (digits_dir / "index.json").stat().st_mtime_ns == before


def test_materialize_race_loser_uses_winner(tmp_path, monkeypatch):
    """Another process finishes first while we build: our rename fails, we return its folder."""
    real_write = bundled.write_bundled_shards
    winner = {}

    def write_then_lose(name, size, output, **kw):
        real_write(name, size, output, **kw)
        monkeypatch.setattr(bundled, "write_bundled_shards", real_write)
        winner["dir"] = materialize_shards(name, size, tmp_path, **kw)  # the "other process"
        winner["mtime"] = (winner["dir"] / "index.json").stat().st_mtime_ns

    monkeypatch.setattr(bundled, "write_bundled_shards", write_then_lose)
    result = materialize_shards("digits", 8, tmp_path, count=200)
    assert result == winner["dir"] and (result / "index.json").stat().st_mtime_ns == winner["mtime"]
    assert [p.name for p in tmp_path.iterdir()] == [result.name]  # our temporary copy is gone
    assert read_index(result)["num_samples"] == 200


def test_photo_crops_are_deterministic_color_crops():
    a = load_photo_crops(64, count=6, seed=1)
    assert a.shape == (6, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, load_photo_crops(64, count=6, seed=1))
    assert not np.array_equal(a, load_photo_crops(64, count=6, seed=2))
    assert np.abs(a[..., 0].astype(int) - a[..., 2].astype(int)).mean() > 5  # colour, not gray


def _save_images(folder: Path, sizes: list[tuple[int, int]]) -> None:
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_undecodable_images_are_skipped_and_counted(tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    _save_images(source, [(40, 30), (30, 30), (64, 20)])
    _save_images(source / "sub", [(33, 50)])
    (source / "broken.png").write_bytes(b"not an image at all")
    (source / "sub" / "cut.jpg").write_bytes((source / "img0.png").read_bytes()[:60])
    (source / "notes.txt").write_text("ignored")
    summary = make_shards_from_path(source, tmp_path / "out", 16, samples_per_shard=3)
    assert summary["samples"] == 4 and summary["skipped"] == 2 and summary["shards"] == 2
    index = read_index(tmp_path / "out", verify_sha256=True)
    assert index["has_labels"] is False and index["size"] == 16
    assert set(_tar_names(tmp_path / "out" / "shard-000001.tar")) == {"000000003.png", "000000003.json"}


def test_jpeg_quality_and_overwrite(tmp_path):
    out = tmp_path / "out"
    samples = [(f"{i:09d}", np.full((8, 8, 3), i, np.uint8)) for i in range(5)]
    write_shards(samples, out, size=8, samples_per_shard=2)
    assert len(read_index(out)["shards"]) == 3
    with pytest.raises(UserError, match="--overwrite"):
        write_shards(samples, out, size=8, samples_per_shard=2)
    index = write_shards(samples, out, size=8, samples_per_shard=5, quality=90, overwrite=True)
    assert index["format"] == "jpg" and [s["name"] for s in index["shards"]] == ["shard-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.tar"]  # old shards gone
    assert _tar_names(out / "shard-000000.tar")[0] == "000000000.jpg"


def test_failed_write_leaves_nothing(tmp_path):
    def samples():
        yield "000000000", np.zeros((8, 8, 3), np.uint8)
        yield "000000001", np.zeros((8, 8, 3), np.uint8)
        raise UserError("boom")

    with pytest.raises(UserError, match="boom"):
        write_shards(samples(), tmp_path / "a" / "out", size=8, samples_per_shard=1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="contain no"):
        write_shards([("a.b", np.zeros((8, 8, 3), np.uint8))], tmp_path / "out", size=8)
    assert list(tmp_path.iterdir()) == []


def test_read_index_errors_name_the_file(tmp_path, digits_dir):
    with pytest.raises(UserError, match=str(tmp_path / "index.json")):
        read_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_index(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(digits_dir, copy)
    (copy / "shard-000003.tar").unlink()
    with pytest.raises(UserError, match="shard-000003.tar"):
        read_index(copy)
    index = json.loads((digits_dir / "index.json").read_text())
    del index["size"]
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="'size'"):
        read_index(copy)


def test_zip_input_is_read_in_name_order(tmp_path):
    import zipfile

    _save_images(tmp_path, [(20, 20), (24, 20), (20, 30)])
    with zipfile.ZipFile(tmp_path / "faces.zip", "w") as archive:
        archive.writestr("faces/", "")
        for i in (2, 0, 1):
            archive.write(tmp_path / f"img{i}.png", f"faces/img{i}.png")
        archive.writestr("__MACOSX/faces/._img0.png", b"resource fork")
    summary = make_shards_from_path(tmp_path / "faces.zip", tmp_path / "out", 16)
    assert summary["samples"] == 3 and summary["skipped"] == 0
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = [json.loads(tar.extractfile(f"{i:09d}.json").read())["name"] for i in range(3)]
    assert names == ["faces/img0.png", "faces/img1.png", "faces/img2.png"]
