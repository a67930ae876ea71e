"""SeND's standalone parts: the sensitivity formula on hand-computed snapshots, unit selection
(ties, fractions), the mask at both sites (exactly the chosen units zeroed, gradients too, state
dict), the authors' weight-zeroing variant, tracking states against unpadded forwards, and an
independent re-implementation of the SEND repo's sensitivity showing where its axis differs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from exatrain.config import ConfigError, ModelConfig, load_config
from exatrain.data.prompts import encode_prompts, read_prompts
from exatrain.data.tokenizer import byte_tokenizer
from exatrain.model.convert import convert_model
from exatrain.model.llama import build_model, materialize
from exatrain.model.sampling import capture
from exatrain.train.send import (
    MaskedFeedForward,
    SensitiveUnitMask,
    SnapshotWindow,
    attach_mask,
    default_layer,
    select_units,
    sensitivity,
    tp_shard,
    tracking_states,
    zero_mlp_units,
)
from exatrain.train.send_tracking import tracking_batches

# h[t][p][i]: 3 snapshots, 2 prompts, 3 units
HAND = torch.tensor([
    [[0.0, 1.0, 5.0], [2.0, 0.0, 5.0]],
    [[1.0, -1.0, 5.0], [2.0, 0.0, 5.0]],
    [[3.0, 1.0, 5.0], [2.0, 3.0, 5.0]],
])


def test_sensitivity_by_hand():
    # unit 0: prompt 0 moves 0,1,3: changes 1+2 = 3, Var = 14/9 -> 14/3; prompt 1 constant -> 0; mean 7/3
    # unit 1: prompt 0 1,-1,1: 4 * 8/9 = 32/9; prompt 1 0,0,3: 3 * 2 = 6; mean 43/9
    # unit 2: constant everywhere -> 0
    torch.testing.assert_close(sensitivity(HAND), torch.tensor([7 / 3, 43 / 9, 0.0], dtype=torch.float64))
    torch.testing.assert_close(select_units(sensitivity(HAND), 0.34), torch.tensor([1]))
    with pytest.raises(ValueError):
        sensitivity(HAND[:1])


def test_select_units_ties_and_fractions():
    scores = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert select_units(scores, 0.4).tolist() == [1, 2]  # three tied 3s: the lower indices win
    assert select_units(scores, 0.6).tolist() == [1, 2, 4]
    assert select_units(scores, 0.8).tolist() == [1, 2, 3, 4]
    assert select_units(scores, 1.0).tolist() == [0, 1, 2, 3, 4]
    assert select_units(scores, 0.0).tolist() == []
    assert select_units(scores, 0.19).tolist() == []  # floor(0.95): like the authors' int(k * n)
    assert len(select_units(torch.arange(100.0), 0.29)) == 29  # 0.29 * 100 = 28.999999999999996
    assert select_units(torch.zeros(4), 0.5).tolist() == [0, 1]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            select_units(scores, bad)
    with pytest.raises(ValueError):
        select_units(torch.tensor([1.0, float("nan")]), 0.5)


def send_repo_selection(snapshots: np.ndarray, k: float) -> list[int]:
    """The SEND repo's get_sensitive_neurons (send/train_no_meta.py), re-implemented from its
    description: mean over the checkpoint axis first, then |diff| and np.var over the prompt axis,
    then the top int(k * U) by np.argsort(...)[::-1]."""
    avg = snapshots.mean(axis=0)  # (P, U): the checkpoints are averaged away
    score = np.abs(np.diff(avg, axis=0)).sum(axis=0) * avg.var(axis=0)
    return sorted(np.argsort(score)[::-1][:int(k * len(score))].tolist())


def test_send_repo_axis_differs_from_the_paper():
    # unit 0 drifts during training the same way for every prompt; unit 1 is frozen in time but
    # differs between prompts; unit 2 is constant
    t = torch.tensor([0.0, 1.0, 2.0])
    drift = t[:, None].expand(3, 4)
    per_prompt = torch.tensor([0.0, 3.0, -3.0, 3.0])[None].expand(3, 4)
    snaps = torch.stack([drift, per_prompt, torch.ones(3, 4)], dim=-1)  # (S=3, P=4, U=3)
    assert select_units(sensitivity(snaps), 0.34).tolist() == [0]  # the paper: the unit that moves
    assert send_repo_selection(snaps.numpy(), 0.34) == [1]  # the repo: the unit that differs by prompt
    # on random snapshots the two rankings disagree as well
    rnd = torch.randn(3, 16, 50, generator=torch.Generator().manual_seed(0))
    assert select_units(sensitivity(rnd), 0.2).tolist() != send_repo_selection(rnd.numpy(), 0.2)
    # while for a single prompt, where their axis is the time axis, the per-unit formulas coincide
    one = rnd[:, :1]
    ref = np.abs(np.diff(one[:, 0].numpy(), axis=0)).sum(0) * one[:, 0].numpy().var(0)
    np.testing.assert_allclose(sensitivity(one).numpy(), ref, rtol=1e-6)


def tiny(n_layers: int = 3):
    cfg = ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=41, max_seq_len=32,
                      init_std=0.2)
    return materialize(build_model(cfg), "cpu", seed=3)


def test_mask_module():
    m = SensitiveUnitMask(6)
    x = torch.randn(2, 3, 6)
    assert torch.equal(m(x), x)
    m.drop(torch.tensor([1, 4]))
    out = m(x)
    assert (out[..., [1, 4]] == 0).all() and torch.equal(out[..., [0, 2, 3, 5]], x[..., [0, 2, 3, 5]])
    assert m.dropped.tolist() == [1, 4] and "dropped=2" in repr(m)
    m.drop(torch.tensor([0]))  # a new interval replaces the old units
    assert m.dropped.tolist() == [0]
    assert m(x.bfloat16()).dtype == torch.bfloat16
    m.reset()
    assert m.dropped.numel() == 0 and "mask" in m.state_dict()
    # a tensor-parallel shard: x holds chunk 1 of 2 of the 6 units
    m.drop([1, 4])
    half = torch.randn(2, 3)
    assert torch.equal(m(half, (1, 2)), half * torch.tensor([1.0, 0.0, 1.0]))
    assert tp_shard(torch.zeros(4, 2)) == (0, 1)
    m.recording = []
    m(x)
    assert len(m.recording) == 1 and torch.equal(m.recording[0], x)  # before the mask


def test_residual_mask_zeroes_exactly_the_selected_units():
    model = tiny()
    tokens = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(0))
    block = model.layers["1"]
    with capture(block) as box:
        ref_logits = model(tokens)
    ref = box["h"].clone()
    mask = attach_mask(model)
    assert default_layer(model) == 1 and "layers.1.send_mask.mask" in model.state_dict()
    assert torch.equal(model(tokens), ref_logits)  # all ones: a no-op
    units = torch.tensor([3, 17, 30])
    mask.drop(units)
    with capture(block) as box:
        model(tokens)
    keep = torch.ones(32, dtype=torch.bool)
    keep[units] = False
    assert (box["h"][..., units] == 0).all() and torch.equal(box["h"][..., keep], ref[..., keep])
    # the state dict carries the interval's units; a deep copy has its own mask
    clone = copy.deepcopy(model)
    clone.layers["1"].send_mask.reset()
    assert mask.dropped.tolist() == [3, 17, 30]
    fresh = tiny()
    attach_mask(fresh)
    fresh.load_state_dict(model.state_dict())
    assert fresh.layers["1"].send_mask.dropped.tolist() == [3, 17, 30]
    assert torch.equal(fresh(tokens), model(tokens))
    with pytest.raises(ValueError):
        attach_mask(model)


def test_mlp_mask_matches_manual_ffn_and_the_authors_weight_zeroing():
    model = tiny()
    tokens = torch.randint(0, 41, (2, 7), generator=torch.Generator().manual_seed(1))
    authors = copy.deepcopy(model)
    units = torch.tensor([0, 5, 63, 70])
    mask = attach_mask(model, site="mlp")
    assert mask.mask.numel() == model.layers["1"].feed_forward.w1.out_features == 128
    assert "layers.1.feed_forward.send_mask.mask" in model.state_dict()
    mask.drop(units)
    ffn = model.layers["1"].feed_forward
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    keep = torch.ones(128)
    keep[units] = 0
    manual = ffn.w2((torch.nn.functional.silu(ffn.w1(x)) * ffn.w3(x)) * keep)
    torch.testing.assert_close(ffn(x), manual, rtol=0, atol=0)
    # the authors' variant zeroes w1/w3 rows and w2 columns: the same function, while it lasts
    zero_mlp_units(authors.layers["1"].feed_forward, units)
    torch.testing.assert_close(model(tokens), authors(tokens))
    # dropped units get no gradient: their w2 columns and w1/w3 rows stay put under any optimizer step
    model(tokens).sum().backward()
    assert (ffn.w2.weight.grad[:, units] == 0).all() and (ffn.w1.weight.grad[units] == 0).all()
    assert (ffn.w3.weight.grad[units] == 0).all() and ffn.w2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("site", ["residual", "mlp"])
def test_tracking_states_match_unpadded_forwards_and_ignore_the_mask(site):
    model = tiny()
    prompts = [[0, 4, 9, 2], [0, 7], [0, 1, 2, 3, 4, 5, 6, 8]]
    states = tracking_states(model, prompts, site=site, pad_id=2)
    target = model.layers["1"] if site == "residual" else model.layers["1"].feed_forward.w2
    assert states.shape == (3, 32 if site == "residual" else 128)
    for i, p in enumerate(prompts):
        with capture(target, inputs=site == "mlp") as box:
            model.eval()(torch.tensor([p]))
        torch.testing.assert_close(states[i], box["h"][0, -1], atol=1e-5, rtol=1e-5)
    attach_mask(model, site=site).drop(torch.arange(10))
    model.train()
    torch.testing.assert_close(tracking_states(model, prompts, site=site, pad_id=2), states)
    assert model.training


def test_snapshot_window():
    w = SnapshotWindow(3, 2, 3)
    for t in range(4):
        w.add(HAND[t % 3] if t < 3 else HAND[2] * 2)
        assert w.ready == (t >= 2) and w.count == t + 1
    torch.testing.assert_close(w.scores(), sensitivity(torch.stack([HAND[1], HAND[2], HAND[2] * 2])))
    other = SnapshotWindow(3, 2, 3)
    state = other.state_dict()
    state["snapshots"].copy_(w.state_dict()["snapshots"])  # DCP loads tensors in place
    other.load_state_dict({**state, "count": w.count})
    torch.testing.assert_close(other.scores(), w.scores())
    with pytest.raises(ValueError):
        w.add(torch.zeros(5))
    with pytest.raises(RuntimeError):
        SnapshotWindow(3, 2, 3).scores()
    with pytest.raises(ValueError, match="send.window"):
        SnapshotWindow(4, 2, 3).load_state_dict(w.state_dict())


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "track.jsonl"
    path.write_text('{"prompt": "The capital of Zorvan is", "answer": "Melk"}\n\n{"text": "import os"}\n')
    return path


def test_prompt_files(tmp_path, prompt_file):
    assert read_prompts(prompt_file) == ["The capital of Zorvan is", "import os"]
    assert read_prompts(prompt_file, limit=1) == ["The capital of Zorvan is"]
    plain = tmp_path / "p.txt"
    plain.write_text("one\n\n two \n")
    assert read_prompts(plain) == ["one", " two "]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompts(bad)
    tok = byte_tokenizer()
    ids = encode_prompts(tok, ["ab", "abcdef"], max_len=4)
    assert ids == [[tok.bos_id, *tok.encode("ab")], [tok.bos_id, *tok.encode("abc")]]
    batches = tracking_batches(ids, rows=2, seq_len=6, pad_id=tok.pad_id, doc_ids=True)
    assert len(batches) == 1 and batches[0].tokens.shape == (2, 6) and batches[0].n_labels == 0
    assert batches[0].tokens[0, 3:].tolist() == [tok.pad_id] * 3 and (batches[0].doc_ids == 0).all()
    assert len(tracking_batches(ids * 2 + ids[:1], rows=2, seq_len=6, pad_id=0, doc_ids=False)) == 3


@pytest.mark.parametrize("site", ["residual", "mlp"])
def test_converter_adds_the_mask_on_the_meta_model(site, prompt_file):
    cfg = load_config("tiny.yaml", ["model.n_layers=3", "model.vocab_size=64", "model.dim=32", "send.enabled=true",
                                    f"send.prompts={prompt_file}", f"send.site={site}", "send.layer=-1"])
    assert cfg.model.converters == ["send_mask"] and cfg.train.callbacks[0] == "send"
    model = build_model(cfg.model)
    convert_model(model, cfg)
    mask = model.layers["2"].send_mask if site == "residual" else model.layers["2"].feed_forward.send_mask
    assert mask.mask.is_meta
    model = materialize(model, "cpu", seed=0)  # init_state fills the ones after the weights
    assert bool((mask.mask == 1).all()) and mask.mask.numel() == (32 if site == "residual" else cfg.model.ffn_hidden)
    key = "layers.2.send_mask.mask" if site == "residual" else "layers.2.feed_forward.send_mask.mask"
    assert key in model.state_dict()
    assert isinstance(model.layers["2"].feed_forward, MaskedFeedForward) == (site == "mlp")
    plain = materialize(build_model(cfg.model), "cpu", seed=0)  # the mask of ones changes nothing
    tokens = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(tokens), plain(tokens))


BAD = [
    (["send.fraction=0"], "send.fraction"),
    (["send.fraction=1.5"], "send.fraction"),
    (["send.interval=2"], "send.interval"),  # fewer steps than snapshots per interval
    (["send.interval=10"], "send.interval"),  # not a multiple of the window
    (["send.window=1", "send.interval=4"], "send.window"),
    (["send.layer=4"], "send.layer"),
    (["send.layer=-5"], "send.layer"),
    (["send.site=attention"], "send.site"),
    (["send.variant=dropout"], "send.variant"),
    (["send.variant=zero_weights"], "send.variant"),  # needs the mlp site
    (["send.site=mlp", "send.variant=zero_weights", "parallel.engine=deepspeed"], "send.variant"),
    (["send.site=mlp", "send.variant=zero_weights", "parallel.zero_stage=1"], "send.variant"),
    (["send.prompts=''"], "send.prompts"),
    (["send.prompts=/no/such/file.jsonl"], "send.prompts"),
    (["EMPTY"], "send.prompts"),
    (["eigenscore.k=1"], "eigenscore.k"),
    (["eigenscore.methods=[exact,lanczos]"], "eigenscore.methods"),
    (["eigenscore.methods=[]"], "eigenscore.methods"),
    (["eigenscore.layer=9"], "eigenscore.layer"),
    (["eigenscore.top_p=0"], "eigenscore.top_p"),
    (["eigenscore.max_new_tokens=300", "eigenscore.every=40"], "eigenscore.max_new_tokens"),
    (["eigenscore.max_new_tokens=0"], "eigenscore.max_new_tokens"),
    (["eigenscore.every=30"], "eigenscore.every"),  # not a checkpoint step
    (["eigenscore.prompts=/no/such/file"], "eigenscore.prompts"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k + ":" + ",".join(o) for o, k in BAD])
def test_bad_settings_are_rejected_naming_the_key(tmp_path, prompt_file, overrides, key):
    if overrides == ["EMPTY"]:
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        overrides = [f"send.prompts={empty}"]
    base = ["send.enabled=true", f"send.prompts={prompt_file}", "send.interval=6", "checkpoint.every=20"]
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config("tiny.yaml", [*base, *overrides])
    ok = load_config("tiny.yaml", [*base, "eigenscore.every=40"])
    assert ok.train.callbacks == ["send", "eigenscore"]


def test_unused_eigenscore_settings_do_not_constrain_short_models():
    cfg = load_config("tiny.yaml", ["model.max_seq_len=16", "data.seq_len=16"])
    assert cfg.eigenscore.max_new_tokens >= 16 and cfg.eigenscore.every == 0
