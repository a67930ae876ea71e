"""A hybrid S2 model trains under tensor parallelism (TP=2, gloo, 2 processes) like one process.

Each TP rank holds 2 of the 4 query heads and 1 of the 2 KV heads; it must read the pattern
rows of its global heads (Attention.head_offset), and the packed batches exercise document
masking. The shared parallel harness (tests/parallel_worker.py) trains; the plain single-process
loop of tests/parallel_common.py is the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import torchrun_worker  # noqa: E402
from parallel_common import STEPS, global_batches, max_rel_err, reference_run, tiny_cfg  # noqa: E402

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
S2 = ["model.max_seq_len=64", "data.seq_len=64", "model.attention=s2", "model.s2.block_size=16",
      "model.s2.local_blocks=1", "model.s2.vert_stride=2", "model.s2.dense_layers=[2]"]
CASES = {
    "s2_tp2_sp": S2 + ["parallel.tp=2", "parallel.dp_shard=1"],
    "s2_tp2_no_sp": S2 + ["parallel.tp=2", "parallel.dp_shard=1", "parallel.sequence_parallel=false",
                          "parallel.loss_parallel=false"],
}


@pytest.mark.slow
def test_s2_tensor_parallel_matches_single_process(tmp_path):
    spec = [{"name": name, "overrides": o} for name, o in CASES.items()]
    out = torchrun_worker(WORKER, 2, spec, tmp_path, 300, {"EXATRAIN_TEST_CKPT": str(tmp_path)})
    results = json.loads(out.read_text())
    cfg = tiny_cfg(S2)
    batches = global_batches(cfg, STEPS + 1)
    ref = reference_run(cfg, batches[:STEPS], batches[STEPS])
    for name in CASES:
        got = results[name]
        assert "error" not in got, got.get("error")
        assert got["consistent"], f"{name}: ranks disagree: {got}"
        assert max_rel_err(got, ref) <= 1e-5, f"{name}: {got} vs single process {ref}"
