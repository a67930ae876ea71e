"""Per-rank training-state memory and step time for each parallel layout vs one replicated process.

    python benchmarks/parallel_memory.py [--steps 3]

For every layout it launches torchrun (one launch per world size), builds the engine on a small
Llama (~2M parameters, fp32) and measures, on every rank, the bytes of parameters, gradients
and optimizer state it actually holds: gradients and optimizer tensors are read in an optimizer
step pre/post hook, so the numbers are what the optimizer sees (DeepSpeed's fp32 master partitions
count as optimizer state). The table reports the largest rank. "ideal" is the fraction of the
replicated total a layout should hold (1/N when all three are sharded N ways; the ZeRO formulas for
DeepSpeed, see LAYOUTS), and the run fails unless measured/replicated is within 10% of every ideal.
Every rank is also compared with the planner's memory model (exatrain.bench.memory): its states at the
optimizer step and, for the native engine, the peak of live tensor bytes of one more step.
Writes benchmarks/out/parallel_memory.json and parallel_memory.md (a section for RESULTS.md).
Step times are from oversubscribed CPU processes and only compare layouts relative to each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out"
MODEL = ["model.dim=128", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.vocab_size=2048",
         "model.max_seq_len=32", "model.tie_embeddings=false", "data.seq_len=32", "train.global_batch=16",
         "train.micro_batch=2"]

# name -> (world size, overrides, ideal fraction of the replicated bytes, None where layers do not split evenly).
# Replicated fp32 AdamW holds 4P (params, grads, two moments). FSDP shards all of it: 1/N. DeepSpeed also keeps
# an fp32 master copy in its optimizer (3P of optimizer state): ZeRO-2 P+(P+3P)/N, ZeRO-3 5P/N. ZeRO-1 holds full
# gradients only during backward; by the optimizer step they are reduced into partitions, so it measures as ZeRO-2.
# exatrain's native ZeRO-1 likewise: replicated parameters, gradient slices and fp32 master slices + moments.
LAYOUTS: dict[str, tuple[int, list[str], float | None]] = {
    "replicated (1 proc)": (1, ["parallel.dp_shard=1"], 1.0),
    "fsdp dp_shard=2 (ZeRO-3)": (2, ["parallel.dp_shard=2"], 1 / 2),
    "fsdp dp_shard=2 zero_stage=2": (2, ["parallel.dp_shard=2", "parallel.zero_stage=2"], 1 / 2),
    "tp=2": (2, ["parallel.tp=2", "parallel.dp_shard=1"], None),
    "pp=2 (1F1B)": (2, ["parallel.pp=2", "parallel.dp_shard=1"], None),
    "native ZeRO-1 dp=2": (2, ["parallel.dp_shard=2", "parallel.zero_stage=1"], (1 + 4 / 2) / 4),
    "deepspeed ZeRO-1 dp=2": (2, ["parallel.dp_shard=2", "parallel.engine=deepspeed", "parallel.zero_stage=1"],
                              (1 + 4 / 2) / 4),
    "deepspeed ZeRO-2 dp=2": (2, ["parallel.dp_shard=2", "parallel.engine=deepspeed", "parallel.zero_stage=2"],
                              (1 + 4 / 2) / 4),
    "deepspeed ZeRO-3 dp=2": (2, ["parallel.dp_shard=2", "parallel.engine=deepspeed", "parallel.zero_stage=3"],
                              (5 / 2) / 4),
    "fsdp dp_shard=4": (4, ["parallel.dp_shard=4"], 1 / 4),
    "hsdp 2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], 1 / 2),
    "tp=2 x fsdp=2": (4, ["parallel.tp=2", "parallel.dp_shard=2"], None),
    "pp=2 x fsdp=2": (4, ["parallel.pp=2", "parallel.dp_shard=2"], None),
    "native ZeRO-1 dp=4": (4, ["parallel.dp_shard=4", "parallel.zero_stage=1"], (1 + 4 / 4) / 4),
    "tp=2 x ZeRO-1 dp=2": (4, ["parallel.tp=2", "parallel.dp_shard=2", "parallel.zero_stage=1"], None),
    "pp=2 x ZeRO-1 dp=2": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.zero_stage=1"], None),
    "fsdp dp_shard=8": (8, ["parallel.dp_shard=8"], 1 / 8),
    "3d pp2 x dp2 x tp2": (8, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.tp=2"], None),
    "3d pp2 x ZeRO-1 dp2 x tp2": (8, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.tp=2", "parallel.zero_stage=1"],
                                  None),
}


def _bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


class StateMeter:
    """Counts parameter, gradient and optimizer-state bytes held by this rank (shared tensors counted once).

    Gradients are collected in every optimizer-step pre-hook of a train step (DeepSpeed steps its base
    optimizer once per parameter group, with only that group's gradient partition alive) and summed."""

    def __init__(self, engine):
        self.engine = engine
        self.grad_bytes = 0
        self._grads: dict[int, int] = {}
        for opt in self._optimizers():
            opt.register_step_pre_hook(lambda o, *_: self._collect_grads())

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        if hasattr(self.engine, "optimizers"):
            return [o.optimizer for o in self.engine.optimizers]
        return [self.engine.ds.optimizer.optimizer]

    def _model_params(self) -> list[torch.Tensor]:
        params = [p for part in self.engine.model_parts for p in part.parameters()]
        return [getattr(p, "ds_tensor", p) for p in params]

    def _collect_grads(self) -> None:
        tensors = self._model_params() + [p for o in self._optimizers() for g in o.param_groups for p in g["params"]]
        for t in tensors:
            if t.grad is not None:
                self._grads[_local(t.grad).data_ptr()] = _bytes(t.grad)

    def train_step(self, *args) -> None:
        self._grads.clear()
        self.engine.train_step(*args)
        self.grad_bytes = max(self.grad_bytes, sum(self._grads.values()))

    def param_bytes(self) -> int:
        return sum(_bytes(p) for p in {_local(p).data_ptr(): p for p in self._model_params()}.values())

    def _masters(self) -> list[torch.Tensor]:
        """fp32 master partitions separate from the module's parameters: native ZeRO-1's slices, DeepSpeed's."""
        if hasattr(self.engine, "optimizers"):
            return [m for o in self.engine.optimizers for m in getattr(o, "masters", {}).values()]
        zero = self.engine.ds.optimizer
        return list(getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups)

    def optimizer_bytes(self) -> int:
        model = {_local(p).untyped_storage().data_ptr() for p in self._model_params()}
        total = sum(_bytes(p) for p in self._masters() if p.untyped_storage().data_ptr() not in model)
        for opt in self._optimizers():
            for state in opt.state.values():
                total += sum(_bytes(v) for v in state.values() if torch.is_tensor(v) and v.numel() > 1)
        return total


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _live_peak(engine, micro, batch, cfg) -> int:
    """Peak live tensor bytes of one more step (native engine; 0 for DeepSpeed, whose flat buffers live outside)."""
    from parallel_common import n_labels

    from exatrain.bench.measure import LiveBytes, live_tensors

    if not hasattr(engine, "optimizers"):
        return 0
    tracker = LiveBytes(live_tensors(engine))
    with tracker:
        engine.train_step(micro, n_labels(batch), cfg.optim.lr)
    return tracker.peak


def predicted(name: str) -> list[dict]:
    """The planner's per-pipeline-rank bytes for a layout (CPU kernels): states at the optimizer step and the peak."""
    from exatrain.bench.layout import from_config
    from exatrain.bench.memory import Kernels, estimate_memory
    from exatrain.config import load_config

    world, overrides, _ = LAYOUTS[name]
    cfg = load_config(None, MODEL + overrides)
    est = estimate_memory(cfg, from_config(cfg, world), Kernels.for_device("cpu"))
    return [{"states": r.params + r.optimizer_grads + r.optimizer, "peak": r.peak} for r in est.ranks]


def worker(names: list[str], steps: int, out: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from parallel_common import global_batches, n_labels, rank_micro_batches

    from exatrain.config import load_config
    from exatrain.engine import build_engine
    from exatrain.model.llama import build_model
    from exatrain.parallel import ParallelDims

    torch.set_num_threads(1)
    results = {}
    for name in names:
        _, overrides, _ = LAYOUTS[name]
        cfg = load_config(None, MODEL + overrides)
        dims = ParallelDims.from_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        mesh = dims.build_mesh("cpu")
        engine = build_engine(build_model(cfg.model), cfg, dims, mesh, "cpu")
        meter = StateMeter(engine)
        times = []
        for b in global_batches(cfg, steps + 1):
            micro = rank_micro_batches(b, dims.dp_rank(mesh), dims.dp_size, cfg.train.micro_batch)
            dist.barrier()
            t0 = time.perf_counter()
            meter.train_step(micro, n_labels(b), cfg.optim.lr)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        row = {"param": meter.param_bytes(), "grad": meter.grad_bytes, "optim": meter.optimizer_bytes(),
               "pp_rank": mesh.get_local_rank("pp"), "live_peak": _live_peak(engine, micro, b, cfg)}
        rows: list = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        results[name] = {"ranks": rows, "step_s": statistics.median(times[1:])}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()


def launch(world: int, names: list[str], steps: int) -> dict:
    out = OUT / f"parallel_memory_w{world}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__,
           "--worker", "--steps", str(steps), "--out", str(out), *names]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run(cmd, check=True, env=env, timeout=1800, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    out.unlink()
    return data


def report(results: dict) -> tuple[list[dict], str]:
    base = results["replicated (1 proc)"]["ranks"][0]
    base_total = base["param"] + base["grad"] + base["optim"]
    rows, lines = [], [
        "## Parallel layouts: per-rank training-state memory and step time",
        "",
        f"Model: {' '.join(MODEL)} (fp32, AdamW). Bytes are the largest rank's parameters + gradients + optimizer",
        "state as held at the optimizer step; ratio = rank total / replicated total; ideal = 1/N where every",
        "state is sharded N ways, and for DeepSpeed (which adds a 4-byte fp32 master copy to its optimizer state)",
        "ZeRO-1/2 (1+4/N)/4, ZeRO-3 5/(4N) (ZeRO-1's full gradients live only during backward, not in this",
        "optimizer-step snapshot). TP/PP rows have no ideal: replicated norms and the",
        "embedding/output on the first/last stage make ranks uneven. Step times: oversubscribed CPU processes",
        "on a shared 2-core machine, median of steps 2..n (compare layouts only roughly).",
        "",
        "| layout | procs | params MiB | grads MiB | optim MiB | total MiB | ratio | ideal | step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def states(x: dict) -> int:
        return x["param"] + x["grad"] + x["optim"]

    checks = []
    for name, (world, _, ideal) in LAYOUTS.items():
        r = results[name]
        pred = predicted(name)
        s_ratio = [states(x) / pred[x["pp_rank"]]["states"] for x in r["ranks"]]
        p_ratio = [x["live_peak"] / pred[x["pp_rank"]]["peak"] for x in r["ranks"] if x["live_peak"]]
        checks.append({"layout": name, "procs": world, "states_ratio": s_ratio, "peak_ratio": p_ratio,
                       "live_peak": [x["live_peak"] for x in r["ranks"]],
                       "pred_peak": [pred[x["pp_rank"]]["peak"] for x in r["ranks"]]})
        worst = max(r["ranks"], key=states)
        worst = {k: worst[k] for k in ("param", "grad", "optim")}
        total = sum(worst.values())
        ratio = total / base_total
        ok = None if ideal is None else abs(ratio / ideal - 1) <= 0.10
        rows.append({"layout": name, "procs": world, **worst, "total": total, "ratio": ratio, "ideal": ideal,
                     "within_10pct": ok, "step_s": r["step_s"], "ranks": r["ranks"]})
        mib = [x / 2**20 for x in (worst["param"], worst["grad"], worst["optim"], total)]
        ideal_s = "-" if ideal is None else f"{ideal:.3f}" + ("" if ok else " (off)")
        lines.append(f"| {name} | {world} | " + " | ".join(f"{m:.2f}" for m in mib)
                     + f" | {ratio:.3f} | {ideal_s} | {r['step_s']:.3f} |")
    lines += ["", "### Planner memory model vs these runs (every rank)", "",
              ("Predicted by exatrain.bench.memory for each rank's pipeline stage (CPU kernels): the states at the "
              "optimizer step (parameters + the gradients the optimizer steps on + optimizer state, fp32 masters "
              "included) and the step's peak of live tensor bytes (one extra step under "
              "exatrain.bench.measure.LiveBytes; native engine only: DeepSpeed's flat buffers live outside the "
              "tracker). Ratio = measured / predicted, min-max over ranks."), "",
              "| layout | procs | states meas/pred | peak meas/pred | peak MiB meas (pred), worst rank |",
              "|---|---:|---:|---:|---:|"]
    for c in checks:
        sr = f"{min(c['states_ratio']):.3f}-{max(c['states_ratio']):.3f}"
        pr = f"{min(c['peak_ratio']):.3f}-{max(c['peak_ratio']):.3f}" if c["peak_ratio"] else "-"
        i = max(range(len(c["pred_peak"])), key=lambda j: c["pred_peak"][j])
        mib = f"{c['live_peak'][i] / 2**20:.1f} ({c['pred_peak'][i] / 2**20:.1f})" if c["live_peak"][i] else \
            f"- ({c['pred_peak'][i] / 2**20:.1f})"
        lines.append(f"| {c['layout']} | {c['procs']} | {sr} | {pr} | {mib} |")
    within = all(abs(x - 1) <= 0.10 for c in checks for x in c["states_ratio"] + c["peak_ratio"])
    lines += ["", f"Every rank of every layout within 10%: {'yes' if within else 'NO'}."]
    rows.append({"planner_checks": checks, "all_within_10pct": within})
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        dist.init_process_group("gloo")
        worker(args.names, args.steps, args.out)
        dist.destroy_process_group()
        return
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for world in sorted({w for w, _, _ in LAYOUTS.values()}):
        names = [n for n, (w, _, _) in LAYOUTS.items() if w == world]
        print(f"launching {world} process(es): {', '.join(names)}", flush=True)
        results.update(launch(world, names, args.steps))
    rows, md = report(results)
    (OUT / "parallel_memory.json").write_text(json.dumps(rows, indent=1))
    (OUT / "parallel_memory.md").write_text(md)
    print(md)
    bad = [r["layout"] for r in rows if r.get("within_10pct") is False]
    if bad:
        sys.exit(f"sharded states do not scale as 1/N within 10%: {bad}")


if __name__ == "__main__":
    main()
