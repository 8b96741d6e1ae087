"""Real 2-process launches on CPU (gloo): both ranks train, each writes its own state, rank 0 logs."""
import json

import torch

from conftest import FAST, run_script
from trainer.checkpoint import latest_checkpoint, read_torch

# On a CPU-only machine `--multi_gpu` is what makes accelerate start one process per rank (torchrun);
# the trainer then forms a gloo group.
TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]
PER_RANK = ["train.per_device_batch_size=4", "train.global_batch_size=8"]


def test_two_process_nvae_and_vaebm(tmp_path, cache_dir):
    nvae_dir, vaebm_dir = tmp_path / "nvae", tmp_path / "vaebm"
    result = run_script("train_nvae.py", "--config", "digits", "--run-dir", str(nvae_dir), f"data.cache_dir={cache_dir}",
                        *FAST, *PER_RANK, "train.max_steps=2", "train.image_every=0", launcher=TWO_PROCESSES)
    assert "2 process(es), accumulation 1" in result.stderr
    checkpoint = latest_checkpoint(nvae_dir)
    assert (checkpoint / "rank-0" / "data.json").is_file() and (checkpoint / "rank-1" / "data.json").is_file()
    data_states = [json.loads((checkpoint / f"rank-{r}" / "data.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in data_states] == [0, 1]
    assert len((nvae_dir / "stats.jsonl").read_text().splitlines()) == 1  # rank 0 logs, once per interval

    run_script("train_vaebm.py", "--config", "digits", "--vae", str(nvae_dir), "--run-dir", str(vaebm_dir),
               f"data.cache_dir={cache_dir}", *FAST, *PER_RANK, "train.max_steps=2", "langevin.steps=2",
               "train.image_every=0", launcher=TWO_PROCESSES)
    checkpoint = latest_checkpoint(vaebm_dir)
    buffers = [read_torch(checkpoint / f"rank-{r}" / "replay.pt") for r in (0, 1)]
    assert buffers[0]["fill"] == buffers[1]["fill"] == 8  # per-rank buffers, 4 chains × 2 steps each
    # Chains are seeded per rank: the two ranks' negatives must differ.
    assert not torch.equal(buffers[0]["storage"][0], buffers[1]["storage"][0])
