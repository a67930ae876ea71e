"""The GPU hot path of attention: document boundaries come from the host once per micro-batch (no
device->host sync in any layer), the S2 phase tensors are cached, and configs that would put flash or S2
on a GPU in fp32 are rejected at load time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from exatrain.config import ConfigError, ModelConfig, load_config
from exatrain.data.batch import Batch
from exatrain.engine.base import model_inputs
from exatrain.model.attention import reference_attention, sdpa_attention
from exatrain.model.documents import describe, documents, to_device
from exatrain.model.llama import build_model, materialize
from exatrain.model.s2 import S2Attention, S2Pattern, force_impl, triton_kernel
from exatrain.model.s2.phases import local_phases


class CountSyncs(TorchDispatchMode):
    """Counts aten._local_scalar_dense: every item()/bool()/int()/tolist() of a tensor goes through it."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def packed_ids(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.rand(B, T, generator=g) < 0.05, 1)


def test_describe_matches_the_old_per_layer_derivation():
    ids = packed_ids(3, 97)
    flat = ids + torch.arange(3)[:, None] * (ids.max() + 1)  # the derivation flash_attention used to run per layer
    _, counts = torch.unique_consecutive(flat.flatten(), return_counts=True)
    docs = describe(ids)
    assert torch.equal(docs.cu_seqlens, F.pad(counts.cumsum(0), (1, 0)).to(torch.int32))
    assert docs.max_seqlen == int(counts.max())
    assert describe(torch.full((2, 9), 4)) is None
    assert documents(None) is None


def test_model_forward_with_packed_documents_runs_without_host_syncs():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=64)
    model = materialize(build_model(cfg), "cpu", seed=0)
    ids = packed_ids(2, 64)
    batch = Batch(torch.randint(0, 50, (2, 64)), torch.zeros(2, 64, dtype=torch.long), doc_ids=ids)
    tokens, kwargs = model_inputs(batch, torch.device("cpu"))
    with CountSyncs() as mode:
        logits = model(tokens, **kwargs)
    assert mode.syncs == 0
    with CountSyncs() as once:
        describe(ids)
    with CountSyncs() as mode:  # ids nobody recorded (a pipeline stage's slice): described once, not per layer
        assert torch.equal(logits, model(tokens, **{**kwargs, "doc_ids": ids.clone()}))
    assert mode.syncs == once.syncs > 0


def test_sdpa_with_documents_equals_the_masked_reference():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 80, 16, generator=g) for _ in range(3))
    ids = to_device(packed_ids(2, 80, seed=3), "cpu")
    got = sdpa_attention(q, k, v, doc_ids=ids, scale=0.25, head_offset=0)
    torch.testing.assert_close(got, reference_attention(q, k, v, doc_ids=ids, scale=0.25, head_offset=0))


def test_s2_gpu_wrapper_reuses_phases_and_never_syncs(monkeypatch):
    p = S2Pattern(block_size=16, local_blocks=1, vert_stride=2, n_heads=4, n_kv_heads=2, num_dense_heads=2)
    assert local_phases(p, 0, 4, torch.device("cpu")) is local_phases(p, 0, 4, torch.device("cpu"))
    seen = []
    monkeypatch.setattr(triton_kernel._S2Triton, "apply", lambda q, k, v, docs, phases, *a: seen.append(docs) or q)
    q, k = torch.randn(1, 4, 48, 16), torch.randn(1, 2, 48, 16)
    ids = to_device(packed_ids(1, 48), "cpu")
    single = to_device(torch.zeros(1, 48, dtype=torch.long), "cpu")
    layer = S2Attention(p)
    with force_impl("triton"):
        layer(q, k, k, doc_ids=ids, scale=0.25, head_offset=0)
        with CountSyncs() as mode:
            for docs in (ids, single):
                layer(q, k, k, doc_ids=docs, scale=0.25, head_offset=0)
    assert mode.syncs == 0
    assert seen == [ids, ids, None]  # a single document per row runs without the document mask


@pytest.mark.parametrize("attention", ["flash", "s2"])
def test_flash_and_s2_on_gpu_reject_fp32_with_the_fix(attention, monkeypatch):
    over = [f"model.attention={attention}", "model.s2.vert_stride=2", "train.device=cuda"]
    with pytest.raises(ConfigError, match=r"train\.dtype: .*set train\.dtype=bf16"):
        load_config("tiny.yaml", over)
    load_config("tiny.yaml", [*over, "train.dtype=bf16"])
    load_config("tiny.yaml", [*over[:2], "train.device=cpu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="train.device=auto"):
        load_config("tiny.yaml", over[:2])
