"""CPU-scale check of SeND (Sensitive Neuron Dropout; DESIGN.md §6) on a synthetic fact corpus.

Claims (the SeND paper): dropping the most sensitive neurons of the penultimate layer during training
makes the model more reliable at test time (up to 17% in the ACL 2025 version, 40% in the arXiv
preprint, measured with EigenScore-style hallucination metrics) and reduces the oscillation of
hallucination over training; EES approximates EigenScore cheaply.

Here: a 4-layer model trained on invented facts (exatrain.data.facts: Zipf-frequent entities, so most
facts are rare; a wrong value on a rare fact is a hallucination). Three arms per seed, paired: same
initialisation, data order and LR schedule (train.seed and data.shuffle_seed per seed), differing only
in SeND:
- baseline: send.enabled=false;
- send: exatrain's default, an exact {0,1} mask on the residual stream after the penultimate block,
  top 20% every `send.interval` steps from 3 snapshots of the tracking questions, lifted after training;
- send_zero: the authors' drop, zeroing the weights of the top 20% hidden units of the penultimate MLP
  at the selection and at the next two tracking points, letting AdamW regrow them.
Every EVAL_EVERY steps each arm is evaluated with the model as it is at that step (the `send` arm with
its current mask): greedy answer accuracy per frequency bucket, per-question correctness, and on a
fixed subset of ES_QUESTIONS questions the EigenScore of K = 10 sampled answers (exact, Chebyshev EES
and SLQ). The `send` arm's final model is evaluated after its mask is lifted; the accuracy with the
last mask kept is reported too.

Metrics per run: accuracy per bucket of the final model; the oscillation of rare-fact accuracy over
the last OSC_EVALS evaluations (mean absolute change, standard deviation, and the standard deviation
around a fitted line, i.e. without the learning trend); per question, how often a fact known at one
evaluation is wrong at the next (forgetting, also conditional on being known) and how often the answer
flips; mean ES / EES / SLQ; ES AUROC for telling wrong from right answers (final model, ES subset).
Each SeND arm is compared with the baseline by paired differences over the seeds, with an exact
Wilcoxon signed-rank test and an exact sign-flip permutation test of the mean (two-sided; scipy is
not a dependency).

Facts in held-out documents: the loader sets aside data.val_fraction of the documents; mentions in
them are subtracted before bucketing, so "rare" means 1-3 mentions in the *training* documents.

    OMP_NUM_THREADS=1 python studies/send.py [--seeds 10] [--jobs 2]
Writes studies/out/send.{json,md,png}; run directories go to runs/studies/send/.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from exatrain.config import load_config  # noqa: E402
from exatrain.data import build_data  # noqa: E402
from exatrain.data.facts import FactConfig, Question, load_questions, write_corpus  # noqa: E402
from exatrain.eval.eigenscore import METHODS, eigenscore  # noqa: E402
from exatrain.eval.hallucination import accuracy_by_bucket, answer_accuracy, eigenscore_for_prompts  # noqa: E402
from exatrain.train.callback import Callback  # noqa: E402
from exatrain.train.send import find_masks  # noqa: E402
from exatrain.train.trainer import train  # noqa: E402

CONFIG = "studies/send.yaml"  # shipped in exatrain/configs/
OUT = REPO / "studies" / "out"
RUNS = REPO / "runs" / "studies" / "send"
FACTS = FactConfig(entities=400, unseen=40, relations=4, values_per_relation=50, documents=5000, tracking=32,
                   frequent_min=20, rare_max=3, seed=0)
STEPS = 1200
EVAL_EVERY = 100
OSC_EVALS = 8  # oscillation over the last 8 evaluations (steps 500..1200)
ES_QUESTIONS = 120
SHUFFLE_SEED = 1234
ARMS = {  # name -> overrides
    "baseline": ["send.enabled=false"],
    "send": ["send.enabled=true"],
    "send_zero": ["send.enabled=true", "send.site=mlp", "send.variant=zero_weights"],
}
LABELS = {"baseline": "baseline", "send": "SeND (mask)", "send_zero": "SeND (authors' zeroing)"}


def train_mentions(cfg, questions: list[Question]) -> list[Question]:
    """Questions re-bucketed by their mentions in the training documents (held-out documents subtracted)."""
    data = build_data(cfg, 0, 1)
    store, tok = data.val.store, data.tokenizer
    held = Counter()
    for doc in data.val.docs:
        text = tok.decode(store.tokens[store.offsets[doc]:store.offsets[doc + 1]].tolist())
        for relation, entity in re.findall(r"The (\w+) of (\w+) is \w+\.", text):
            held[entity, relation] += 1
    world = FACTS
    out = []
    for q in questions:
        n = q.mentions - held[q.entity, q.relation]
        bucket = ("unseen" if n == 0 else "rare" if n <= world.rare_max else
                  "frequent" if n >= world.frequent_min else "medium")
        out.append(replace(q, mentions=n, bucket=bucket))
    return out


def es_subset(questions: list[Question]) -> list[Question]:
    """A fixed, bucket-stratified subset for EigenScore: 40% rare, 30% medium, 15% frequent, 15% unseen."""
    shares = {"rare": 0.4, "medium": 0.3, "frequent": 0.15, "unseen": 0.15}
    out = []
    for bucket, share in shares.items():
        pool = [q for q in questions if q.bucket == bucket]
        step = max(1, len(pool) // max(1, round(share * ES_QUESTIONS)))
        out += pool[::step][:round(share * ES_QUESTIONS)]
    return out


def auroc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    wins = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


class StudyEval(Callback):
    """Every EVAL_EVERY steps (after the send callback): accuracy per bucket and EigenScore on the subset."""

    name = "study_eval"

    def __init__(self, questions: list[Question], subset: list[Question], es_cfg):
        self.questions, self.subset, self.es = questions, subset, es_cfg
        self.history: list[dict] = []
        self.final: dict = {}

    def evaluate(self, trainer, with_es: bool = True) -> dict:
        model, tok = trainer.engine.model_parts[0], trainer.data.tokenizer
        correct = answer_accuracy(model, tok, self.questions)
        rec = {"step": trainer.state.step,
               "accuracy": {b: v["accuracy"] for b, v in accuracy_by_bucket(self.questions, correct).items()},
               "correct": "".join("1" if c else "0" for c in correct)}
        if with_es:
            by_q = dict(zip((q.prompt for q in self.questions), correct))
            prompts = [[tok.bos_id, *tok.encode(q.prompt)] for q in self.subset]
            es = self.es
            samples = eigenscore_for_prompts(model, prompts, k=es.k, max_new_tokens=es.max_new_tokens,
                                             temperature=es.temperature, top_k=es.top_k, top_p=es.top_p,
                                             eos_id=tok.eos_id, methods=(), seed=es.sample_seed)
            scores = {m: [eigenscore(s.hidden, es.alpha, m, moments=es.moments, probes=es.probes, seed=es.sample_seed)
                          for s in samples] for m in METHODS}
            wrong = [not by_q[q.prompt] for q in self.subset]
            rec["es"] = {m: statistics.fmean(v) for m, v in scores.items()}
            rec["es_auroc"] = {m: auroc(v, wrong) for m, v in scores.items()}
            rec["es_scores"] = scores["exact"]
            rec["es_wrong"] = wrong
        return rec

    def on_step_end(self, trainer, stats, record):
        step = trainer.state.step
        if step % EVAL_EVERY and step != trainer.cfg.train.steps:
            return
        if step == trainer.cfg.train.steps and trainer.cfg.send.enabled and trainer.cfg.send.variant == "mask":
            masks = [m for p in trainer.engine.model_parts for m in find_masks(p)]
            send = next(cb for cb in trainer.callbacks if getattr(cb, "name", "") == "send")
            for m in masks:  # the send callback lifted the mask at the end: evaluate once more as trained
                m.drop(send.selected)
            self.history.append(self.evaluate(trainer))
            for m in masks:
                m.reset()
            self.final = self.evaluate(trainer)
        else:
            self.history.append(self.evaluate(trainer))
            if step == trainer.cfg.train.steps:
                self.final = self.history[-1]


def oscillation(values: list[float]) -> dict[str, float]:
    """Mean |change| between consecutive evaluations, std, and std around a least-squares line (the part
    of the variation that is not a trend)."""
    n = len(values)
    x_mean, y_mean = (n - 1) / 2, statistics.fmean(values)
    slope = sum((i - x_mean) * (v - y_mean) for i, v in enumerate(values)) / sum((i - x_mean) ** 2 for i in range(n))
    residuals = [v - (y_mean + slope * (i - x_mean)) for i, v in enumerate(values)]
    return {"mean_abs_change": statistics.fmean(abs(b - a) for a, b in itertools.pairwise(values)),
            "std": statistics.pstdev(values), "detrended_std": math.sqrt(statistics.fmean(r * r for r in residuals))}


def flips(history: list[dict], questions: list[Question], bucket: str) -> dict[str, float]:
    """Per question and pair of consecutive evaluations: P(right -> wrong) (forgetting), the same among the
    questions answered right at the first of the two (so a model that knows fewer facts is not credited
    with forgetting fewer), and P(the answer's correctness changed)."""
    idx = [i for i, q in enumerate(questions) if bucket in ("all", q.bucket)]
    pairs = list(itertools.pairwise(history))
    forgot = sum(a["correct"][i] == "1" and b["correct"][i] == "0" for a, b in pairs for i in idx)
    known = sum(a["correct"][i] == "1" for a, _ in pairs for i in idx)
    changed = sum(a["correct"][i] != b["correct"][i] for a, b in pairs for i in idx)
    total = len(pairs) * len(idx)
    return {"forget_rate": forgot / total, "forget_given_known": forgot / max(known, 1), "flip_rate": changed / total}


def run_arm(seed: int, arm: str, paths: dict, questions: list[Question], subset: list[Question]) -> dict:
    run_dir = RUNS / f"{arm}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(CONFIG, [f"run_dir={run_dir}", f"train.steps={STEPS}", f"train.seed={seed}",
                               f"data.shuffle_seed={SHUFFLE_SEED + seed}", f"data.paths=[{paths['facts']}]",
                               f"send.prompts={paths['tracking']}", *ARMS[arm]])
    ev = StudyEval(questions, subset, cfg.eigenscore)
    t0 = time.process_time()
    wall = time.perf_counter()
    result = train(cfg, callbacks=[ev])
    cpu, wall = time.process_time() - t0, time.perf_counter() - wall
    last = ev.history[-OSC_EVALS:]
    osc = {b: {**oscillation([h["accuracy"][b] for h in last]), **flips(last, questions, b)} for b in ("rare", "all")}
    selections = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    overlaps = [r["send_overlap"] for r in selections if "send_overlap" in r]
    return {"seed": seed, "arm": arm, "cpu_s": cpu, "wall_s": wall, "final_loss": result.final_loss,
            "final": {k: v for k, v in ev.final.items() if k not in ("es_scores", "es_wrong")},
            "final_es_scores": ev.final.get("es_scores"), "final_es_wrong": ev.final.get("es_wrong"),
            "history": [{k: v for k, v in h.items() if k not in ("es_scores", "es_wrong", "correct")}
                        for h in ev.history],
            "oscillation": osc, "send_mean_overlap": statistics.fmean(overlaps) if overlaps else None}


# -- paired tests (exact; n <= 20 pairs)

def wilcoxon_exact(diffs: list[float]) -> tuple[float, float]:
    """Two-sided exact Wilcoxon signed-rank test: (W+, p). Zeros are dropped; tied |d| get mid-ranks."""
    d = [x for x in diffs if x != 0]
    n = len(d)
    if n == 0:
        return 0.0, 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    w_plus = sum(r for r, x in zip(ranks, d) if x > 0)
    total = sum(ranks)
    centre = total / 2
    extreme = 0
    for signs in itertools.product((0, 1), repeat=n):
        w = sum(r for r, s in zip(ranks, signs) if s)
        extreme += abs(w - centre) >= abs(w_plus - centre) - 1e-12
    return w_plus, extreme / 2 ** n


def sign_flip_exact(diffs: list[float]) -> float:
    """Two-sided exact permutation test of mean(d) = 0 by flipping signs of the paired differences."""
    n, observed = len(diffs), abs(sum(diffs))
    extreme = sum(abs(sum(s * x for s, x in zip(signs, diffs))) >= observed - 1e-12
                  for signs in itertools.product((1, -1), repeat=n))
    return extreme / 2 ** n


def paired(runs: list[dict], metric, arm: str) -> dict:
    seeds = sorted({r["seed"] for r in runs})
    base = {r["seed"]: metric(r) for r in runs if r["arm"] == "baseline"}
    other = {r["seed"]: metric(r) for r in runs if r["arm"] == arm}
    diffs = [other[s] - base[s] for s in seeds if s in base and s in other and not (math.isnan(other[s]) or
                                                                                     math.isnan(base[s]))]
    w, p = wilcoxon_exact(diffs)
    return {"baseline_mean": statistics.fmean(base.values()), "arm_mean": statistics.fmean(other.values()),
            "mean_diff": statistics.fmean(diffs), "sd_diff": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "higher": sum(x > 0 for x in diffs), "lower": sum(x < 0 for x in diffs), "n": len(diffs),
            "wilcoxon_w_plus": w, "wilcoxon_p": p, "sign_flip_p": sign_flip_exact(diffs)}


METRICS = {  # reported name -> where the value sits in a run's record
    "final rare accuracy": ("final", "accuracy", "rare"),
    "final medium accuracy": ("final", "accuracy", "medium"),
    "final frequent accuracy": ("final", "accuracy", "frequent"),
    "final overall accuracy": ("final", "accuracy", "all"),
    "rare accuracy, last mask kept": ("history", -1, "accuracy", "rare"),
    "rare-accuracy oscillation (mean |change|)": ("oscillation", "rare", "mean_abs_change"),
    "rare-accuracy oscillation (std)": ("oscillation", "rare", "std"),
    "rare-accuracy oscillation (detrended std)": ("oscillation", "rare", "detrended_std"),
    "rare facts forgotten per evaluation interval": ("oscillation", "rare", "forget_rate"),
    "known rare facts forgotten per evaluation interval": ("oscillation", "rare", "forget_given_known"),
    "rare facts flipping per evaluation interval": ("oscillation", "rare", "flip_rate"),
    "overall-accuracy oscillation (mean |change|)": ("oscillation", "all", "mean_abs_change"),
    "all facts forgotten per evaluation interval": ("oscillation", "all", "forget_rate"),
    "known facts forgotten per evaluation interval": ("oscillation", "all", "forget_given_known"),
    "final mean ES (exact)": ("final", "es", "exact"),
    "final mean EES (Chebyshev)": ("final", "es", "chebyshev"),
    "final mean ES (SLQ)": ("final", "es", "slq"),
    "ES AUROC wrong vs right (exact)": ("final", "es_auroc", "exact"),
    "final training loss": ("final_loss",),
}


def lookup(path: tuple):
    return lambda record: functools.reduce(lambda node, key: node[key], path, record)


def report(runs: list[dict], setup: dict) -> dict:
    tests = {arm: {name: paired(runs, lookup(path), arm) for name, path in METRICS.items()} for arm in ARMS if arm != "baseline"}
    es_err = {m: statistics.fmean(abs(h["es"][m] - h["es"]["exact"]) for r in runs for h in r["history"])
              for m in ("chebyshev", "slq")}
    return {"setup": setup, "tests": tests, "es_mean_abs_error_vs_exact": es_err, "runs": runs}


def write_markdown(res: dict) -> str:
    s, tests = res["setup"], res["tests"]
    head = (f"Model {s['params'] / 1e6:.2f}M parameters ({s['model']}), {s['steps']} steps x {s['tokens_per_step']} "
            f"tokens ({s['epochs']:.1f} epochs of {s['train_tokens']:,} training tokens), constant LR after warmup. "
            f"Facts: {s['facts']}. Questions by training mentions: {s['buckets']}. SeND: {s['send']} (the "
            f"authors' variant: site mlp, variant zero_weights). Evaluations every {EVAL_EVERY} steps; oscillation "
            f"over the last {OSC_EVALS}; EigenScore on {s['es_questions']} questions, K={s['es_k']}, middle block. "
            "CPU time per arm (one thread, evaluations included): "
            + ", ".join(f"{LABELS[a]} {t:.0f} s" for a, t in s["cpu"].items()) + ".")
    legend = ("Differences are arm − baseline, mean ± sd over seeds; n+/n− = seeds where the arm is higher / lower; "
              "p = exact two-sided Wilcoxon signed-rank / sign-flip permutation.")
    columns = " | ".join(f"{LABELS[a]} | Δ | n+/n− | p (W / perm)" for a in tests)
    lines = [f"# SeND vs baseline on the synthetic fact corpus ({s['seeds']} paired seeds)", "", head, "", legend, "",
             f"| metric | baseline | {columns} |", "|---|---:|" + "---:|---:|---:|---:|" * len(tests)]
    for name in METRICS:
        first = next(iter(tests.values()))[name]
        row = f"| {name} | {first['baseline_mean']:.4f} |"
        for arm in tests:
            t = tests[arm][name]
            row += (f" {t['arm_mean']:.4f} | {t['mean_diff']:+.4f} ± {t['sd_diff']:.4f} | {t['higher']}/{t['lower']} | "
                    f"{t['wilcoxon_p']:.3f} / {t['sign_flip_p']:.3f} |")
        lines.append(row)
    err = res["es_mean_abs_error_vs_exact"]
    lines += ["", (f"EES (Chebyshev, M=20, 20 probes) and SLQ vs exact EigenScore, mean |error| over every evaluation: "
                   f"{err['chebyshev']:.4f} and {err['slq']:.4f} nats (K=10 <= 20 probes: both use the exact trace "
                   "with unit probes, so only the polynomial / quadrature error remains).")]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = {"baseline": "tab:blue", "send": "tab:red", "send_zero": "tab:green"}
    for r in res["runs"]:
        steps = [h["step"] for h in r["history"]]
        axes[0].plot(steps, [h["accuracy"]["rare"] for h in r["history"]], color=colors[r["arm"]], alpha=0.25, lw=1)
        axes[1].plot(steps, [h["es"]["exact"] for h in r["history"]], color=colors[r["arm"]], alpha=0.25, lw=1)
    for arm in ARMS:
        runs = [r for r in res["runs"] if r["arm"] == arm]
        steps = [h["step"] for h in runs[0]["history"]]
        for ax, key, ls in ((axes[0], lambda h: h["accuracy"]["rare"], "-"), (axes[1], lambda h: h["es"]["exact"], "-"),
                            (axes[1], lambda h: h["es"]["chebyshev"], ":")):
            mean = [statistics.fmean(key(r["history"][i]) for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, color=colors[arm], lw=2.5, ls=ls, label=LABELS[arm] if ls == "-" else None)
    axes[0].set(title="rare-fact accuracy (thin: seeds, thick: mean)", xlabel="step", ylabel="accuracy")
    axes[0].legend()
    axes[1].set(title="mean EigenScore (solid: exact = SLQ here, dotted: Chebyshev EES)", xlabel="step",
                ylabel="ES (nats)")
    seeds = sorted({r["seed"] for r in res["runs"]})
    by = {(r["seed"], r["arm"]): r for r in res["runs"]}
    metrics = (("rare acc.", lambda r: r["final"]["accuracy"]["rare"]),
               ("rare |Δ|", lambda r: r["oscillation"]["rare"]["mean_abs_change"]),
               ("rare detr. std", lambda r: r["oscillation"]["rare"]["detrended_std"]),
               ("known rare forgotten", lambda r: r["oscillation"]["rare"]["forget_given_known"]),
               ("ES AUROC", lambda r: r["final"]["es_auroc"]["exact"]))
    for j, arm in enumerate(a for a in ARMS if a != "baseline"):
        for i, (name, key) in enumerate(metrics):
            diffs = [key(by[s, arm]) - key(by[s, "baseline"]) for s in seeds]
            axes[2].scatter([i + 0.15 * (2 * j - 1)] * len(diffs), diffs, color=colors[arm], alpha=0.7, s=14,
                            label=LABELS[arm] if i == 0 else None)
    axes[2].set_xticks(range(len(metrics)), [m for m, _ in metrics], rotation=20)
    axes[2].axhline(0, color="gray", lw=1)
    axes[2].legend()
    axes[2].set(title="paired differences arm − baseline (one dot per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    global STEPS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=1, help="arms run in parallel processes (one thread each)")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps per arm (default {STEPS}; smoke: 300)")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # "seed,send": run one arm, print its JSON (worker mode)
    args = ap.parse_args()
    torch.set_num_threads(1)
    STEPS = args.steps or STEPS
    if args.arm:  # the parent wrote the corpus (and built the tokenizer and token caches) before starting arms
        paths = {name: RUNS / "facts" / f"{name}.jsonl" for name in ("facts", "questions", "tracking")}
    else:
        paths = write_corpus(RUNS / "facts", FACTS)
    base_cfg = load_config(CONFIG, [f"run_dir={RUNS / 'setup'}", f"data.paths=[{paths['facts']}]",
                                    f"send.prompts={paths['tracking']}"])
    questions = train_mentions(base_cfg, load_questions(paths["questions"], split="eval"))
    subset = es_subset(questions)
    if args.arm:
        seed, arm = args.arm.split(",")
        res = run_arm(int(seed), arm, paths, questions, subset)
        (RUNS / f"arm_{seed}_{arm}.json").write_text(json.dumps(res))
        return
    pending = [(s, arm) for s in range(args.seeds) for arm in ARMS]
    procs: list[tuple[subprocess.Popen, tuple]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = []
    t0 = time.perf_counter()
    while pending or procs:
        while pending and len(procs) < args.jobs:
            seed, arm = pending.pop(0)
            cmd = [sys.executable, __file__, "--arm", f"{seed},{arm}", "--steps", str(STEPS)]
            log = open(RUNS / f"arm_{seed}_{arm}.log", "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log), (seed, arm)))
        time.sleep(1)
        for p, (seed, arm) in list(procs):
            if p.poll() is None:
                continue
            procs.remove((p, (seed, arm)))
            if p.returncode != 0:
                raise RuntimeError(f"arm {arm} seed {seed} failed; see {RUNS}/arm_{seed}_{arm}.log")
            runs.append(json.loads((RUNS / f"arm_{seed}_{arm}.json").read_text()))
            r = runs[-1]
            print(f"[{time.perf_counter() - t0:6.0f}s] seed {seed} {arm:9s}: rare {r['final']['accuracy']['rare']:.3f} "
                  f"all {r['final']['accuracy']['all']:.3f} osc {r['oscillation']['rare']['mean_abs_change']:.4f} "
                  f"ES {r['final']['es']['exact']:.3f} AUROC {r['final']['es_auroc']['exact']:.3f} "
                  f"({r['cpu_s']:.0f} s cpu)", flush=True)
    runs.sort(key=lambda r: (r["seed"], list(ARMS).index(r["arm"])))
    cfg = base_cfg
    from exatrain.model.llama import build_model, count_params

    data = build_data(cfg, 0, 1)
    setup = {"seeds": args.seeds, "steps": STEPS, "params": count_params(build_model(cfg.model)),
             "model": f"dim {cfg.model.dim}, {cfg.model.n_layers} layers, {cfg.model.n_heads} heads, vocab "
                      f"{cfg.model.vocab_size}",
             "tokens_per_step": cfg.train.global_batch * cfg.data.seq_len, "train_tokens": data.train.num_tokens,
             "epochs": STEPS * cfg.train.global_batch * cfg.data.seq_len / data.train.num_tokens,
             "facts": asdict(FACTS), "buckets": dict(Counter(q.bucket for q in questions)),
             "send": {k: v for k, v in asdict(cfg.send).items() if k not in ("prompts", "enabled")},
             "es_questions": len(subset), "es_k": cfg.eigenscore.k,
             "cpu": {arm: statistics.fmean(r["cpu_s"] for r in runs if r["arm"] == arm) for arm in ARMS}}
    res = report(runs, setup)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "send.json").write_text(json.dumps(res, indent=1))
    (OUT / "send.md").write_text(write_markdown(res))
    plot(res, OUT / "send.png")
    print(write_markdown(res))


if __name__ == "__main__":
    main()
