"""SeND (Sensitive Neuron Dropout, "Sensitivity Dropout" in the ACL 2025 version): the model side and
the arithmetic (DESIGN.md §6). The training loop side is exatrain.train.send_tracking.

Every interval/window steps the trainer runs held-out tracking prompts through the model and records,
per prompt, one layer's units at the last real token; the last S snapshots (`SnapshotWindow`, S = 3
as the authors) give each unit a sensitivity (`sensitivity`), the top `fraction` of units are chosen
(`select_units`) and zeroed for the next interval by a {0, 1} mask (`SensitiveUnitMask`, placed by
`attach_mask`, or by the `send_mask` model converter on the meta model before parallelisation).

The authors' code (github.com/notarobot-hub/SEND, send/train_no_meta.py and send/send_pythia.py,
`get_sensitive_neurons`) differs from the paper in ways this module does not copy:
- it averages the snapshots over the checkpoint axis first (`np.mean(embeddings, axis=0)` on
  (S, P, 1, U)) and then takes changes and variance over the *prompts* (in list order), so it
  ranks units by how they differ between prompts, not by how they move during training;
- it reads `hidden_states[-2][:, -2, :]` of 512-token right-padded inputs: the second-to-last
  *position*, a pad for most texts, not the last real token;
- it drops by zeroing weights of the penultimate block's MLP (`zero_mlp_units`) at the start of
  each of the next 3 epochs, indexing MLP hidden units with residual-stream indices; AdamW's
  moments move the weights off zero within the epoch, and the learned weights are lost.
Here the mask keeps the weights, is exact for the whole interval, and lives in the state dict; the
weight-zeroing drop is available as `send.variant: zero_weights` (at the MLP site, where its indices
mean what they index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from exatrain.config import JobConfig
from exatrain.model.convert import register_converter
from exatrain.model.llama import FeedForward, Transformer, ffn_hidden_dim
from exatrain.model.sampling import capture

SITES = ("residual", "mlp")
VARIANTS = ("mask", "zero_weights")


def sensitivity(snapshots: Tensor) -> Tensor:
    """(S, P, U) snapshots -> (U,) float64: s_i = mean_p Σ_t |h_{t+1,p,i} − h_{t,p,i}| · Var_t(h_{t,p,i}).

    Changes and variance run over the snapshot axis t (training time), per prompt; the product is
    averaged over prompts. Var is the population variance (1/S), as the paper's Var and the authors'
    `np.var`; the sample variance would scale every score by S/(S − 1) and select the same units.
    """
    if snapshots.dim() != 3 or snapshots.shape[0] < 2:
        raise ValueError(f"snapshots must be (S >= 2, prompts, units), got {tuple(snapshots.shape)}")
    h = snapshots.detach().to(torch.float64)
    change = (h[1:] - h[:-1]).abs().sum(0)
    return (change * h.var(0, unbiased=False)).mean(0)


def select_units(scores: Tensor, fraction: float) -> Tensor:
    """Indices (ascending, int64) of the floor(fraction · U) highest scores; ties go to the lower index.

    Deterministic for equal inputs, so data-parallel ranks agree once they agree on the scores.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if scores.dim() != 1 or not bool(torch.isfinite(scores).all()):
        raise ValueError("scores must be a finite 1-D tensor")
    n = math.floor(fraction * scores.numel() + 1e-9)  # 0.29 * 100 is 28.999999999999996
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:n].sort().values


class SensitiveUnitMask(nn.Module):
    """Multiplies the last dimension by a persistent {0, 1} buffer (ones: no-op).

    A buffer, not a parameter: it is in the state dict (checkpoints restore the interval's units),
    replicated under FSDP2 and tensor parallelism (every rank that holds the layer holds all units),
    and never touched by the optimizer. Applied in train and eval mode alike, like the authors'
    zeroed weights; `reset()` lifts it. `forward(x, shard)` takes the units x holds: shard = (index,
    count) means x's last dimension is chunk `index` of `count` equal chunks (a tensor-parallel shard).

    While `recording` is a list, each call appends its input (the units before the mask): that is how
    SeND's tracking reads the layer inside a parallelised model (exatrain.train.send_tracking).
    """

    def __init__(self, units: int):
        super().__init__()
        self.register_buffer("mask", torch.ones(units))
        self.recording: list[Tensor] | None = None

    def forward(self, x: Tensor, shard: tuple[int, int] = (0, 1)) -> Tensor:
        if self.recording is not None:
            self.recording.append(x.detach())
        mask = self.mask if shard[1] == 1 else self.mask.chunk(shard[1])[shard[0]]
        return x * mask.to(x.dtype)

    @torch.no_grad()
    def init_state(self) -> None:
        """Run by model initialisation after the weights (exatrain.model.convert): every unit on."""
        self.mask.fill_(1.0)

    @torch.no_grad()
    def drop(self, units: Tensor | Sequence[int]) -> None:
        """Zero exactly `units` (replacing the previous interval's)."""
        self.mask.fill_(1.0)
        self.mask[torch.as_tensor(units, dtype=torch.long).to(self.mask.device)] = 0.0

    @torch.no_grad()
    def reset(self) -> None:
        self.mask.fill_(1.0)

    @property
    def dropped(self) -> Tensor:
        return (self.mask == 0).nonzero().flatten()

    def extra_repr(self) -> str:
        return f"units={self.mask.numel()}, dropped={int((self.mask == 0).sum())}"


def tp_shard(weight: Tensor, dim: int = 0) -> tuple[int, int]:
    """(index, count): which of `count` equal chunks of `weight`'s dimension `dim` this rank holds.

    (0, 1) unless `weight` is a DTensor sharded on `dim`: a column-parallel w1 holds rows Shard(0) over
    the `tp` mesh (under FSDP2 the forward sees the unsharded parameter, a DTensor over `tp` only).
    """
    if not isinstance(weight, DTensor):
        return (0, 1)
    index, count = 0, 1
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_shard(dim):
            size = weight.device_mesh.size(mesh_dim)
            index, count = index * size + weight.device_mesh.get_local_rank(mesh_dim), count * size
    return index, count


class MaskedFeedForward(FeedForward):
    """SwiGLU with a SensitiveUnitMask on its hidden units: w2(mask(SiLU(w1 x) · w3 x)).

    Parameter names are FeedForward's, so TP plans, FSDP units, checkpoints and HF export see the same
    weights; the mask is `feed_forward.send_mask`. Under tensor parallelism w1/w3 are column-parallel
    and the hidden units arrive as this rank's local chunk (use_local_output): the chunk comes from
    w1's DTensor layout (`tp_shard`), and the mask applies before w2's row-parallel reduction.
    """

    send_mask: SensitiveUnitMask

    def forward(self, x):
        hidden = F.silu(self.w1(x)) * self.w3(x)
        return self.w2(self.send_mask(hidden, tp_shard(self.w1.weight)))


def _mask_output(module: nn.Module, args, out: Tensor) -> Tensor:
    return module.send_mask(out)


def default_layer(model: Transformer) -> int:
    """The penultimate block, as the paper (the authors' `hidden_states[-2]` and `layers[-2]`)."""
    if model.cfg.n_layers < 2:
        raise ValueError("SeND tracks the penultimate block: the model needs at least 2 layers")
    return model.cfg.n_layers - 2


def layer_index(layer: int, n_layers: int) -> int:
    """A block index from `layer`, negative counting from the end (-1 = the last block)."""
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range for {n_layers} layers (use {-n_layers}..{n_layers - 1})")
    return layer % n_layers


def site_units(model_cfg, site: str) -> int:
    """Units at `site` for a ModelConfig: dim (residual) or the FFN's hidden width (mlp)."""
    if site not in SITES:
        raise ValueError(f"send site must be one of {SITES}, got {site!r}")
    return model_cfg.dim if site == "residual" else ffn_hidden_dim(model_cfg)


def find_masks(module: nn.Module) -> list[SensitiveUnitMask]:
    return [m for m in module.modules() if isinstance(m, SensitiveUnitMask)]


def attach_mask(model: Transformer, layer: int | None = None, site: str = "residual") -> SensitiveUnitMask:
    """Add a SensitiveUnitMask at `site` of block `layer` (default the penultimate; negative from the
    end) and return it.

    residual: a forward hook multiplies the block's output (dim units), the residual stream after the
    block; state-dict key `layers.{layer}.send_mask.mask`. Under sequence parallelism the block's
    output is this rank's (B, T/tp, dim) slice and the mask (over dim) applies as it is.
    mlp: the block's FeedForward becomes a MaskedFeedForward, masking the SwiGLU hidden units between
    SiLU(w1 x) · w3 x and w2; key `layers.{layer}.feed_forward.send_mask.mask`.
    Works on the meta model (the `send_mask` converter; `init_state` fills the ones later) and on a
    materialised one. Parameter names and the modules TP plans name are untouched; the hook looks the
    mask up on its module, so deep copies (pipeline stages) get their own.
    """
    layer = default_layer(model) if layer is None else layer_index(layer, model.cfg.n_layers)
    units = site_units(model.cfg, site)
    block = model.layers[str(layer)]
    if find_masks(block):
        raise ValueError(f"block {layer} already has a SeND mask")
    mask = SensitiveUnitMask(units).to(block.attention_norm.weight.device)
    if site == "residual":
        block.send_mask = mask
        block.register_forward_hook(_mask_output)
        return mask
    ffn = block.feed_forward
    if type(ffn) is not FeedForward:
        raise ValueError(f"send.site=mlp needs block {layer}'s feed_forward to be a plain FeedForward, got "
                         f"{type(ffn).__name__} (replaced by another model converter?)")
    ffn.__class__ = MaskedFeedForward
    ffn.send_mask = mask
    return mask


@register_converter("send_mask")
def convert_send_mask(model: nn.Module, cfg: JobConfig) -> None:
    """The `send_mask` model converter (the config resolver adds it when send.enabled): the mask at
    send.site of block send.layer, on the meta model before pipeline split, TP, AC, compile and FSDP."""
    attach_mask(model, cfg.send.layer, cfg.send.site)


@torch.no_grad()
def zero_mlp_units(ffn: FeedForward, units: Tensor | Sequence[int]) -> None:
    """The authors' drop for Llama MLPs (SEND repo, send/send_llama_8b.py `drop_sensitive_neurons`):
    zero rows `units` of gate_proj (w1) and up_proj (w3) and columns `units` of down_proj (w2).

    Either zeroed row already silences the hidden unit; all three stay at zero only until the
    optimizer's moments move them. (send/train_no_meta.py, for Pythia's GELU MLP, zeroes
    dense_h_to_4h rows and bias and dense_4h_to_h columns, plus dense_4h_to_h.bias[units], which
    is a residual-stream unit.) SeND's `send.variant: zero_weights`.

    Sharded weights (FSDP2 and/or TP DTensors) are gathered, zeroed and this rank's shard copied back:
    a collective over the ranks that hold the layer, one all-gather of three matrices (FSDP gathers
    every layer twice per step anyway).
    """
    units = torch.as_tensor(units, dtype=torch.long)
    for lin, dim in ((ffn.w1, 0), (ffn.w3, 0), (ffn.w2, 1)):
        w = lin.weight
        if isinstance(w, DTensor):
            full = w.full_tensor()
            full.index_fill_(dim, units.to(full.device), 0.0)
            w.to_local().copy_(distribute_tensor(full, w.device_mesh, w.placements, src_data_rank=None).to_local())
        else:
            w.index_fill_(dim, units.to(w.device), 0.0)


@torch.no_grad()
def tracking_states(model: Transformer, prompts: Sequence[Sequence[int]], layer: int | None = None,
                    site: str = "residual", pad_id: int = 0) -> Tensor:
    """(P, U) float32: the site's units at each prompt's last real token, before any SeND mask.

    For one plain model (a parallelised one is read by exatrain.train.send_tracking). Prompts are
    right-padded into one batch: under causal attention a pad after the last real token cannot
    change it. With a mask at the site its recording gives the units it receives, so snapshots see
    the units' own values, not the zeros of the current interval (which would read as large changes).
    """
    layer = default_layer(model) if layer is None else layer_index(layer, model.cfg.n_layers)
    site_units(model.cfg, site)
    lengths = torch.tensor([len(p) for p in prompts])
    if len(prompts) == 0 or int(lengths.min()) == 0:
        raise ValueError("need at least one prompt and no empty prompt")
    device = next(model.parameters()).device
    tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    block = model.layers[str(layer)]
    masks = find_masks(block)
    was_training = model.training
    model.eval()
    try:
        if masks:
            masks[0].recording = []
            model(tokens.to(device))
            h = masks[0].recording[0]
        else:
            target = block if site == "residual" else block.feed_forward.w2
            with capture(target, inputs=site == "mlp") as box:
                model(tokens.to(device))
            h = box["h"]
    finally:
        for m in masks:
            m.recording = None
        model.train(was_training)
    return h[torch.arange(len(prompts)), lengths.to(device) - 1].float()


class SnapshotWindow:
    """The last `size` tracking snapshots of (prompts, units), in one fixed-shape tensor (oldest first)
    plus the number recorded so far: checkpointable in place by torch.distributed.checkpoint."""

    def __init__(self, size: int, prompts: int, units: int):
        if size < 2:
            raise ValueError(f"the snapshot window needs at least 2 snapshots, got {size}")
        self.snapshots = torch.zeros(size, prompts, units)
        self.count = 0

    @property
    def size(self) -> int:
        return self.snapshots.shape[0]

    def add(self, snapshot: Tensor) -> None:
        if snapshot.shape != self.snapshots.shape[1:]:
            raise ValueError(f"snapshot shape {tuple(snapshot.shape)} != {tuple(self.snapshots.shape[1:])}")
        self.snapshots = torch.cat([self.snapshots[1:], snapshot.detach().cpu().float()[None]])
        self.count += 1

    @property
    def ready(self) -> bool:
        return self.count >= self.size

    def scores(self) -> Tensor:
        if not self.ready:
            raise RuntimeError(f"{self.count} of {self.size} snapshots recorded")
        return sensitivity(self.snapshots)

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        if state["snapshots"].shape != self.snapshots.shape:
            raise ValueError(f"snapshot window {tuple(state['snapshots'].shape)} != {tuple(self.snapshots.shape)}: "
                             "send.window, the tracking prompts or the layer's units changed")
        self.snapshots = state["snapshots"].float().clone()
        self.count = int(state["count"])
