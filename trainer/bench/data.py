"""Data-path throughput: TrainStream against a bare tarfile + PIL loop over the same shards.

    python scripts/bench.py data --shards OUT        (shards from e.g. `make_shards.py --dataset photo-crops --size 256`)

`stream_img_per_s`: TrainStream with one DataLoader worker, shuffle, decode, flips and the
[B, 3, S, S] float conversion included. `bare_img_per_s`: one plain loop in this process that reads
the same tar files with `tarfile`, decodes with PIL and makes a [3, S, S] float tensor in [-1, 1].
The two alternate over several rounds (same total time each) so that machine noise hits both;
`ratio` = stream / bare. Worker start-up and the shuffle buffer's first fill are not timed.
"""
from __future__ import annotations

import io
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.shards import read_index
from data.stream import TrainStream


def _time_stream(shards: Path, size: int, batch_size: int, seconds: float, seed: int) -> tuple[int, float]:
    stream = TrainStream(shards, batch_size=batch_size, seed=seed, rank=0, world_size=1, num_workers=1,
                         image_size=size, hflip=True)
    batches = iter(stream)
    for _ in range(3):  # worker start-up, first shuffle-buffer fill, first touch of buffers: not steady state
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["key"])
    elapsed = time.perf_counter() - start
    batches.close()  # stop the worker now, so it does not compete with the bare loop
    return count, elapsed


def _time_bare(index: dict, seconds: float) -> tuple[int, float]:
    root, suffix = Path(index["root"]), "." + index["format"]
    count, start = 0, time.perf_counter()
    while True:
        for shard in index["shards"]:
            with tarfile.open(root / shard["name"], "r|") as tar:
                for member in tar:
                    if not member.name.endswith(suffix):
                        continue
                    image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                    pixels = np.asarray(image)  # read-only view: fine, the float conversion copies
                    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
                    assert tensor.shape[0] == 3
                    count += 1
                    if time.perf_counter() - start >= seconds:
                        return count, time.perf_counter() - start


def bench_data(shards: Path, size: int | None = None, seconds: float = 20.0, batch_size: int = 32,
               rounds: int = 4) -> dict:
    """Measure stream vs bare images/s over `seconds` in total, alternating `rounds` times."""
    index = read_index(Path(shards))
    size = size or index["size"]
    # One intra-op thread here, as in the DataLoader worker: on a shared machine extra threads
    # make the tiny per-image float conversion of the bare loop up to 50x slower (oversubscription).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # the bare loop wraps PIL's read-only buffer on purpose
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return _bench(shards, index, size, seconds, batch_size, rounds)
    finally:
        torch.set_num_threads(threads)


def _bench(shards: Path, index: dict, size: int, seconds: float, batch_size: int, rounds: int) -> dict:
    totals = {"stream": [0, 0.0], "bare": [0, 0.0]}
    per_turn = seconds / (2 * rounds)
    for r in range(rounds):
        # Alternate which goes first, so neither always runs on a cold (or warm) machine.
        order = ("stream", "bare") if r % 2 == 0 else ("bare", "stream")
        for kind in order:
            if kind == "stream":
                n, t = _time_stream(Path(shards), size, batch_size, per_turn, seed=r)
            else:
                n, t = _time_bare(index, per_turn)
            totals[kind][0] += n
            totals[kind][1] += t
    stream_rate = totals["stream"][0] / totals["stream"][1]
    bare_rate = totals["bare"][0] / totals["bare"][1]
    return {"stream_img_per_s": round(stream_rate, 1), "bare_img_per_s": round(bare_rate, 1),
            "ratio": round(stream_rate / bare_rate, 3), "size": size, "format": index["format"],
            "batch_size": batch_size, "rounds": rounds, "seconds": seconds,
            "torch_threads": torch.get_num_threads()}
