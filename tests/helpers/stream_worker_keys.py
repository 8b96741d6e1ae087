"""Helper for tests/test_stream.py, run under torchrun: every rank reads one epoch of TrainStream
(2 DataLoader workers), the keys are gathered over gloo, and rank 0 writes them as JSON.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/stream_worker_keys.py SHARDS OUT.json
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data.stream import TrainStream  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    shards, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stream = TrainStream(shards, batch_size=50, seed=3, rank=rank, world_size=world, num_workers=2,
                         image_size=8, hflip=True, epochs=1)
    keys = [key for batch in stream for key in batch["key"]]
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "keys": keys, "seen": stream.seen_samples,
                                      "pid": os.getpid()})
    if rank == 0:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(gathered))
        tmp.rename(out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
