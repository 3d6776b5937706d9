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

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megatrain.config import ModelConfig, MoEConfig
from megatrain.errors import ConfigError
from megatrain.model import ModelFamily, ModelOutput, TokenIds, num_params
from megatrain.model.llama import LlamaFamily, flops_per_token, pick_attention

if TYPE_CHECKING:  # imported where used (see megatrain/model/llama.py)
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock


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
        from megatrain.model.moe_gate import MaskedTopKGate

        # The same module (weights, settings), with a forward that keeps pads out of top-2's slots too.
        self.moe.deepspeed_moe.gate.__class__ = MaskedTopKGate
        self.moe.deepspeed_moe.gate.register_forward_hook(self._record_routing)
        self.aux_loss = self.z_loss = self.load = self.dropped = None
        self.token_budget: int | None = None
        """Tokens a training micro-batch may hold (micro_batch_size x max_seq_len; MoEFamily.set_token_budget):
        capacity is counted on it, so padding moves no real token over capacity."""
        self.real: torch.Tensor | None = None
        """(tokens,) bool: which tokens of the next forward are real (not padding); set around a training
        forward by MoEFamily.forward, None (every token routed) otherwise, e.g. when generating."""
        self._routed_real: torch.Tensor | None = None  # the same, for the tokens handed to DeepSpeed's gate

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
        # index per route with -1 where capacity dropped it (or the token was not routed), ...).
        dropped = (output[3] < 0).float()  # (top_k, tokens)
        real = self._routed_real
        self.dropped = (dropped.mean() if real is None else
                        (dropped * real).sum() / (real.sum() * dropped.shape[0]).clamp(min=1)).detach()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        routed, real, back = self._without_padding(tokens)
        short = self.cfg.min_capacity - routed.shape[0]
        if short > 0:  # DeepSpeed's gate asserts tokens >= min_capacity: a decode step of a few sequences
            routed = torch.cat([routed, routed.new_zeros(short, routed.shape[1])])
            real = torch.cat([real if real is not None else routed.new_ones(routed.shape[0] - short),
                              routed.new_zeros(short)])
        self._routed_real = real
        # used_token keeps the fillers and pads out of dispatch where capacity drops tokens (top-2 through
        # MaskedTopKGate). With drop_tokens=false nothing is dropped, so they cost slots but change no
        # result (and top1gating would then size topk by a float count: moe/sharded_moe.py 241-259,
        # 283-284). Their losses and load are masked below either way.
        masked = real is not None and self.cfg.drop_tokens
        out, _, _ = self.moe(routed, used_token=real if masked else None)
        # DeepSpeed's l_aux averages over every token handed to it, pads included, so the losses are
        # recomputed from the router's logits over the real tokens: a (tokens x hidden) x (hidden x
        # experts) matmul (without the jitter, which DeepSpeed's gate applies inside).
        self.aux_loss, self.z_loss, self.load = routing_losses(F.linear(routed.float(), self.router.weight.float()),
                                                              real)
        return back(out).reshape(hidden_states.shape)

    def _without_padding(self, tokens: torch.Tensor):
        """(tokens to route, which of them are real or None, the map of the routed output back onto
        `tokens`). With a mask, the real tokens go first in their order (a stable sort: no host sync),
        then the pads, cut or topped up with zero fillers to token_budget (the same on every rank, as
        the expert-parallel all-to-all needs, and independent of how much padding a batch has)."""
        # Only in training: an activation-checkpointed layer recomputes its forward during backward with
        # the mask it had, and an eval forward (model.eval()) routes every token as before.
        if self.real is None or self.token_budget is None or not self.training:
            n = tokens.shape[0]
            return tokens, None, lambda out: out[:n]
        order = torch.argsort((~self.real.reshape(-1)).to(torch.int8), stable=True)[: self.token_budget]
        routed, real = tokens[order], self.real.reshape(-1)[order].to(tokens.dtype)
        fill = self.token_budget - routed.shape[0]
        if fill > 0:
            routed = torch.cat([routed, routed.new_zeros(fill, routed.shape[1])])
            real = torch.cat([real, real.new_zeros(fill)])
        return routed, real, lambda out: torch.zeros_like(tokens).index_copy(0, order, out[: len(order)])

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


def routing_losses(logits: torch.Tensor, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """Switch's load-balancing loss, ST-MoE's z-loss and the expert load (share of first choices) of one
    layer's router logits [tokens, experts], over the real tokens only (`real`: (tokens,) 1/0; None:
    all). Unmasked they are what DeepSpeed's top1gating/top2gating compute, so both MoE families log
    the same figures: aux = E * sum_e(share of first choices on e * mean router probability of e), 1 at
    uniform load."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    weight = (real.float() if real is not None else probs.new_ones(probs.shape[0]))[:, None]  # (tokens, 1)
    count = weight.sum().clamp(min=1)
    first = (F.one_hot(probs.argmax(dim=-1), logits.shape[-1]) * weight).sum(dim=0) / count
    aux = logits.shape[-1] * (first * (probs * weight).sum(dim=0) / count).sum()
    z = (torch.logsumexp(logits, dim=-1).square() * weight[:, 0]).sum() / count
    return aux, z, first.detach()


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
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

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
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        for e, (gate_up, down) in layer.hf_experts().items():
            block.experts.gate_up_proj[e].copy_(gate_up)
            block.experts.down_proj[e].copy_(down)
    return block


def hf_config(cfg: ModelConfig, ids: TokenIds) -> Qwen3MoeConfig:
    from transformers import Qwen3MoeConfig

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
    supports_tp = False  # DeepSpeed's native MoE with AutoTP is untested upstream; check_parallel refuses it
    fixed_length = True
    expert_parallel = True

    def build(self, cfg: ModelConfig, ids: TokenIds, device_type: str = "cpu") -> Qwen3MoeForCausalLM:
        return replace_sparse_blocks(self.hf_model(cfg, ids, device_type), cfg.moe)

    @staticmethod
    def hf_model(cfg: ModelConfig, ids: TokenIds, device_type: str) -> Qwen3MoeForCausalLM:
        """transformers' Qwen3-MoE, from model.from_pretrained or from the config, in fp32."""
        from transformers import Qwen3MoeForCausalLM

        attn = pick_attention(cfg.attention, device_type)
        if cfg.from_pretrained:
            return Qwen3MoeForCausalLM.from_pretrained(cfg.from_pretrained, attn_implementation=attn,
                                                       dtype=torch.float32)
        config = hf_config(cfg, ids)
        config._attn_implementation = attn
        return Qwen3MoeForCausalLM(config)

    def shard_experts(self, model: Qwen3MoeForCausalLM, cfg, dims, rank: int) -> Qwen3MoeForCausalLM:
        if dims.ep > 1:
            model = replace_sparse_blocks(model, cfg.model.moe, dims.ep, dims.ep_rank(rank))
        # Where the layers meet the whole config: capacity is counted on a training micro-batch's token
        # budget, not on however many pads a batch carries (SwitchFeedForward._without_padding).
        for layer in switch_layers(model):
            layer.token_budget = cfg.train.micro_batch_size * cfg.model.max_seq_len
        return model

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
        from transformers import Qwen3MoeForCausalLM

        return Qwen3MoeForCausalLM.from_pretrained(path, attn_implementation=pick_attention("auto", device_type),
                                                   dtype=torch.float32, **placement)

    def hf_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Each SwitchFeedForward: its experts sit on the ranks of an EP group, its HF names are Qwen3-MoE's."""
        return {name: m for name, m in model.named_modules() if isinstance(m, SwitchFeedForward)}

    def hf_module_tensors(self, name: str, layer: SwitchFeedForward) -> dict[str, torch.Tensor] | None:
        """The layer as a Qwen3-MoE sparse block (router, fused experts) on rank 0; None elsewhere.

        Every rank must call it. Only the first EP group's ranks (global ranks 0..ep_size-1: MoE runs have
        no TP) send their experts, host tensors pickled to rank 0, so rank 0 receives each expert once.
        """
        import torch.distributed as dist

        from megatrain.parallel.host import gather_object

        rank = dist.get_rank() if dist.is_initialized() else 0
        everyone = gather_object(layer.hf_experts() if rank < layer.ep_size else {})
        if everyone is None:
            return None
        experts = {e: rows for part in everyone for e, rows in part.items()}
        ids = range(layer.cfg.num_experts)
        return {f"{name}.gate.weight": layer.router.weight.detach().to("cpu", copy=True),
                f"{name}.experts.gate_up_proj": torch.stack([experts[e][0] for e in ids]),
                f"{name}.experts.down_proj": torch.stack([experts[e][1] for e in ids])}

    def forward(self, model: torch.nn.Module, batch: dict) -> ModelOutput:
        layers = switch_layers(model)
        real = batch.get("attention_mask")  # Q/A rows are padded; packed rows are all real
        for layer in layers:  # kept until the next forward: activation checkpointing recomputes with it
            layer.real = real.reshape(-1).bool() if real is not None else None
        out = model(**self.inputs(model, batch))
        extra = sum(layer.weighted_loss() for layer in layers)
        parts = {"loss_part/aux": sum(layer.aux_loss for layer in layers).detach(),
                 "loss_part/z": sum(layer.z_loss for layer in layers).detach()}
        for layer in layers:
            parts[f"moe/layer{layer.layer_idx}/dropped"] = layer.dropped
            for e, share in enumerate(layer.load):
                parts[f"moe/layer{layer.layer_idx}/load_e{e}"] = share
        return ModelOutput(out.logits, extra, parts)

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
