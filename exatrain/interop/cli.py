"""`exatrain export | import | data prepare`: argument definitions without torch (the handlers import their
modules when they run), so `exatrain --help` and a mistyped command stay instant."""

from __future__ import annotations

import argparse
import logging
import sys

from exatrain.config import DEFAULT_CONFIG, split_config_args
from exatrain.interop import EXPORT_DTYPES


def cmd_export(args: argparse.Namespace) -> int:
    from exatrain.interop.hf import export_hf
    from exatrain.train.checkpoint import CheckpointError

    try:
        out = export_hf(args.run, args.out, args.step, args.max_shard_size, args.dtype, not args.no_tokenizer)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"exatrain: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} (transformers.LlamaForCausalLM.from_pretrained loads it)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from exatrain.interop.hf import import_hf

    try:
        path = import_hf(args.hf_dir, args.out_run, *split_config_args(args.config_args))
    except (ValueError, OSError) as exc:
        print(f"exatrain: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}; start the run with: exatrain train {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from exatrain.data.prepare import prepare

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare(args.inputs, args.output, args.tokenizer, args.workers, args.text_key)
    except (OSError, ValueError) as exc:
        print(f"exatrain: {exc}", file=sys.stderr)
        return 2
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face transformers Llama directory")
    p.add_argument("run", help="run directory (latest checkpoint) or a checkpoints/step_* directory")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--step", type=int, default=None, help="export checkpoints/step_N instead of the latest")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: transformers Llama)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="float32", help="weight dtype (default float32)")
    p.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer.json and its config files")
    p.set_defaults(func=cmd_export)


def add_import_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="a run config that starts from a Hugging Face Llama directory's weights")
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("out_run", help="run directory to create; its config.yaml is written")
    p.add_argument("config_args", nargs="*", metavar="[CONFIG] OVERRIDES",
                   help=f"base config (default {DEFAULT_CONFIG}) and dotlist overrides, e.g. data.paths=[a.jsonl]")
    p.set_defaults(func=cmd_import)


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="data preparation: tokenize a corpus once into Megatron .bin/.idx")
    commands = data.add_subparsers(dest="data_command", required=True)
    p = commands.add_parser("prepare", help="tokenize JSONL/text files into PREFIX.bin/.idx (+ PREFIX.exatrain.json)")
    p.add_argument("inputs", nargs="+", help="JSONL or text files, .gz too, or directories of them (as data.paths)")
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.exatrain.json")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json path (the job's data.tokenizer.path), or 'byte'")
    p.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes of one thread each (default 1: one process, the tokenizer's own threads)")
    p.add_argument("--text-key", default="text", help="JSONL field holding the text (default text)")
    p.set_defaults(func=cmd_prepare)
