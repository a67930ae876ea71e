"""Data preparation costs (issues 14, 15): peak memory of tokenizing one huge single-line document, whole
(one tokenizer call, as exatrain did) vs in pieces (`encode_texts`), and `exatrain data prepare` throughput
by worker count. Each measurement runs in a fresh process so its peak RSS is its own.

    OMP_NUM_THREADS=1 python benchmarks/data_prepare.py [--mb 50] [--corpus-mb 20] [--workers 1 2]

Prints a table and writes benchmarks/out/data_prepare.json.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
WORDS = "the of and packed sequence token model data shard rank epoch loss gradient attention".split()

_ENCODE = """
import json, resource, sys, time
import numpy as np
from exatrain.data.tokenizer import SHIPPED_DIR, Tokenizer, encode_texts
tok = Tokenizer.load(next(SHIPPED_DIR.glob("tokenizer-bpe4096-*.json")))
text = json.loads(open(sys.argv[1], "rb").readline())["text"]
start = time.perf_counter()
if sys.argv[2] == "whole":
    n = len(np.asarray(tok.encode_batch([text])[0], dtype=np.uint16))
else:
    n = sum(len(ids) for ids in encode_texts(tok, [text], np.uint16))
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

_PREPARE = """
import json, sys, time
from exatrain.data.prepare import prepare
from exatrain.data.tokenizer import SHIPPED_DIR
tok = str(next(SHIPPED_DIR.glob("tokenizer-bpe4096-*.json")))
start = time.perf_counter()
info = prepare([sys.argv[1]], sys.argv[2], tok, int(sys.argv[3]))
print(json.dumps({"tokens": info["tokens"], "documents": info["documents"], "seconds": time.perf_counter() - start}))
"""


def _text(chars: int, rng: random.Random) -> str:
    words = []
    total = 0
    while total < chars:
        words.append(rng.choice(WORDS))
        total += len(words[-1]) + 1
    return " ".join(words)[:chars]


def _run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50, help="size of the single-line document")
    parser.add_argument("--corpus-mb", type=float, default=20, help="size of the corpus for the prepare runs")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rng = random.Random(0)
    result: dict = {"document_mb": args.mb, "corpus_mb": args.corpus_mb, "long_document": {}, "prepare": {}}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp, "big.jsonl")
        big.write_text(json.dumps({"text": _text(int(args.mb * 1e6), rng)}) + "\n")
        for mode in ("whole", "pieces"):
            result["long_document"][mode] = _run(_ENCODE, str(big), mode)
        corpus = Path(tmp, "corpus.jsonl")
        with open(corpus, "w") as f:
            written = 0
            while written < args.corpus_mb * 1e6:
                text = _text(rng.randint(200, 8000), rng)
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text)
        for workers in args.workers:
            result["prepare"][workers] = _run(_PREPARE, str(corpus), str(Path(tmp, f"out{workers}")), str(workers))
    print(f"one {args.mb:g} MB single-line document, shipped BPE-4096 tokenizer:")
    print("| encoding | tokens | seconds | peak RSS MiB |\n|---|---:|---:|---:|")
    for mode, r in result["long_document"].items():
        print(f"| {mode} | {r['tokens']:,} | {r['seconds']:.1f} | {r['peak_rss_mib']:,.0f} |")
    print(f"\nexatrain data prepare, {args.corpus_mb:g} MB JSONL:")
    print("| workers | documents | tokens | seconds | tokens/s |\n|---:|---:|---:|---:|---:|")
    for workers, r in result["prepare"].items():
        print(f"| {workers} | {r['documents']:,} | {r['tokens']:,} | {r['seconds']:.1f} | "
              f"{r['tokens'] / r['seconds']:,.0f} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "data_prepare.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
