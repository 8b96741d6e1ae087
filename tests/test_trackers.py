"""`train.log_with`: Accelerate's trackers beside TensorBoard, tested with MLflow's local file store (offline)."""
from __future__ import annotations

import json

import pytest
from conftest import FAST, run_script

from trainer.errors import UserError
from trainer.run.trackers import accelerate_trackers


def test_tracker_names_are_checked():
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    assert accelerate_trackers(["tensorboard"]) == []  # always ours: nothing for Accelerate to start
    with pytest.raises(UserError, match="unknown tracker 'tensorbored'"):
        accelerate_trackers(["tensorbored"])
    installed = {str(t) for t in get_available_trackers()}
    missing = next(str(t) for t in LoggerType if str(t) not in installed | {"all", "tensorboard"})
    with pytest.raises(UserError, match=f"{missing} is not installed"):
        accelerate_trackers([missing])


def test_unknown_tracker_is_a_clean_error(tmp_path, cache_dir):
    result = run_script("train_nvae.py", "--config", "digits", "--run-dir", str(tmp_path / "run"), *FAST,
                        f"data.cache_dir={cache_dir}", "train.log_with=[tensorboard,all]", check=False)
    assert result.returncode == 2 and "error: train.log_with: name the trackers" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_mlflow_gets_the_scalars_and_grids_and_continues_after_resume(tmp_path, cache_dir, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra (mlflow-skinny) is not installed")
    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise
    run_dir = tmp_path / "run"
    common = ["--config", "digits", "--run-dir", str(run_dir), *FAST, f"data.cache_dir={cache_dir}",
              "train.max_steps=4", "train.image_every=2", "train.checkpoint_every=100",
              "train.log_with=mlflow", "train.tracker_project=digits-test"]
    run_script("train_nvae.py", *common, "train.halt_at_step=2")
    run_script("train_nvae.py", *common)

    client = mlflow.tracking.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("digits-test").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed launch continued the same run
    run_id = runs[0].info.run_id
    assert json.loads((run_dir / "trackers.json").read_text()) == {"mlflow": run_id}
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert history == [(row["step"], row["loss"]) for row in rows] == [(2, rows[0]["loss"]), (4, rows[1]["loss"])]
    assert {"kl/group_00", "sys/img_per_s", "data/skipped_samples"} <= set(runs[0].data.metrics)
    assert runs[0].data.params["train.max_steps"] == "4" and runs[0].data.params["data.dataset"] == "digits"
    grids = sorted(f.path for f in client.list_artifacts(run_id, "samples"))
    assert grids == sorted(f"samples/{p.name}" for p in (run_dir / "samples").glob("*.png")) and len(grids) == 4
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))  # TensorBoard stays on
