"""The scripts' CPU thread setting (trainer/run/threads.py): precedence of the knobs, bad values, and that the
setting reaches torch and OpenMP in a real script process (it must be in place before torch loads)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from trainer.bench.contention import busy_competitor, setting_env
from trainer.errors import UserError
from trainer.run import threads
from trainer.run.threads import available_cores, configure_cpu_threads


def test_defaults_apply_when_nothing_is_set():
    env = {}
    setting = configure_cpu_threads(env)
    assert setting.source == "default"
    assert env["OMP_NUM_THREADS"] == threads.DEFAULT_THREADS == "1" == str(setting.threads)
    assert env["OMP_WAIT_POLICY"] == threads.DEFAULT_WAIT_POLICY == setting.wait_policy


def test_auto_divides_the_cores_among_the_processes_of_a_launch():
    env = {"VAEBM_THREADS": "auto", "LOCAL_WORLD_SIZE": "2"}
    configure_cpu_threads(env)
    assert env["OMP_NUM_THREADS"] == str(max(available_cores() // 2, 1))


def test_the_users_own_omp_settings_are_respected():
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    setting = configure_cpu_threads(env)
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}
    assert (setting.threads, setting.source) == (3, "OMP_NUM_THREADS")


def test_vaebm_knobs_win_and_off_and_default_leave_things_alone():
    env = {"VAEBM_THREADS": "2", "OMP_NUM_THREADS": "5", "VAEBM_WAIT_POLICY": "active", "OMP_WAIT_POLICY": "PASSIVE"}
    configure_cpu_threads(env)
    assert (env["OMP_NUM_THREADS"], env["OMP_WAIT_POLICY"]) == ("2", "ACTIVE")
    env = {"VAEBM_THREADS": "off", "VAEBM_WAIT_POLICY": "default", "OMP_WAIT_POLICY": "PASSIVE"}
    setting = configure_cpu_threads(env)
    assert "OMP_NUM_THREADS" not in env and "OMP_WAIT_POLICY" not in env  # OpenMP's and torch's own defaults
    assert setting.threads is None and setting.wait_policy is None


@pytest.mark.parametrize("env, name", [({"VAEBM_THREADS": "two"}, "VAEBM_THREADS"),
                                       ({"VAEBM_THREADS": "0"}, "VAEBM_THREADS"),
                                       ({"OMP_NUM_THREADS": "-1"}, "OMP_NUM_THREADS"),
                                       ({"VAEBM_WAIT_POLICY": "sleepy"}, "VAEBM_WAIT_POLICY")])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(UserError, match=name):
        configure_cpu_threads(dict(env))


def test_available_cores_is_within_the_affinity_mask():
    assert 1 <= available_cores() <= len(os.sched_getaffinity(0))


PROBE = ("from trainer.cli import run_cli\n"
         "def main():\n"
         "    import json, os, torch\n"
         "    print(json.dumps({'threads': torch.get_num_threads(), 'policy': os.environ.get('OMP_WAIT_POLICY')}))\n"
         "run_cli(main)\n")


def _probe(env_changes: dict[str, str | None]) -> dict:
    """A script entry point (`run_cli`) that reports what torch ended up with."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "VAEBM_THREADS",
                                                           "VAEBM_WAIT_POLICY")}
    env.update({k: v for k, v in env_changes.items() if v is not None}, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_scripts_apply_the_setting_before_torch_loads():
    assert _probe({"VAEBM_THREADS": "1"}) == {"threads": 1, "policy": "PASSIVE"}
    assert _probe({"OMP_NUM_THREADS": "2", "VAEBM_WAIT_POLICY": "ACTIVE"})["threads"] == 2
    assert _probe({"OMP_NUM_THREADS": "2", "VAEBM_WAIT_POLICY": "ACTIVE"})["policy"] == "ACTIVE"
    assert _probe({})["threads"] == int(threads.DEFAULT_THREADS)


@pytest.mark.parametrize("variable, value, message", [
    ("VAEBM_THREADS", "many", "VAEBM_THREADS must be a positive number of threads, auto or off, got 'many'"),
    ("VAEBM_MALLOC", "sometimes", "VAEBM_MALLOC must be one of keep, default, got 'sometimes'")])  # host_memory.py
def test_a_bad_setting_is_a_one_line_error_in_a_script(tmp_path, variable, value, message):
    env = {**os.environ, variable: value, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "scripts" / "train_nvae.py"), "--config", "digits", "--run-dir",
               str(tmp_path / "run"), "train.max_steps=1", f"data.cache_dir={tmp_path / 'cache'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_busy_competitor_spins_while_the_block_runs_and_is_gone_after():
    with busy_competitor() as competitor:
        assert competitor.poll() is None  # running
    assert competitor.returncode is not None
    with busy_competitor(False) as nothing:
        assert nothing is None


def test_contention_settings_map_to_the_knobs():
    assert setting_env("1:default") == {"VAEBM_THREADS": "1", "VAEBM_WAIT_POLICY": "default"}
    assert setting_env("auto") == {"VAEBM_THREADS": "auto", "VAEBM_WAIT_POLICY": "PASSIVE"}
