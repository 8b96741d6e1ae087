"""scripts/reproduce.py: the results table from the experiments' JSON, and its errors.

The experiments themselves are tested end to end in tests/test_eval_*.py; here the table is rendered
(`--table-only`) from hand-written results, so every row's keys and the failure rows are checked.
"""
from __future__ import annotations

import importlib.util
import json

from conftest import ROOT, run_script

from trainer.evaluation.ood import OOD_SETS


def load_reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_is_rendered_from_the_results_and_names_failures(tmp_path):
    (tmp_path / "toy-likelihood.json").write_text(json.dumps({"vae_ll": -3.19071, "vaebm_ll": -2.4794, "true_ll": -1.13,
                                                               "vaebm_ll_seed_stderr": 0.0213}))
    ood = {f"{method}_{name}_auroc": 0.5 + 0.1 * i for i, name in enumerate(OOD_SETS) for method in ("nvae", "vaebm")}
    (tmp_path / "ood.json").write_text(json.dumps(ood))
    (tmp_path / "vampprior.json").write_text(json.dumps({"vae_standard_ll": -25.0}))  # an earlier run's result
    status = {"toy-likelihood": [0, 169.0, ""], "ood": [0, 23.0, ""], "modes": [3, 12.0, ""],
              "fid": [-1, 0.0, "no VAEBM bundle in OUT/models (run fd-digits first)"], "vampprior": [4, 30.0, ""]}
    (tmp_path / "status.json").write_text(json.dumps(status))

    result = run_script("reproduce.py", "--quick", "--only", "toy-likelihood,modes,ood,fid,vampprior",
                        "--out-dir", str(tmp_path), "--table-only", check=False)
    assert result.returncode == 1  # some experiments failed: the table says which, the exit code says so too
    table = (tmp_path / "results.md").read_text()
    assert table in result.stdout
    assert "| toy-likelihood | 25-Gaussians test LL, VAE (nats) | −3.191 | −2.97 |" in table
    assert "| toy-likelihood | 25-Gaussians test LL, VAEBM, Langevin in ε-space (nats) | −2.479 ± 0.021 | −1.50 |" in table
    assert "| toy-likelihood | 25-Gaussians test LL, reference trainer with exact negatives (nats) | – |  |" in table
    assert "failed (exit 3, see modes.log)" in table
    assert "not run: no VAEBM bundle in OUT/models" in table
    # Stopped (exit 4): the experiment wrote nothing, and an earlier run's JSON must not pass for its result.
    assert "| vampprior | binarized digits test LL, VAE + standard prior | stopped before its results" in table
    assert "−25" not in table
    ood_rows = [line for line in table.splitlines() if line.startswith("| ood | AUROC")]
    assert [row.split(" | ")[2] for row in ood_rows] == [f"{0.5 + 0.1 * i:.4g} / {0.5 + 0.1 * i:.4g}"
                                                          for i in range(len(OOD_SETS))]
    assert "| toy-likelihood | 2.8 |" in table and "| modes | 0.2 |" in table
    assert "joint-prior" not in table  # only the requested experiments


def test_every_row_names_a_known_experiment_and_ood_set():
    reproduce = load_reproduce()
    assert {name for name, *_ in reproduce.ROWS} == set(reproduce.ORDER)
    ood_keys = {key for name, _, keys, _ in reproduce.ROWS if name == "ood" for key in keys.split(",")}
    assert ood_keys == {f"{method}_{name}_auroc" for name in OOD_SETS for method in ("nvae", "vaebm")}


def test_table_only_without_a_run_and_unknown_experiments_are_one_line_errors(tmp_path):
    missing = run_script("reproduce.py", "--quick", "--out-dir", str(tmp_path), "--table-only", check=False)
    assert missing.returncode == 2 and "status.json" in missing.stderr and "Traceback" not in missing.stderr
    unknown = run_script("reproduce.py", "--only", "toy,modes", "--out-dir", str(tmp_path), check=False)
    assert unknown.returncode == 2 and "unknown experiment(s) toy" in unknown.stderr
    assert not (tmp_path / "results.md").exists()
