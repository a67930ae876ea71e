"""Command line: `exatrain train | print-config | launch | eval | plan | bench | data | export | import ...`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from exatrain.config import DEFAULT_CONFIG, ConfigError, load_config, split_config_args, to_yaml
from exatrain.launch.cli import add_launch_arguments


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG,
                   help=f"YAML config (path, or a name under exatrain/configs/; default {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=3e-4 train.steps=100")


def _split_config(args: argparse.Namespace) -> tuple[str, list[str]]:
    return split_config_args([args.config, *args.overrides])


def cmd_train(args: argparse.Namespace) -> int:
    from exatrain.train.checkpoint import CheckpointError
    from exatrain.train.trainer import exit_code, train

    path, overrides = _split_config(args)
    try:
        result = train(load_config(path, overrides))
    except (CheckpointError, FloatingPointError) as exc:  # README "Failure modes": the message says what to do
        print(f"exatrain: {exc}", file=sys.stderr)
        return 1
    loss = f"loss {result.final_loss:.4f}, " if math.isfinite(result.final_loss) else ""
    print(f"{result.status}: step {result.step}, {loss}val loss {result.val_loss:.4f}, run dir {result.run_dir}")
    return exit_code(result)


def cmd_print_config(args: argparse.Namespace) -> int:
    path, overrides = _split_config(args)
    print(to_yaml(load_config(path, overrides)), end="")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from exatrain.launch.cli import run_launch

    path, overrides = _split_config(args)
    return run_launch(path, overrides, args)


def cmd_eval(args: argparse.Namespace) -> int:
    from exatrain.train.checkpoint import CheckpointError

    try:
        if args.eigenscore:
            from exatrain.eval.eigenscore_run import evaluate_eigenscore, format_table

            overrides = {k: v for k, v in (("k", args.k), ("methods", args.method), ("temperature", args.temperature),
                                            ("max_new_tokens", args.max_new_tokens), ("sample_seed", args.seed))
                         if v is not None}
            result = evaluate_eigenscore(args.run_dir, args.prompts or "", args.max_prompts, overrides, args.device)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
        else:
            from exatrain.eval.perplexity import evaluate_perplexity, format_table

            result = evaluate_perplexity(args.run_dir, args.metadata or ["none", "real"], args.max_docs,
                                         device=args.device)
    except (CheckpointError, ValueError, OSError) as exc:
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
    p = sub.add_parser("eval", help="held-out text perplexity of a trained run (with or without MeCo metadata), "
                                    "or its EigenScore")
    p.add_argument("run_dir", help="run directory (latest checkpoint) or a checkpoints/step_* directory")
    p.add_argument("--metadata", action="append", metavar="none|real|VALUE",
                   help="condition, repeatable: none, real (the document's own domain) or a made-up value "
                        "such as wikipedia.org (default: none and real)")
    p.add_argument("--max-docs", type=int, default=None, help="evaluate only the first N held-out documents")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    es = p.add_argument_group("EigenScore (--eigenscore; defaults from the run's eigenscore: section)")
    es.add_argument("--eigenscore", action="store_true",
                    help="EigenScore of K sampled answers per prompt (exact, Chebyshev EES, SLQ) instead of perplexity")
    es.add_argument("--prompts", metavar="FILE", help="prompt file: JSONL ('prompt' or 'text') or one per line "
                    "(default eigenscore.prompts, else send.prompts, else held-out document beginnings)")
    es.add_argument("--max-prompts", type=int, default=None, help="score only the first N prompts")
    es.add_argument("--k", type=int, default=None, help="samples per prompt")
    es.add_argument("--method", action="append", choices=["exact", "chebyshev", "slq"],
                    help="estimator, repeatable (default eigenscore.methods)")
    es.add_argument("--temperature", type=float, default=None)
    es.add_argument("--max-new-tokens", type=int, default=None)
    es.add_argument("--seed", type=int, default=None)
    es.add_argument("--json", metavar="FILE", help="also write the full result (per-prompt scores) as JSON")
    p.set_defaults(func=cmd_eval)
    from exatrain.bench.cli import add_bench_arguments, add_plan_arguments
    from exatrain.interop.cli import add_data_parser, add_export_parser, add_import_parser

    p = sub.add_parser("plan", help="rank parallel layouts for N devices by predicted tokens/s (memory-checked)")
    add_plan_arguments(p)
    p = sub.add_parser("bench", help="micro-benchmarks (gemm, comm) and scaling sweeps")
    add_bench_arguments(p)
    add_data_parser(sub)
    add_export_parser(sub)
    add_import_parser(sub)
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
