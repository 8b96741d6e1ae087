"""Import checkpoints of the official NVAE / VAEBM code into run directories of this trainer.

    python scripts/import_official.py nvae CHECKPOINT.pt --out RUN_DIR
    python scripts/import_official.py ebm EBM_CHECKPOINT.pth --vae RUN_DIR --out RUN_DIR2 \\
        [--layout cifar10|celeba64|lsun_church64|celebahq256] [--n-channel C] [--input-range 0..1|-1..1] [--step N]

`nvae` writes an NVAE run (resolved config.yaml + one checkpoint at the official step) that
`train_vaebm.py --vae RUN_DIR`, `export.py RUN_DIR` and `train_nvae.py --config RUN_DIR/config.yaml
--run-dir RUN_DIR train.max_steps=N` accept. `ebm` writes a VAEBM run on that NVAE which
`train_vaebm.py --config RUN_DIR2/config.yaml --run-dir RUN_DIR2 --data SHARDS` resumes and `export.py`
exports. Files are read with torch.load(weights_only=True): nothing but tensors and argparse.Namespace
is unpickled. User mistakes print `error: ...` and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from trainer.cli import run_cli  # noqa: E402

LAYOUTS = ("cifar10", "celeba64", "lsun_church64", "celebahq256")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line of import_official.py (subcommands nvae and ebm)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True)
    nvae = kinds.add_parser("nvae", help="an official NVAE checkpoint (Gaussian decoder) → NVAE run")
    nvae.add_argument("checkpoint", type=Path, help="official checkpoint.pt (state_dict, args, ...)")
    nvae.add_argument("--out", type=Path, required=True, help="new NVAE run directory")
    ebm = kinds.add_parser("ebm", help="an official VAEBM energy network → VAEBM run on an NVAE run")
    ebm.add_argument("checkpoint", type=Path, help="official EBM_<iteration>.pth (model, optimizer)")
    ebm.add_argument("--vae", type=Path, required=True, help="the NVAE run (e.g. from `import_official.py nvae`)")
    ebm.add_argument("--out", type=Path, required=True, help="new VAEBM run directory")
    ebm.add_argument("--layout", choices=LAYOUTS, default=None, help="energy layout (default: recognized from shapes)")
    ebm.add_argument("--n-channel", type=int, default=None, help="base width C (default: read from the weights)")
    ebm.add_argument("--input-range", choices=("0..1", "-1..1"), default="0..1",
                     help="image range the network was trained on (official default 0..1; --renormalize: -1..1)")
    ebm.add_argument("--step", type=int, default=None, help="training iteration (default: from EBM_<N>.pth, else 0)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Import an official NVAE checkpoint or VAEBM energy network into a new run directory; returns 0."""
    args = parse_args(argv)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.kind == "nvae":
        from trainer.official.nvae import import_nvae

        import_nvae(args.checkpoint, args.out, log=log)
    else:
        from trainer.official.ebm import import_ebm

        import_ebm(args.checkpoint, args.vae, args.out, layout=args.layout, n_channel=args.n_channel,
                   input_range=args.input_range, step=args.step, log=log)
    return 0


if __name__ == "__main__":
    run_cli(main)
