"""DeepSpeed ZeRO-1/2/3 as a second engine (`parallel.engine=deepspeed`), data parallelism only.

The Frontier paper trained with DeepSpeed ZeRO-1 (plus Megatron TP/PP); this engine lets the
same job run on DeepSpeed's optimizer sharding so both stacks can be compared. It follows the
native engine's contract: loss = global token CE / global label count with gradients summed
over ranks (DeepSpeed averages, so the backward loss is scaled by the DP size), the same muP
param groups, and a state dict in the native engine's FQN-keyed format ("model" and a flattened
"optim"), so checkpoints move between engines and layouts.
On CPU it runs with gloo (DS_ACCELERATOR=cpu is set before deepspeed is imported).
Build sequence: convert (model.converters) -> activation checkpointing -> init (always the full
single-process init, `materialize`, then model.init_from's weights) -> deepspeed.initialize partitions it.
Precision: train.dtype=bf16 is torch autocast around the forward (fp32 weights, as on the native engine);
bf16_params is DeepSpeed's `bf16` mode (bf16 weights, fp32 master weights in the ZeRO optimizer).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from exatrain.config import ConfigError, JobConfig
from exatrain.data.batch import Batch
from exatrain.engine.base import StepStats, all_reduce_sum, ce_sum, clean_fqn, model_inputs
from exatrain.interop.hf import load_init_from
from exatrain.model.convert import convert_model
from exatrain.model.llama import materialize
from exatrain.parallel.activation_checkpoint import apply_activation_checkpointing
from exatrain.parallel.dims import ParallelDims
from exatrain.registry import ENGINES
from exatrain.train.optim import build_optimizer, set_lr

_ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError("parallel.engine=deepspeed needs DeepSpeed: pip install 'exatrain[deepspeed]' "
                          "(DS_BUILD_OPS=0 is enough: no compiled ops are used)") from exc
    return deepspeed


class DeepSpeedEngine:
    """Same interface as NativeEngine. `mesh` is unused: DeepSpeed's data-parallel group is the whole world
    (layouts with tp/pp > 1 or a replicate dim are rejected by ParallelDims)."""

    def __init__(self, model: nn.Module, cfg: JobConfig, dims: ParallelDims, mesh, device: torch.device):
        ds = _import_deepspeed(device)
        self.cfg, self.dims, self.device = cfg, dims, device
        t = cfg.train
        convert_model(model, cfg)
        apply_activation_checkpointing(model, t.activation_checkpointing)
        model = materialize(model, device, t.seed)
        load_init_from(model)
        optimizer = build_optimizer(model, cfg)
        self._group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.accumulation = t.global_batch // (t.micro_batch * dims.dp_size)
        config = {
            "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": self.accumulation,
            "train_batch_size": t.global_batch,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": cfg.parallel.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": t.dtype == "bf16_params"},  # bf16 weights, fp32 master in the ZeRO optimizer
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self.ds, _, _, _ = ds.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
        self.model_parts = [self.ds.module]
        self._names = [clean_fqn(name) for name, _ in self.ds.module.named_parameters()]
        self._deepspeed = ds

    def _forward_loss(self, b: Batch, n_labels: int) -> torch.Tensor:
        tokens, kwargs = model_inputs(b, self.device)
        # train.dtype=bf16 is autocast on every engine (fp32 weights); bf16_params is DeepSpeed's bf16 mode.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.dtype == "bf16"):
            logits = self.ds(tokens, **kwargs)
        return ce_sum(logits, b.labels.to(self.device)) / n_labels

    def train_step(self, micro_batches: list[Batch], n_label_tokens: int, lr: float) -> StepStats:
        if len(micro_batches) != self.accumulation:
            raise ValueError(f"DeepSpeed engine expects {self.accumulation} micro-batches per step "
                             f"(global_batch / (micro_batch x dp)), got {len(micro_batches)}")
        set_lr(self.ds.optimizer, lr)
        self.ds.train()
        local = torch.zeros((), dtype=torch.float64)
        for b in micro_batches:
            loss = self._forward_loss(b, max(n_label_tokens, 1))
            self.ds.backward(loss * self.dims.dp_size, scale_wrt_gas=False)
            self.ds.step()
            local += loss.detach().double().cpu()
        norm = self.ds.get_global_grad_norm()
        return StepStats(loss=all_reduce_sum(local), grad_norm=float(norm))

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch]) -> tuple[float, int]:
        self.ds.eval()
        local, count = torch.zeros((), dtype=torch.float64), 0
        for b in micro_batches:
            local += self._forward_loss(b, 1).double().cpu()
            count += b.n_labels
        return all_reduce_sum(local), int(round(all_reduce_sum(torch.tensor(float(count)))))

    def _ensure_optimizer_state(self) -> None:
        """Create AdamW's zero state before the first step (as DCP's get_state_dict does for the native
        engine), so a fresh engine has a complete state dict to load a checkpoint into."""
        zero = self.ds.optimizer
        base = zero.optimizer
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        for flat in flats:
            if not base.state.get(flat):
                base.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                    "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
        link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            # DeepSpeed links the per-parameter state views once, after the first *group's* first step, when
            # the later groups have no state yet: their views stay empty. Relink now that every group has it.
            if hasattr(zero, "_hp_optimizer_states_linked"):
                zero._hp_optimizer_states_linked = False
            link()

    def _step_tensor(self) -> torch.Tensor:
        states = [s for s in self.ds.optimizer.optimizer.state.values() if "step" in s]
        return states[0]["step"].detach().clone().float().cpu() if states else torch.zeros(())

    def state_dict(self) -> dict[str, dict]:
        """Full (unsharded) tensors keyed like the native engine; gathering is collective on all ranks."""
        utils = self._deepspeed.utils
        self._ensure_optimizer_state()
        model, optim = {}, {}
        step = self._step_tensor()
        groups = self.ds.optimizer.param_groups
        for name, p in zip(self._names, self.ds.module.parameters()):
            model[name] = utils.safe_get_full_fp32_param(p).detach().cpu()
            for key in _ADAM_STATES:
                state = utils.safe_get_full_optimizer_state(p, key)
                optim[f"state.{name}.{key}"] = (torch.zeros_like(model[name]) if state is None
                                                else state.detach().cpu().view_as(model[name]))
            optim[f"state.{name}.step"] = step.clone()
            for key, value in groups[self._group_of[id(p)]].items():
                if key != "params":
                    optim[f"param_groups.{name}.{key}"] = value
        return {"model": model, "optim": optim}

    def load_state_dict(self, sd: dict[str, dict]) -> None:
        utils = self._deepspeed.utils
        self._ensure_optimizer_state()
        params = list(self.ds.module.parameters())
        if self.cfg.parallel.zero_stage == 3:
            with self._deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
                for name, p in zip(self._names, params):
                    p.data.copy_(sd["model"][name])
        else:
            with torch.no_grad():
                for name, p in zip(self._names, params):
                    p.data.copy_(sd["model"][name])
        groups = self.ds.optimizer.param_groups
        for name, p in zip(self._names, params):
            utils.safe_set_full_fp32_param(p, sd["model"][name].to(self.device))
            for key in _ADAM_STATES:
                utils.safe_set_full_optimizer_state(p, sd["optim"][f"state.{name}.{key}"].to(self.device), key)
            group = groups[self._group_of[id(p)]]
            for key in group:
                if key != "params" and f"param_groups.{name}.{key}" in sd["optim"]:
                    group[key] = sd["optim"][f"param_groups.{name}.{key}"]
        step = sd["optim"][f"state.{self._names[0]}.step"]
        for state in self.ds.optimizer.optimizer.state.values():
            if "step" in state:
                state["step"] = step.clone().to(state["step"].device, state["step"].dtype)


ENGINES.register("deepspeed", DeepSpeedEngine)
