"""The Triton S2 kernels (forward and backward) equal the reference, run on CPU by Triton's
interpreter. TRITON_INTERPRET is read when kernels are defined, so the check runs in a fresh
process with it set rather than flipping the variable inside this test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from exatrain.model.s2.launch import LaunchConfig, force_config, launch_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

CHECK = r"""
import json, sys, torch
from exatrain.model.s2.pattern import S2Pattern
from exatrain.model.s2.reference import reference_s2_attention
from exatrain.model.s2.launch import LaunchConfig, force_config
from exatrain.model.s2.triton_kernel import triton_attention

def run(fn, q, k, v, p, docs, off, grad):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, p, doc_ids=docs, scale=0.3, head_offset=off)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]

errors = {}
for name, (B, H, Hkv, T, D, kw, docs, off, tiles) in json.loads(sys.argv[1]).items():
    g = torch.Generator().manual_seed(0)
    p = S2Pattern(**kw)
    q, grad = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    doc_ids = torch.cumsum(torch.rand(B, T, generator=g) < 0.03, 1) if docs else None
    ref = run(reference_s2_attention, q, k, v, p, doc_ids, off, grad)
    with force_config(LaunchConfig(*tiles, num_warps=4, num_stages=1) if tiles else None):
        got = run(triton_attention, q, k, v, p, doc_ids, off, grad)
    errors[name] = max(((a - b).abs().max() / (1 + b.abs().max())).item() for a, b in zip(got, ref))
print(json.dumps(errors))
"""

# name: (B, H, Hkv, T, D, pattern, packed documents, head offset, forced (tile_m, tile_n) or None)
CASES = {
    "mha_ragged": (1, 2, 2, 16 * 4 + 5, 16, dict(block_size=16, local_blocks=2, vert_stride=2, n_heads=2), False, 0,
                   None),
    "gqa_docs_dense_head": (1, 4, 2, 16 * 4 + 3, 16, dict(block_size=16, local_blocks=1, vert_stride=2, n_heads=4,
                                                          n_kv_heads=2, num_dense_heads=2), True, 0, None),
    "tp_shard_head_dim_24": (2, 2, 1, 16 * 3, 24, dict(block_size=16, local_blocks=1, vert_stride=2, n_heads=4,
                                                        n_kv_heads=2), False, 2, None),
    "offset_dense_last_shard": (1, 2, 1, 16 * 4 + 3, 16, dict(block_size=16, local_blocks=1, vert_stride=4, n_heads=4,
                                                               n_kv_heads=2, num_dense_heads=2, head_sliding_offset=1),
                                True, 2, None),
    "offset_sparse_shard": (1, 2, 1, 16 * 5, 16, dict(block_size=16, local_blocks=1, vert_stride=4, n_heads=4,
                                                      n_kv_heads=2, num_dense_heads=2, head_sliding_offset=1), True, 0,
                            None),
    # Tiles below the pattern block: 16-row query tiles x 32-row key tiles, and the other way round.
    "tiles_16x32_in_64_blocks": (1, 2, 1, 64 * 3 + 7, 16, dict(block_size=64, local_blocks=1, vert_stride=2,
                                                                n_heads=2, n_kv_heads=1), True, 0, (16, 32)),
    "tiles_32x16_in_64_blocks": (1, 2, 2, 64 * 3 + 7, 16, dict(block_size=64, local_blocks=2, vert_stride=2,
                                                                n_heads=2), False, 0, (32, 16)),
}


def test_triton_kernels_match_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(CASES)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(errors) == set(CASES)
    bad = {name: err for name, err in errors.items() if not err < 1e-5}
    assert not bad, f"Triton S2 differs from the reference (max relative error): {bad}"


def test_launch_configs_are_per_backend_and_never_exceed_the_block():
    bf16 = torch.bfloat16
    hip_bwd = launch_config("hip", "bwd", bf16, 128)
    assert hip_bwd == LaunchConfig(64, 32, 4, 1, 1)
    assert hip_bwd.compile_options("hip") == dict(num_warps=4, num_stages=1, waves_per_eu=1)
    assert hip_bwd.compile_options("cuda") == dict(num_warps=4, num_stages=1)  # CUDA has no such option
    assert launch_config("cuda", "bwd", bf16, 128).num_warps == 8
    assert launch_config("cuda", "fwd", torch.float32, 64) == launch_config("hip", "fwd", bf16, 256)  # the fallback
    assert hip_bwd.kernel_args(16) == dict(TILE_M=16, TILE_N=16)
    with force_config(LaunchConfig(16, 32, 4, 1)):
        assert launch_config("hip", "fwd", bf16, 64) == LaunchConfig(16, 32, 4, 1)
