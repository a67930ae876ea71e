"""Needle in a haystack: synthetic passkey retrieval across context lengths and depths (DESIGN.md §4).

A passkey sentence is hidden at a relative depth of a haystack (the classic filler sentences,
or natural text) and the prompt ends with a question; the model must continue with the key's
digits. A cell (length, depth) scores the exact-match rate of greedy decoding (with the KV cache,
so S2 models decode through their pruned cache). Far needles are where a sparse pattern could
lose information: beyond the local window only the strided blocks reach them.

Small CPU models cannot retrieve out of the box, so `write_corpus` makes training documents of
the same form (needle at a uniform depth, question and answer at the end); exatrain/configs/s2.yaml and
exatrain/configs/s2_dense.yaml train on them mixed with the embedded natural-text corpus. `eval` also
reports held-out perplexity: over all documents, and for passkey documents and natural text apart.

    python -m exatrain.eval.needle corpus runs/needle/passkey.jsonl
    python -m exatrain.eval.needle eval runs/s2 runs/s2_dense --out studies/out/s2_needle.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import torch

from exatrain.data.documents import load_documents
from exatrain.data.tokenizer import Tokenizer
from exatrain.model.generate import generate
from exatrain.model.llama import Transformer

# The key follows a marker ("#") that occurs nowhere else, so that the first digit is cued by one
# token: with plain "The pass key is 12345" the cue is the bigram "key is", " is" being in most
# filler sentences, and the CPU-sized study models of exatrain/configs/s2*.yaml did not learn retrieval.
NEEDLE = " The pass key is #{key}. Remember it."
QUESTION = " What is the pass key? The pass key is #"
ANSWER = "{key}"
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def random_key(rng: random.Random, digits: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def haystack_text(kind: str = "filler", seed: int = 0, n_chars: int = 1 << 19) -> str:
    """Text to hide needles in. `filler`: the classic passkey haystack (Mohtashami & Jaggi, 2023),
    shuffled filler sentences that a small model learns fast, so training signal goes to retrieval.
    `corpus`: natural text, the embedded corpus."""
    if kind == "corpus":
        docs, _ = load_documents([])
        return " ".join(" ".join(d.text.split()) for d in docs)
    if kind != "filler":
        raise ValueError(f"haystack kind must be filler or corpus, got {kind!r}")
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        out.append(rng.choice(FILLER))
        size += len(out[-1]) + 1
    return " ".join(out)


def passkey_document(haystack: str, depth: float, key: str) -> str:
    """Haystack with the needle after the word nearest to `depth`, then the question and the answer."""
    pos = int(depth * len(haystack))
    cut = len(haystack) if pos >= len(haystack) else max(0, haystack.rfind(" ", 0, pos + 1))
    parts = (haystack[:cut].strip(), NEEDLE.format(key=key).strip(), haystack[cut:].strip(), QUESTION.strip())
    return " ".join(p for p in parts if p) + ANSWER.format(key=key) + "."


def write_corpus(out: str | Path, n_docs: int = 30000, min_chars: int = 20, max_chars: int = 150,
                 digits: int = 5, seed: int = 0, haystack: str = "filler") -> Path:
    """JSONL training documents: random haystack windows of [min_chars, max_chars) with a needle."""
    rng = random.Random(seed)
    text = haystack_text(haystack, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(n_docs):
            n = rng.randrange(min_chars, max_chars)
            start = text.find(" ", rng.randrange(0, len(text) - n)) + 1
            end = text.rfind(" ", start, start + n)  # whole words only
            doc = passkey_document(text[start:end], rng.random(), random_key(rng, digits))
            f.write(json.dumps({"text": doc, "source": "passkey"}) + "\n")
    return out


def passkey_prompts(tok: Tokenizer, haystack_ids: list[int], length: int, depth: float, keys: list[str],
                    rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of exactly `length` tokens (<bos>, haystack with the needle at `depth`, question) and
    their answer tokens: (len(keys), length) and (len(keys), answer length)."""
    prompts, answers = [], []
    for key in keys:
        needle, question = tok.encode(NEEDLE.format(key=key)), tok.encode(QUESTION)
        n_hay = length - 1 - len(needle) - len(question)
        if n_hay < 0:
            raise ValueError(f"context {length} is too short for the needle and the question")
        start = rng.randrange(0, len(haystack_ids) - n_hay)
        hay = haystack_ids[start:start + n_hay]
        cut = round(depth * n_hay)
        prompts.append([tok.bos_id] + hay[:cut] + needle + hay[cut:] + question)
        answers.append(tok.encode(ANSWER.format(key=key)))
    if len({len(a) for a in answers}) > 1:
        raise ValueError("answers tokenize to different lengths; draw keys with `same_length_keys`")
    return torch.tensor(prompts), torch.tensor(answers)


@torch.no_grad()
def evaluate_needle(model: Transformer, tok: Tokenizer, haystack_ids: list[int], lengths: list[int],
                    depths: list[float], trials: int = 8, digits: int = 5, seed: int = 0) -> dict[str, Any]:
    """Exact-match retrieval rate per (length, depth): {"cells": [{"length", "depth", "accuracy"}], "mean"}.

    `length` counts the whole sequence, prompt and answer, so it may equal the model's max_seq_len.
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    cells = []
    for length in lengths:
        for depth in depths:
            keys = same_length_keys(tok, rng, trials, digits)
            n_answer = len(tok.encode(ANSWER.format(key=keys[0])))
            prompts, answers = passkey_prompts(tok, haystack_ids, length - n_answer, depth, keys, rng)
            out = generate(model, prompts.to(device), n_answer)
            hits = (out[:, prompts.shape[1]:].cpu() == answers).all(1).float()
            cells.append({"length": length, "depth": depth, "accuracy": hits.mean().item()})
    return {"cells": cells, "mean": sum(c["accuracy"] for c in cells) / len(cells)}


def same_length_keys(tok: Tokenizer, rng: random.Random, n: int, digits: int) -> list[str]:
    """n random keys whose answers tokenize to one length (BPE merges digits unevenly), so that a
    batch of prompts decodes a fixed number of tokens."""
    keys = [random_key(rng, digits)]
    size = len(tok.encode(ANSWER.format(key=keys[0])))
    while len(keys) < n:
        key = random_key(rng, digits)
        if len(tok.encode(ANSWER.format(key=key))) == size:
            keys.append(key)
    return keys


def format_grid(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per (length, depth), one accuracy column per run, then the mean."""
    names = list(results)
    lines = ["| length | depth | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for i, cell in enumerate(results[names[0]]["cells"]):
        accs = " | ".join(f"{results[n]['cells'][i]['accuracy']:.2f}" for n in names)
        lines.append(f"| {cell['length']} | {cell['depth']:.2f} | {accs} |")
    lines.append("| mean | | " + " | ".join(f"{results[n]['mean']:.2f}" for n in names) + " |")
    return "\n".join(lines)


def format_perplexity(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: held-out loss per token (and ppl) of each run, on all documents and by kind."""
    kinds = [k for k in ("all", "passkey", "text") if all(k in r for r in results.values())]
    lines = ["| run | " + " | ".join(f"{k} loss (ppl)" for k in kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]['loss']:.4f} ({r[k]['ppl']:.2f})" for k in kinds) + " |")
    return "\n".join(lines)


def _eval_runs(args: argparse.Namespace) -> dict[str, Any]:
    from exatrain.data import build_data
    from exatrain.eval.perplexity import evaluate_perplexity, load_run

    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    text = haystack_text(args.haystack, seed=args.seed + 1)
    report: dict[str, Any] = {"needle": {}, "perplexity": {}}
    for run_dir in args.run_dirs:
        run = load_run(run_dir, args.device)
        data = build_data(run.cfg, 0, 1)
        tok = data.tokenizer
        name = Path(run_dir).name
        report["needle"][name] = evaluate_needle(run.model, tok, tok.encode(text), lengths, depths, args.trials,
                                                 args.digits, args.seed)
        ppl = evaluate_perplexity(run_dir, ("none",), args.max_docs, device=args.device)
        report["perplexity"][name] = {"all": ppl["summary"]["none"],
                                      **perplexity_by_kind(ppl["documents"], data.val.store, tok)}
    return report


def perplexity_by_kind(docs: list[dict[str, Any]], store, tok: Tokenizer) -> dict[str, dict[str, float]]:
    """Held-out loss per token of the passkey documents and of the natural text, apart (the filler
    haystack is far easier to predict than text, so the mixture's mean says little about either)."""
    groups: dict[str, list[dict[str, Any]]] = {"passkey": [], "text": []}
    for d in docs:
        ids = store.tokens[store.offsets[d["doc"]]:store.offsets[d["doc"]] + d["tokens"]].tolist()
        groups["passkey" if "The pass key is #" in tok.decode(ids) else "text"].append(d)
    out = {}
    for kind, group in groups.items():
        tokens = sum(d["tokens"] for d in group)
        if tokens:
            loss = sum(math.log(d["ppl"]["none"]) * d["tokens"] for d in group) / tokens
            out[kind] = {"documents": len(group), "tokens": tokens, "loss": loss, "ppl": math.exp(loss)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m exatrain.eval.needle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("corpus", help="write passkey training documents (JSONL)")
    p.add_argument("out")
    p.add_argument("--docs", type=int, default=30000)
    p.add_argument("--min-chars", type=int, default=20)
    p.add_argument("--max-chars", type=int, default=150)
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", choices=("filler", "corpus"), default="filler")
    p = sub.add_parser("eval", help="needle grid and held-out perplexity of trained runs")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--lengths", default="128,192,256")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--haystack", choices=("filler", "corpus"), default="filler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int, default=None, help="held-out documents for perplexity (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.command == "corpus":
        print(write_corpus(args.out, args.docs, args.min_chars, args.max_chars, args.digits, args.seed,
                           args.haystack))
        return 0
    report = _eval_runs(args)
    print(format_grid(report["needle"]))
    print()
    print(format_perplexity(report["perplexity"]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
