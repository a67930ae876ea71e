"""The planner on the Frontier paper's three models: where the paper's layouts rank and what it prefers.

    python benchmarks/frontier_layouts.py          # ~30 s, CPU only

For 22B on 16 GCDs, 175B on 128 and 1T on 1024 (the paper's sizes, GBS 640/640/1024, seq 2048), on the
built-in Frontier hardware facts (exatrain.bench.hardware): the paper's layout as exatrain's recipe runs it
(exatrain/configs/*-frontier.yaml: TP/PP/DP2 with native ZeRO-1, 1F1B, micro-batch 1, full recompute,
train.dtype=bf16_params as the paper's DeepSpeed bf16 mode), the same under train.dtype=bf16 (autocast over
fp32 parameters), the planner's top layouts over the whole space (native ZeRO-1 included), and its top
layouts with the paper's own knobs fixed (1F1B, micro-batch 1, full recompute).
Writes benchmarks/out/frontier_layouts.{md,json}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
sys.path.insert(0, str(ROOT))

from exatrain.bench.hardware import load_cluster
from exatrain.bench.layout import from_config
from exatrain.bench.memory import GIB, Kernels
from exatrain.bench.planner import Candidate, enumerate_layouts, evaluate, plan
from exatrain.config import load_config

FACTS = """### The paper (Dash et al., "Optimizing Distributed Training on Frontier for Large Language Models",
arXiv:2312.12705, ISC High Performance 2024)

- Stack: Megatron-DeepSpeed on ROCm: Megatron tensor and pipeline parallelism (1F1B), DeepSpeed ZeRO-1
  data parallelism, activation recomputation, bf16; hyper-parameters tuned with DeepHyper.
- Models (GPT-style), seq 2048, micro-batch 1: 22B = 48 layers, hidden 6144, 48 heads, TP1 PP8 on 2 nodes,
  GBS 640; 175B = 96/12288/96, TP4 PP16 ZeRO-1 on 16 nodes, GBS 640; 1T = 128/25600/200, TP4 PP128 ZeRO-1 on
  128 nodes, GBS 1024 (DESIGN.md §2, checked against the paper and its code; the paper's full text was not
  retrievable in this session, so these rows rest on that check).
- Throughput: 38.38%, 36.14%, 31.96% of peak for 22B, 175B, 1T (abstract; ORNL publication record); reported
  as 73.5 and 69.2 TFLOP/s for 22B and 175B (press coverage of the paper), i.e. the denominator is one GCD's
  191.5 TFLOP/s (half an MI250X). 100% weak scaling to 1024 (175B) and 3072 (1T) GCDs, 89% and 87% strong
  scaling (abstract). Press coverage quotes 14 TB of memory for the 1T model's training state (= 14 bytes per
  parameter; Megatron's count is 18 without a distributed optimizer, 6 + 12/dp with one).
- Vocabulary: not in the sources reachable here. exatrain's recipes assume GPT-2's BPE (50,257) padded as
  Megatron-DeepSpeed pads it (--make-vocab-size-divisible-by 128 times TP): 50,304 at TP1 (22B), 50,688 at TP4
  (175B, 1T); other layouts below are evaluated with the recipe's padded vocabulary.
- Hardware (Frontier User Guide; LUMI-G, the same node): 8 GCDs of 64 GB per node, 191.5 TFLOP/s bf16 each; the
  two GCDs of one MI250X share 200 GB/s Infinity Fabric (hence the paper's TP=2 sweet spot), GCDs of different
  MI250X 50-100 GB/s; 4 HPE Slingshot-11 NICs of 25 GB/s per node.
"""

PAPER = {  # model -> (devices, TP, PP, measured % of 191.5 TFLOP/s per GCD)
    "22b": (16, 1, 8, 0.3838),
    "175b": (128, 4, 16, 0.3614),
    "1t": (1024, 4, 128, 0.3196),
}


def row(label: str, c: Candidate, cap: float, cl) -> dict:
    worst = c.memory.worst
    phase = "after backward (reduce-scatter, step, all-gather)" if worst.optimizer_step >= worst.backward_peak \
        else "forward/backward"
    return {"label": label, "layout": c.layout.describe(), "valid": c.invalid is None, "peak_phase": phase,
            "worst_pp_rank": worst.pp_rank, "states_gib": worst.states / GIB,
            "tokens_per_s": c.tokens_per_s, "step_s": c.time.total, "tflops": c.time.megatron_tflops,
            "pct_peak": c.time.megatron_tflops / 191.5, "mfu": c.time.mfu, "peak_gib": c.peak_gib,
            "breakdown": c.time.breakdown(), "why": c.why(cl, cap)}


def exact_knobs(cfg, devices: int, cl, caps=(57.6, 40.0)) -> dict:
    """The paper's own search space: 1F1B, ZeRO-1, micro-batch 1, full recompute; only the degrees vary. Ranked
    under the planner's cap and under 40 GiB (headroom for allocator fragmentation and communication buffers
    the model does not count)."""
    cands = [evaluate(cfg, lay, cl) for lay in enumerate_layouts(cfg, devices, max_micro_batch=1, ac_modes=("full",))
             if (lay.pp == 1 or lay.schedule == "1F1B") and lay.engine == "native" and lay.dp_replicate == 1
             and (lay.dp == 1 or lay.zero_stage == 1)]
    out = {}
    for cap in caps:
        fit = sorted((c for c in cands if c.peak_gib <= cap and c.invalid is None), key=lambda c: -c.tokens_per_s)
        out[str(cap)] = [(c.layout.describe(), c.tokens_per_s, c.peak_gib) for c in fit[:4]]
    return out


def main() -> None:
    cl = load_cluster("frontier")
    cap = 0.9 * cl.device.memory_gib
    kernels = Kernels.for_device("gpu")
    results = {}
    for name, (devices, tp, pp, measured) in PAPER.items():
        cfg = load_config(f"{name}-frontier.yaml")
        recipe = from_config(cfg, devices)
        assert (recipe.tp, recipe.pp, recipe.zero_stage) == (tp, pp, 1), recipe
        paper = evaluate(cfg, recipe, cl, kernels)
        autocast = evaluate(load_config(f"{name}-frontier.yaml", ["train.dtype=bf16"]), recipe, cl, kernels)
        full = plan(cfg, devices, cl, top=5, cap_gib=cap)
        knobs = plan(cfg, devices, cl, top=3, cap_gib=cap, max_micro_batch=1, ac_modes=("full",))
        every = plan(cfg, devices, cl, top=10**6, cap_gib=cap)
        faster = sum(c.tokens_per_s > paper.tokens_per_s for c in every.ranked)
        zero1 = [c for c in every.ranked if c.layout.sharding == "zero1" and c.layout.engine == "native"]
        results[name] = {
            "devices": devices, "measured_pct_peak": measured, "paper_rank": faster + 1,
            "paper_fits": paper.peak_gib <= cap, "paper_fits_device": paper.peak_gib <= cl.device.memory_gib,
            "candidates": len(every.ranked), "rejected": every.rejected,
            "evaluated": every.evaluated,
            "rows": [row("paper layout = exatrain recipe (native ZeRO-1)", paper, cap, cl),
                     row("same under train.dtype=bf16 (autocast over fp32 params)", autocast, cap, cl)]
            + [row(f"planner #{i + 1}", c, cap, cl) for i, c in enumerate(full.ranked)]
            + [row(f"best native ZeRO-1 (#{every.ranked.index(c) + 1})", c, cap, cl) for c in zero1[:1]]
            + [row(f"paper knobs #{i + 1}", c, cap, cl) for i, c in enumerate(knobs.ranked)],
            "exact_knobs": exact_knobs(cfg, devices, cl),
        }
    (OUT / "frontier_layouts.json").write_text(json.dumps(results, indent=1))
    md = report(results, cl)
    (OUT / "frontier_layouts.md").write_text(md)
    print(md)


def verdict(r: dict) -> str:
    """Why the planner's first choice beats the paper's layout, in seconds per step by component, and whether the
    paper's layout fits the planner's cap and the 64 GiB GCD."""
    paper, autocast, best = r["rows"][0], r["rows"][1], r["rows"][2]
    parts = [f"{k} {paper['step_s'] * paper['breakdown'][k]:.0f}→{best['step_s'] * best['breakdown'][k]:.0f} s"
             for k in ("compute", "tp_comm", "bubble", "dp_comm") if paper["breakdown"][k] + best["breakdown"][k] > 0.005]
    gain = best["tokens_per_s"] / paper["tokens_per_s"] - 1
    peak = (f"{paper['peak_gib']:.1f} GiB on pipeline rank {paper['worst_pp_rank']} "
            f"({paper['states_gib']:.1f} GiB of states), peaking {paper['peak_phase']}")
    if r["paper_fits"]:
        fit = (f"The paper's layout fits the 57.6 GiB cap: {peak}; it ranks #{r['paper_rank']} of "
               f"{r['candidates']} fitting layouts. ")
    else:
        device = "fits the 64 GiB GCD" if r["paper_fits_device"] else "does not fit the 64 GiB GCD either"
        fit = f"The paper's layout is over the 57.6 GiB cap: {peak}; it {device}. "
    fit += f"Under train.dtype=bf16 (autocast over fp32 parameters) it would need {autocast['peak_gib']:.1f} GiB. "
    return (fit + f"Planner #1 ({best['layout']}) is {gain:+.0%} tokens/s over it: " + ", ".join(parts)
            + f" (step {paper['step_s']:.0f}→{best['step_s']:.0f} s; compute includes recomputation).")


def report(results: dict, cl) -> str:
    lines = ["## Frontier paper layouts through the planner", "", FACTS,
             ("`python benchmarks/frontier_layouts.py`. Predicted with the built-in Frontier facts "
             f"({cl.gemm.source}; {cl.intra.source}). TFLOP/s per GCD uses the Megatron formula with c = 4 under "
             "full recompute, as the paper does; % of peak is against 191.5 TFLOP/s per GCD. Memory cap 57.6 GiB "
             "(90% of 64). `paper knobs`: the best layouts with the paper's micro-batch 1 and full recompute fixed. "
             "Every layout runs the recipes' train.dtype=bf16_params (bf16 parameters and gradients, fp32 master "
             "weights and moments: the paper's DeepSpeed bf16 mode) unless its row says otherwise."), ""]
    for name, r in results.items():
        lines += [(f"### {name.upper()} on {r['devices']} GCDs — paper measured {r['measured_pct_peak']:.2%} of peak; "
                  f"{r['evaluated']} layouts evaluated, {r['candidates']} accepted and under 57.6 GiB"), "",
                  "| | layout | valid | tokens/s | step s | TFLOP/s/GCD | % peak | MFU | peak GiB | why |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for x in r["rows"]:
            lines.append(f"| {x['label']} | {x['layout']} | {'yes' if x['valid'] else 'no'} | "
                         f"{x['tokens_per_s']:,.0f} | {x['step_s']:.1f} | {x['tflops']:.1f} | {x['pct_peak']:.1%} | "
                         f"{x['mfu']:.1%} | {x['peak_gib']:.1f} | {x['why']} |")
        lines += ["", verdict(r), "", "Only the degrees free (1F1B, ZeRO-1, micro-batch 1, full recompute, as the paper):"]
        for cap, top in r["exact_knobs"].items():
            lines.append(f"- under {cap} GiB: " + "; ".join(f"{lay} {tps:,.0f} tok/s {gib:.1f} GiB" for lay, tps, gib in top))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
