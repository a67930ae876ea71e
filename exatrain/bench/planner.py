"""Layout planner: enumerate every layout for N devices, keep what the trainer accepts and what fits,
rank by predicted tokens/s, and say in one line why each top layout wins (DESIGN.md §12).

Validity is decided by the trainer's own validator (`ParallelDims.from_config` via
`exatrain.bench.layout.check`), so a proposed layout always starts. The space covers TP, PP (every
schedule), FSDP2 (zero_stage 2/3), HSDP, native ZeRO-1 composed with TP and PP (the Frontier
paper's layout), DeepSpeed ZeRO-1/2/3 (pure data parallelism), micro-batch and activation
checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from exatrain.bench.hardware import Cluster
from exatrain.bench.layout import AC_MODES, Layout, check
from exatrain.bench.memory import GIB, Kernels, MemoryEstimate, estimate_memory
from exatrain.bench.micro import format_table
from exatrain.bench.timing import StepTime, default_kernels, estimate_step_time
from exatrain.config import JobConfig

PP_SCHEDULES = (("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("InterleavedZeroBubble", 2), ("ZBVZeroBubble", 2))


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    invalid: str | None  # the validator's message; None when the trainer accepts the layout

    @property
    def peak_gib(self) -> float:
        return self.memory.peak / GIB

    @property
    def tokens_per_s(self) -> float:
        return self.time.tokens_per_s

    def why(self, cl: Cluster, cap_gib: float) -> str:
        """One line: where each parallel dim's traffic goes, the costs that matter, and the memory fit."""
        lay, b = self.layout, self.time.breakdown()
        parts = []
        if lay.tp > 1:
            link, bw = cl.link(lay.tp, 1)
            scope = "pair link" if link is cl.pair else "in-node" if link is cl.intra else "ACROSS NODES"
            parts.append(f"TP{lay.tp} {scope} ({bw:.0f} GB/s, {b['tp_comm']:.0%} of step)")
        if lay.pp > 1:
            across = lay.world > cl.devices_per_node
            parts.append(f"PP{lay.pp} {'across nodes' if across else 'in-node'}, bubble {b['bubble']:.1%}")
        if lay.dp > 1:
            parts.append(f"DP{lay.dp} {lay.sharding} exposed {b['dp_comm']:.1%}")
        parts.append(f"compute {b['compute']:.0%}")
        parts.append(f"{'fits' if self.peak_gib <= cap_gib else 'OVER the cap:'} {self.peak_gib:.1f}/{cap_gib:.0f} GiB")
        parts.append(f"MFU {self.time.mfu:.1%}")
        return "; ".join(parts)


@dataclass
class Plan:
    ranked: list[Candidate]  # accepted by the validator and under the cap, best first
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    cap_gib: float = 0.0
    evaluated: int = 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(cfg: JobConfig, devices: int, *, max_micro_batch: int = 8, ac_modes=AC_MODES,
                      max_tp: int = 64, virtual_stages=(2,), sequence_parallel=(True,),
                      engines=("native", "deepspeed")) -> list[Layout]:
    """Every combination of degrees, schedule, engine/ZeRO stage, micro-batch and AC for `devices` ranks
    (validity is not checked here)."""
    m, gbs = cfg.model, cfg.train.global_batch
    out = []
    for tp in _divisors(devices):
        if tp > min(max_tp, m.n_heads):
            continue
        for pp in _divisors(devices // tp):
            if pp > m.n_layers:
                continue
            dp = devices // (tp * pp)
            if gbs % dp:
                continue
            scheds = [(s, v) for s, v in PP_SCHEDULES for v in ((v,) if v == 1 or s == "ZBVZeroBubble"
                                                                else virtual_stages)] if pp > 1 else [("1F1B", 1)]
            for (sched, v), rep in product(scheds, _divisors(dp)):
                shard = dp // rep
                # under PP, pipelining keeps FSDP units gathered anyway: zero_stage 2 and 3 are the same run
                choices = [("native", 3)] + ([("native", 2)] if shard > 1 and pp == 1 else [])
                if rep == 1 and dp > 1:
                    choices.append(("native", 1))  # ZeRO-1: replicated params and grads, sharded optimizer
                if tp == pp == 1 and rep == 1 and dp > 1:
                    choices += [("deepspeed", z) for z in (1, 2, 3)]
                choices = [c for c in choices if c[0] in engines]
                for (engine, zero), mb, ac, sp in product(choices, _divisors(gbs // dp), ac_modes, sequence_parallel):
                    if mb > max_micro_batch or (not sp and tp == 1):
                        continue
                    out.append(Layout(tp, pp, shard, rep, v, sched, engine, zero, mb, ac, sp))
    return out


def evaluate(cfg: JobConfig, lay: Layout, cl: Cluster, kernels: Kernels | None = None) -> Candidate:
    """Memory and time of one layout, valid or not."""
    k = kernels or default_kernels(cl)
    return Candidate(lay, estimate_memory(cfg, lay, k), estimate_step_time(cfg, lay, cl, k), check(cfg, lay))


def plan(cfg: JobConfig, devices: int, cl: Cluster, *, cap_gib: float | None = None, top: int = 10,
         kernels: Kernels | None = None, **enum) -> Plan:
    """Rank all accepted layouts that fit under `cap_gib` (default 90% of the device memory) by tokens/s."""
    cap = cap_gib if cap_gib is not None else 0.9 * cl.device.memory_gib
    k = kernels or default_kernels(cl)
    result = Plan([], {"validator": 0, "memory": 0}, cap)
    for lay in enumerate_layouts(cfg, devices, **enum):
        result.evaluated += 1
        mem = estimate_memory(cfg, lay, k, all_ranks=False)
        if mem.peak / GIB > cap:
            result.rejected["memory"] += 1
            continue
        if check(cfg, lay):
            result.rejected["validator"] += 1
            continue
        result.ranked.append(Candidate(lay, mem, estimate_step_time(cfg, lay, cl, k), None))
    result.ranked.sort(key=lambda c: -c.tokens_per_s)
    del result.ranked[top:]
    return result


def format_plan(p: Plan, cl: Cluster, title: str = "") -> str:
    def rows(cands: list[Candidate]) -> list[list]:
        return [[i + 1, c.layout.describe(), f"{c.tokens_per_s:,.0f}", f"{c.time.total:.2f}",
                 f"{c.time.megatron_tflops:.1f}", f"{c.time.mfu:.1%}", f"{c.peak_gib:.1f}", c.why(cl, p.cap_gib)]
                for i, c in enumerate(cands)]

    header = ["#", "layout", "tokens/s", "step s", "TFLOP/s/dev", "MFU", "peak GiB", "why"]
    out = [title] if title else []
    out.append(format_table(header, rows(p.ranked)) if p.ranked else "no accepted layout fits")
    out.append(f"{p.evaluated} layouts evaluated; rejected: {p.rejected['validator']} by the validator, "
               f"{p.rejected['memory']} over "
               f"{p.cap_gib:.0f} GiB; hardware: {cl.gemm.source}; links {cl.intra.source}")
    return "\n".join(out)
