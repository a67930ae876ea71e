"""The S2-Attention sparsity pattern (DESIGN.md §4).

Tokens are grouped into blocks of `block_size`. Query block q of KV group h may read key block k
iff k <= q and either k is one of the `local_blocks` most recent blocks or k is on the group's
vertical stride: (k + h*step + head_sliding_offset) % vert_stride == 0, with
step = max(1, vert_stride // n_heads) over the *query* heads. Groups start their strides at
different phases, so the heads together read every block of the context when there are enough.

This is the authors' DKernel `get_sparse_attn_mask` (dkernel/utils.py) block for block:
- under GQA the phase is per KV group (DKernel's loop over `num_kv_heads`), not per query head as
  in vLLM's copy of the function (which has no GQA); without GQA the two agree;
- the dense heads are the *last* KV groups; `num_dense_heads` counts query heads here (a multiple of
  the group size), DKernel's counts KV heads: ours // group;
- `homo_head` gives every head group 0's pattern and admits no dense heads (DKernel asserts this);
- `head_sliding_offset` defaults to DKernel's 0 (head 0 reads block 0); vLLM and Phi-3-small use 1.

The pattern is defined per *unit*: one unit per KV head, so each KV head needs only its own
strided blocks; that is what lets the decode-time cache drop the others (kv_cache.py). Heads keep
their global index when tensor parallelism shards them, so a rank's local heads read the rows of
the pattern that belong to their global heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from exatrain.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class S2Pattern:
    block_size: int
    local_blocks: int
    vert_stride: int
    n_heads: int
    n_kv_heads: int = 0
    homo_head: bool = False
    num_dense_heads: int = 0
    head_sliding_offset: int = 0

    def __post_init__(self) -> None:
        """The one validation of the pattern's parameters (config validation builds a pattern to run it)."""
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise ConfigError(f"model.s2.block_size must be a power of two >= 16 (kernel tiles), got {bs}")
        if self.local_blocks < 1:
            raise ConfigError(f"model.s2.local_blocks must be >= 1 (the diagonal block), got {self.local_blocks}")
        if self.vert_stride < 1:
            raise ConfigError(f"model.s2.vert_stride must be >= 1, got {self.vert_stride}")
        if self.n_kv_heads == 0:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if not 0 <= self.num_dense_heads <= self.n_heads or self.num_dense_heads % self.group:
            raise ConfigError(f"model.s2.num_dense_heads must be in [0, n_heads={self.n_heads}] and a multiple of "
                              f"the GQA group size {self.group} (dense heads are whole KV groups), "
                              f"got {self.num_dense_heads}")
        if self.homo_head and self.num_dense_heads:
            raise ConfigError(f"model.s2.num_dense_heads={self.num_dense_heads} needs model.s2.homo_head=false: "
                              f"a homogeneous pattern has no dense heads (as in DKernel)")
        if self.head_sliding_offset < 0:
            raise ConfigError(f"model.s2.head_sliding_offset must be >= 0, got {self.head_sliding_offset}")

    @property
    def covers_context(self) -> bool:
        """Whether the sparse heads together read every stride phase, i.e. every far block (DESIGN.md §4)."""
        sparse = {p for p in self.unit_phase if p >= 0}
        return self.homo_head or not sparse or len(sparse) == self.vert_stride

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> S2Pattern:
        s = cfg.s2
        return cls(s.block_size, s.local_blocks, s.vert_stride, cfg.n_heads, cfg.n_kv_heads or cfg.n_heads,
                   s.homo_head, s.num_dense_heads, s.head_sliding_offset)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def n_dense_units(self) -> int:
        return self.num_dense_heads // self.group

    @property
    def n_sparse_units(self) -> int:
        return self.n_kv_heads - self.n_dense_units

    @cached_property
    def unit_phase(self) -> tuple[int, ...]:
        """Per KV head: the residue r with strided blocks k % vert_stride == r, or -1 for a dense unit
        (the last `n_dense_units`)."""
        V = self.vert_stride
        step = 0 if self.homo_head else max(1, V // self.n_heads)
        return tuple(-1 if u >= self.n_sparse_units else -(u * step + self.head_sliding_offset) % V
                     for u in range(self.n_kv_heads))

    def local_units(self, head_offset: int, n_local_heads: int) -> range:
        """Global KV-head indices of a rank holding query heads [head_offset, head_offset + n_local_heads)."""
        if head_offset % self.group or n_local_heads % self.group:
            raise ValueError(f"tensor-parallel head shard ({head_offset}, +{n_local_heads}) splits a GQA group "
                             f"of {self.group} heads")
        if head_offset + n_local_heads > self.n_heads:
            raise ValueError(f"heads [{head_offset}, {head_offset + n_local_heads}) exceed n_heads={self.n_heads}")
        return range(head_offset // self.group, (head_offset + n_local_heads) // self.group)

    def block_mask(self, n_blocks: int, units: range | None = None, device=None) -> torch.Tensor:
        """Bool (U, n_blocks, n_blocks) [unit, query block, key block]: the block pairs a unit reads."""
        units = range(self.n_kv_heads) if units is None else units
        q = torch.arange(n_blocks, device=device)[:, None]
        k = torch.arange(n_blocks, device=device)[None, :]
        causal = k <= q
        local = causal & (q - k < self.local_blocks)
        phase = torch.tensor([self.unit_phase[u] for u in units], device=device)[:, None, None]
        strided = causal & (k % self.vert_stride == phase)
        return local | strided | (causal & (phase < 0))

    def token_mask(self, seq_len: int, units: range | None = None, device=None) -> torch.Tensor:
        """Bool (U, T, T): the block mask at token level, causal inside the diagonal block."""
        n_blocks = -(-seq_len // self.block_size)
        blocks = self.block_mask(n_blocks, units, device)
        idx = torch.arange(seq_len, device=device) // self.block_size
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
        return blocks[:, idx][:, :, idx] & causal

    def attended_fraction(self, seq_len: int) -> float:
        """Attended block pairs / causal block pairs, averaged over heads (1.0 = dense)."""
        n = -(-seq_len // self.block_size)
        return self.block_mask(n).sum().item() / (self.n_kv_heads * n * (n + 1) // 2)


def is_dense_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    """Hybrid models: layers listed in s2.dense_layers, or every dense_period-th layer from layer 0."""
    s = cfg.s2
    return layer_idx in s.dense_layers or (s.dense_period > 0 and layer_idx % s.dense_period == 0)
