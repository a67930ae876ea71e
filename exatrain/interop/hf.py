"""Hugging Face transformers Llama checkpoints out of and into exatrain (DESIGN.md §13; README "Hugging Face").

Export (`exatrain export RUN --format hf OUT`): a run's checkpoint, written under any layout (its DCP keys are
layout-independent FQNs, read here in one process), becomes `config.json`, sharded safetensors with
`model.safetensors.index.json` and the tokenizer, which `transformers.LlamaForCausalLM.from_pretrained` loads
and evaluates to exatrain's logits. Import (`model.init_from: hf:PATH`): the full model of the single-process
init (parallel.init=full) is overwritten with the HF weights before it is sharded, so every layout and engine
starts from them; `exatrain import HF_DIR OUT_RUN` writes a run config that does this.

Two differences are bridged in the weights themselves:
- RoPE: exatrain rotates interleaved pairs (x0, x1), (x2, x3), ...; HF rotates halves (x_i, x_{i+hd/2}).
  Permuting each head's rows of wq and wk to the halves order makes HF's rotated q·k equal exatrain's.
- muP multipliers, which LlamaForCausalLM lacks, are folded into the weights they scale: emb_mult into the
  embedding, 1/width_mult into the LM head (a tied muP model therefore exports untied), res_mult into wo and
  w2, and muP's 1/hd attention scale (HF uses 1/sqrt(hd)) into wq as an extra 1/sqrt(hd). Import divides them
  out again: bitwise exact without muP or with power-of-two multipliers, within one rounding otherwise.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from exatrain.config import JobConfig, ModelConfig, require
from exatrain.data.tokenizer import Tokenizer, build_tokenizer
from exatrain.engine.base import clean_fqn
from exatrain.files import write_private
from exatrain.interop import EXPORT_DTYPES
from exatrain.model.llama import Transformer, width_mult
from exatrain.registry import config_validator

HF_SCHEME = "hf:"
INDEX = "model.safetensors.index.json"
DENSE_ATTENTION = ("sdpa", "reference", "flash")  # the backends LlamaForCausalLM's attention equals
DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPES}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer older transformers saved; recomputed on load
_FACTOR_OF = {"wq": "query", "wo": "residual", "w2": "residual", "tok_embeddings": "embed", "output": "lm_head"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- weights


def name_map(n_layers: int) -> dict[str, str]:
    """exatrain FQN -> HF LlamaForCausalLM parameter name."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                 "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def multipliers(cfg: ModelConfig) -> dict[str, float]:
    """The muP multipliers folded into weights on export (all 1 without muP)."""
    if not cfg.mup.enabled:
        return {"embed": 1.0, "lm_head": 1.0, "residual": 1.0, "query": 1.0}
    return {"embed": cfg.mup.emb_mult, "lm_head": 1.0 / width_mult(cfg), "residual": cfg.mup.res_mult,
            "query": 1.0 / math.sqrt(cfg.dim // cfg.n_heads)}


def hf_tied(cfg: ModelConfig) -> bool:
    """Whether the export ties lm_head to the embedding: only if their folded multipliers agree."""
    m = multipliers(cfg)
    return cfg.tie_embeddings and m["embed"] == m["lm_head"]


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from exatrain's interleaved RoPE pairs to HF's rotated halves, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _scaled(w: torch.Tensor, factor: float) -> torch.Tensor:
    """w * factor rounded once (computed in float64); w itself when factor is 1, so no-muP stays bitwise."""
    return w if factor == 1.0 else (w.double() * factor).to(w.dtype)


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """exatrain model state (plain tensors; tied models under both names) -> HF tensors, contiguous."""
    m, n_kv = multipliers(cfg), cfg.n_kv_heads or cfg.n_heads
    out = {}
    for ours, theirs in name_map(cfg.n_layers).items():
        if theirs == "lm_head.weight" and hf_tied(cfg):
            continue
        w = state[ours].detach()
        kind = ours.split(".")[-2]
        if kind in ("wq", "wk"):
            w = interleaved_to_halves(w, cfg.n_heads if kind == "wq" else n_kv)
        out[theirs] = _scaled(w, m[_FACTOR_OF[kind]] if kind in _FACTOR_OF else 1.0).contiguous()
    return out


def from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "the HF checkpoint"
            ) -> dict[str, torch.Tensor]:
    """HF tensors -> exatrain model state in fp32 (every parameter FQN, `output.weight` too when tied).

    Every HF tensor is used or named in the error: an untied lm_head is only dropped for a tied model
    when it equals the folded embedding (a tied muP export)."""
    m, n_kv = multipliers(cfg), cfg.n_kv_heads or cfg.n_heads
    names = name_map(cfg.n_layers)
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors = {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}  # a tied HF checkpoint
    missing = sorted(theirs for theirs in names.values() if theirs not in tensors)
    unexpected = sorted(k for k in tensors if k not in names.values() and not _IGNORED.search(k))
    if missing or unexpected:
        raise ValueError(f"{source} does not hold this model's weights: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    state = {}
    for ours, theirs in names.items():
        w = tensors[theirs].to(torch.float32)  # exatrain's parameters; bf16 weights unfold without a bf16 rounding
        kind = ours.split(".")[-2]
        w = w if kind not in _FACTOR_OF else _scaled(w, 1.0 / m[_FACTOR_OF[kind]])
        if kind in ("wq", "wk"):
            w = halves_to_interleaved(w, cfg.n_heads if kind == "wq" else n_kv)
        state[ours] = w.contiguous()
    if cfg.tie_embeddings:
        head, emb = state.pop("output.weight"), state["tok_embeddings.weight"]
        if head is not emb and not torch.allclose(head.float(), emb.float(), rtol=1e-6, atol=0.0):
            raise ValueError(f"{source} has an lm_head different from its embedding, but model.tie_embeddings "
                             "is true: set model.tie_embeddings=false to keep it")
        state["output.weight"] = emb
    return state


# --------------------------------------------------------------------------- config.json


def hf_config(cfg: ModelConfig, dtype: str = "float32", special_ids: tuple[int, int, int] = (0, 1, 2)
              ) -> dict[str, Any]:
    """LlamaConfig fields for `cfg`, loadable by transformers 4.45+ (rope_theta, rope_scaling) and 5.x
    (rope_parameters). special_ids: <bos>, <eos>, <pad> (exatrain's tokenizers put them at 0, 1, 2)."""
    bos, eos, pad = special_ids
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads or cfg.n_heads,
        "head_dim": cfg.dim // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": hf_tied(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def read_hf_config(path: Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return json.loads(f.read_text())


def _rope(hf: dict[str, Any]) -> tuple[str, float]:
    """(rope type, theta) of a config.json from transformers 4.x (rope_theta, rope_scaling) or 5.x."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    return kind, float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_mismatches(hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Fields of an HF config.json that a model built from `cfg` cannot hold exactly, one line each."""
    if hf.get("model_type", "llama") != "llama":
        return [f"model_type: {hf['model_type']!r}, only 'llama' is read"]
    heads = hf.get("num_attention_heads", 0)
    given = {
        "vocab_size": hf.get("vocab_size"), "hidden_size": hf.get("hidden_size"),
        "intermediate_size": hf.get("intermediate_size"), "num_hidden_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": heads, "num_key_value_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or (hf.get("hidden_size", 0) // max(heads, 1)),
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6), "rope_theta": _rope(hf)[1],
        "hidden_act": hf.get("hidden_act", "silu"), "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
    }
    ours = {"vocab_size": "model.vocab_size", "hidden_size": "model.dim", "intermediate_size": "model.ffn_hidden",
            "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
            "num_key_value_heads": "model.n_kv_heads", "head_dim": "model.dim / model.n_heads",
            "rms_norm_eps": "model.norm_eps", "rope_theta": "model.rope_theta"}
    expected = hf_config(cfg)
    out = [f"{key}: checkpoint {value!r} vs {ours.get(key, 'exatrain')}={expected[key]!r}"
           for key, value in given.items() if value != expected[key]]
    kind = _rope(hf)[0]
    if kind != "default":
        out.append(f"rope type {kind!r}: exatrain implements plain RoPE only")
    if hf_tied(cfg) and not hf.get("tie_word_embeddings", False):
        out.append("tie_word_embeddings: checkpoint false (its own lm_head) vs model.tie_embeddings=true")
    return out


# --------------------------------------------------------------------------- files


def parse_size(text: str | int) -> int:
    """Bytes from 5GB / 500MB / 2GiB / 1000 (decimal units as HF's max_shard_size, binary with i)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB or a byte count)")
    unit = (m.group(2) or "").upper()
    base = 1024 if unit.endswith("I") else 1000
    return int(float(m.group(1)) * base ** (" KMGT".index(unit[:1]) if unit else 0))


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int) -> list[Path]:
    """Shards of at most `max_shard_size` bytes (a bigger tensor gets its own) plus the index; returns the shards."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        f = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(f), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, f.name))
        files.append(f)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return files


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory's safetensors (sharded with an index, or one model.safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / INDEX).is_file():
        files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither {INDEX} nor model.safetensors (only safetensors weights are read)")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def write_tokenizer(tokenizer: Tokenizer, out: Path, max_len: int) -> None:
    """tokenizer.json plus the two small files AutoTokenizer reads for the class and the special tokens.
    `tokenizer(text)` in transformers then starts with <bos>, as every document did in training (exatrain
    itself never adds special tokens implicitly, so the post-processor only serves HF users)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.processors import TemplateProcessing

    tokenizer.save(out / "tokenizer.json")
    backend = Backend.from_file(str(out / "tokenizer.json"))
    backend.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B:1",
                                                special_tokens=[("<bos>", tokenizer.bos_id)])
    backend.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def run_tokenizer(cfg: JobConfig) -> Tokenizer:
    """The tokenizer a run trained with (its file, the shipped or cached BPE, or trained again from its data)."""
    from exatrain.data.documents import DataStats, files_digest, read_documents, resolve_files

    if cfg.data.tokenizer.path or cfg.data.tokenizer.kind == "byte":  # no data needed (it may be gone)
        return build_tokenizer(cfg.data.tokenizer, (), "", Path(cfg.data.cache_dir))
    files = resolve_files(cfg.data.paths)
    texts = (doc.text for doc in read_documents(files, DataStats()))
    return build_tokenizer(cfg.data.tokenizer, texts, files_digest(files), Path(cfg.data.cache_dir))


# --------------------------------------------------------------------------- export / import


def export_hf(run: str | Path, out: str | Path, step: int | None = None, max_shard_size: int | str = "5GB",
              dtype: str = "float32", tokenizer: bool = True) -> Path:
    """Write a run's checkpoint (the latest, or `step`) as a transformers Llama directory `out`."""
    from exatrain.eval.perplexity import load_run

    run, out = Path(run), Path(out)
    loaded = load_run(run / "checkpoints" / f"step_{step:08d}" if step is not None else run)
    cfg = loaded.cfg.model
    if cfg.attention not in DENSE_ATTENTION:
        raise ValueError(f"{loaded.checkpoint}: model.attention={cfg.attention!r} is not dense attention, which "
                         f"is all LlamaForCausalLM computes (exportable: {', '.join(DENSE_ATTENTION)})")
    if out.exists() and any(out.glob("model*.safetensors*")):
        raise FileExistsError(f"{out} already holds a model; export into a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf(loaded.model.state_dict(), cfg)
    write_safetensors({k: v.to(DTYPES[dtype]) for k, v in tensors.items()}, out, parse_size(max_shard_size))
    ids = (0, 1, 2)
    if tokenizer:
        tok = run_tokenizer(loaded.cfg)
        write_tokenizer(tok, out, cfg.max_seq_len)
        ids = (tok.bos_id, tok.eos_id, tok.pad_id)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, dtype, ids), indent=1))
    return out


def hf_dir(init_from: str) -> Path:
    return Path(init_from[len(HF_SCHEME):]).expanduser()


@torch.no_grad()
def load_init_from(model: Transformer) -> None:
    """Overwrite a materialised full model with the weights its `model.init_from` names (nothing when unset).

    Runs on the full model of the single-process init, before sharding (exatrain.parallel.parallelize, the
    DeepSpeed engine), so every layout starts from the same weights; parameters a model converter added keep
    their init."""
    if not model.cfg.init_from:
        return
    path = hf_dir(model.cfg.init_from)
    state = from_hf(read_hf_weights(path), model.cfg, str(path))
    params = {clean_fqn(name): p for name, p in model.named_parameters(remove_duplicate=False)}
    for name, t in state.items():
        params[name].copy_(t)


@config_validator
def validate_init_from(cfg: JobConfig) -> None:
    src = cfg.model.init_from
    if not src:
        return
    require(src.startswith(HF_SCHEME), "model.init_from", f"expected hf:PATH (a Hugging Face Llama directory), "
                                                          f"got {src!r}")
    path = hf_dir(src)
    require((path / "config.json").is_file(), "model.init_from", f"{path} has no config.json")
    require(cfg.parallel.init == "full", "parallel.init",
            "model.init_from loads the full model before sharding: use parallel.init=full")
    bad = config_mismatches(read_hf_config(path), cfg.model)
    require(not bad, "model.init_from", f"{path} does not fit the model config:\n  " + "\n  ".join(bad))


def model_overrides(hf: dict[str, Any]) -> list[str]:
    """model.* dotlist overrides that build the model of an HF Llama config.json."""
    heads = hf["num_attention_heads"]
    return [f"model.dim={hf['hidden_size']}", f"model.n_layers={hf['num_hidden_layers']}", f"model.n_heads={heads}",
            f"model.n_kv_heads={hf.get('num_key_value_heads') or heads}",
            f"model.ffn_hidden={hf['intermediate_size']}", f"model.vocab_size={hf['vocab_size']}",
            "model.vocab_multiple_of=1", f"model.max_seq_len={hf.get('max_position_embeddings', 2048)}",
            f"model.norm_eps={hf.get('rms_norm_eps', 1e-6)}", f"model.rope_theta={_rope(hf)[1]}",
            f"model.tie_embeddings={str(bool(hf.get('tie_word_embeddings', False))).lower()}",
            "model.mup.enabled=false"]


def import_hf(hf_path: str | Path, out_run: str | Path, config: str, overrides: list[str]) -> Path:
    """Write `out_run/config.yaml`: `config` with the HF model's shape, model.init_from=hf:PATH and, if the
    directory has one, its tokenizer (which must hold <bos>, <eos>, <pad>); `exatrain train` it to start there."""
    from exatrain.config import load_config, to_yaml

    hf_path, out_run = Path(hf_path).resolve(), Path(out_run)
    extra = model_overrides(read_hf_config(hf_path)) + [f"model.init_from={HF_SCHEME}{hf_path}",
                                                        f"run_dir={out_run}"]
    if (hf_path / "tokenizer.json").is_file():
        extra.append(f"data.tokenizer.path={hf_path / 'tokenizer.json'}")
    cfg = load_config(config, extra + list(overrides))
    out_run.mkdir(parents=True, exist_ok=True)
    write_private(out_run / "config.yaml", to_yaml(cfg))
    return out_run / "config.yaml"

