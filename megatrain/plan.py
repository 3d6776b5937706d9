"""`megatrain plan`: will a recipe fit on a cluster, and what will it cost? Answered without a GPU.

The model is built on the meta device through its family (shapes only, no weights), so parameter
counts are the real model's. Per-GPU memory is then counted the way DeepSpeed 0.19.8 allocates it on
the path megatrain's derived DeepSpeed JSON (parallel/zero.py) selects, term by term:

    model states   parameters, gradients, optimizer state (fp32 master copy + Adam's two moments)
    buffers        DeepSpeed's gradient buckets and ZeRO-3's gathered layer
    activations    Korthikanti et al. 2022, adapted to the decoder's shapes (see activation_bytes)
    reserve        CUDA context, NCCL and allocator fragmentation (an assumption: RESERVE_BYTES)

The model-state terms are checked against bench/zero_memory.py's measurement of live tensors on CPU
ranks (tests/test_plan.py). Time comes from the family's own flops_per_token and the device table
metrics.PEAK_BF16_FLOPS at an assumed MFU.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from megatrain.config import Config, apply_overrides, batch_plan, validate
from megatrain.errors import ConfigError, MegatrainError
from megatrain.metrics import PEAK_BF16_FLOPS
from megatrain.model import TokenIds, family
from megatrain.parallel.dims import ParallelDims

GiB = 2**30
RESERVE_BYTES = 2 * GiB
"""Per GPU, outside PyTorch tensors: the CUDA context (~0.5 GiB on A100/H100), NCCL's communicator
buffers and the caching allocator's fragmentation. An assumption, not a measurement."""
DEFAULT_VOCAB_SIZE = 32000
"""Llama 2 / Code Llama's sentencepiece vocabulary: used when neither a model.from_pretrained folder
nor the data's tokenizer is here to say (Code Llama 7B's 32016 changes its count by 0.13M)."""
ADAM_STATE_BYTES = 8
"""Adam's exp_avg and exp_avg_sq, fp32, per parameter."""


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float
    """Memory of one GPU in GiB (an A100-40GB has 40 GiB)."""
    gpu: str = "A100"
    """A key of metrics.PEAK_BF16_FLOPS."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ParamCounts:
    """What the meta model says about parameters; `dense`/`expert` are what one rank holds after tensor
    and expert parallelism split them, before ZeRO shards them."""

    total: int
    active: int
    """Parameters a token passes through (an MoE's top_k experts per layer, not all of them)."""
    dense: int
    expert: int
    small: int
    """Of `dense`, parameters under ZeRO-3's persistence threshold: kept whole on every rank."""
    largest_layer: int
    """Parameters of the largest decoder layer on one rank: what ZeRO-3 gathers at once."""
    partition_span: int
    """The most dense parameters whose gradients one rank keeps whole under ZeRO-1/2's plain path
    (see partition_span): its shard plus the parameters that straddle the shard's edges."""


# ----------------------------------------------------------------------------- the model on meta

def architecture(cfg: Config, vocab_size: int | None) -> tuple[Config, int, str]:
    """The model config and vocabulary to size, and a line saying where they came from.

    A model.from_pretrained folder, when present, is what training builds: its config.json wins over
    the recipe's model fields (the recipe's copy lets plan work before the weights are downloaded).
    """
    folder = Path(cfg.model.from_pretrained) if cfg.model.from_pretrained else None
    if folder is not None and (folder / "config.json").is_file():
        hf = json.loads((folder / "config.json").read_text())
        # transformers' names (Llama/Qwen3-MoE, then T5's) -> ModelConfig fields
        names = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                 "num_key_value_heads": "num_kv_heads", "intermediate_size": "intermediate_size",
                 "tie_word_embeddings": "tie_embeddings", "rope_theta": "rope_theta",
                 "d_model": "hidden_size", "num_layers": "num_layers", "num_heads": "num_heads", "d_ff": "intermediate_size"}
        fields = {ours: hf[theirs] for theirs, ours in names.items() if theirs in hf}
        model = dataclasses.replace(cfg.model, **fields)
        return (dataclasses.replace(cfg, model=model), vocab_size or hf["vocab_size"],
                f"architecture from {folder / 'config.json'}")
    where = f"{folder} absent: " if folder is not None else ""
    if vocab_size:
        return cfg, vocab_size, f"{where}architecture from the recipe, vocabulary {vocab_size} (--vocab-size)"
    try:
        from megatrain.data.training_data import open_data

        vocab = open_data(cfg).ids.vocab_size
        return cfg, vocab, f"{where}architecture from the recipe, vocabulary {vocab} from the data's tokenizer"
    except (MegatrainError, OSError):  # no data here: plan needs only a vocabulary size
        return (cfg, DEFAULT_VOCAB_SIZE, f"{where}architecture from the recipe, vocabulary {DEFAULT_VOCAB_SIZE} "
                "assumed (no data here; --vocab-size to set it)")


def build_on_meta(cfg: Config, vocab_size: int) -> torch.nn.Module:
    """The family's model with shapes only: no memory, no initialization cost worth the name."""
    model_cfg = dataclasses.replace(cfg.model, from_pretrained="")  # from_pretrained would read the weights
    with torch.device("meta"), warnings.catch_warnings():
        # The attention kernel changes no parameter: flash-attn missing on this machine is no news here.
        warnings.filterwarnings("ignore", message="model.attention=")
        return family(cfg.model.family).build(model_cfg, TokenIds(vocab_size, 0, 1, 2), "cpu")


def is_expert(name: str) -> bool:
    """Expert weights in every MoE family (DeepSpeed's MoE layer, Qwen3-MoE, Switch Transformers)."""
    return ".experts." in name


def count_params(model: torch.nn.Module, cfg: Config, dims: ParallelDims, persistence_threshold: int) -> ParamCounts:
    """Totals, and what one rank holds once AutoTP splits the modules of the model's tensor-parallel plan
    (transformers' base_model_tp_plan) and the LM head (by vocabulary rows, tied or not) and expert
    parallelism splits the experts."""
    plan = model.config.base_model_tp_plan if family(cfg.model.family).supports_tp else None
    tp_patterns = [f"*{pattern}" for pattern in (plan or {})]
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    seen: set[int] = set()
    total = expert_total = dense = expert = small = 0
    per_layer: dict[str, float] = {}
    # The family's optimizer groups (ModelFamily.param_groups: matrices, then norms and biases), in
    # parameter order: DeepSpeed flattens and partitions each group on its own.
    dense_groups: tuple[list[int], list[int]] = ([], [])
    for module_name, module in model.named_modules():
        split_tp = id(module) == id(head) or any(fnmatch.fnmatch(module_name, p) for p in tp_patterns)
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            full_name = f"{module_name}.{name}"
            n = p.numel()
            total += n
            local = n / dims.tp if (split_tp or id(p) in head_ids) else n
            if is_expert(full_name):
                expert_total += n
                expert += local / dims.ep
            else:
                dense += local
                small += local if n <= persistence_threshold else 0
                dense_groups[0 if p.dim() >= 2 else 1].append(int(local))
            layer = _layer_of(full_name)
            if layer is not None:
                per_layer[layer] = per_layer.get(layer, 0) + (local / dims.ep if is_expert(full_name) else local)
    moe = cfg.model.moe
    active = total - expert_total * (1 - moe.top_k / moe.num_experts) if expert_total else total
    return ParamCounts(total, int(active), int(dense), int(expert), int(small), int(max(per_layer.values(), default=0)),
                       partition_span(dense_groups, dims.dp))


def partition_span(groups: tuple[list[int], ...], dp: int) -> int:
    """The most parameter elements whose gradients one rank keeps, whole, under ZeRO-1/2's path without
    a separate fp32 gradient buffer: DeepSpeed cuts each flattened parameter group into dp equal shards
    and gives a rank a buffer for the *whole* gradient of every parameter that overlaps its shard
    (stage_1_and_2.py:2184-2194, params_in_partition). So a large parameter straddling a shard edge (the
    embedding, on a small model) counts on both ranks: measured, 18 % more than the shard on 4 ranks."""
    spans = [0] * dp
    for numels in groups:
        shard = math.ceil(sum(numels) / dp) or 1
        start = 0
        for n in numels:
            first, last = start // shard, min((start + n - 1) // shard, dp - 1)
            for rank in range(first, last + 1):
                spans[rank] += n
            start += n
    return max(spans)


def _layer_of(name: str) -> str | None:
    """`model.layers.3` of `model.layers.3.mlp.up_proj.weight` (T5: `encoder.block.3`), else None."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "block") and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


# ----------------------------------------------------------------------------- memory

def weight_bytes(cfg: Config) -> int:
    """Bytes of a parameter (and an activation) in the training dtype (make_plan resolves `auto`)."""
    return 4 if cfg.precision == "fp32" else 2


def zero_settings(ds: dict) -> dict:
    """The ZeRO settings the engine will run with: the derived JSON's, else DeepSpeed 0.19.8's defaults
    (runtime/zero/config.py: reduce and allgather buckets 5e8 elements, line 113 and 132; overlap_comm
    on for stage 3 only, line 384-386; prefetch bucket 5e7, 222; persistence threshold 1e5, 228)."""
    zero = ds["zero_optimization"]
    stage = zero["stage"]
    return {"stage": stage, "reduce_bucket_size": int(zero.get("reduce_bucket_size", 5e8)),
            "allgather_bucket_size": int(zero.get("allgather_bucket_size", 5e8)),
            "overlap_comm": zero.get("overlap_comm", stage == 3), "contiguous_gradients": zero.get("contiguous_gradients", True),
            "prefetch_bucket_size": int(zero.get("stage3_prefetch_bucket_size", 5e7)),
            "persistence_threshold": int(zero.get("stage3_param_persistence_threshold", 1e5))}


def optimizer_path(cfg: Config) -> str:
    """Which DeepSpeed optimizer wrapper the engine picks (runtime/engine.py:2305-2311)."""
    p = cfg.parallel
    if p.zero_stage == 0:
        return "none"
    fp32_accumulation = weight_bytes(cfg) == 2 and p.fp32_grad_reduce
    if p.zero_stage == 1 and fp32_accumulation and not p.offload_optimizer:
        return "bf16_optimizer"
    return "stage3" if p.zero_stage == 3 else "stage_1_and_2"


def model_state_bytes(cfg: Config, counts: ParamCounts, dims: ParallelDims, accumulation: int) -> dict:
    """Per-rank bytes of parameters, gradients and optimizer state, on the GPU and offloaded to the CPU.

    P is what a rank holds after TP/EP, S its ZeRO shard (dense parameters over the dp ranks, experts
    over the dp/ep ranks that hold the same experts), w the training dtype's bytes. DeepSpeed 0.19.8:

    - ZeRO-0: w P each for parameters and gradients (fp32 only: bf16 at stage 0 is refused by
      config.validate), Adam 8 P; the fp32 parameters are their own master copy.
    - ZeRO-1, bf16 with fp32 gradient sums, no offload: the BF16_Optimizer keeps the bf16 parameters
      flat (bf16_optimizer.py:167-170), a *whole* fp32 gradient buffer (:191, not sharded), the bf16
      gradients autograd made (added to that buffer in backward_epilogue, engine.py:3156-3160, and
      dropped only at the step) and an fp32 master shard (:182): 2 P + (4 + 2) P + (4 + 8) S.
    - ZeRO-1/2 otherwise (stage_1_and_2.py): flat w P parameters (:509), an fp32 master shard cloned even
      for fp32 models (:568-569), gradients reduced into a shard in the accumulation dtype; at stage 1
      with gradient accumulation the whole gradients also live between micro-batches (they are reduced
      only at the step's boundary), in fp32 under fp32 sums (use_grad_accum_attribute, :396-401).
    - ZeRO-3 (stage3.py): parameter, gradient, master and Adam shards, plus the small parameters kept
      whole (stage3_param_persistence_threshold).
    - offload_optimizer moves the master shard, Adam and the gradient shard to the CPU; offload_params
      moves the parameter shard too (ZeRO-3).

    DeepSpeed's own estimators (stage_1_and_2.py:4017-4034, 2 P + 18 P / N; stage3.py:4016-4052) give
    totals only and count ZeRO-1 as ZeRO-2, every gradient sharded, where the BF16_Optimizer keeps 6 P
    bytes of gradients whole on every rank (20.6 GB for LLEMMA 7B at TP 2): plan counts term by term
    (checked against bench/zero_memory.py) and prints theirs beside.
    """
    w = weight_bytes(cfg)
    P = counts.dense + counts.expert
    S = counts.dense / dims.dp + counts.expert / (dims.dp // dims.ep)
    p = cfg.parallel
    fp32_sums = w == 4 or p.fp32_grad_reduce
    grad_w = 4 if fp32_sums else w
    path = optimizer_path(cfg)
    cpu = 0.0
    if path == "none":
        params, grads, optim = w * P, w * P, ADAM_STATE_BYTES * P
    elif path == "bf16_optimizer":
        params, grads, optim = 2 * P, (4 + 2) * P, (4 + ADAM_STATE_BYTES) * S
    else:
        stage3 = path == "stage3"
        params = w * (S + counts.small) if stage3 else w * P
        # bf16 with fp32 sums keeps an exact fp32 shard (_use_compact_grad_partition_buffer, :1259); the
        # plain path keeps whole gradients of the parameters overlapping the shard (partition_span).
        compact = stage3 or (w == 2 and fp32_sums)
        grads = grad_w * (S if compact else counts.partition_span + counts.expert / (dims.dp // dims.ep))
        if p.zero_stage == 1 and (accumulation > 1 or (fp32_sums and w == 2)):
            grads += grad_w * P  # the whole gradients, accumulated before the reduce
        optim = (4 + ADAM_STATE_BYTES) * S
        if p.offload_optimizer:
            cpu += optim + grad_w * S
            grads -= grad_w * S
            optim = 0.0
        if stage3 and p.offload_params:
            cpu += w * S
            params -= w * S
    return {"params": int(params), "grads": int(grads), "optimizer": int(optim), "cpu_offload": int(cpu), "path": path}


def deepspeed_estimate(cfg: Config, counts: ParamCounts, dims: ParallelDims) -> int | None:
    """DeepSpeed's own per-GPU model-state estimate for this layout (None at ZeRO-0, which it has none for)."""
    p = cfg.parallel
    P = counts.dense + counts.expert
    if p.zero_stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=dims.dp, num_nodes=1,
                                                       cpu_offload=p.offload_optimizer)
        return gpu
    if p.zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(P, counts.largest_layer, num_gpus_per_node=dims.dp,
                                                          num_nodes=1, cpu_offload=p.offload_optimizer,
                                                          cpu_offload_params=p.offload_params)
        return gpu
    return None


def buffer_bytes(cfg: Config, counts: ParamCounts, zero: dict) -> int:
    """DeepSpeed's working buffers during backward, sized from the derived JSON.

    - BF16_Optimizer: none; it reduces its flat fp32 gradients in place and all-gathers into the flat
      bf16 parameters through views (runtime/utils.py:1019 all_gather_dp_groups).
    - stage_1_and_2: the contiguous-gradient bucket, reduce_bucket_size elements allocated whole
      (stage_1_and_2.py:3266), twice with overlap_comm (:3275), fp32 when it stages fp32 sums.
    - ZeRO-3: its reduce bucket and prefetch bucket, and the gathered largest layer with its gradients
      (DeepSpeed's estimator counts that layer as 4 bytes/parameter for 16-bit, stage3.py:4027).
    """
    w = weight_bytes(cfg)
    path = optimizer_path(cfg)
    fp32_sums = w == 4 or cfg.parallel.fp32_grad_reduce
    if path == "bf16_optimizer":
        return 0
    if path in ("none", "stage_1_and_2"):
        if path == "none" or not zero["contiguous_gradients"]:
            return 0
        staged_fp32 = cfg.parallel.zero_stage == 1 and fp32_sums
        return zero["reduce_bucket_size"] * (4 if staged_fp32 else w) * (2 if zero["overlap_comm"] else 1)
    return (zero["reduce_bucket_size"] * (4 if fp32_sums else w) + zero["prefetch_bucket_size"] * w
            + 2 * w * counts.largest_layer)


def activation_bytes(cfg: Config, vocab_size: int, tp: int, checkpointing: bool) -> int:
    """Activation memory of one micro-batch on one rank, after Korthikanti et al. 2022 ("Reducing
    Activation Recomputation in Large Transformer Models", section 4.1).

    Their per-layer count for GPT, in bytes with 16-bit activations and t-way tensor parallelism without
    sequence parallelism, is s b h (10 + 24/t + 5 a s / (h t)). The 5 a s / (h t) term is the s x s
    attention scores, softmax and dropout, which FlashAttention never stores (it keeps fp32 softmax
    statistics, 4 a s b / t bytes). Counted along their accounting for a Llama layer (no dropout,
    SwiGLU of width f, k/v of width h_kv):

        replicated over TP:  8 s b h      (two RMSNorm inputs, the q/k/v input, the MLP input)
        split over TP:       (2 s b (h + 2 h_kv)  q, k, v
                              + 2 s b h           the attention output (o_proj input)
                              + 8 s b f           gate, up, SiLU(gate), their product
                              + 4 a s b) / t      FlashAttention's softmax statistics

    which for GPT's shapes (h_kv = h, a GeLU MLP of 4h storing 4 s b f, two 1-byte dropout masks)
    gives back their 10 + 24/t. An MoE layer's MLP holds top_k x capacity_factor tokens per token.
    Outside the layers: the logits, 2 s b V / t in bf16 plus the fp32 copy cross entropy makes,
    4 s b V / t (the LM head splits by vocabulary rows). fp32 training doubles the layers' terms and
    keeps one 4 s b V / t copy of the logits.

    With activation checkpointing (megatrain's apply_ac: one checkpoint per decoder layer, not
    partitioned over TP) a rank keeps each layer's input, 2 s b h per layer, and one layer's full
    activations while it is recomputed. T5 counts its encoder and decoder layers alike.
    """
    m = cfg.model
    s, b, h = m.max_seq_len, cfg.train.micro_batch_size, m.hidden_size
    a, h_kv = m.num_heads, h // m.num_heads * (m.num_kv_heads or m.num_heads)
    scale = weight_bytes(cfg) / 2
    layers = m.num_layers * (2 if family(m.family).task == "seq2seq" else 1)
    dense_mlp = 8 * s * b * m.intermediate_size
    moe_every = m.moe.every if m.family in ("moe", "dropless_moe", "switch_t5") else 0
    expert_width = m.moe.expert_intermediate_size or m.intermediate_size
    moe_mlp = 8 * s * b * expert_width * m.moe.top_k * m.moe.capacity_factor

    def layer(mlp: float) -> float:
        return 8 * s * b * h + (2 * s * b * (h + 2 * h_kv) + 2 * s * b * h + mlp + 4 * a * s * b) / tp

    moe_layers = layers // moe_every if moe_every else 0
    per_layer = [layer(moe_mlp)] * moe_layers + [layer(dense_mlp)] * (layers - moe_layers)
    # The logits in the training dtype, and cross entropy's fp32 copy of them (none when already fp32).
    logits = s * b * vocab_size / tp * (weight_bytes(cfg) + (4 if weight_bytes(cfg) == 2 else 0))
    if checkpointing:
        body = layers * 2 * s * b * h + max(per_layer)
    else:
        body = sum(per_layer)
    return int(scale * body + logits)


# ----------------------------------------------------------------------------- the plan

def make_plan(cfg: Config, cluster: Cluster, mfu: float = 0.4, vocab_size: int | None = None) -> dict:
    """Everything `megatrain plan` prints, as one JSON-able dict (bytes, seconds; GiB where named so).

    Raises:
        ConfigError: the layout is not one megatrain can run on this cluster (config.validate and the
            family's own checks).
    """
    from megatrain.parallel import parallelize
    from megatrain.parallel.zero import deepspeed_config

    if cluster.gpu not in PEAK_BF16_FLOPS:
        raise ConfigError(f"--gpu {cluster.gpu}: known GPUs are {', '.join(PEAK_BF16_FLOPS)}")
    cfg, vocab, source = architecture(cfg, vocab_size)
    if cfg.precision == "auto":  # as precision.choose resolves it on a GPU with native bf16
        cfg = dataclasses.replace(cfg, precision="fp32" if cfg.parallel.zero_stage == 0 else "bf16")
    dims = validate(cfg, cluster.world_size)
    fam = family(cfg.model.family)
    parallelize.check(cfg, fam, vocab, dims)
    plan_batch = batch_plan(cfg, dims)
    zero = zero_settings(deepspeed_config(cfg, dims))
    model = build_on_meta(cfg, vocab)
    counts = count_params(model, cfg, dims, zero["persistence_threshold"] if zero["stage"] == 3 else 0)
    states = model_state_bytes(cfg, counts, dims, plan_batch.accumulation)
    buffers = buffer_bytes(cfg, counts, zero)
    act_on = activation_bytes(cfg, vocab, dims.tp, checkpointing=True)
    act_off = activation_bytes(cfg, vocab, dims.tp, checkpointing=False)
    activations = act_on if cfg.parallel.activation_checkpointing else act_off
    total = states["params"] + states["grads"] + states["optimizer"] + buffers + activations + RESERVE_BYTES
    capacity = cluster.gpu_memory_gb * GiB
    flops_per_token = fam.flops_per_token(cfg.model, model)
    tokens_per_step = plan_batch.global_batch_size * cfg.model.max_seq_len
    tokens = tokens_per_step * cfg.train.steps
    seconds = tokens * flops_per_token / (cluster.world_size * PEAK_BF16_FLOPS[cluster.gpu] * mfu)
    return {
        "config": {"family": cfg.model.family, "precision": "bf16" if weight_bytes(cfg) == 2 else "fp32",
                   "zero_stage": cfg.parallel.zero_stage, "tp": dims.tp, "ep": dims.ep, "dp": dims.dp,
                   "micro_batch_size": plan_batch.micro_batch_size, "accumulation": plan_batch.accumulation,
                   "activation_checkpointing": cfg.parallel.activation_checkpointing,
                   "offload_optimizer": cfg.parallel.offload_optimizer, "offload_params": cfg.parallel.offload_params,
                   "optimizer_path": states["path"], "architecture": source},
        "cluster": dataclasses.asdict(cluster) | {"world_size": cluster.world_size},
        "params": {"total": counts.total, "active": counts.active, "per_rank": counts.dense + counts.expert,
                   "vocab_size": vocab},
        "memory": {"params": states["params"], "grads": states["grads"], "optimizer": states["optimizer"],
                   "model_states": states["params"] + states["grads"] + states["optimizer"],
                   "buffers": buffers, "reduce_bucket_size": zero["reduce_bucket_size"],
                   "allgather_bucket_size": zero["allgather_bucket_size"], "activations": activations,
                   "activations_checkpointed": act_on, "activations_full": act_off, "reserve": RESERVE_BYTES,
                   "total": total,
                   "cpu_offload_per_gpu": states["cpu_offload"],
                   "deepspeed_estimate_model_states": deepspeed_estimate(cfg, counts, dims)},
        "fits": total <= capacity,
        "margin_gib": (capacity - total) / GiB,
        "time": {"tokens_per_step": tokens_per_step, "steps": cfg.train.steps, "tokens": tokens,
                 "flops_per_token": flops_per_token, "mfu": mfu, "peak_flops": PEAK_BF16_FLOPS[cluster.gpu],
                 "wall_s": seconds, "gpu_hours": seconds * cluster.world_size / 3600},
    }


def candidate_changes(cfg: Config, cluster: Cluster) -> list[list[str]]:
    """Overrides to try, cheapest in throughput first: checkpointing, a smaller micro batch (more
    accumulation when train.global_batch_size is set), the next ZeRO stage, twice the TP degree (within
    a node), optimizer then parameter offload."""
    p, changes = cfg.parallel, []
    if not p.activation_checkpointing:
        changes.append(["--parallel.activation_checkpointing=true"])
    micro = cfg.train.micro_batch_size
    while micro > 1:
        micro //= 2
        changes.append([f"--train.micro_batch_size={micro}"])
    for stage in range(p.zero_stage + 1, 4):
        changes.append([f"--parallel.zero_stage={stage}"])
    tp = p.tp_degree * 2
    while tp <= cluster.gpus_per_node:
        changes.append([f"--parallel.tp_degree={tp}"])
        tp *= 2
    if not p.offload_optimizer:
        changes.append([f"--parallel.zero_stage={max(p.zero_stage, 1)}", "--parallel.offload_optimizer=true"])
    changes.append(["--parallel.zero_stage=3", "--parallel.offload_optimizer=true", "--parallel.offload_params=true"])
    return changes


def suggest(cfg: Config, cluster: Cluster, mfu: float, vocab_size: int | None) -> dict | None:
    """The first change that makes `cfg` fit: one setting at a time in candidate_changes' order, then
    the same changes accumulated. None when nothing does."""
    def fits(overrides: list[str]) -> dict | None:
        try:
            result = make_plan(apply_overrides(cfg, overrides), cluster, mfu, vocab_size)
        except MegatrainError:  # e.g. a TP degree that does not divide the heads
            return None
        return {"overrides": overrides, "total": result["memory"]["total"], "margin_gib": result["margin_gib"],
                "cpu_offload_per_gpu": result["memory"]["cpu_offload_per_gpu"]} if result["fits"] else None

    singles = candidate_changes(cfg, cluster)
    for change in singles:
        found = fits(change)
        if found:
            return found
    combined: dict[str, str] = {}
    for change in singles:
        for key, value in (arg.split("=", 1) for arg in change):
            if key == "--parallel.zero_stage" and key in combined:  # accumulated: never a lower stage
                value = str(max(int(value), int(combined[key])))
            combined[key] = value
        found = fits([f"{k}={v}" for k, v in combined.items()])
        if found:
            return found
    return None


def _count(n: float) -> str:
    """6.74B, 2.13M, 1.54k: three significant digits and a unit."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_plan(result: dict) -> str:
    """The plan as `megatrain plan` prints it."""
    c, m, t, prm = result["config"], result["memory"], result["time"], result["params"]
    cl = result["cluster"]

    def gib(n: float) -> str:
        return f"{n / GiB:6.2f} GiB"

    layout = (f"ZeRO-{c['zero_stage']} ({c['optimizer_path']}), TP {c['tp']}, EP {c['ep']}, DP {c['dp']}, "
              f"{c['precision']}, micro batch {c['micro_batch_size']} x {c['accumulation']} accumulation"
              + (", optimizer offload" if c["offload_optimizer"] else "") + (", parameter offload" if c["offload_params"] else ""))
    ac = "on" if c["activation_checkpointing"] else "off"
    lines = [f"model       {c['family']}: {c['architecture']}",
             f"parameters  {_count(prm['total'])} total" + (f", {_count(prm['active'])} active per token"
                                                          if prm["active"] != prm["total"] else "")
             + f"; {_count(prm['per_rank'])} per rank after TP/EP",
             f"cluster     {cl['nodes']} x {cl['gpus_per_node']} {cl['gpu']} ({cl['gpu_memory_gb']:g} GiB), {layout}",
             "memory per GPU",
             f"  parameters            {gib(m['params'])}",
             f"  gradients             {gib(m['grads'])}",
             f"  optimizer state       {gib(m['optimizer'])}",
             f"  DeepSpeed buffers     {gib(m['buffers'])}   (reduce bucket {m['reduce_bucket_size']:.3g} elements; "
             f"the {m['allgather_bucket_size']:.3g}-element allgather bucket works in place)",
             f"  activations           {gib(m['activations'])}   (checkpointing {ac}; with {gib(m['activations_checkpointed']).strip()}, "
             f"without {gib(m['activations_full']).strip()})",
             f"  reserve               {gib(m['reserve'])}   (CUDA context, NCCL, fragmentation)",
             f"  total                 {gib(m['total'])}"]
    if m["deepspeed_estimate_model_states"] is not None:
        lines.append(f"  (DeepSpeed's own estimator: {gib(m['deepspeed_estimate_model_states']).strip()} of model states; "
                     f"plan's: {gib(m['model_states']).strip()})")
    if m["cpu_offload_per_gpu"]:
        lines.append(f"  offloaded to CPU      {gib(m['cpu_offload_per_gpu'])} per GPU, "
                     f"{m['cpu_offload_per_gpu'] * cl['gpus_per_node'] / GiB:.0f} GiB per node")
    verdict = "FITS" if result["fits"] else "DOES NOT FIT"
    lines.append(f"{verdict} in {cl['gpu_memory_gb']:g} GiB: margin {result['margin_gib']:+.2f} GiB")
    if not result["fits"]:
        fix = result.get("suggestion")
        offload = (f"; {fix['cpu_offload_per_gpu'] * cl['gpus_per_node'] / GiB:.0f} GiB of host memory per node"
                   if fix and fix["cpu_offload_per_gpu"] else "")
        lines.append(f"  change: {' '.join(fix['overrides'])} (total {fix['total'] / GiB:.2f} GiB, margin "
                     f"{fix['margin_gib']:+.2f} GiB{offload})" if fix else
                     "  no single change or combination tried fits: use more GPUs or GPUs with more memory")
    hours = t["wall_s"] / 3600
    peak = f"{t['peak_flops'] / 1e12:.0f} TFLOP/s bf16" + (" (an fp32 run is slower)" if c["precision"] == "fp32" else "")
    lines += [f"time        {_count(t['tokens_per_step'])} tokens per step x {t['steps']:,} steps = "
              f"{_count(t['tokens'])} tokens; {t['flops_per_token'] / 1e9:.3g} GFLOP per token",
              f"            at {t['mfu']:.0%} MFU of {peak}: {hours:,.1f} h wall "
              f"({hours / 24:.1f} days), {t['gpu_hours']:,.0f} GPU-hours"]
    return "\n".join(lines)


def run(config_path: str, overrides: list[str], cluster: Cluster, mfu: float = 0.4,
        vocab_size: int | None = None) -> dict:
    """The plan of a recipe with overrides, and the change to make when it does not fit."""
    from megatrain.config import load_config

    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu}: give a fraction in (0, 1], e.g. 0.4")
    for name, value in (("--nodes", cluster.nodes), ("--gpus-per-node", cluster.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{name} {value}: must be at least 1")
    if not cluster.gpu_memory_gb > 0 or math.isinf(cluster.gpu_memory_gb):
        raise ConfigError(f"--gpu-memory-gb {cluster.gpu_memory_gb}: must be a positive number")
    cfg = load_config(config_path, overrides)
    result = make_plan(cfg, cluster, mfu, vocab_size)
    result["suggestion"] = None if result["fits"] else suggest(cfg, cluster, mfu, vocab_size)
    return result
