"""A dropless mixture-of-experts decoder that trains under ZeRO-3 with expert parallelism
(`model.family=dropless_moe`), through DeepSpeed's AutoEP.

The model is transformers' Qwen3-MoE as it is (the same HF side as `model.family=moe`). Given the
DeepSpeed JSON's `"expert_parallel"` section, `deepspeed.initialize` swaps each HF sparse block for an
`AutoEPMoELayer` holding this rank's experts (deepspeed/module_inject/auto_ep.py; code adapted from
torchtitan): token-choice top-k routing, every token reaches its experts (no capacity, nothing
dropped, no jitter), tokens travel all-to-all with per-rank split sizes, and under ZeRO-3 an expert's
weights are partitioned over the ranks that hold the same experts. GPT-NeoX and Megatron-DeepSpeed
stop MoE at ZeRO-2; this family is the ZeRO-3 answer (`model.family=moe` is the capacity-based
Switch layer, ZeRO 0-2).

What this family adds around AutoEP: the load-balancing loss and the router z-loss from the router
logits transformers records (one pair per MoE layer, as `model.family=moe` logs them), the DeepSpeed
JSON section, and the HF export of experts that sit on several ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from megatrain.errors import ConfigError
from megatrain.model import ModelFamily, ModelOutput, TokenIds, num_params
from megatrain.model.llama import flops_per_token
from megatrain.model.moe import MoEFamily, routing_losses

if TYPE_CHECKING:  # imported where used (see megatrain/model/llama.py)
    from transformers import Qwen3MoeForCausalLM


def _allow_autoep_registry_lookups() -> None:
    """Let DeepSpeed 0.19.8's AutoEP read transformers' output-capture registry (transformers >= 5.23).

    AutoEP retargets the recorder of router logits from the HF router to its own and, to restore the
    registry afterwards, calls `registry.get(class_name, default)` as on a plain dict; transformers 5.23
    made the registry a dict subclass whose `get(model)` takes one argument (TypeError in
    deepspeed.initialize, measured 2026-12-02 with 5.23-5.25). This keeps transformers' `get(model)`
    and answers a string key as a dict does.
    """
    from transformers.utils import output_capturing

    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    base = type(registry)
    if registry is None or base is dict or getattr(base, "_megatrain_autoep", False):
        return

    class Registry(base):
        _megatrain_autoep = True

        def get(self, key, default=None):
            if isinstance(key, str):
                return dict.get(self, key, default)
            return super().get(key)

    registry.__class__ = Registry


class DroplessMoEFamily(MoEFamily):
    name = "dropless_moe"
    fixed_length = False  # no capacity: ranks exchange as many tokens as they route (all-to-all-v)

    def build(self, cfg, ids: TokenIds, device_type: str = "cpu") -> Qwen3MoeForCausalLM:
        _allow_autoep_registry_lookups()
        model = self.hf_model(cfg, ids, device_type)
        model.__dict__["_moe"] = cfg.moe  # the loss coefficients forward() reads (not an nn.Module attribute)
        return model

    def shard_experts(self, model, cfg, dims, rank):
        return model  # deepspeed.initialize does it (see deepspeed_config)

    def deepspeed_config(self, cfg, dims) -> dict:
        moe = cfg.model.moe
        return {"expert_parallel": {
            "enabled": True, "autoep_size": dims.ep, "preset_model": "qwen3_moe",
            # As the HF model: top-1 weighs its expert by the softmax probability, top-2 renormalizes
            # the two (hf_config's norm_topk_prob); the preset's default renormalizes always, which
            # would give top-1 a weight of 1 and its router no gradient from the LM loss.
            "route_norm": moe.top_k == 2,
            # Grouped GEMM kernels are CUDA's; on CPU AutoEP loops over the local experts.
            "use_grouped_mm": torch.cuda.is_available()}}

    def check_parallel(self, cfg, dims) -> None:
        p = cfg.parallel
        self.check_experts(cfg)
        if p.zero_stage != 3:
            raise ConfigError(f"parallel.zero_stage={p.zero_stage}: model.family=dropless_moe is the ZeRO-3 MoE "
                              "(DeepSpeed AutoEP); below ZeRO-3 train model.family=moe, or set parallel.zero_stage=3")
        if p.tp_degree > 1:
            raise ConfigError(f"parallel.tp_degree={p.tp_degree}: model.family=dropless_moe is not tensor-parallel; "
                              "split it with parallel.ep_degree and ZeRO-3 instead")

    def hf_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Each AutoEPMoELayer: its experts sit on the ranks of an EP group, its HF names are Qwen3-MoE's."""
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

        return {name: m for name, m in model.named_modules() if isinstance(m, AutoEPMoELayer)}

    def hf_module_tensors(self, name: str, layer: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The layer as a Qwen3-MoE sparse block (router, fused experts) on rank 0; None elsewhere.

        Every rank must call it, with the layer's parameters gathered (ZeRO-3 partitions them over the ranks
        that hold the same experts). Only the first EP group's ranks (global ranks 0..ep_size-1: this family
        has no TP) send their experts, host tensors pickled to rank 0, so rank 0 receives each expert once.
        """
        import torch.distributed as dist

        from megatrain.parallel.host import gather_object

        experts, first = layer.experts, layer.ep_rank * layer.num_local_experts
        rank = dist.get_rank() if dist.is_initialized() else 0
        mine = ({first + i: (torch.cat([experts.w1[i], experts.w3[i]]).detach().cpu(),
                             experts.w2[i].detach().to("cpu", copy=True)) for i in range(layer.num_local_experts)}
                if rank < layer.ep_size else {})
        everyone = gather_object(mine)
        if everyone is None:
            return None
        rows = {e: pair for part in everyone for e, pair in part.items()}
        ids = range(layer.num_experts)
        return {f"{name}.gate.weight": layer.router.gate.weight.detach().to("cpu", copy=True),
                f"{name}.experts.gate_up_proj": torch.stack([rows[e][0] for e in ids]),
                f"{name}.experts.down_proj": torch.stack([rows[e][1] for e in ids])}

    def flops_per_token(self, cfg, model: torch.nn.Module) -> float:
        """From the active parameters: everything but the experts, plus top_k experts per MoE layer."""
        experts = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
        active = num_params(model) - experts * (1 - cfg.moe.top_k / cfg.moe.num_experts)
        return flops_per_token(cfg, active, cfg.max_seq_len)

    param_groups = ModelFamily.param_groups  # AutoEP tags its expert parameters inside deepspeed.initialize

    def forward(self, model: torch.nn.Module, batch: dict) -> ModelOutput:
        # HF's own (all-layer) balance term is left out: ours is per layer, as model.family=moe's.
        out = model(**self.inputs(model, batch), output_router_logits=True)
        config = getattr(model, "module", model).config
        moe_layers = [i for i in range(config.num_hidden_layers) if (i + 1) % config.decoder_sparse_step == 0]
        aux = z = 0.0
        parts = {}
        real = batch.get("attention_mask")  # pads route too (nothing is dropped) but weigh in no loss or load
        real = real.reshape(-1) if real is not None else None
        for layer, logits in zip(moe_layers, out.router_logits, strict=True):
            layer_aux, layer_z, load = routing_losses(logits, real)
            aux, z = aux + layer_aux, z + layer_z
            for e, share in enumerate(load):
                parts[f"moe/layer{layer}/load_e{e}"] = share
        moe = getattr(model, "module", model).__dict__["_moe"]
        extra = moe.aux_loss_coef * aux + moe.z_loss_coef * z
        parts = {"loss_part/aux": aux.detach(), "loss_part/z": z.detach(), **parts}
        return ModelOutput(out.logits, extra, parts)
