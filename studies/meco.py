"""Toy-scale check of MeCo (Gao et al. 2025, "Metadata Conditioning Accelerates Language Model
Pre-training"; DESIGN.md §5).

Claims: (1) training with `URL: <domain>` before each document for 90% of the tokens, then a 10%
plain cooldown, reaches the standard model's loss with less data (33% less at 1.6B parameters);
(2) the MeCo model can be steered at inference by real or fabricated metadata.

Here: a 2-layer model on the embedded corpus, whose 7 sources (Python docs, licenses, PyPI
READMEs, Debian docs and changelogs, manpages) have distinct styles and 10 URL hosts. Standard
and MeCo (10% cooldown) runs are paired: same tokens, schedule, initialisation and document
order, differing only in the metadata; two seeds (initialisation and document order, via
train.seed and data.shuffle_seed) give two pairs, so a MeCo effect can be set against the
seed-to-seed spread. "Same tokens" means the same token budget: while metadata is on, the
masked `URL: <domain>` prefixes take a share of it (reported as `prefix_share`), as in the paper.

Validation loss is measured on plain held-out documents (no metadata), as the paper evaluates.
Final checkpoints, and MeCo's last checkpoint before the cooldown, are scored by
`exatrain.eval.perplexity` under no metadata, the real domain, a fabricated one (wikipedia.org,
never seen) and a real but mostly wrong one (pypi.org).

    OMP_NUM_THREADS=1 python studies/meco.py     # ~16 minutes on one core
Writes studies/out/meco.{json,png,md}; run directories go to runs/studies/meco/.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from exatrain.config import load_config  # noqa: E402
from exatrain.data import build_data  # noqa: E402
from exatrain.eval.perplexity import evaluate_perplexity  # noqa: E402
from exatrain.train.meco import MecoCooldown  # noqa: E402
from exatrain.train.metrics import read_metrics  # noqa: E402
from exatrain.train.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = "studies/meco.yaml"  # shipped in exatrain/configs/
OUT = REPO / "studies" / "out"
RUNS = REPO / "runs" / "studies" / "meco"

STEPS = 300
SEEDS = (0, 1)
SHUFFLE_SEED = 1234  # document order of seed s: SHUFFLE_SEED + s (the same for both arms of a pair)
CONDITIONS = ("none", "real", "wikipedia.org", "pypi.org")


@dataclass(frozen=True)
class Arm:
    meco: bool
    seed: int

    @property
    def tag(self) -> str:
        return f"{'meco' if self.meco else 'standard'}_seed{self.seed}"


def run(arm: Arm, tokens_per_step: int) -> dict:
    """Train one arm; return its curves, final validation loss and metadata-conditioned perplexity.

    A MeCo arm also checkpoints at its last metadata step, to score the model before the cooldown."""
    run_dir = RUNS / arm.tag
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [f"run_dir={run_dir}", f"train.steps={STEPS}", f"train.seed={arm.seed}",
                 f"data.shuffle_seed={SHUFFLE_SEED + arm.seed}", f"data.meco.enabled={str(arm.meco).lower()}"]
    cfg = load_config(CONFIG, overrides)
    last_meta_step = MecoCooldown.from_job(cfg).last_metadata_step(tokens_per_step)
    if last_meta_step:
        cfg = load_config(CONFIG, [*overrides, f"checkpoint.every={last_meta_step}"])
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    out = {**asdict(arm), "tag": arm.tag, "tokens": STEPS * tokens_per_step, "val_loss": result.val_loss,
           "seconds": seconds, "cooldown_tokens": last_meta_step * tokens_per_step if last_meta_step else None,
           "eval_curve": [[r["step"] * tokens_per_step, r["val_loss"]]
                          for r in read_metrics(run_dir / "metrics.jsonl", "eval")],
           "train_curve": [[r["tokens_seen"], r["loss"]] for r in read_metrics(run_dir / "metrics.jsonl", "train")]}
    ppl = evaluate_perplexity(run_dir, CONDITIONS)
    out["perplexity"], out["perplexity_by_domain"] = ppl["summary"], by_domain(ppl)
    if last_meta_step:
        pre = evaluate_perplexity(run_dir / "checkpoints" / f"step_{last_meta_step:08d}", CONDITIONS)
        out["before_cooldown"] = {"step": last_meta_step, "perplexity": pre["summary"],
                                  "perplexity_by_domain": by_domain(pre)}
    return out


def by_domain(ppl: dict) -> dict[str, dict]:
    """Token-weighted perplexity per real domain and condition, with the document count."""
    out: dict[str, dict] = {}
    for d in ppl["documents"]:
        entry = out.setdefault(d["domain"], {"documents": 0, "tokens": 0, "nll": dict.fromkeys(ppl["conditions"], 0.0)})
        entry["documents"] += 1
        entry["tokens"] += d["tokens"]
        for c, p in d["ppl"].items():
            entry["nll"][c] += math.log(p) * d["tokens"]
    return {dom: {"documents": e["documents"], "tokens": e["tokens"],
                  "ppl": {c: math.exp(v / e["tokens"]) for c, v in e["nll"].items()}}
            for dom, e in sorted(out.items(), key=lambda kv: -kv[1]["tokens"])}


def tokens_to_reach(curve: list[list[float]], target: float) -> float | None:
    """First token count where the eval curve reaches `target`, linearly interpolated; None if never."""
    for (t0, l0), (t1, l1) in zip([[0, math.inf]] + curve[:-1], curve):
        if l1 <= target:
            return t1 if not math.isfinite(l0) else t0 + (l0 - target) / (l0 - l1) * (t1 - t0)
    return None


def smooth(xs: list[float], k: int = 15) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def plot(runs: dict[str, dict], path: Path) -> None:
    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    for tag, r in runs.items():
        color, ls = ("tab:red" if r["meco"] else "tab:blue"), ("-" if r["seed"] == 0 else ":")
        ax_val.plot([t / 1e3 for t, _ in r["eval_curve"]], [v for _, v in r["eval_curve"]], color=color, ls=ls,
                    marker=".", label=f"{tag}: final {r['val_loss']:.3f}")
        ax_train.plot([t / 1e3 for t, _ in r["train_curve"]], smooth([v for _, v in r["train_curve"]]),
                      color=color, ls=ls, label=tag)
        if r["cooldown_tokens"]:
            for ax in (ax_val, ax_train):
                ax.axvline(r["cooldown_tokens"] / 1e3, color="grey", lw=0.8, alpha=0.5)
    ax_val.set(xlabel="tokens (k)", ylabel="validation loss (plain documents)")
    ax_train.set(xlabel="tokens (k)", ylabel="train loss on text tokens (smoothed)")
    ax_val.legend(fontsize=8)
    ax_train.legend(fontsize=8)
    fig.suptitle("MeCo vs standard pre-training (toy model, embedded corpus); grey line: MeCo cooldown starts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(runs: dict[str, dict]) -> dict:
    """Per seed: MeCo minus standard, and the tokens MeCo needs to reach standard's final loss; plus the
    same numbers between the two standard runs, which is what a seed change alone produces."""
    pairs = {}
    for seed in SEEDS:
        std, meco = runs[f"standard_seed{seed}"], runs[f"meco_seed{seed}"]
        reach = tokens_to_reach(meco["eval_curve"], std["val_loss"])
        pairs[seed] = {"standard": std["val_loss"], "meco": meco["val_loss"],
                       "delta": meco["val_loss"] - std["val_loss"], "tokens_to_standard": reach,
                       "saving": None if reach is None else 1 - reach / std["tokens"]}
    a, b = (runs[f"standard_seed{s}"] for s in SEEDS)
    lo, hi = (a, b) if a["val_loss"] < b["val_loss"] else (b, a)
    reach = tokens_to_reach(lo["eval_curve"], hi["val_loss"])
    noise = {"delta": abs(a["val_loss"] - b["val_loss"]), "better_seed_tokens_to_other": reach,
             "better_seed_saving": None if reach is None else 1 - reach / hi["tokens"]}
    return {"pairs": pairs, "seed_noise": noise}


def markdown(result: dict) -> str:
    runs, summary, pre = result["runs"], result["summary"], result["prefix"]
    cooldown = runs["meco_seed0"]["cooldown_tokens"]
    lines = ["# MeCo vs standard pre-training (studies/meco.py)", "",
             f"Model: {result['model']}; {result['steps']} steps = {result['steps'] * result['tokens_per_step'] / 1e3:.0f}k "
             f"tokens per run; MeCo: `URL: <domain>` on until {cooldown / 1e3:.0f}k tokens, then the plain cooldown. "
             f"Prefixes (masked) are {pre['prefix_share']:.1%} of the metadata-phase stream "
             f"({pre['prefix_tokens_per_doc']:.1f} tokens per document); documents are long, so only "
             f"{pre['conditioned_text_share']:.0%} of the trained text tokens are in the row that holds their "
             f"document's prefix. Validation: plain held-out documents, "
             f"{result['eval_tokens']:,} tokens, every {result['eval_every']} steps.", "",
             "| seed | standard val loss | MeCo val loss | MeCo − standard | tokens MeCo needs for standard's loss | "
             "data saving |", "|---|---:|---:|---:|---:|---:|"]
    for seed, p in summary["pairs"].items():
        reach = "not reached" if p["tokens_to_standard"] is None else f"{p['tokens_to_standard'] / 1e3:.0f}k"
        saving = "—" if p["saving"] is None else f"{p['saving']:.1%}"
        lines.append(f"| {seed} | {p['standard']:.4f} | {p['meco']:.4f} | {p['delta']:+.4f} | {reach} | {saving} |")
    n = summary["seed_noise"]
    saving = "never" if n["better_seed_saving"] is None else f"{n['better_seed_saving']:.0%}"
    lines += ["", f"Seed noise: the two standard runs differ by {n['delta']:.4f}; by the same interpolation the "
              f"better seed 'saves' {saving} of the tokens.", ""]
    held_out = runs["standard_seed0"]["perplexity"]["none"]
    lines += [f"Held-out perplexity by metadata prompt (first window of {held_out['documents']} documents, "
              f"{held_out['tokens']:,} text tokens):", "",
              "| model | " + " | ".join(CONDITIONS) + " | real − none (loss) |",
              "|---|" + "---:|" * (len(CONDITIONS) + 1)]
    for tag, r in runs.items():
        rows = [(f"{tag}, step {r['before_cooldown']['step']} (before cooldown)", r["before_cooldown"]["perplexity"])] \
            if "before_cooldown" in r else []
        rows.append((f"{tag}, final", r["perplexity"]))
        for name, ppl in rows:
            lines.append(f"| {name} | " + " | ".join(f"{ppl[c]['ppl']:.1f}" for c in CONDITIONS) +
                         f" | {ppl['real']['loss'] - ppl['none']['loss']:+.4f} |")
    std, meco = runs["standard_seed0"], runs["meco_seed0"]
    pre = meco["before_cooldown"]
    lines += ["", f"Real − no metadata per domain, seed 0 (Δ loss; MeCo before the cooldown: step {pre['step']}):", "",
              "| domain | docs | standard | MeCo before cooldown | MeCo final |", "|---|---:|---:|---:|---:|"]
    for dom, e in meco["perplexity_by_domain"].items():
        deltas = [math.log(x["ppl"]["real"] / x["ppl"]["none"]) for x in
                  (std["perplexity_by_domain"][dom], pre["perplexity_by_domain"][dom], e)]
        lines.append(f"| {dom} | {e['documents']} | " + " | ".join(f"{d:+.4f}" for d in deltas) + " |")
    return "\n".join(lines) + "\n"


def prefix_share() -> dict:
    """How much of a metadata-phase token stream the (masked) prefixes take, over one epoch of train documents,
    and which share of the trained text tokens has its prefix in context: with document masking a document
    continued in the next row does not see the prefix, so long documents are conditioned only in their first row."""
    cfg = load_config(CONFIG, ["data.meco.enabled=true"])
    data = build_data(cfg, 0, 1)
    loader = data.train
    prefix = int(loader.prefixes.lengths[loader.docs].sum())
    conditioned = trained = 0
    for _ in range(STEPS // 4):  # the first quarter of a run's batches
        b = loader.next_batch(cfg.train.global_batch)
        for tokens, labels, docs in zip(b.tokens, b.labels, b.doc_ids):
            for d in docs.unique():
                rows = docs == d
                n = int((labels[rows] != -100).sum())
                trained += n
                conditioned += n if int(tokens[rows][0]) == data.tokenizer.bos_id else 0
    return {"train_documents": len(loader.docs), "plain_tokens": loader.num_tokens, "prefix_tokens": prefix,
            "prefix_share": prefix / (prefix + loader.num_tokens),
            "prefix_tokens_per_doc": prefix / len(loader.docs), "conditioned_text_share": conditioned / trained}


def main() -> None:
    torch.set_num_threads(1)
    base = load_config(CONFIG)
    tokens_per_step = base.train.global_batch * base.data.seq_len
    prefix = prefix_share()
    start = time.perf_counter()
    runs = {}
    for seed in SEEDS:
        for meco in (False, True):
            r = run(Arm(meco, seed), tokens_per_step)
            runs[r["tag"]] = r
    m = base.model
    result = {
        "model": f"dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads, vocab {base.data.tokenizer.vocab_size}, "
                 f"seq_len {base.data.seq_len}, batch {base.train.global_batch}",
        "tokens_per_step": tokens_per_step, "steps": STEPS, "eval_every": base.train.eval_every,
        "eval_tokens": base.train.eval_batches * tokens_per_step, "conditions": list(CONDITIONS),
        "prefix": prefix, "summary": summarize(runs), "runs": runs, "total_seconds": time.perf_counter() - start,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    plot(runs, OUT / "meco.png")
    (OUT / "meco.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (OUT / "meco.md").write_text(table)
    print(table)
    print(f"total {result['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
