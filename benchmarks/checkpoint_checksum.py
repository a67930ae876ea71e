"""Cost of the per-file blake2b checksums in checkpoint manifests (exatrain.train.checkpoint).

For a tiny checkpoint (the tests' model, ~3 MB) and a ~100 MB one (random fp32 tensors), saved with DCP the
way the checkpointer does: the DCP save itself, the manifest with checksums vs sizes only (save side), and
`verify` (load side: sizes + checksums, every file read once). Median of `--reps`, wall time, one thread.

    python benchmarks/checkpoint_checksum.py            # ~20 s
Writes benchmarks/out/checkpoint_checksum.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from exatrain.train.checkpoint import FORMAT_VERSION, _manifest, verify

OUT = Path(__file__).resolve().parent / "out"
SIZES_MB = {"tiny": 3, "100MB": 100}


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, mb: int, root: Path, reps: int) -> dict[str, float]:
    n = mb * 2**20 // 4
    state = {f"layer{i}": torch.randn(n // 8) for i in range(8)}
    path = root / name
    def save() -> None:
        shutil.rmtree(path, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, checkpoint_id=str(path), no_dist=True)
    save_s = timed(save, reps)
    hashed_s = timed(lambda: _manifest(path), reps)
    sizes_s = timed(lambda: {str(f): f.stat().st_size for f in path.rglob("*") if f.is_file()}, reps)
    manifest = _manifest(path)
    (path / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": 0, "world_size": 1,
                                                "config": {}, "manifest": manifest}))
    verify_s = timed(lambda: verify(path), reps)
    total = sum(e["bytes"] for e in manifest.values())
    return {"checkpoint": name, "bytes": total, "dcp_save_s": save_s, "manifest_checksums_s": hashed_s,
            "manifest_sizes_s": sizes_s, "verify_s": verify_s, "checksum_GBps": total / hashed_s / 1e9,
            "save_overhead_pct": 100 * (hashed_s - sizes_s) / save_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, mb, Path(tmp), args.reps) for name, mb in SIZES_MB.items()]
    print(f"{'checkpoint':>10} {'MB':>7} {'dcp save s':>10} {'checksums s':>11} {'sizes s':>8} {'verify s':>8} "
          f"{'GB/s':>5} {'save +%':>7}")
    for r in rows:
        print(f"{r['checkpoint']:>10} {r['bytes'] / 1e6:7.1f} {r['dcp_save_s']:10.3f} {r['manifest_checksums_s']:11.3f} "
              f"{r['manifest_sizes_s']:8.4f} {r['verify_s']:8.3f} {r['checksum_GBps']:5.2f} {r['save_overhead_pct']:7.1f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "checkpoint_checksum.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
