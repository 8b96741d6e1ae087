"""Evaluation experiments: FID offline, and the papers' small-scale experiments reproduced on CPU.

    python scripts/evaluate.py NAME [--quick] [--out RESULT.json] [--run-dir DIR] [--seed S] ...
    python scripts/evaluate.py NAME --help        # the experiment's own flags

Each experiment trains what it needs with the project's own trainers, writes its result as JSON
(`--out`), to TensorBoard (`--run-dir`), and prints a short table. `--quick` finishes within 10 minutes
on 2 CPU cores. The experiments live in trainer/evaluation/ (one module each). User mistakes print
`error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.errors import UserError  # noqa: E402
from trainer.cli import run_cli  # noqa: E402
from trainer.evaluation import available, experiment_module, summary  # noqa: E402


def add_shared_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every experiment takes: --out, --run-dir, --quick, --seed."""
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here (atomically)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="keep trained models, images and TensorBoard logs here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="the small version: within 10 minutes on 2 CPU cores")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training and sampling step")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Only the named experiment's module is imported (for its flags), so `evaluate.py --help` needs no torch."""
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="experiment", required=True, metavar="NAME",
                                     help=f"one of: {', '.join(names)}")
    for name in names:
        if name != chosen:
            commands.add_parser(name, help=summary(name))
            continue
        module = experiment_module(name)
        sub = commands.add_parser(name, help=summary(name), description=module.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        add_shared_arguments(sub)
        module.add_arguments(sub)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one evaluation experiment and write its report (JSON with --out); returns the exit code."""
    args = parse_args(argv)
    from trainer.evaluation.report import ExperimentReport

    if args.out is not None and args.out.exists() and args.out.is_dir():
        raise UserError(f"--out '{args.out}' is a directory; give a JSON file path")
    report = ExperimentReport(args.experiment, args.out, args.run_dir)
    results = experiment_module(args.experiment).run(args, report)
    report.finish(results)
    return 0


if __name__ == "__main__":
    run_cli(main)
