"""SeND (Sensitive Neuron Dropout, "Sensitivity Dropout" in the ACL 2025 version): the parts that
need no trainer (DESIGN.md §6).

Every `interval` steps the trainer runs held-out tracking prompts through the model and records,
per prompt, one layer's state at the last real token (`tracking_states`); the last S snapshots
(`SnapshotWindow`, S = 3 as the authors) give each unit a sensitivity (`sensitivity`), the top
`fraction` of units are chosen (`select_units`) and zeroed for the next interval by a {0, 1} mask
(`SensitiveUnitMask`, placed by `attach_mask`).

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
Here the mask keeps the weights, is exact for the whole interval, and lives in the state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exatrain.model.llama import FeedForward, Transformer
from exatrain.model.sampling import capture

SITES = ("residual", "mlp")


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
    replicated under FSDP2, and never touched by the optimizer. Applied in train and eval mode
    alike, like the authors' zeroed weights; `reset()` lifts it.
    """

    def __init__(self, units: int):
        super().__init__()
        self.register_buffer("mask", torch.ones(units))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.dtype)

    @torch.no_grad()
    def drop(self, units: Tensor) -> None:
        self.mask.fill_(1.0)
        self.mask[units.to(self.mask.device)] = 0.0

    @torch.no_grad()
    def reset(self) -> None:
        self.mask.fill_(1.0)

    @property
    def dropped(self) -> Tensor:
        return (self.mask == 0).nonzero().flatten()

    def extra_repr(self) -> str:
        return f"units={self.mask.numel()}, dropped={int((self.mask == 0).sum())}"


def _mask_output(module: nn.Module, args, out: Tensor) -> Tensor:
    return module.send_mask(out)


def _mask_input(module: nn.Module, args):
    return (module.send_mask(args[0]), *args[1:])


def default_layer(model: Transformer) -> int:
    """The penultimate block, as the paper (the authors' `hidden_states[-2]` and `layers[-2]`)."""
    if model.cfg.n_layers < 2:
        raise ValueError("SeND tracks the penultimate block: the model needs at least 2 layers")
    return model.cfg.n_layers - 2


def site_module(model: Transformer, layer: int, site: str) -> nn.Module:
    """Where a site's units are: the block (its output, the residual stream after it) or the MLP's
    down projection w2 (its input, the SwiGLU hidden units SiLU(w1 x) * w3 x)."""
    if site not in SITES:
        raise ValueError(f"send site must be one of {SITES}, got {site!r}")
    block = model.layers[str(layer)]
    return block if site == "residual" else block.feed_forward.w2


def attach_mask(model: Transformer, layer: int | None = None, site: str = "residual") -> SensitiveUnitMask:
    """Add a SensitiveUnitMask at `site` of block `layer` (default the penultimate) and return it.

    residual: a forward hook multiplies the block's output (dim units); state-dict key
    `layers.{layer}.send_mask.mask`. mlp: a forward pre-hook multiplies w2's input (ffn-hidden
    units), i.e. between SiLU(w1 x) * w3 x and w2; key `layers.{layer}.feed_forward.w2.send_mask.mask`.
    Hooks, not a changed forward, so parameter names, TP plans and HF export are untouched. The
    hooks look the mask up on their module, so deep copies get their own mask.
    """
    layer = default_layer(model) if layer is None else layer
    target = site_module(model, layer, site)
    if hasattr(target, "send_mask"):
        raise ValueError(f"block {layer} already has a SeND mask at {site}")
    units = target.in_features if site == "mlp" else model.cfg.dim
    ref = next(model.parameters())
    target.send_mask = SensitiveUnitMask(units).to(ref.device)
    if site == "mlp":
        target.register_forward_pre_hook(_mask_input)
    else:
        target.register_forward_hook(_mask_output)
    return target.send_mask


@torch.no_grad()
def zero_mlp_units(ffn: FeedForward, units: Tensor) -> None:
    """The authors' drop for Llama MLPs (SEND repo, send/send_llama_8b.py `drop_sensitive_neurons`):
    zero rows `units` of gate_proj (w1) and up_proj (w3) and columns `units` of down_proj (w2).

    Either zeroed row already silences the hidden unit; all three stay at zero only until the
    optimizer's moments move them. (send/train_no_meta.py, for Pythia's GELU MLP, zeroes
    dense_h_to_4h rows and bias and dense_4h_to_h columns, plus dense_4h_to_h.bias[units], which
    is a residual-stream unit.) For comparison only: SeND here uses `SensitiveUnitMask`.
    """
    ffn.w1.weight[units] = 0
    ffn.w3.weight[units] = 0
    ffn.w2.weight[:, units] = 0


@torch.no_grad()
def tracking_states(model: Transformer, prompts: Sequence[Sequence[int]], layer: int | None = None,
                    site: str = "residual", pad_id: int = 0) -> Tensor:
    """(P, U) float32: the site's units at each prompt's last real token, before any SeND mask.

    Prompts are right-padded into one batch: under causal attention a pad after the last real
    token cannot change it. The capture runs before the mask hook, so snapshots see the units'
    own values, not the zeros of the current interval (which would read as large changes).
    """
    layer = default_layer(model) if layer is None else layer
    lengths = torch.tensor([len(p) for p in prompts])
    if len(prompts) == 0 or int(lengths.min()) == 0:
        raise ValueError("need at least one prompt and no empty prompt")
    device = next(model.parameters()).device
    tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with capture(site_module(model, layer, site), inputs=site == "mlp", prepend=True) as box:
            model(tokens.to(device))
    finally:
        model.train(was_training)
    return box["h"][torch.arange(len(prompts)), lengths.to(device) - 1].float()


class SnapshotWindow:
    """The last `size` tracking snapshots (P, U); `scores()` once full. Checkpointable."""

    def __init__(self, size: int = 3):
        if size < 2:
            raise ValueError(f"the snapshot window needs at least 2 snapshots, got {size}")
        self.size = size
        self.snapshots: list[Tensor] = []

    def add(self, snapshot: Tensor) -> None:
        if self.snapshots and snapshot.shape != self.snapshots[0].shape:
            raise ValueError(f"snapshot shape {tuple(snapshot.shape)} != {tuple(self.snapshots[0].shape)}")
        self.snapshots = [*self.snapshots, snapshot.detach().cpu().float()][-self.size:]

    @property
    def ready(self) -> bool:
        return len(self.snapshots) == self.size

    def scores(self) -> Tensor:
        if not self.ready:
            raise RuntimeError(f"{len(self.snapshots)} of {self.size} snapshots recorded")
        return sensitivity(torch.stack(self.snapshots))

    def state_dict(self) -> dict:
        return {"size": self.size, "snapshots": [s.clone() for s in self.snapshots]}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state["size"])
        self.snapshots = [s.float() for s in state["snapshots"]][-self.size:]
