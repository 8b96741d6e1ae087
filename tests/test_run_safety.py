"""Nothing lost, nothing let in, through the real scripts: one training per run directory (a real second
process, a holder killed by SIGKILL), graceful termination on real signals (1 and 2 processes), exit codes and
the last line through a real `accelerate launch` (1 and 2 processes), a really full device (tmpfs)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import FAST, ROOT, free_port

from trainer.run.launcher_exit import _decide, is_launcher
from trainer.run.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from trainer.run.lock import Holder, stale_reason

TOY = ["train.progress_bar=false", "train.log_every=1", "train.checkpoint_every=1000000", "train.image_every=0",
       "train.per_device_batch_size=32", "train.global_batch_size=32"]
ONE_PROCESS = ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no"]
TWO_PROCESSES = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port())]


def environment(extra_path: Path | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def start(script: str, *args: str, launcher: list[str] | None = None, env: dict | None = None,
          log: Path) -> subprocess.Popen:
    """Start `scripts/<script>` (or a test helper) in the background, its output to `log`."""
    path = ROOT / script if "/" in script else ROOT / "scripts" / script
    handle = open(log, "w")
    return subprocess.Popen((launcher or [sys.executable]) + [str(path), *args], cwd=ROOT, env=env or environment(),
                            stdout=handle, stderr=subprocess.STDOUT, text=True)


def run(script: str, *args: str, launcher: list[str] | None = None, env: dict | None = None,
        timeout: int = 600) -> subprocess.CompletedProcess:
    path = ROOT / script if "/" in script else ROOT / "scripts" / script
    return subprocess.run((launcher or [sys.executable]) + [str(path), *args], cwd=ROOT, env=env or environment(),
                          capture_output=True, text=True, timeout=timeout)


def wait_for(condition, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-3000:] if log else ''}")


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "stats.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---- One training per run directory ---------------------------------------------------------------------------

def test_stale_lock_rules():
    """Which locks a start may take over: a dead holder on this host, a requeued SLURM job's predecessor, a holder
    on another host whose heartbeat stopped; never a live holder."""
    me = Holder.of_this_process(30.0)
    now = time.time()
    alive = Holder(**{**me.__dict__, "pid": os.getppid(), "pid_start": None, "token": "x"})
    dead = Holder(**{**me.__dict__, "pid": 2**22 + 12345, "token": "y"})
    elsewhere = Holder(**{**me.__dict__, "host": "node-17", "token": "z"})
    assert stale_reason(alive, now, now, 300, me) is None
    assert stale_reason(alive, now - 3600, now, 300, me) is None  # alive on this host: held, however quiet
    assert "is gone" in stale_reason(dead, now, now, 300, me)
    assert stale_reason(elsewhere, now - 60, now, 300, me) is None
    assert "no heartbeat" in stale_reason(elsewhere, now - 301, now, 300, me)
    requeued_me = Holder(**{**me.__dict__, "slurm_job_id": "77", "slurm_restart_count": "1"})
    predecessor = Holder(**{**elsewhere.__dict__, "slurm_job_id": "77", "slurm_restart_count": "0"})
    assert "requeued" in stale_reason(predecessor, now, now, 300, requeued_me)
    same_job_step = Holder(**{**elsewhere.__dict__, "slurm_job_id": "77", "slurm_restart_count": "1"})
    assert stale_reason(same_job_step, now, now, 300, requeued_me) is None
    assert stale_reason(None, now - 10, now, 300, me) is None and stale_reason(None, now - 400, now, 300, me)


@pytest.mark.slow
def test_a_second_training_on_a_run_directory_exits_2_naming_the_holder(tmp_path):
    """Started together: one trains, the other exits 2 in one line. Started later with other settings: exits 2
    within seconds, naming host, PID and since when, and writes nothing. A holder killed by SIGKILL does not
    block the next start."""
    args = lambda run_dir, *more: ["--config", "toy2d", "--run-dir", str(run_dir), *TOY, *more]  # noqa: E731
    together = tmp_path / "together"
    # Both would train forever, so they overlap however their imports are timed: the loser exits 2, then a STOP
    # file ends the winner (exit 0, with a checkpoint).
    pair = [start("train_nvae.py", *args(together, "train.max_steps=100000000"), log=tmp_path / f"pair{i}.log")
            for i in (0, 1)]
    try:
        wait_for(lambda: any(p.poll() is not None for p in pair), 180, "one of the pair to exit", tmp_path / "pair0.log")
        (together / "STOP").touch()
        codes = sorted(p.wait(timeout=180) for p in pair)
    finally:
        for p in pair:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"pair{i}.log").read_text() for i in (0, 1)]
    assert codes == [0, 2], logs
    refused = next(log for log in logs if "in use by another training" in log)
    assert last_line(refused).startswith("error: ") and "Traceback" not in refused
    verify_checkpoint(latest_checkpoint(together))  # the winner's run is whole: the refused start touched nothing
    assert (together / "config.yaml").is_file()

    run_dir = tmp_path / "run"
    log = tmp_path / "holder.log"
    holder = start("train_nvae.py", *args(run_dir, "train.max_steps=100000000"), log=log)
    try:
        wait_for(lambda: steps_logged(run_dir) >= 3, 180, "the holder's first steps", log)
        config = (run_dir / "config.yaml").read_bytes()
        began = time.monotonic()
        second = run("train_nvae.py", *args(run_dir, "train.max_steps=50", "optim.lr=0.001"))
        took = time.monotonic() - began
        assert second.returncode == 2, second.stderr[-2000:]
        line = last_line(second.stderr)
        assert line.startswith("error: ") and "is in use by another training" in line, second.stderr[-2000:]
        assert f"host {socket.gethostname()}, PID {holder.pid}, since 20" in line
        assert took < 90, took  # imports included; the lock itself answers at once
        assert (run_dir / "config.yaml").read_bytes() == config  # nothing of the refused start was written
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert json.loads((run_dir / "lock.json").read_text())["pid"] == holder.pid  # left behind by SIGKILL
    after = run("train_nvae.py", *args(run_dir, "train.max_steps=5"))
    assert after.returncode == 0, after.stderr[-3000:]
    assert not (run_dir / "lock.json").exists() and latest_checkpoint(run_dir).name == "step-0000005"


# ---- Graceful termination --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly_and_a_second_signal_exits_at_once(tmp_path, cache_dir, launcher_env):
    """One process: SIGTERM → a checkpoint at the current step, exit 0. Ctrl-C under `accelerate launch` (SIGINT to
    the launcher and the trainer alike) → the same, the launcher waiting for it and exiting 0. A second signal
    → exit at once (128 + its number) without a checkpoint, the newest complete one staying."""
    run_dir = tmp_path / "run"
    args = ["--config", "digits", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *FAST,
            "train.max_steps=100000", "train.checkpoint_every=100000", "train.image_every=0", "train.log_every=1"]
    log = tmp_path / "first.log"
    first = start("train_nvae.py", *args, log=log)
    wait_for(lambda: steps_logged(run_dir) >= 1, 180, "the first step", log)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, log.read_text()[-3000:]
    stopped = int(log.read_text().split("stop requested (SIGTERM) at step ")[1].split()[0])
    assert latest_checkpoint(run_dir).name == f"step-{stopped:07d}"
    verify_checkpoint(latest_checkpoint(run_dir))
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["exit_code"] == 0 and status["step"] == stopped
    assert not (run_dir / "lock.json").exists()

    log = tmp_path / "ctrl-c.log"
    handle = open(log, "w")
    launcher = subprocess.Popen([*ONE_PROCESS, str(ROOT / "scripts" / "train_nvae.py"), *args], cwd=ROOT,
                                env=launcher_env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: steps_logged(run_dir) >= stopped + 1, 180, "the resumed run's first step", log)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert launcher.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    previous, stopped = stopped, int(text.split("stop requested (SIGINT) at step ")[1].split()[0])
    assert f"resuming from step {previous}" in text and stopped > previous
    assert "Traceback" not in text and last_line(text).startswith(f"halted at step {stopped}; checkpoint")

    log = tmp_path / "twice.log"
    second = start("train_nvae.py", *args, log=log)
    wait_for(lambda: steps_logged(run_dir) >= stopped + 1, 180, "the resumed run's first step", log)
    while second.poll() is None:  # one signal, then more until it exits: the second one handled ends it
        second.send_signal(signal.SIGTERM)
        time.sleep(0.05)  # two signals arriving before the handler runs count as one
    assert second.returncode == 128 + signal.SIGTERM, log.read_text()[-3000:]
    assert "second stop signal (SIGTERM): exiting at once without a checkpoint" in last_line(log.read_text())
    assert [step for step, _ in list_checkpoints(run_dir)][-1] == stopped  # the newest complete one stays
    assert not (run_dir / "lock.json").exists()


def rank_pids(launcher: subprocess.Popen, script: str) -> dict[int, int]:
    """{rank: pid} of the training processes a launcher started (its children running `script`)."""
    found = {}
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            environ = dict(e.split(b"=", 1) for e in entries if b"=" in e)
        except OSError:
            continue
        if any(part.endswith(script.encode()) for part in command) and b"RANK" in environ:
            found[int(environ[b"RANK"])] = pid
    return found


@pytest.mark.slow
def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, cache_dir, launcher_env):
    """SIGUSR1 to rank 1 only: both processes checkpoint at one step and end, the launcher exits 0. Then the
    resumed run gets SIGTERM at the launcher, as `docker stop` or Kubernetes would send it: torch elastic forwards
    it to the whole process group (data-loader workers included, which must survive it), the training processes
    checkpoint, and the launcher exits 0 with the run's line last."""
    run_dir = tmp_path / "run"
    args = ["--config", "digits", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *FAST,
            "train.per_device_batch_size=4", "train.max_steps=100000", "train.checkpoint_every=100000",
            "train.image_every=0", "train.log_every=1"]
    stopped = None
    for attempt, target in enumerate(("rank 1", "launcher")):
        log = tmp_path / f"train-{attempt}.log"
        launcher = start("train_nvae.py", *args, launcher=TWO_PROCESSES, env=launcher_env, log=log)
        try:
            wait_for(lambda: steps_logged(run_dir) >= (stopped or 0) + 1, 240, "a step", log)
            if target == "rank 1":
                ranks = wait_for(lambda: (found := rank_pids(launcher, "train_nvae.py")) and len(found) == 2 and found,
                                 30, "two training processes", log)
                os.kill(ranks[1], signal.SIGUSR1)  # not the main process
            else:
                launcher.send_signal(signal.SIGTERM)
            assert launcher.wait(timeout=180) == 0, log.read_text()[-3000:]
        finally:
            if launcher.poll() is None:
                launcher.kill()
        text = log.read_text()
        previous, stopped = stopped, int(text.split("stop requested (")[1].split(") at step ")[1].split()[0])
        assert previous is None or (f"resuming from step {previous}" in text and stopped > previous)
        checkpoint = verify_checkpoint(latest_checkpoint(run_dir))
        assert checkpoint.step == stopped and checkpoint.world_size == 2
        assert {p.name for p in checkpoint.path.glob("rank-*")} == {"rank-0", "rank-1"}  # one step, both processes
        assert "Traceback" not in text and last_line(text).startswith(f"halted at step {stopped}; checkpoint")


# ---- Exit codes through the launcher ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher_env(tmp_path_factory) -> dict:
    """The environment of a `pip install -e .` that registered pyproject.toml's `torch.backends` entry point. An
    environment installed before the entry point existed gets it from a dist-info folder on PYTHONPATH, written
    from pyproject.toml's own declaration."""
    section = (ROOT / "pyproject.toml").read_text().split('[project.entry-points."torch.backends"]\n')[1]
    declared = dict(re.findall(r'^(\w+) = "([\w.:]+)"$', section.split("\n[")[0], flags=re.M))
    assert declared == {"vaebm_trainer_exit_codes": "trainer.run.launcher_exit:install"}
    if any(ep.value == declared["vaebm_trainer_exit_codes"] for ep in entry_points(group="torch.backends")):
        return environment(ROOT)
    site = tmp_path_factory.mktemp("site")
    info = site / "vaebm_trainer-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vaebm-trainer\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[torch.backends]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    return environment(site)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [ONE_PROCESS, TWO_PROCESSES], ids=["1-process", "2-processes"])
def test_a_bad_input_exits_2_through_accelerate_launch_with_the_line_last(tmp_path, launcher, launcher_env):
    result = run("train_nvae.py", "--config", "digits", "--run-dir", str(tmp_path / "run"), "optim.lr=nan",
                 launcher=launcher, env=launcher_env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert last_line(result.stderr) == "error: config key 'optim.lr' must be a finite number, got 'nan'"
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_diverged_run_exits_3_through_a_two_process_launch(tmp_path, cache_dir, launcher_env):
    run_dir = tmp_path / "run"
    result = run("tests/helpers/nan_nvae.py", "--config", "digits", "--run-dir", str(run_dir),
                 f"data.cache_dir={cache_dir}", *FAST, "train.per_device_batch_size=4", "train.max_steps=12",
                 "train.checkpoint_every=2", "train.image_every=0", "divergence.patience=2",
                 launcher=TWO_PROCESSES, env=launcher_env)
    assert result.returncode == 3, result.stderr[-3000:]
    assert last_line(result.stderr).startswith("error: training diverged at step 5: non-finite loss")
    assert "Traceback" not in result.stderr
    assert json.loads((run_dir / "status.json").read_text())["exit_code"] == 3


def test_the_launcher_hook_acts_only_on_notes_of_ours(tmp_path):
    """The excepthook's decision: our child's note and matching code → that code (and the line where the launcher
    printed after it); a failure without a note of ours → the launcher's own report, unchanged."""
    class CalledProcessError(Exception):
        returncode = 2

    class ProcessFailure:
        pid, exitcode = 4242, 3

    class ChildFailedError(Exception):
        def get_first_failure(self):
            return 0, ProcessFailure()

    class SignalException(Exception):
        pass

    assert is_launcher(["/usr/bin/accelerate", "launch", "x.py"]) and not is_launcher(["/usr/bin/accelerate", "env"])
    assert is_launcher(["/venv/bin/torchrun", "x.py"]) and not is_launcher(["scripts/train_nvae.py"])
    assert _decide(CalledProcessError(), None, tmp_path) is None  # no note: not ours
    (tmp_path / "4242.json").write_text(json.dumps({"code": 3, "line": "error: diverged", "pid": 4242}))
    assert _decide(ChildFailedError(), None, tmp_path) == (3, "error: diverged")
    assert _decide(CalledProcessError(), None, tmp_path) is None  # code 2 but the note says 3
    (tmp_path / "4242.json").write_text(json.dumps({"code": 2, "line": "error: bad", "pid": 4242}))
    assert _decide(CalledProcessError(), None, tmp_path) == (2, None)  # the child's line is already the last
    assert _decide(ChildFailedError(), None, tmp_path) is None  # the first failure exited 3, not 2
    assert _decide(SignalException(), None, tmp_path) is None
    (tmp_path / "4242.json").write_text(json.dumps({"code": 0, "line": "halted at step 7", "pid": 4242}))
    assert _decide(SignalException(), None, tmp_path) == (0, "halted at step 7")  # stopped cleanly by the signal


# ---- A really full device ----------------------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    """A 45 MB tmpfs: room for one digits NVAE checkpoint (30 MB), not two. Needs root (mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; test_checkpoint.py injects ENOSPC without it")
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=45m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode()[-200:]}")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True)  # still busy: detach it anyway


@pytest.mark.slow
def test_a_full_device_is_one_line_and_the_rerun_resumes(small_tmpfs, cache_dir):
    run_dir = small_tmpfs / "run"
    args = ["--config", "digits", "--run-dir", str(run_dir), f"data.cache_dir={cache_dir}", *FAST,
            "train.max_steps=4", "train.checkpoint_every=2", "train.image_every=0"]
    full = run("train_nvae.py", *args)
    assert full.returncode == 2, full.stderr[-3000:]
    line = last_line(full.stderr)
    assert line.startswith(f"error: no space left on the device writing '{run_dir}/checkpoints/step-0000004.tmp/")
    assert "Traceback" not in full.stderr
    assert [step for step, _ in list_checkpoints(run_dir)] == [2]
    verify_checkpoint(run_dir / "checkpoints" / "step-0000002")  # the newest complete checkpoint is untouched
    assert not (run_dir / "checkpoints" / "step-0000004.tmp").exists()  # its space given back at once

    stale = [run_dir / "checkpoints" / "step-0000009.tmp", run_dir / ".config.tmp-99999.yaml"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"\0" * 4096)
    stale[1].write_text("half")
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_tmpfs)], check=True)
    again = run("train_nvae.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 2" in again.stderr and latest_checkpoint(run_dir).name == "step-0000004"
    assert not any(path.exists() for path in stale)
