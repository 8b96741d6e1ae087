"""Streaming readers over the tar shards written by `data.shards`, local or remote (`data.sources`).

`TrainStream`: infinite (or `epochs`-long), shuffled, exactly resumable training batches.
`EvalStream`: finite, ordered, each sample exactly once across ranks.

How `TrainStream` splits and orders data (W = DataLoader workers per rank, at least 1):
- global worker g = rank·W + w of G = world_size·W. In epoch e the shard list is permuted with a
  seed made of (seed, e); worker g reads the shards `perm_e[g::G]`. Within an epoch no sample is
  read twice across all ranks and workers.
- each worker shuffles its raw (still encoded) samples through a buffer seeded by (seed, e, g),
  decodes only after the shuffle, and flips horizontally when a hash of (seed, e, g, position) says
  so. Batches are made inside the worker; leftovers at an epoch end carry over into the next epoch.
- `split="global"` (world-size-invariant order): every rank runs the W workers of a 1-process
  stream (g = w, G = W) with the global batch size (batch_size × world_size) and keeps rows
  [rank·B, (rank+1)·B) of each global batch, so the sample order does not depend on the number of
  processes. Each rank reads and decodes the whole global batch (data cost × world_size): meant for
  equality checks and small runs; "shards" (the default) scales.
- a worker's position is (epoch, cursor): cursor counts the raw samples it has consumed in that
  epoch, skipped ones included. Every batch carries its worker id and the position right after it.
  The main process hands batch b out from worker b % W (per-worker queues undo the round-robin
  restart of a fresh DataLoader), and `state_dict()` records the positions of the batches actually
  handed out. A resumed worker replays its epoch on raw bytes (no decoding) up to its cursor.

Shards are opened by webdataset's openers and read by its tar iterators (`read_shard`); the order, the
split, the positions and the skip accounting above are ours (webdataset's own shuffles and resampling are
not reproducible across resumes).

Corrupt data: an undecodable sample, or the rest of a truncated/garbled shard, or of a shard that cannot
be opened or fails mid-read (a remote one that vanished or broke off: opened anew next epoch), is skipped and
counted (every shard always yields the number of samples its index entry promises, missing ones as
"skipped" placeholders, so positions stay exact). Counts reach the main process inside batches;
warnings are logged at a bounded rate (first 5, then every 100th) and never sleep. Beyond
`max_skip_fraction` of seen samples (after 200 seen) the stream raises `TooManySkippedError`.
"""
from __future__ import annotations

import collections
import hashlib
import io
import itertools
import logging
import os
import random
import signal
import tarfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from data.shards import DECODE_ERRORS
from data.sources import ShardLocation, error_message, open_shard, open_shard_set
from trainer.errors import UserError

log = logging.getLogger(__name__)

MIN_SEEN_FOR_SKIP_CHECK = 200
_MAX_PROBLEMS_PER_BATCH = 32
_BUFFER_SLOTS = 4  # per worker: DataLoader prefetch (2) + one being filled + one spare
STATE_VERSION = 1
SPLITS = ("shards", "global")  # how a TrainStream divides the data among processes (module docstring)


class TooManySkippedError(UserError):
    """More than `max_skip_fraction` of the samples read so far were unreadable."""


def derive_seed(*parts) -> int:
    """A 63-bit seed that is a pure function of `parts` (stable across processes and runs)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


# --------------------------------------------------------------------------------------------
# Raw samples: (key, image bytes or None, label or None, problem message or None)
# --------------------------------------------------------------------------------------------

def read_shard(path: str | Path, expected: int, image_ext: str, *, sha256: str | None = None,
               cache_dir: str | None = None, name: str | None = None) -> Iterator[tuple]:
    """Yield exactly `expected` raw samples from one shard, placeholders for unreadable ones.

    `path` is anything webdataset opens (a local path, a URL, a pipe: command; `data.sources`); with
    `cache_dir` and the shard's `sha256`, a remote shard is read from its verified local copy. `name` (the
    index entry's) names it in messages, default the last part of `path`. A shard that
    cannot be opened, ends early or is garbled loses only its own remaining samples: they come out as
    placeholders (image None); the first of them carries the message explaining why.
    """
    url = str(path)
    name = name or url.rstrip("/").rsplit("/", 1)[-1]
    produced, problem = 0, None
    stream = None
    try:
        stream = open_shard(url, sha256, cache_dir)
        # webdataset's tar iterators: members → {"__key__", "<ext>": bytes} per group of adjacent members.
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
            if produced == expected:
                break
            produced += 1
            key, label, problem_here = sample["__key__"], None, None
            image = sample.get(image_ext)
            if image is None:
                problem_here = f"{name}: sample {key} has no .{image_ext} member"
            if "cls" in sample:
                try:
                    label = int(sample["cls"])
                except ValueError:
                    image, problem_here = None, f"{name}: sample {key} has a bad .cls member"
            yield key, image, label, problem_here
    except (OSError, EOFError, tarfile.TarError, ValueError) as err:
        problem = (f"{name}: unreadable after {produced} of {expected} samples "
                   f"({type(err).__name__}: {error_message(err)})")
    finally:
        _close_quietly(stream)
    if produced < expected:
        problem = problem or f"{name}: ended after {produced} of {expected} samples"
        for i in range(produced, expected):
            yield f"{Path(name).stem}-missing{i}", None, None, problem if i == produced else None


def _close_quietly(stream) -> None:
    # A pipe or curl that we stop reading early may exit with a broken-pipe status; every sample read
    # so far was complete, and a real read failure was already reported by the reader.
    if stream is not None:
        try:
            stream.close()
        except (OSError, ValueError):
            pass


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `size` items; the order depends only on `rng`."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


def decode_image(payload: bytes, size: int) -> np.ndarray:
    """Encoded image → [size, size, 3] uint8 array. Raises on undecodable data or a wrong size."""
    image = Image.open(io.BytesIO(payload))
    if image.size != (size, size):
        raise ValueError(f"image is {image.size[0]}x{image.size[1]}, expected {size}x{size}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def to_float_images(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8 → [B, 3, H, W] float32 in [-1, 1], as a new tensor."""
    out = torch.empty(pixels.shape, dtype=torch.float32)
    out.copy_(pixels)
    return out.div_(127.5).sub_(1.0)


def _stack_chw(images: list[np.ndarray]) -> torch.Tensor:
    """B arrays [S, S, 3] uint8 → ByteTensor [B, 3, S, S]."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))


def _batch(pixels: torch.Tensor, labels: list, keys: list) -> dict:
    """{"pixels": ByteTensor [B, 3, S, S], "label": LongTensor [B] if labelled, "key": list[str]}."""
    batch = {"pixels": pixels, "key": keys}
    if labels and labels[0] is not None:
        batch["label"] = torch.tensor(labels, dtype=torch.long)
    return batch


def _finish_batch(batch: dict) -> dict:
    """{"pixels", ...} → {"image": FloatTensor [B, 3, S, S] in [-1, 1], "label"?, "key"}."""
    out = {"image": to_float_images(batch.pop("pixels"))}
    out.update(batch)
    return out


class _PixelBuffers:
    """A ring of reusable uint8 batch buffers [B, 3, S, S], in shared memory inside a worker.

    Why: workers hand over uint8 pixels (a float batch is 4x larger) and the main process converts
    them. Fresh memory for every batch made the hand-over cost more than decoding (page faults on
    new shared memory in the worker and again in the main process: 256x256 ran at ~95 images/s
    with one worker against ~160 in-process). So batch n of worker w reuses buffer n % slots, once
    the main process has copied batch n - slots out of it, which it reports by advancing the
    shared counter `released[w]`. The main process reads batches in DataLoader order, so the one
    a worker waits for was always received earlier: no deadlock.
    """

    def __init__(self, slots: int, shape: tuple, shared: bool, released: torch.Tensor, worker: int):
        self.buffers = [torch.empty(shape, dtype=torch.uint8) for _ in range(slots)]
        if shared:
            for buffer in self.buffers:
                buffer.share_memory_()
        self.released, self.worker, self.count = released, worker, 0
        self.parent = os.getppid()

    def next(self) -> torch.Tensor:
        """The buffer for this worker's next batch (waits until the main process freed it)."""
        while int(self.released[self.worker]) < self.count - len(self.buffers) + 1:
            if os.getppid() != self.parent:  # main process gone: do not wait forever
                raise RuntimeError("data worker: the main process exited")
            time.sleep(0.0005)
        buffer = self.buffers[self.count % len(self.buffers)]
        self.count += 1
        return buffer


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------

class _WorkerBatches(IterableDataset):
    """Runs inside each DataLoader worker (or in-process when num_workers=0): yields batches
    tagged with `_worker`, the position after the batch, and seen/skipped counts, then one
    `_end` marker when the worker's epochs are exhausted."""

    def __init__(self, shards: list[dict], cache_dir: str | None, image_ext: str, image_size: int, batch_size: int,
                 seed: int, rank: int, world_size: int, workers: int, hflip: bool, epochs: int | None,
                 shuffle_buffer: int, start: list[tuple[int, int]], released: torch.Tensor):
        self.shards, self.cache_dir, self.image_ext = shards, cache_dir, image_ext
        self.image_size, self.batch_size, self.seed = image_size, batch_size, seed
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.hflip, self.epochs, self.shuffle_buffer, self.start = hflip, epochs, shuffle_buffer, start
        self.released = released  # shared [W] int64: batches of each worker the main process copied out

    def epoch_items(self, epoch: int, g: int) -> tuple[int, Iterator[tuple]]:
        """(number of raw samples, shuffled raw samples) of global worker g in `epoch`."""
        order = list(range(len(self.shards)))
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        mine = [self.shards[i] for i in order[g::self.world_size * self.workers]]
        raw = itertools.chain.from_iterable(
            read_shard(s["url"], s["num_samples"], self.image_ext, sha256=s["sha256"], cache_dir=self.cache_dir,
                       name=s["name"]) for s in mine)
        rng = random.Random(derive_seed(self.seed, "buffer", epoch, g))
        return sum(s["num_samples"] for s in mine), buffer_shuffle(raw, self.shuffle_buffer, rng)

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        assert info is None or info.num_workers == self.workers, "built for a different worker count"
        g = self.rank * self.workers + w
        size = self.image_size
        buffers = _PixelBuffers(_BUFFER_SLOTS, (self.batch_size, 3, size, size), shared=info is not None,
                                released=self.released, worker=w)
        epoch, cursor = self.start[w]
        pixels, labels, keys, problems = None, [], [], []
        seen = skipped = 0

        def tagged(batch: dict, position: tuple[int, int]) -> dict:
            batch.update(_worker=w, _epoch=position[0], _cursor=position[1],
                         _seen=seen, _skipped=skipped, _problems=problems)
            return batch

        while self.epochs is None or epoch < self.epochs:
            length, items = self.epoch_items(epoch, g)
            for position, (key, payload, label, problem) in enumerate(items, start=1):
                if position <= cursor:
                    continue  # resuming: replay the shuffle on raw bytes, decode nothing
                seen += 1
                image = None
                if payload is not None:
                    try:
                        image = decode_image(payload, size)
                    except DECODE_ERRORS as err:
                        problem = f"sample {key}: undecodable ({type(err).__name__}: {err})"
                if image is None:
                    skipped += 1
                    if problem and len(problems) < _MAX_PROBLEMS_PER_BATCH:
                        problems.append(problem)
                    continue
                if self.hflip and derive_seed(self.seed, "flip", epoch, g, position) & 1:
                    image = image[:, ::-1]
                if pixels is None:
                    pixels = buffers.next()
                pixels.numpy()[len(keys)] = image.transpose(2, 0, 1)  # HWC → CHW here, off the main process
                labels.append(label)
                keys.append(key)
                if len(keys) == self.batch_size:
                    # A batch ending an epoch points at the next one, so resuming never re-reads it.
                    after = (epoch, position) if position < length else (epoch + 1, 0)
                    yield tagged(_batch(pixels, labels, keys), after)
                    pixels, labels, keys, problems = None, [], [], []
                    seen = skipped = 0
            epoch, cursor = epoch + 1, 0
        if keys:  # finite stream: the last partial batch too, so every sample is seen once
            yield tagged(_batch(pixels[:len(keys)], labels, keys), (epoch, 0))
            seen, skipped, problems = 0, 0, []
        yield tagged({"_end": True}, (epoch, 0))


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """In a DataLoader worker: die of SIGTERM only when the training process (the parent) sends it, as torch's
    own worker handler does, and ignore it from anyone else. Schedulers send SIGTERM to every process of a job
    (Slurm; torch elastic, to the process group), and the training process stops on it gracefully while still
    reading batches (README, "Stopping"). Python handlers cannot see the sender: a thread takes the blocked
    signal with `sigwaitinfo`, which can."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="sigterm-from-parent", daemon=True).start()


# --------------------------------------------------------------------------------------------
# Main-process side
# --------------------------------------------------------------------------------------------

class TrainStream:
    """Shuffled training batches over a shard set, exactly resumable.

    `shards`: a local folder, or anything `data.sources.shard_location` returns (a URL prefix, a brace
    pattern or a pipe: command with its index, and a cache folder for remote shards).

    Iterating yields {"image": FloatTensor [B, 3, S, S] in [-1, 1], "label": LongTensor [B] (only
    when the shards have labels), "key": list[str]} forever (epochs=None, every batch full) or for
    `epochs` epochs (then each worker's last partial batch is yielded too). Each `iter()` starts
    from the current state (fresh DataLoader workers; persistent workers would keep a stale start).
    `seen_samples` / `skipped_samples` count what the handed-out batches consumed (restored on resume;
    with `split="global"` they count the whole global batches every rank reads).
    Never pass it to `accelerator.prepare()`: it already splits by rank.

    `split`: "shards" (each rank reads its own shards) or "global" (each rank keeps its rows of the
    world-size-invariant global batches; a finite stream's last partial global batch is cut the same
    way, so a rank may get a short or empty last batch, and every rank yields the same number).
    """

    def __init__(self, shards: str | Path | ShardLocation, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, image_size: int, hflip: bool, epochs: int | None = None,
                 max_skip_fraction: float = 0.01, shuffle_buffer: int = 1000, split: str = "shards"):
        self.index = open_shard_set(shards)
        if self.index["size"] != image_size:
            raise UserError(f"shards in {shards} are {self.index['size']}x{self.index['size']} "
                            f"but image_size is {image_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if split not in SPLITS:
            raise UserError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
        self.workers = max(num_workers, 1)  # num_workers=0 reads in-process as one worker
        # The readers: this rank's share of the shards, or (global) the workers of a 1-process stream.
        self._readers = world_size if split == "shards" else 1
        needed = self._readers * self.workers
        if len(self.index["shards"]) < needed:
            readers = "world_size" if split == "shards" else "1 (split=global)"
            raise UserError(f"{shards} has {len(self.index['shards'])} shards, fewer than {readers} x num_workers "
                            f"= {self._readers} x {self.workers} = {needed}; write smaller shards or use fewer workers")
        self.source, self.batch_size, self.seed = self.index["root"], batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.image_size, self.hflip, self.epochs = image_size, hflip, epochs
        self.max_skip_fraction, self.shuffle_buffer, self.split = max_skip_fraction, shuffle_buffer, split
        self._positions = [(0, 0)] * self.workers
        self._batches = 0
        self._next_worker = 0
        self.seen_samples = 0
        self.skipped_samples = 0
        self._skip_events = 0

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Positions as of the last batch handed to the caller (JSON-serializable)."""
        return {
            "version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "split": self.split, "num_workers": self.workers, "batches": self._batches, "next_worker": self._next_worker,
            "workers": [{"epoch": e, "cursor": c} for e, c in self._positions],
            "seen_samples": self.seen_samples, "skipped_samples": self.skipped_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. Call before iterating."""
        state = {"split": "shards", **state}  # checkpoints from before `split` existed
        for field, mine in (("world_size", self.world_size), ("num_workers", self.workers),
                            ("rank", self.rank), ("seed", self.seed), ("split", self.split)):
            if state.get(field) != mine:
                raise UserError(f"cannot resume the data stream: checkpoint has {field}={state.get(field)}, "
                                f"this run has {field}={mine}")
        if state.get("version") != STATE_VERSION or len(state.get("workers", [])) != self.workers:
            raise UserError(f"cannot resume the data stream: unrecognised state {state!r:.200}")
        self._positions = [(int(p["epoch"]), int(p["cursor"])) for p in state["workers"]]
        self._batches, self._next_worker = int(state["batches"]), int(state["next_worker"])
        self.seen_samples, self.skipped_samples = int(state["seen_samples"]), int(state["skipped_samples"])

    # ---- iteration ----------------------------------------------------------------------
    def _loader(self, released: torch.Tensor) -> DataLoader:
        if self.split == "shards":
            batch_size, rank, readers = self.batch_size, self.rank, self.world_size
        else:  # every rank reads the global batches of a 1-process stream
            batch_size, rank, readers = self.batch_size * self.world_size, 0, 1
        dataset = _WorkerBatches(
            self.index["shards"], self.index["cache_dir"], self.index["format"], self.image_size, batch_size,
            self.seed, rank, readers, self.workers, self.hflip, self.epochs,
            self.shuffle_buffer, list(self._positions), released)
        # Own generator: creating the loader must not consume the global torch RNG (training
        # randomness would then depend on when the stream was (re)started).
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                          generator=torch.Generator().manual_seed(derive_seed(self.seed, "loader")),
                          worker_init_fn=_leave_stop_signals_to_the_trainer)

    def _my_rows(self, batch: dict) -> dict:
        """With split="global": this rank's rows [rank·B, (rank+1)·B) of a global batch (uint8, before
        the float conversion, so only they are converted)."""
        if self.split == "shards":
            return batch
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        batch["pixels"], batch["key"] = batch["pixels"][rows], batch["key"][rows]
        if "label" in batch:
            batch["label"] = batch["label"][rows]
        return batch

    def _account(self, item: dict) -> None:
        """Fold one worker item's counters into the totals; log and enforce the skip budget."""
        self.seen_samples += item.pop("_seen")
        self.skipped_samples += item.pop("_skipped")
        for problem in item.pop("_problems"):
            self._skip_events += 1
            if self._skip_events <= 5 or self._skip_events % 100 == 0:
                log.warning("data: skipped unreadable data (%d samples so far, event %d): %s",
                            self.skipped_samples, self._skip_events, problem)
        if (self.seen_samples >= MIN_SEEN_FOR_SKIP_CHECK
                and self.skipped_samples > self.max_skip_fraction * self.seen_samples):
            raise TooManySkippedError(
                f"{self.skipped_samples} of {self.seen_samples} samples read from {self.source} were "
                f"unreadable, more than max_skip_fraction={self.max_skip_fraction}; check the shards")

    def __iter__(self) -> Iterator[dict]:
        W = self.workers
        done = [self.epochs is not None and e >= self.epochs for e, _ in self._positions]
        queues = [collections.deque() for _ in range(W)]
        released = torch.zeros(W, dtype=torch.int64).share_memory_()
        # Holding each worker's last buffers keeps them mapped here: torch then reuses the mapping
        # for the next batch in the same buffer instead of mapping it afresh (page faults again).
        mapped = [collections.deque(maxlen=_BUFFER_SLOTS) for _ in range(W)]
        source = iter(self._loader(released))
        try:
            while not all(done) or any(queues):
                w = self._next_worker
                while not queues[w] and not done[w]:
                    item = next(source)  # a worker always ends with an `_end` item: never exhausts first
                    sender = item["_worker"]
                    if "pixels" in item:  # copy out at once so that the worker may reuse its buffer
                        mapped[sender].append(item["pixels"])
                        item = _finish_batch(self._my_rows(item))
                        released[sender] += 1
                    queues[sender].append(item)
                    if item.get("_end"):
                        done[sender] = True
                if not queues[w]:  # this worker has finished: the turn passes on
                    self._next_worker = (w + 1) % W
                    continue
                item = queues[w].popleft()
                self._account(item)
                self._positions[w] = (item.pop("_epoch"), item.pop("_cursor"))
                del item["_worker"]
                if item.pop("_end", False):
                    continue  # counters only; the turn stays here until the queue is empty
                self._batches += 1
                self._next_worker = (w + 1) % W
                yield item
        finally:
            del source  # shuts the workers down


class EvalStream:
    """Finite, ordered batches: rank r reads shards r::R in index order, samples in shard order.

    Yields the same dicts as TrainStream (no flips, no shuffle); the last partial batch is
    yielded. Unreadable samples are skipped and counted in `skipped_samples`. A rank may get
    no shards at all when there are fewer shards than ranks.
    """

    def __init__(self, shards: str | Path | ShardLocation, batch_size: int, rank: int, world_size: int,
                 image_size: int):
        self.index = open_shard_set(shards)
        if self.index["size"] != image_size:
            raise UserError(f"shards in {shards} are {self.index['size']}x{self.index['size']} "
                            f"but image_size is {image_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.batch_size, self.image_size = batch_size, image_size
        self.my_shards = self.index["shards"][rank::world_size]
        self.num_samples = sum(s["num_samples"] for s in self.my_shards)
        self.skipped_samples = 0

    def __len__(self) -> int:
        """Number of batches this rank yields when no sample is skipped."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        images, labels, keys = [], [], []
        for shard in self.my_shards:
            for key, payload, label, problem in read_shard(shard["url"], shard["num_samples"], self.index["format"],
                                                           sha256=shard["sha256"], cache_dir=self.index["cache_dir"],
                                                           name=shard["name"]):
                try:
                    image = decode_image(payload, self.image_size) if payload is not None else None
                except DECODE_ERRORS as err:
                    image, problem = None, f"sample {key}: undecodable ({type(err).__name__}: {err})"
                if image is None:
                    self.skipped_samples += 1
                    if problem:
                        log.warning("data: eval skipped unreadable data: %s", problem)
                    continue
                images.append(image)
                labels.append(label)
                keys.append(key)
                if len(images) == self.batch_size:
                    yield _finish_batch(_batch(_stack_chw(images), labels, keys))
                    images, labels, keys = [], [], []
        if images:
            yield _finish_batch(_batch(_stack_chw(images), labels, keys))
