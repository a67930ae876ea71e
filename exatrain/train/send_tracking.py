"""SeND in the training loop (DESIGN.md §6): the `send` callback, on any layout.

`send.enabled: true` is all a job sets: the resolver below adds the `send_mask` model converter (a
{0, 1} mask at send.site of block send.layer, exatrain.train.send) and this callback. Every
`interval / window` steps, after the optimizer step, the callback

1. runs the tracking prompts through the live, parallelised model with `engine.eval_loss` (labels all
   ignored; rows of train.micro_batch × data.seq_len, the shapes pipeline stages were built for; every
   data-parallel rank runs the same prompts) while the mask module records the units it receives:
   the state *before* the mask, so the zeros of the current interval never read as changes;
2. on the ranks that hold the layer: gathers tensor-parallel pieces (the sequence shard of the residual
   stream under sequence parallelism, the hidden-unit shard at the MLP site) over the `tp` group, takes
   each prompt's last real token, and averages the snapshot over the data-parallel ranks (float64: exact
   when they agree, as they do on CPU; a guarantee of agreement where kernels are not deterministic);
3. under pipeline parallelism broadcasts it from the stage that owns the layer over the `pp` group, so
   every rank holds the same snapshot window (the callback's checkpointed state is identical everywhere);
4. every `interval` steps, once `window` snapshots exist (all taken in the interval just ended, under
   one mask), ranks the units by sensitivity, selects the top `fraction` (ties to the lower index) and
   either sets the mask (`variant: mask`, exact for the whole next interval) or zeroes the units' MLP
   weights now and at the next `zero_repeats - 1` tracking points (`variant: zero_weights`, the authors').

Cost per tracking point: one forward of ceil(P / micro_batch) micro-batches (P = tracking prompts) and,
with tp > 1, one all-gather of P · seq_len · units floats; the step record gains `send_snapshots` and,
at updates, `send_dropped` and `send_overlap` (the fraction of units also chosen at the previous update).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from exatrain.config import ConfigError, JobConfig, require
from exatrain.data.batch import IGNORE_INDEX, Batch
from exatrain.data.prompts import encode_prompts, read_prompts
from exatrain.engine.base import last_forward_calls
from exatrain.registry import CALLBACKS, config_resolver, config_validator
from exatrain.train.callback import Callback
from exatrain.train.send import (
    SITES,
    VARIANTS,
    MaskedFeedForward,
    SnapshotWindow,
    find_masks,
    layer_index,
    select_units,
    site_units,
    zero_mlp_units,
)

log = logging.getLogger("exatrain")


def tracking_batches(prompts: list[list[int]], rows: int, seq_len: int, pad_id: int,
                     doc_ids: bool) -> list[Batch]:
    """The prompts right-padded to `seq_len` in batches of `rows` rows (extra rows repeat pad tokens);
    every label is ignored. `doc_ids`: give all-zero document ids (one document per row), as training
    batches carry them with data.document_masking."""
    n = -(-len(prompts) // rows) * rows
    tokens = torch.full((n, seq_len), pad_id, dtype=torch.long)
    for i, ids in enumerate(prompts):
        tokens[i, :len(ids)] = torch.as_tensor(ids[:seq_len], dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE_INDEX)
    positions = torch.arange(seq_len).expand(n, seq_len).contiguous()
    docs = torch.zeros_like(tokens) if doc_ids else None
    return [Batch(tokens[i:i + rows], labels[i:i + rows], positions[i:i + rows],
                  None if docs is None else docs[i:i + rows]) for i in range(0, n, rows)]


class SendTracking(Callback):
    """The `send` callback; see the module docstring. Checkpointed state (identical on every rank): the
    snapshot window (window, prompts, units) and its count, the last selection, pending re-zeroings."""

    name = "send"

    def __init__(self, job: JobConfig):
        s = job.send
        self.job, self.cfg = job, s
        self.layer = layer_index(s.layer, job.model.n_layers)
        self.units = site_units(job.model, s.site)
        self.texts = read_prompts(s.prompts, s.max_prompts)
        self.track_every = s.interval // s.window
        self.window = SnapshotWindow(s.window, len(self.texts), self.units)
        self.selected: list[int] = []
        self.zero_left = 0
        self.masks: list = []
        self.ffns: list[MaskedFeedForward] = []

    # -- setup

    def on_train_start(self, trainer: Any) -> None:
        job = self.job
        tok = trainer.data.tokenizer
        ids = encode_prompts(tok, self.texts, job.data.seq_len)
        self.last = torch.tensor([len(i) - 1 for i in ids])
        self.batches = tracking_batches(ids, job.train.micro_batch, job.data.seq_len, tok.pad_id,
                                        job.data.document_masking)
        parts = trainer.engine.model_parts
        self.masks = [m for part in parts for m in find_masks(part)]
        self.ffns = [m for part in parts for m in part.modules() if isinstance(m, MaskedFeedForward)]
        if len(self.masks) > 1:
            raise RuntimeError(f"send: found {len(self.masks)} SeND masks on one rank; the send_mask converter "
                               "must be listed once in model.converters")
        mesh, dims = trainer.mesh, trainer.dims
        self.tp = dims.tp
        self.tp_group = mesh.get_group("tp") if dims.tp > 1 else None
        self.dp_size = dims.dp_size
        self.dp_groups = [mesh.get_group(d) for d in ("dp_replicate", "dp_shard") if mesh[d].size() > 1]
        self.pp_group = mesh.get_group("pp") if dims.pp > 1 else None
        self.owner = 0
        holds = torch.tensor([mesh.get_local_rank("pp") if self.masks else 0, 1 if self.masks else 0])
        if self.pp_group is not None:
            dist.all_reduce(holds, group=self.pp_group)
        if int(holds[1]) != 1:
            raise RuntimeError(f"send: {int(holds[1])} pipeline stages hold the SeND mask of block {self.layer}, "
                               "expected 1; is send_mask in model.converters?")
        self.owner = int(holds[0])

    # -- the loop

    def on_step_end(self, trainer: Any, stats: Any, record: dict[str, Any]) -> None:
        step = trainer.state.step
        if step % self.track_every:
            return
        s = self.cfg
        self.window.add(self.track(trainer))
        record["send_snapshots"] = self.window.count
        last_step = step >= self.job.train.steps
        if step % s.interval == 0 and self.window.ready:
            units = select_units(self.window.scores(), s.fraction).tolist()
            if self.selected:
                record["send_overlap"] = len(set(units) & set(self.selected)) / max(len(units), 1)
            record["send_dropped"] = len(units)
            self.selected = units
            if s.variant == "mask":
                for m in self.masks:
                    m.drop(units)
            else:
                self.zero_left = s.zero_repeats
        if s.variant == "zero_weights" and self.zero_left > 0 and not last_step:
            for ffn in self.ffns:
                zero_mlp_units(ffn, self.selected)
            self.zero_left -= 1
        if last_step and s.reset_at_end and s.variant == "mask":
            for m in self.masks:
                m.reset()

    @torch.no_grad()
    def track(self, trainer: Any) -> Tensor:
        """(P, U) float32, identical on every rank: the units at each tracking prompt's last token."""
        for m in self.masks:
            m.recording = []
        try:
            trainer.engine.eval_loss(self.batches)
            recorded = [t for m in self.masks for t in m.recording]
        finally:
            for m in self.masks:
                m.recording = None
        snap = torch.zeros(len(self.texts), self.units, dtype=torch.float64)
        if self.masks:
            need = sum(b.tokens.shape[0] for b in self.batches)
            calls = last_forward_calls(recorded, len, need, f"send (block {self.layer})")
            h = torch.cat([self._full(t) for t in calls])
            snap = h[torch.arange(len(self.texts)), self.last.to(h.device)].double().cpu()
            for group in self.dp_groups:
                dist.all_reduce(snap, group=group)
            snap /= self.dp_size
        if self.pp_group is not None:
            dist.broadcast(snap, group=self.pp_group, group_src=self.owner)
        return snap.float()

    def _full(self, t: Tensor) -> Tensor:
        """One recorded (rows, T, units) tensor with its tensor-parallel pieces gathered."""
        if isinstance(t, DTensor):
            return t.full_tensor()
        if self.tp_group is None:
            return t
        seq_len = self.job.data.seq_len
        if self.cfg.site == "residual" and t.shape[1] * self.tp == seq_len:  # sequence parallel
            dim = 1
        elif self.cfg.site == "mlp" and t.shape[-1] * self.tp == self.units:  # column-parallel hidden units
            dim = t.dim() - 1
        else:
            return t
        pieces = [torch.empty_like(t) for _ in range(self.tp)]
        dist.all_gather(pieces, t.contiguous(), group=self.tp_group)
        return torch.cat(pieces, dim=dim)

    # -- checkpointed state

    def state_dict(self) -> dict[str, Any]:
        return {**self.window.state_dict(), "selected": list(self.selected), "zero_left": self.zero_left}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state)
        self.selected = [int(u) for u in state["selected"]]
        self.zero_left = int(state["zero_left"])


CALLBACKS.register("send", SendTracking)


@config_resolver
def add_send(cfg: JobConfig) -> None:
    """send.enabled: the send_mask converter (once) and the send callback (first among the methods')."""
    if cfg.send.enabled:
        if "send_mask" not in cfg.model.converters:
            cfg.model.converters.append("send_mask")
        if "send" not in cfg.train.callbacks:
            cfg.train.callbacks.insert(0, "send")


@config_validator
def validate_send(cfg: JobConfig) -> None:
    s, n = cfg.send, cfg.model.n_layers
    require(s.site in SITES, "send.site", f"got {s.site!r}, expected one of {', '.join(SITES)}")
    require(s.variant in VARIANTS, "send.variant", f"got {s.variant!r}, expected one of {', '.join(VARIANTS)}")
    require(0.0 < s.fraction < 1.0, "send.fraction", f"must be in (0, 1), got {s.fraction}")
    require(s.window >= 2, "send.window", f"needs at least 2 snapshots (changes and variance), got {s.window}")
    require(s.interval >= s.window and s.interval % s.window == 0, "send.interval",
            f"{s.interval} must be a positive multiple of send.window={s.window}: snapshots are taken every "
            "interval/window steps")
    require(-n <= s.layer < n, "send.layer", f"{s.layer} is out of range for model.n_layers={n} (use {-n}..{n - 1})")
    require(s.zero_repeats >= 1, "send.zero_repeats", "must be >= 1")
    require(s.max_prompts >= 0, "send.max_prompts", "must be >= 0 (0 = every prompt in the file)")
    require(s.variant != "zero_weights" or s.site == "mlp", "send.variant",
            "zero_weights zeroes the MLP weights of the selected hidden units: it needs send.site=mlp")
    require(s.enabled or "send" not in cfg.train.callbacks, "train.callbacks", "the send callback needs send.enabled=true")
    if not s.enabled:
        return
    require(s.variant != "zero_weights" or (cfg.parallel.engine == "native" and cfg.parallel.zero_stage != 1),
            "send.variant", "zero_weights needs parallel.engine=native with zero_stage 2 or 3: it zeroes the model's "
            "weights, and ZeRO-1 (DeepSpeed or native) keeps its own fp32 master copy that would overwrite the zeros")
    require(bool(s.prompts), "send.prompts", "SeND needs a tracking prompt file (JSONL with a 'prompt' or 'text' "
            "field, or one prompt per line), held out from the training data")
    try:
        found = len(read_prompts(s.prompts, s.max_prompts))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"send.prompts: {exc}") from None
    require(found > 0, "send.prompts", f"{s.prompts} holds no prompts")
