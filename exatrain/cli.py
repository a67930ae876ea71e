"""Command line: `exatrain train | print-config | launch | eval ...`."""

from __future__ import annotations

import argparse
import math
import sys

from exatrain.config import DEFAULT_CONFIG, ConfigError, load_config, split_config_args, to_yaml
from exatrain.launch.cli import add_launch_arguments


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                   help=f"YAML config (path, or a name under exatrain/configs/; default {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4 train.steps=100")


def _split_config(args: argparse.Namespace) -> tuple[str, list[str]]:
    return split_config_args([args.config, *args.overrides])


def cmd_train(args: argparse.Namespace) -> int:
    from exatrain.train.trainer import train

    path, overrides = _split_config(args)
    result = train(load_config(path, overrides))
    loss = f"loss {result.final_loss:.4f}, " if math.isfinite(result.final_loss) else ""
    print(f"{result.status}: step {result.step}, {loss}val loss {result.val_loss:.4f}, run dir {result.run_dir}")
    return 0 if result.status == "completed" else 3


def cmd_print_config(args: argparse.Namespace) -> int:
    path, overrides = _split_config(args)
    print(to_yaml(load_config(path, overrides)), end="")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from exatrain.launch.cli import run_launch

    path, overrides = _split_config(args)
    return run_launch(path, overrides, args)


def cmd_eval(args: argparse.Namespace) -> int:
    from exatrain.eval.perplexity import evaluate_perplexity, format_table
    from exatrain.train.checkpoint import CheckpointError

    try:
        result = evaluate_perplexity(args.run_dir, args.metadata or ["none", "real"], args.max_docs, device=args.device)
    except (CheckpointError, ValueError) as exc:
        print(f"exatrain: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exatrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model (under torchrun/srun/mpirun for several processes)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("print-config", help="print the resolved config")
    _add_config_args(p)
    p.set_defaults(func=cmd_print_config)
    p = sub.add_parser("launch", help="submit to Slurm through submitit (profiles in exatrain/configs/clusters/)")
    _add_config_args(p)
    add_launch_arguments(p)
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("eval", help="held-out text perplexity of a trained run, with or without MeCo metadata")
    p.add_argument("run_dir", help="run directory (latest checkpoint) or a checkpoints/step_* directory")
    p.add_argument("--metadata", action="append", metavar="none|real|VALUE",
                   help="condition, repeatable: none, real (the document's own domain) or a made-up value "
                        "such as wikipedia.org (default: none and real)")
    p.add_argument("--max-docs", type=int, default=None, help="evaluate only the first N held-out documents")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"exatrain: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
