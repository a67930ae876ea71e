"""Throughput accounting (FLOPs, peak, MFU) and the metrics logger."""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from exatrain.bench.flops import (flops_per_token, flops_per_token_by_convention, megatron_flops_per_iteration,
                                  mfu_formula, non_embedding_params)
from exatrain.bench.peak import PeakInfo, lookup, peak_tflops
from exatrain.config import MetricsConfig, ModelConfig, S2Config
from exatrain.model.llama import build_model, count_params, ffn_hidden_dim
from exatrain.train.metrics import METRICS_FILE, MetricsLogger, peak_memory_bytes, read_metrics, throughput

# dim 64, 2 layers, 4 heads of 16 (KV dim 2 * 16 = 32), SwiGLU hidden int(8 * 64 / 3) = 170 rounded up to 192.
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=32)


# ---- FLOPs -------------------------------------------------------------------------------------------


def test_param_count_by_hand_and_against_model():
    cfg = ModelConfig(**TINY)
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 192 + 2 * 64  # wq, wk+wv, wo, w1/w2/w3, 2 norms
    hand = 2 * per_layer + 64 + 100 * 64  # + final norm + output projection
    assert hand == 105024
    assert non_embedding_params(cfg) == hand
    # Tied: the shared embedding/output matrix is counted once, as the output projection.
    assert count_params(build_model(cfg)) == hand
    # Untied: the input embedding is a lookup and is excluded, the output projection is kept.
    untied = ModelConfig(**TINY, tie_embeddings=False)
    assert count_params(build_model(untied), exclude_embeddings=True) == non_embedding_params(untied) == hand
    mha = ModelConfig(**{**TINY, "n_kv_heads": 0, "ffn_hidden": 100})
    assert non_embedding_params(mha) == count_params(build_model(mha))


def test_flops_per_token_hand_count():
    cfg = ModelConfig(**TINY)
    # 6·N plus the full (non-causal-halved) score matmuls: 12 · layers · dim · seq_len.
    assert flops_per_token(cfg, 32) == 6 * 105024 + 12 * 2 * 64 * 32 == 679296
    assert flops_per_token(cfg, 64) - flops_per_token(cfg, 32) == 12 * 2 * 64 * 32


def torchtitan_flop_per_token(num_params: int, n_layers: int, n_heads: int, dim: int, seq_len: int) -> int:
    """torchtitan's get_num_flop_per_token: 6·N + 12·l·h·q·t (no causal halving)."""
    return 6 * num_params + 12 * n_layers * n_heads * (dim // n_heads) * seq_len


def megatron_lm_flops(batch: int, seq: int, layers: int, hidden: int, heads: int, groups: int, ffn: int,
                      vocab: int) -> float:
    """Megatron-LM's num_floating_point_operations (training.py, dense GQA SwiGLU transformer, no MoE/MTP):
    3 (fwd, wgrad, dgrad) x 2 (FMA) per GEMM, core attention over the causal half."""
    kv_channels = hidden // heads
    q, kv = kv_channels * heads, kv_channels * groups
    attn = 3 * 2 * (hidden * (q + 2 * kv) + q * seq / 2 * 2 + q * hidden)
    mlp = 3 * 2 * hidden * ffn * 3
    return batch * seq * (layers * (attn + mlp) + 3 * 2 * hidden * vocab)


@pytest.mark.parametrize("kw", [TINY, dict(dim=256, n_layers=3, n_heads=8, n_kv_heads=8, vocab_size=1000),
                                dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                     ffn_hidden=14336)])
@pytest.mark.parametrize("seq", [32, 2048])
def test_flop_conventions_match_torchtitan_and_megatron_lm(kw, seq):
    cfg = ModelConfig(**kw)
    n = non_embedding_params(cfg)
    assert flops_per_token(cfg, seq) == torchtitan_flop_per_token(n, cfg.n_layers, cfg.n_heads, cfg.dim, seq)
    assert flops_per_token(cfg, seq, "palm") == flops_per_token(cfg, seq)  # the default
    # Megatron-LM counts no norm weights (2 per layer + the final one, dim each): the only other difference.
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    mega = megatron_lm_flops(3, seq, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads,
                             ffn_hidden_dim(cfg), cfg.vocab_size)
    assert 3 * seq * (flops_per_token(cfg, seq, "megatron") - 6 * norms) == pytest.approx(mega, rel=1e-12)
    both = flops_per_token_by_convention(cfg, seq)
    assert both["palm"] - both["megatron"] == 6 * cfg.n_layers * cfg.dim * seq
    assert "palm convention" in mfu_formula("palm") and "megatron convention" in mfu_formula("megatron")
    with pytest.raises(ValueError, match="unknown FLOP convention 'causal'"):
        flops_per_token(cfg, seq, "causal")


def test_flops_need_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        flops_per_token(ModelConfig(), 32)


def test_s2_scales_only_sparse_layers():
    # Layer 0 dense (dense_period 2), layer 1 sparse. 64 tokens = 4 blocks of 16, 2 KV heads on stride
    # phases {0, 1}, local window = the diagonal block; 10 causal block pairs per head. Phase-1 head:
    # 4 diagonal + key block 1 for query blocks 2, 3 = 6. Phase-0 head: 4 diagonal + key block 0 for
    # query blocks 1..3 + key block 2 for query block 3 = 8. Fraction 14/20.
    cfg = ModelConfig(**TINY, attention="s2", s2=S2Config(block_size=16, local_blocks=1, vert_stride=2, dense_period=2))
    assert flops_per_token(cfg, 64) == pytest.approx(6 * 105024 + 12 * 64 * 64 * (1 + 14 / 20))


def test_s2_without_pattern_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "exatrain.model.s2.pattern", None)  # makes the import fail
    with pytest.raises(NotImplementedError, match="attended"):
        flops_per_token(ModelConfig(**TINY, attention="s2"), 32)


def test_megatron_formula_gpt3_175b():
    gpt3 = ModelConfig(dim=12288, n_layers=96, n_heads=96, vocab_size=51200)
    # 96·B·s·l·h²·(1 + s/6h + V/16lh) at B=1536, s=2048, evaluated with exact rationals.
    assert megatron_flops_per_iteration(gpt3, 1536, 2048, recompute=True) == pytest.approx(4.5109707533231063e18, rel=1e-12)
    no_recompute = megatron_flops_per_iteration(gpt3, 1536, 2048, recompute=False)
    assert no_recompute == pytest.approx(4.5109707533231063e18 * 3 / 4, rel=1e-12)
    # Leading term without recompute is 6·(12·l·h²)·tokens: the 6N rule for a GPT block.
    tiny_ctx = ModelConfig(dim=12288, n_layers=96, n_heads=96, vocab_size=1)
    leading = 6 * 12 * 96 * 12288**2 * 1536 * 1
    assert megatron_flops_per_iteration(tiny_ctx, 1536, 1, recompute=False) == pytest.approx(leading, rel=1e-4)


# ---- peak --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, dtype, tflops, label", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0, "H100 SXM"),
    ("NVIDIA H100 PCIe", "bf16", 756.0, "H100 PCIe"),
    ("NVIDIA H200", "bf16", 989.0, "H200"),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0, "A100"),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5, "A100"),
    ("AMD Instinct MI250X", "bf16", 191.5, "per GCD"),
    ("AMD Instinct MI250X/MI250", "fp32", 47.9, "per GCD"),
    ("AMD Instinct MI300X", "bf16", 1307.4, "MI300X"),
])
def test_peak_table(monkeypatch, name, dtype, tflops, label):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    info = peak_tflops(torch.device("cuda", 0), dtype)
    assert info.tflops == tflops and label in info.source and info.source.startswith("table")


@pytest.mark.parametrize("name, arch, cus, tflops, label", [
    ("AMD Instinct MI250X / MI250", "gfx90a:sramecc+:xnack-", 110, 191.5, "MI250X"),
    ("AMD Instinct MI250X / MI250", "gfx90a:sramecc+:xnack-", 104, 181.0, "MI250,"),
    ("", "gfx942:sramecc+:xnack-", 304, 1307.4, "MI300X"),
])
def test_rocm_peak_falls_back_to_the_gcn_arch(monkeypatch, name, arch, cus, tflops, label):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(gcnArchName=arch, multi_processor_count=cus))
    info = peak_tflops(torch.device("cuda", 0), "bf16")
    assert info.tflops == tflops and label in info.source


def test_peak_tf32_and_override(monkeypatch):
    assert lookup("NVIDIA H100 80GB HBM3", "fp32", tf32=True).tflops == 494.7
    assert lookup("AMD Instinct MI250X", "fp32", tf32=True).tflops == 47.9  # no TF32 path on CDNA2
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda"), "bf16", override=500.0) == PeakInfo(500.0, "override (metrics.peak_tflops)")
    with pytest.raises(ValueError, match="dtype"):
        peak_tflops(torch.device("cuda"), "int8")


def test_unknown_gpu_warns_and_reports_no_peak(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Acme Tensor Slab 9000")
    with caplog.at_level(logging.WARNING, logger="exatrain"):
        info = peak_tflops(torch.device("cuda"), "bf16")
    assert info.tflops == 0.0
    assert "Acme Tensor Slab 9000" in caplog.text and "peak_tflops" in caplog.text
    assert math.isnan(throughput(1000, 1.0, 1e9, info, 1)["mfu"])


def test_cpu_probe_is_quick_and_cached():
    t0 = time.perf_counter()
    info = peak_tflops(torch.device("cpu"), "fp32")
    first = time.perf_counter() - t0
    assert info.tflops > 0 and info.source.startswith("measured")
    assert first < 3.0
    t0 = time.perf_counter()
    assert peak_tflops("cpu", "fp32") == info
    assert time.perf_counter() - t0 < 0.05


def test_throughput_and_memory():
    r = throughput(tokens=8000, seconds=2.0, flops_per_token=1e9, peak=PeakInfo(2.0, "test"), world_size=4)
    assert r["tokens_per_s"] == 1000.0  # per device
    assert r["tflops"] == pytest.approx(1.0)
    assert r["mfu"] == pytest.approx(0.5)
    assert peak_memory_bytes("cpu") > 10 * 2**20  # a Python process with torch loaded


# ---- MetricsLogger -----------------------------------------------------------------------------------


def _cfg(**kw) -> MetricsConfig:
    return MetricsConfig(**{"log_every": 5, "tensorboard": False, "progress_bar": False, **kw})


STEP = {"loss": 2.5, "grad_norm": 0.75, "lr": 3e-3, "tokens_seen": 40960, "tokens_per_s": 12345.6, "tflops": 0.0123,
        "mfu": 0.125, "peak_mem_gb": 3.0, "data_wait_pct": 2.0}


def test_jsonl_and_log_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="exatrain"), MetricsLogger(tmp_path, _cfg(), 0, total_steps=12) as m:
        for step in range(1, 13):
            m.log_step(step, {**STEP, "loss": STEP["loss"] + step})
        m.log_eval(12, {"val_loss": math.log(20.0), "val_ppl": 20.0})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 13
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs[:12]] == list(range(1, 13)) and recs[0]["kind"] == "train"
    assert recs[0]["loss"] == 3.5 and "resumed_from" not in recs[0]
    assert recs[-1]["kind"] == "eval" and recs[-1]["val_ppl"] == 20.0
    logged = [r.getMessage() for r in caplog.records]
    step_lines = [x for x in logged if x.startswith("step")]
    assert [x.split()[1] for x in step_lines] == ["1/12", "5/12", "10/12", "12/12"]  # first, every 5, last
    assert step_lines[0] == ("step  1/12 | loss 3.5000 | grad_norm 0.750 | lr 3.00e-03 | 40.96K tok | "
                             "12,346 tok/s/dev | 0.0123 TFLOP/s/dev | MFU 12.5% | mem 3.00 GiB | data-wait 2.0%")
    assert logged[-1] == "eval step 12 | val_loss 2.9957 | val_ppl 20.00"


def test_nonfinite_and_extra_keys(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="exatrain"), MetricsLogger(tmp_path, _cfg(), 0, total_steps=10) as m:
        m.log_step(1, {"loss": float("nan"), "mfu": math.nan, "send_dropped": 12, "loss_t": torch.tensor(1.5)})
    rec = json.loads((tmp_path / METRICS_FILE).read_text())
    assert rec["loss"] is None and rec["mfu"] is None and rec["send_dropped"] == 12 and rec["loss_t"] == 1.5
    assert caplog.records[-1].getMessage() == "step  1/10 | loss nan | MFU n/a | send_dropped 12 | loss_t 1.5"


def test_other_ranks_write_nothing(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="exatrain"), MetricsLogger(tmp_path / "r1", _cfg(), 1, 10) as m:
        m.log_step(1, STEP)
        m.log_eval(1, {"val_loss": 1.0})
    assert not (tmp_path / "r1").exists() and not caplog.records


def test_resume_appends_and_supersedes(tmp_path):
    with MetricsLogger(tmp_path, _cfg(), 0, total_steps=10) as m:
        for step in range(1, 8):  # crashed after step 7, last checkpoint at step 5
            m.log_step(step, {"loss": 1.0})
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"kind": "train", "step": 8, "lo')  # torn write at the crash
    with MetricsLogger(tmp_path, _cfg(), 0, total_steps=10, start_step=5) as m:
        for step in range(6, 11):
            m.log_step(step, {"loss": 2.0})
    raw = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(raw) == 7 + 1 + 5  # append-only: nothing rewritten
    assert json.loads(raw[8])["resumed_from"] == 5
    recs = read_metrics(tmp_path / METRICS_FILE, kind="train")
    assert [r["step"] for r in recs] == list(range(1, 11))
    assert [r["loss"] for r in recs] == [1.0] * 5 + [2.0] * 5


def test_restart_from_scratch_supersedes_everything(tmp_path):
    for loss in (1.0, 2.0):  # the first attempt died before its first checkpoint
        with MetricsLogger(tmp_path, _cfg(), 0, total_steps=3) as m:
            for step in (1, 2, 3):
                m.log_step(step, {"loss": loss})
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[3])["resumed_from"] == 0
    assert [r["loss"] for r in read_metrics(tmp_path / METRICS_FILE)] == [2.0] * 3


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, _cfg(tensorboard=True), 0, total_steps=3) as m:
        for step in (1, 2, 3):
            m.log_step(step, {"loss": float(step)})
        m.log_eval(3, {"val_loss": 0.5})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [1.0, 2.0, 3.0]
    assert acc.Scalars("eval/val_loss")[0].value == 0.5


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_routes_log_lines_through_tqdm(tmp_path, monkeypatch):
    tty = _FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    handler = logging.StreamHandler(tty)
    exa = logging.getLogger("exatrain")
    old_level = exa.level
    exa.addHandler(handler)
    exa.setLevel(logging.INFO)
    try:
        with MetricsLogger(tmp_path, _cfg(progress_bar=True), 0, total_steps=10) as m:
            assert m._bar is not None and handler not in exa.handlers  # swapped for a tqdm.write handler
            m.log_step(1, STEP)
        assert handler in exa.handlers  # restored on close
    finally:
        exa.removeHandler(handler)
        exa.setLevel(old_level)
    out = tty.getvalue()
    assert out.count("step  1/10 | loss 2.5000") == 1  # the log line, written once, by tqdm.write
    assert "1/10 [" in out  # the bar itself
