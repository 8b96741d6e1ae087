"""The SLURM files on a real Slurm cluster (two slurmd on loopback): a sweep as a job array, a
training job preempted mid-run (USR1 -> checkpoint -> requeue -> resume) that ends bit-identical to
an uninterrupted run, and a 2-node job. Plus the accelerate config files and the sweep summary.

The cluster is `slurm/local-cluster.sh` (Debian's slurm-wlm + munge, installed with apt-get when
missing and possible); its tests skip only when those packages cannot be had (or without root).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # a real Slurm cluster on loopback

CLUSTER = ROOT / "slurm" / "local-cluster.sh"
SMALL = ["train.per_device_batch_size=8", "train.global_batch_size=8", "data.num_workers=1",
         "train.progress_bar=false", "train.image_every=0", "train.log_every=1", "train.checkpoint_every=100"]
JOB_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "ACCELERATE_EXTRA_ARGS": "--mixed_precision no --dynamo_backend no"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _free_ports(count: int) -> int:
    """A port P with P .. P+count-1 free (slurmctld, then one per slurmd)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + count >= 65535:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
    return 16817


@pytest.fixture(scope="module")
def cluster():
    """A private cluster of two nodes on loopback (own state dir and ports); always stopped at the end."""
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("slurm-wlm/munge not installed and not root, so they cannot be installed with apt-get")
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons as root (slurm/local-cluster.sh); not root here")
    state_dir = Path(tempfile.mkdtemp(prefix="vaebm-slurm-", dir="/tmp"))  # short: munge socket path limit
    # Two slurmd (a real 2-node job), 4 declared CPUs each: the jobs never queue behind each other
    # (the machine's cores are shared by the OS).
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state_dir), "SLURM_LOCAL_PORT": str(_free_ports(3)),
           "SLURM_LOCAL_NODES": "2", "SLURM_LOCAL_CPUS": "4"}
    had_packages = shutil.which("slurmctld") is not None
    start = subprocess.run([str(CLUSTER), "start", "--install"], env=env, capture_output=True, text=True, timeout=900)
    if start.returncode != 0 and not had_packages and shutil.which("slurmctld") is None:
        shutil.rmtree(state_dir, ignore_errors=True)
        pytest.skip(f"slurm-wlm/munge are not installed and could not be installed: {start.stderr.strip()[-300:]}")
    env["SLURM_CONF"] = str(state_dir / "slurm.conf")
    try:
        assert start.returncode == 0, f"local cluster did not start:\n{start.stdout}\n{start.stderr}\n{_logs(state_dir)}"
        yield {"env": env, "dir": state_dir}
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)


def _logs(state_dir: Path) -> str:
    out = []
    for name in ("slurmctld.log", "slurmd.log"):
        path = state_dir / "log" / name
        if path.is_file():
            out.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(out)


def sbatch(cluster, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(["sbatch", "--parsable", *args], env={**cluster["env"], **JOB_ENV, **(env or {})},
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def job_states(cluster, job_id: str) -> dict[str, dict]:
    """`scontrol show job` fields per job (array tasks included): {JobId: {JobState, Restarts, ...}}."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=cluster["env"], capture_output=True,
                            text=True, timeout=30)
    jobs = {}
    for line in result.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            jobs[fields["JobId"]] = fields
    return jobs


def wait_for(condition, timeout: float, what: str, cluster, outputs=(), interval: float = 1.0):
    """Poll `condition()` (truthy = done) every `interval` s up to `timeout` s; fail with logs if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    details = "\n".join(f"--- {p}\n{Path(p).read_text(errors='replace')[-3000:]}" for p in outputs if Path(p).is_file())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details}\n{_logs(cluster['dir'])}")


def wait_finished(cluster, job_id: str, count: int, timeout: float, outputs=()) -> dict[str, dict]:
    def finished():
        jobs = job_states(cluster, job_id)
        done = len(jobs) >= count and all(j["JobState"] in FINAL_STATES for j in jobs.values())
        return jobs if done else None
    return wait_for(finished, timeout, f"job {job_id} to finish", cluster, outputs)


def test_batch_script_launch_lines(cluster, tmp_path):
    """Dry run on 2 nodes (the launcher is `echo`): one launch line per node, each with its own
    machine rank ($SLURM_NODEID evaluated on the node), the head node's address, the job's port."""
    out = tmp_path / "dry.out"
    job = sbatch(cluster, "--nodes=2", f"--output={out}", "slurm/train_nvae.sbatch", "--config", "digits",
                 "train.seed=3", env={"ACCELERATE_LAUNCH": "echo LAUNCH", "PROCESSES_PER_NODE": "2",
                                      "ACCELERATE_EXTRA_ARGS": "--mixed_precision no",
                                      "RUN_DIR": str(tmp_path / "dry-run")})
    jobs = wait_finished(cluster, job, 1, 60, [out])
    assert jobs[job]["JobState"] == "COMPLETED", out.read_text()
    lines = sorted(l for l in out.read_text().splitlines() if l.startswith("LAUNCH"))
    assert len(lines) == 2, out.read_text()
    for rank, line in enumerate(lines):
        assert re.fullmatch(r"LAUNCH --num_machines 2 --num_processes 4 --multi_gpu --main_process_ip 127\.0\.0\.1 "
                            rf"--main_process_port {20000 + int(job) % 20000} --mixed_precision no --machine_rank {rank} "
                            rf"scripts/train_nvae.py --run-dir {re.escape(str(tmp_path / 'dry-run'))} "
                            r"--config digits train\.seed=3", line), line

    refused = tmp_path / "refused.out"
    job = sbatch(cluster, f"--output={refused}", "slurm/train_nvae.sbatch", "--config", "digits", "--run-dir", "x")
    wait_finished(cluster, job, 1, 60, [refused])
    assert "not --run-dir" in refused.read_text()


def test_sweep_preemption_and_two_nodes(cluster, tmp_path, cache_dir):
    """(a) a 2-task array sweep -> two run dirs + a summary table; (b) USR1 mid-run -> checkpoint,
    requeue, resume -> the same weights as an uninterrupted run; (c) a 2-node job trains as one
    2-process group. All side by side to save time."""
    # Materialize the bundled shards once, before several jobs would each do it.
    from data.bundled import materialize_shards
    materialize_shards("digits", 32, cache_dir)
    common = ["--config", "digits", f"data.cache_dir={cache_dir}", *SMALL]

    # (b) the job to preempt, and the uninterrupted reference run straight from python, side by side.
    preempt_dir, preempt_out = tmp_path / "preempted", tmp_path / "preempted.out"
    preempt = sbatch(cluster, f"--output={preempt_out}", "slurm/train_nvae.sbatch", *common, "train.max_steps=6",
                     env={"RUN_DIR": str(preempt_dir)})
    reference_dir = tmp_path / "reference"
    reference = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train_nvae.py"), "--run-dir", str(reference_dir),
                                  *common, "train.max_steps=6"], cwd=ROOT, env={**os.environ, **JOB_ENV},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: os.nice(10))  # the preempted job's chain is the long pole

    # (a) the sweep: two tasks, each in SWEEP_DIR/task-i; comments and blank lines are not tasks.
    sweep_dir = tmp_path / "sweep"
    sweep_file = tmp_path / "sweep.txt"
    sweep_file.write_text("# seeds and learning rates\ntrain.seed=0 optim.lr=0.01\n\n  # another\ntrain.seed=1 optim.lr=0.005\n")
    array_out = tmp_path / "sweep-%A_%a.out"
    array = sbatch(cluster, "--array=0-1", f"--output={array_out}", "slurm/sweep.sbatch", str(sweep_file), "nvae",
                   *common, "train.max_steps=2",
                   env={"SWEEP_DIR": str(sweep_dir), "ACCELERATE_LAUNCH": "nice -n 10 accelerate launch"})

    # (c) two nodes, one launcher and one process on each, gloo between them.
    two_dir, two_out = tmp_path / "two-nodes", tmp_path / "two-nodes.out"
    two = sbatch(cluster, "--nodes=2", f"--output={two_out}", "slurm/train_nvae.sbatch", *common, "train.max_steps=2",
                 "train.per_device_batch_size=4",
                 env={"RUN_DIR": str(two_dir), "ACCELERATE_LAUNCH": "nice -n 10 accelerate launch"})

    try:
        # Preempt once the trainer is stepping (its first stats row), as Slurm would 120 s before the limit.
        stats = preempt_dir / "stats.jsonl"
        wait_for(lambda: stats.is_file() and stats.read_text().strip(), 180, "the first training step", cluster,
                 [preempt_out], interval=0.2)
        signal = subprocess.run(["scancel", "--signal=USR1", "--batch", preempt], env=cluster["env"],
                                capture_output=True, text=True, timeout=30)
        assert signal.returncode == 0, signal.stderr
        jobs = wait_finished(cluster, preempt, 1, 300, [preempt_out])
        reference_err = reference.communicate(timeout=300)[1]
        assert reference.returncode == 0, reference_err[-3000:]
        array_jobs = wait_finished(cluster, array, 2, 300, sweep_dir.glob("*/log.txt"))
        two_jobs = wait_finished(cluster, two, 1, 300, [two_out])
    finally:
        if reference.poll() is None:
            reference.kill()
        subprocess.run(["scancel", preempt, array, two], env=cluster["env"], capture_output=True, timeout=30)

    # (c) one process group over two nodes.
    assert two_jobs[two]["JobState"] == "COMPLETED", two_out.read_text()
    assert "2 node(s) x 1 process(es)" in two_out.read_text()
    assert "2 process(es)" in (two_dir / "log.txt").read_text()
    assert {p.name for p in (two_dir / "checkpoints" / "step-0000002").iterdir()} >= {"rank-0", "rank-1"}

    # (b) preempted, requeued under the same job id, resumed, finished.
    output = preempt_out.read_text()
    job = jobs[preempt]
    assert job["JobState"] == "COMPLETED" and int(job["Restarts"]) >= 1, (job, output)
    log = (preempt_dir / "log.txt").read_text()
    stopped = re.search(r"stop requested \(.*\) at step (\d+)", log)
    resumed = re.search(r"resuming from step (\d+)", log)
    assert stopped and resumed and 0 < int(resumed.group(1)) == int(stopped.group(1)) < 6, log
    assert "requeueing" in output and "finished at step 6" in log.splitlines()[-1]
    assert not (preempt_dir / "STOP").exists()
    for name in ("model.safetensors", "ema.safetensors"):
        straight = load_file(str(reference_dir / "checkpoints" / "step-0000006" / name))
        interrupted = load_file(str(preempt_dir / "checkpoints" / "step-0000006" / name))
        assert straight.keys() == interrupted.keys()
        for key in straight:
            assert torch.equal(straight[key], interrupted[key]), (name, key)

    # (a) two tasks, two run directories, one summary.
    assert sorted(j["JobState"] for j in array_jobs.values()) == ["COMPLETED", "COMPLETED"], array_jobs
    for task, overrides in ((0, "train.seed=0 optim.lr=0.01"), (1, "train.seed=1 optim.lr=0.005")):
        task_dir = sweep_dir / f"task-{task}"
        assert (task_dir / "sweep_overrides.txt").read_text().strip() == overrides
        assert (task_dir / "checkpoints" / "step-0000002" / "model.safetensors").is_file()
        assert f"optim.lr={overrides.split('lr=')[1]}" in (task_dir / "sweep_command.txt").read_text()
    summary = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_summary.py"), str(sweep_dir),
                              "--out", str(tmp_path / "summary.csv")], capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0, summary.stderr
    table = summary.stdout.splitlines()
    assert table[0].startswith("| task | overrides | status | step | loss | nelbo |"), table
    assert len(table) == 4 and "| 0 | train.seed=0 optim.lr=0.01 | finished | 2 |" in table[2], table
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].startswith("1,train.seed=1 optim.lr=0.005,finished,2,"), rows
    assert json.loads((sweep_dir / "task-1" / "stats.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_exit_codes_survive_the_batch_script(cluster, tmp_path, cache_dir):
    """A job exits with its trainer's code: 2 for a bad config (through the launcher, trainer/run/launcher_exit.py),
    3 for a diverged run even when the launcher cannot pass the code on (TORCH_DEVICE_BACKEND_AUTOLOAD=0: the
    batch script reads the code the run recorded in status.json for this run of the job)."""
    from data.bundled import materialize_shards
    materialize_shards("digits", 32, cache_dir)
    site = tmp_path / "site"  # pyproject.toml's torch.backends entry point, as `pip install -e .` registers it
    info = site / "vaebm_trainer-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vaebm-trainer\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\n"
                                           "vaebm_trainer_exit_codes = trainer.run.launcher_exit:install\n")
    python_path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    bad_out, diverged_out = tmp_path / "bad.out", tmp_path / "diverged.out"
    bad = sbatch(cluster, f"--output={bad_out}", "slurm/train_nvae.sbatch", "--config", "digits", "optim.lr=nan",
                 env={"RUN_DIR": str(tmp_path / "bad"), "PYTHONPATH": python_path})
    diverged = sbatch(cluster, f"--output={diverged_out}", "slurm/train_nvae.sbatch", "--config", "digits",
                      f"data.cache_dir={cache_dir}", *SMALL, "train.max_steps=12", "train.checkpoint_every=2",
                      "divergence.patience=2",
                      env={"RUN_DIR": str(tmp_path / "diverged"), "TRAINER_SCRIPT": "tests/helpers/nan_nvae.py",
                           "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"})
    try:
        jobs = {**wait_finished(cluster, bad, 1, 300, [bad_out]), **wait_finished(cluster, diverged, 1, 300,
                                                                                  [diverged_out])}
    finally:
        subprocess.run(["scancel", bad, diverged], env=cluster["env"], capture_output=True, timeout=30)
    assert jobs[bad]["JobState"] == "FAILED" and jobs[bad]["ExitCode"] == "2:0", bad_out.read_text()
    assert "error: config key 'optim.lr' must be a finite number" in bad_out.read_text()
    assert jobs[diverged]["JobState"] == "FAILED" and jobs[diverged]["ExitCode"] == "3:0", diverged_out.read_text()
    assert "the run recorded exit code 3" in diverged_out.read_text()


# ---- Pieces that need no cluster -------------------------------------------------------------------

def test_accelerate_config_files_load():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "multi_node_ddp": "MULTI_GPU",
                "deepspeed_zero2": "DEEPSPEED", "vaebm_ddp": "MULTI_GPU"}
    for name, kind in expected.items():
        config = load_config_from_file(str(ROOT / "slurm" / "accelerate" / f"{name}.yaml"))
        assert str(config.distributed_type).split(".")[-1] == kind, name
    deepspeed = load_config_from_file(str(ROOT / "slurm" / "accelerate" / "deepspeed_zero2.yaml")).deepspeed_config
    assert deepspeed["zero_stage"] == 2 and deepspeed["deepspeed_multinode_launcher"] == "standard"


def test_sweep_example_lines_are_valid_overrides():
    from trainer.config.ebm import VAEBMTrainingConfig
    from trainer.config.loader import load_config

    lines = [l for l in (ROOT / "slurm" / "sweep_example.txt").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    assert len(lines) >= 2
    for line in lines:
        load_config(VAEBMTrainingConfig, "vaebm", "digits", line.split() + ["vae.path=unused"])


def test_sweep_summary_reports_bad_tasks_and_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    good, broken, unstarted = sweep / "task-0", sweep / "task-1", sweep / "task-10"
    for task in (good, broken, unstarted):
        task.mkdir(parents=True)
    (good / "sweep_overrides.txt").write_text("train.seed=1 optim.lr=0.01\n")
    (good / "stats.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5, "kl": 0.25}\n')
    (good / "log.txt").write_text("2026-01-01 00:00:00 finished at step 2; checkpoint x\n")
    (broken / "sweep_overrides.txt").write_text("train.seed=2\n")
    (broken / "stats.jsonl").write_text('{"step": 1, "lo')
    (broken / "log.txt").write_text("2026-01-01 00:00:00 starting\n")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_summary.py"), str(sweep),
                             "--out", str(tmp_path / "t.md")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    table = result.stdout.splitlines()
    assert table[0] == "| task | overrides | status | step | loss | kl |"
    assert table[2] == "| 0 | train.seed=1 optim.lr=0.01 | finished | 2 | 2.5 | 0.25 |"
    assert table[3].startswith("| 1 | train.seed=2 | error: ") and table[4] == "| 10 | ? | not started |  |  |  |"
    assert "warning: task 1" in result.stderr
    assert (tmp_path / "t.md").read_text() == result.stdout
    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_summary.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
