"""A Switch-style mixture-of-experts decoder (`model.family=moe`): the Llama-style decoder with every
`moe.every`-th feed-forward replaced by experts behind a learned router, on DeepSpeed's MoE layer.

The Hugging Face side is transformers' Qwen3-MoE (a Llama-style decoder whose `decoder_sparse_step`
puts a sparse block in every N-th layer, with SwiGLU experts and a softmax top-k router), so a
checkpoint's `hf/` folder loads with `AutoModelForCausalLM` and a local Qwen3-MoE folder is a
starting point. Training swaps each HF sparse block for a `SwitchFeedForward` around
`deepspeed.moe.layer.MoE`, which adds what the HF block lacks: expert capacity with token dropping,
router jitter, the load-balancing loss, and all-to-all expert parallelism
(megatrain/parallel/expert.py shards the experts). The two compute the same function when no token
is dropped: top-1 weighs the expert by its softmax probability (HF: norm_topk_prob=False), top-2
renormalizes the two (norm_topk_prob=True).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from megatrain.config import ModelConfig, MoEConfig
from megatrain.errors import ConfigError
from megatrain.model import ModelFamily, ModelOutput, TokenIds, num_params
from megatrain.model.llama import LlamaFamily, flops_per_token, pick_attention


class SwiGLUExpert(torch.nn.Module):
    """One expert: the decoder's SwiGLU feed-forward (as Qwen3-MoE's experts)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwitchFeedForward(torch.nn.Module):
    """Router + experts in place of a Qwen3-MoE sparse block, holding experts
    [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size) of the layer's E.

    After each forward it holds what the loss and the metrics read: `aux_loss` (Switch's
    load-balancing loss, DeepSpeed's l_aux), `z_loss`, `load` (fraction of this rank's tokens whose
    first choice was each expert, before capacity) and `dropped` (fraction of routes over capacity).
    """

    def __init__(self, layer_idx: int, hidden_size: int, expert_size: int, moe: MoEConfig,
                 ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        self.layer_idx, self.cfg, self.ep_size, self.ep_rank = layer_idx, moe, ep_size, ep_rank
        # The weights are copied in from an HF block (load_hf): drawing them would move the global RNG,
        # and with it the jitter and dropout of training, by how many experts this rank holds.
        with torch.random.fork_rng(devices=[]):
            self.moe = self._make(hidden_size, expert_size, moe, ep_size)
        self.moe.deepspeed_moe.gate.register_forward_hook(self._record_routing)
        self.aux_loss = self.z_loss = self.load = self.dropped = None

    @staticmethod
    def _make(hidden_size: int, expert_size: int, moe: MoEConfig, ep_size: int):
        from deepspeed.moe.layer import MoE

        return MoE(hidden_size, SwiGLUExpert(hidden_size, expert_size), moe.num_experts, ep_size, k=moe.top_k,
                   capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
                   min_capacity=moe.min_capacity, noisy_gate_policy="Jitter" if moe.jitter else None,
                   drop_tokens=moe.drop_tokens,
                   # Overflow tokens are dropped by position (as Switch), not by a random draw, and
                   # top-2's second expert is the second-best, not sampled: routing is a function of
                   # the weights, so evaluation is deterministic and matches the HF model.
                   use_rts=False, top2_2nd_expert_sampling=False)

    @property
    def router(self) -> torch.nn.Linear:
        return self.moe.deepspeed_moe.gate.wg

    @property
    def local_experts(self) -> list[SwiGLUExpert]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def global_expert_ids(self) -> range:
        local = self.moe.num_local_experts
        return range(self.ep_rank * local, (self.ep_rank + 1) * local)

    def _record_routing(self, gate, inputs, output) -> None:
        # DeepSpeed's MOELayer asks the gate for sparse routes: (l_aux, capacity, num_experts, expert
        # index per route with -1 where capacity dropped it, slot, gate value, tokens per expert).
        indices, counts = output[3], output[6]
        self.dropped = (indices < 0).float().mean().detach()
        self.load = (counts.float() / counts.sum().clamp(min=1)).detach()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        short = self.cfg.min_capacity - tokens.shape[0]
        if short > 0:  # DeepSpeed's gate asserts tokens >= min_capacity: a decode step of a few sequences
            tokens = torch.cat([tokens, tokens.new_zeros(short, tokens.shape[1])])
        out, self.aux_loss, _ = self.moe(tokens)
        # ST-MoE's z-loss keeps router logits small (bf16 softmax stays exact). DeepSpeed's gate does not
        # return its logits, so they are recomputed: a (tokens x hidden) x (hidden x experts) matmul.
        logits = F.linear(tokens.float(), self.router.weight.float())
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return out[: len(out) - max(short, 0)].reshape(hidden_states.shape)

    def weighted_loss(self) -> torch.Tensor:
        """This layer's term of the training loss (the coefficients are model.moe's)."""
        return self.cfg.aux_loss_coef * self.aux_loss + self.cfg.z_loss_coef * self.z_loss

    @torch.no_grad()
    def load_hf(self, block: Qwen3MoeSparseMoeBlock) -> None:
        """Copy the router and this rank's experts from an HF sparse block (fused [E, ...] tensors)."""
        self.router.weight.copy_(block.gate.weight)
        size = block.experts.intermediate_dim
        for expert, e in zip(self.local_experts, self.global_expert_ids()):
            expert.gate_proj.weight.copy_(block.experts.gate_up_proj[e, :size])
            expert.up_proj.weight.copy_(block.experts.gate_up_proj[e, size:])
            expert.down_proj.weight.copy_(block.experts.down_proj[e])

    @torch.no_grad()
    def hf_experts(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """This rank's experts as HF rows: global id -> (gate_up_proj[e], down_proj[e])."""
        return {e: (torch.cat([x.gate_proj.weight, x.up_proj.weight]).detach().cpu(), x.down_proj.weight.detach().cpu())
                for x, e in zip(self.local_experts, self.global_expert_ids())}


def switch_layers(model: torch.nn.Module) -> list[SwitchFeedForward]:
    """The model's MoE layers in order (found once, then kept on the model: the loss reads them every step)."""
    model = getattr(model, "module", model)  # a DeepSpeed engine
    found = model.__dict__.get("_switch_layers")
    if found is None:
        found = [m for m in model.modules() if isinstance(m, SwitchFeedForward)]
        model.__dict__["_switch_layers"] = found  # not an attribute nn.Module tracks
    return found


def replace_sparse_blocks(model: Qwen3MoeForCausalLM, moe: MoEConfig, ep_size: int = 1,
                          ep_rank: int = 0) -> Qwen3MoeForCausalLM:
    """Swap every HF sparse block (or an already swapped layer) for a SwitchFeedForward holding this
    EP rank's experts, copying router and expert weights across."""
    for idx, layer in enumerate(model.model.layers):
        old = layer.mlp
        if isinstance(old, SwitchFeedForward):
            old = to_hf_block(old, model.config)
        if isinstance(old, Qwen3MoeSparseMoeBlock):
            new = SwitchFeedForward(idx, model.config.hidden_size, model.config.moe_intermediate_size, moe,
                                    ep_size, ep_rank)
            new.load_hf(old)
            layer.mlp = new.to(old.gate.weight.dtype)
    model.__dict__.pop("_switch_layers", None)
    return model


def to_hf_block(layer: SwitchFeedForward, config: Qwen3MoeConfig) -> Qwen3MoeSparseMoeBlock:
    """The HF sparse block of a layer that holds all its experts (ep_size 1)."""
    if layer.ep_size != 1:
        raise ValueError("to_hf_block needs all experts on this rank; gather them with hf_experts() first")
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        for e, (gate_up, down) in layer.hf_experts().items():
            block.experts.gate_up_proj[e].copy_(gate_up)
            block.experts.down_proj[e].copy_(down)
    return block


def hf_config(cfg: ModelConfig, ids: TokenIds) -> Qwen3MoeConfig:
    moe = cfg.moe
    return Qwen3MoeConfig(
        vocab_size=ids.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_seq_len, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, decoder_sparse_step=moe.every,
        moe_intermediate_size=moe.expert_intermediate_size or cfg.intermediate_size,
        norm_topk_prob=moe.top_k == 2, router_aux_loss_coef=moe.aux_loss_coef,
        pad_token_id=ids.pad_id, bos_token_id=ids.bos_id, eos_token_id=ids.eos_id)


class MoEFamily(ModelFamily):
    name = "moe"
    hf_model_types = ("qwen3_moe",)
    shape_fields = (*LlamaFamily.shape_fields, "moe.num_experts", "moe.every", "moe.expert_intermediate_size")
    tp_plan = None  # DeepSpeed's native MoE with AutoTP is untested upstream; check_parallel refuses it
    fixed_length = True
    expert_parallel = True

    def build(self, cfg: ModelConfig, ids: TokenIds, device_type: str = "cpu") -> Qwen3MoeForCausalLM:
        return replace_sparse_blocks(self.hf_model(cfg, ids, device_type), cfg.moe)

    @staticmethod
    def hf_model(cfg: ModelConfig, ids: TokenIds, device_type: str) -> Qwen3MoeForCausalLM:
        """transformers' Qwen3-MoE, from model.from_pretrained or from the config, in fp32."""
        attn = pick_attention(cfg.attention, device_type)
        if cfg.from_pretrained:
            return Qwen3MoeForCausalLM.from_pretrained(cfg.from_pretrained, attn_implementation=attn,
                                                       dtype=torch.float32)
        config = hf_config(cfg, ids)
        config._attn_implementation = attn
        return Qwen3MoeForCausalLM(config)

    def shard_experts(self, model: Qwen3MoeForCausalLM, cfg, dims, rank: int) -> Qwen3MoeForCausalLM:
        if dims.ep == 1:
            return model
        return replace_sparse_blocks(model, cfg.model.moe, dims.ep, dims.ep_rank(rank))

    def check_pretrained(self, cfg: ModelConfig, ids: TokenIds) -> None:
        """As every family, and model.moe must describe the folder's experts (the MoE layers are built from it)."""
        config = super().check_pretrained(cfg, ids)
        if config is None:
            return None
        if config.mlp_only_layers:
            raise ConfigError(f"model.from_pretrained={cfg.from_pretrained} has dense layers at mlp_only_layers="
                              f"{config.mlp_only_layers}; model.family=moe places MoE layers by model.moe.every only")
        folder = {"num_experts": config.num_experts, "top_k": config.num_experts_per_tok,
                  "every": config.decoder_sparse_step, "expert_intermediate_size": config.moe_intermediate_size}
        ours = {**vars(cfg.moe), "expert_intermediate_size": cfg.moe.expert_intermediate_size or cfg.intermediate_size}
        fixes = [f"--model.moe.{k}={v}" for k, v in folder.items() if ours[k] != v]
        if fixes:
            raise ConfigError(f"model.from_pretrained={cfg.from_pretrained} has other experts than model.moe; "
                              f"set {' '.join(fixes)}")
        return config

    def check_parallel(self, cfg, dims) -> None:
        """Every layout DeepSpeed's MoE layer cannot train, refused with one line each."""
        p = cfg.parallel
        self.check_experts(cfg)
        if p.zero_stage == 3:
            # DeepSpeed 0.19.8 rejects its native MoE layer under ZeRO-3 (engine.py _configure_zero_optimizer).
            raise ConfigError("model.family=moe trains with parallel.zero_stage 0, 1 or 2 (DeepSpeed's MoE layer does "
                              "not support ZeRO-3); for less memory use zero_stage=2 with "
                              "parallel.offload_optimizer=true or more expert-parallel ranks (parallel.ep_degree), "
                              "or the dropless ZeRO-3 MoE, model.family=dropless_moe")
        if p.tp_degree > 1:
            raise ConfigError(f"parallel.tp_degree={p.tp_degree}: model.family=moe is not tensor-parallel (DeepSpeed's "
                              "MoE layer with AutoTP is untested upstream); split it with parallel.ep_degree instead")

    @staticmethod
    def check_experts(cfg) -> None:
        """The experts must split evenly over the EP ranks, and some layer must have them."""
        p, moe = cfg.parallel, cfg.model.moe
        if moe.num_experts % p.ep_degree:
            raise ConfigError(f"parallel.ep_degree={p.ep_degree} does not divide model.moe.num_experts="
                              f"{moe.num_experts}; every expert-parallel rank holds the same number of experts")
        if moe.every > cfg.model.num_layers:
            raise ConfigError(f"model.moe.every={moe.every} exceeds model.num_layers={cfg.model.num_layers}: the "
                              "model would have no MoE layer; use model.family=llama for a dense model")

    def load_hf(self, path, device_type: str = "cpu", **placement) -> Qwen3MoeForCausalLM:
        """The exported model as HF runs it: every token reaches its experts (no capacity limit)."""
        return Qwen3MoeForCausalLM.from_pretrained(path, attn_implementation=pick_attention("auto", device_type),
                                                   dtype=torch.float32, **placement)

    def hf_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The HF (Qwen3-MoE) state dict on rank 0, every expert gathered from its EP rank; None elsewhere.

        Every rank must call it. Experts travel by gather_object to rank 0 only, a layer at a time.
        """
        import torch.distributed as dist

        distributed = dist.is_initialized() and dist.get_world_size() > 1
        is_main = not distributed or dist.get_rank() == 0
        prefix = {id(layer): name for name, layer in model.named_modules() if isinstance(layer, SwitchFeedForward)}
        state = {k: v.detach() for k, v in model.state_dict().items() if ".mlp.moe." not in k} if is_main else None
        for layer in switch_layers(model):
            experts = layer.hf_experts()
            if distributed:
                everyone = [None] * dist.get_world_size() if is_main else None
                dist.gather_object(experts, everyone, dst=0)
                if is_main:
                    experts = {e: rows for part in everyone for e, rows in part.items()}
            if is_main:
                name = prefix[id(layer)]
                ids = range(layer.cfg.num_experts)
                state[f"{name}.gate.weight"] = layer.router.weight.detach().cpu()
                state[f"{name}.experts.gate_up_proj"] = torch.stack([experts[e][0] for e in ids])
                state[f"{name}.experts.down_proj"] = torch.stack([experts[e][1] for e in ids])
        return state

    def forward(self, model: torch.nn.Module, batch: dict) -> ModelOutput:
        out = model(**batch, use_cache=False)
        layers = switch_layers(model)
        loss = out.loss + sum(layer.weighted_loss() for layer in layers)
        parts = {"loss_part/lm": out.loss.detach(),
                 "loss_part/aux": sum(layer.aux_loss for layer in layers).detach(),
                 "loss_part/z": sum(layer.z_loss for layer in layers).detach()}
        for layer in layers:
            parts[f"moe/layer{layer.layer_idx}/dropped"] = layer.dropped
            for e, share in enumerate(layer.load):
                parts[f"moe/layer{layer.layer_idx}/load_e{e}"] = share
        return ModelOutput(loss, out.logits, parts)

    def flops_per_token(self, cfg: ModelConfig, model: torch.nn.Module) -> float:
        """From the active parameters: everything but the experts, plus top_k experts per MoE layer."""
        layers = switch_layers(model)
        local = sum(p.numel() for layer in layers for x in layer.local_experts for p in x.parameters())
        per_expert = local // max(1, sum(len(layer.local_experts) for layer in layers))
        active = num_params(model) - local + len(layers) * cfg.moe.top_k * per_expert
        return flops_per_token(cfg, active, cfg.max_seq_len)

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        """Weight decay on matrices only, with each expert-parallel group's experts in groups of their own:
        their gradients are averaged over the expert-data-parallel ranks, not all data-parallel ranks."""
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = super().param_groups(model, weight_decay)
        for group, name in zip(groups, ("decay", "no_decay")):
            group["name"] = name
        return split_params_into_different_moe_groups_for_optimizer(groups)
