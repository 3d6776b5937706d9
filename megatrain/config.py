"""The one config tree: dataclass sections, YAML values, dotted CLI overrides.

Precedence is defaults < YAML file < command line (`--section.key=value`), as in torchtitan.
Unknown keys and wrong types raise `ConfigError` naming the key and the file. Checks that span
sections or need the world size live in `validate()`, and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatrain.errors import ConfigError
from megatrain.files import atomic_write_text
from megatrain.parallel.dims import BatchPlan, ParallelDims


@dataclass
class RunConfig:
    """Where the run writes, and its seed."""

    dir: str = "runs/default"
    """Run folder: config.yaml, metrics.jsonl, TensorBoard events and checkpoints/ go here."""
    seed: int = 1234
    """Seeds model init, data order and dropout."""


@dataclass
class MoEConfig:
    """Switch-style mixture-of-experts feed-forward layers (model.family=moe), on DeepSpeed's MoE layer.

    Defaults follow the Switch Transformer paper (Fedus et al. 2021): top-1 routing, capacity factor
    1.25 in training, jitter on the router input, aux loss 0.01; the router z-loss is ST-MoE's 0.001.
    """

    num_experts: int = 8
    """Experts in each MoE layer; parallel.ep_degree must divide it."""
    every: int = 2
    """An MoE feed-forward in every N-th decoder layer (layers N, 2N, ...), a dense one elsewhere; 1 = all."""
    top_k: int = 1
    """Experts per token: 1 (Switch) or 2 (GShard; the two gate values are renormalized)."""
    expert_intermediate_size: int = 0
    """Hidden width of each expert's SwiGLU; 0 = model.intermediate_size."""
    capacity_factor: float = 1.25
    """Tokens an expert takes per micro-batch in training: capacity_factor x tokens x top_k / num_experts."""
    eval_capacity_factor: float = 2.0
    """capacity_factor in eval and generation (the model not in training mode): more room, fewer tokens dropped."""
    min_capacity: int = 4
    """An expert's capacity never falls below this many tokens."""
    jitter: bool = True
    """Multiply the router input by U(1-0.01, 1+0.01) noise in training (Switch's exploration jitter)."""
    drop_tokens: bool = True
    """Tokens beyond an expert's capacity skip the layer (the residual carries them); false sizes
    every expert's buffer to the busiest one, so no token is dropped."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Switch eq. 4), summed over MoE layers."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss (ST-MoE eq. 5, mean squared logsumexp of router logits), summed over layers."""

    def __post_init__(self):
        for key in ("num_experts", "every", "min_capacity"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)}: must be at least 1")
        if self.top_k not in (1, 2):
            raise ConfigError(f"model.moe.top_k={self.top_k}: DeepSpeed's capacity-based router takes 1 or 2")
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.moe.top_k={self.top_k} exceeds model.moe.num_experts={self.num_experts}")
        for key in ("capacity_factor", "eval_capacity_factor"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)}: must be positive (1.0 gives every expert "
                                  "exactly its even share of tokens); set model.moe.drop_tokens=false for no limit")
        for key in ("aux_loss_coef", "z_loss_coef", "expert_intermediate_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)}: must not be negative")


@dataclass
class ModelConfig:
    """The model: a family from megatrain/model/ and its sizes (checkpoints stay HF-native)."""

    family: str = "llama"
    """llama: a Llama-style decoder (transformers' Llama classes). moe: the same decoder with Switch-style
    mixture-of-experts feed-forward layers (model.moe; HF-native as Qwen3-MoE). t5: T5/FLAN-T5, question to
    the encoder, answer from the decoder. switch_t5: transformers' Switch Transformers (T5 with experts).
    dropless_moe: the moe model under ZeRO-3, experts sharded by DeepSpeed AutoEP, no token dropped. lstm: a
    recurrent LM (embedding, num_layers stacked LSTMs of hidden_size, tied output), as the TinyStories study's."""
    hidden_size: int = 256
    """Model width: the embedding and residual stream size; must divide by num_heads."""
    num_layers: int = 4
    """Decoder layers (t5, switch_t5: encoder layers, and as many decoder layers; lstm: stacked LSTMs)."""
    num_heads: int = 4
    """Attention heads per layer."""
    num_kv_heads: int = 0
    """Key/value heads for grouped-query attention; 0 means num_heads (plain multi-head)."""
    intermediate_size: int = 688
    """Hidden width of the dense feed-forward layers (SwiGLU in llama and moe, gated GELU in t5)."""
    max_seq_len: int = 128
    """Longest sequence in tokens (the model's max_position_embeddings): a longer question loses its
    oldest tokens, never the answer; pretraining rows (data.sources) are packed to this length."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding's frequencies (llama, moe, dropless_moe)."""
    tie_embeddings: bool = True
    """Share one matrix between the input embedding and the output (LM head) projection."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init of a model built from scratch (HF initializer_range)."""
    attention: str = "auto"
    """auto | sdpa | flash_attention_2 | eager. auto takes flash-attn on a GPU when it imports."""
    from_pretrained: str = ""
    """A local Hugging Face folder (save_pretrained) to continue training from; empty = from scratch."""
    allow_bin_weights: bool = False
    """Accept a from_pretrained folder whose weights are only pytorch_model*.bin pickles (transformers
    reads them with torch.load(weights_only=True)); without it only safetensors are loaded."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Read by model.family=moe, and by switch_t5 built from the config (num_experts, every, capacity,
    jitter and the loss coefficients go to transformers' SwitchTransformersConfig)."""

    def __post_init__(self):
        if self.attention not in ("auto", "sdpa", "flash_attention_2", "eager"):
            raise ConfigError(f"model.attention={self.attention!r}: use auto, sdpa, flash_attention_2 or eager")
        kv = self.num_kv_heads or self.num_heads
        if self.hidden_size % self.num_heads or self.num_heads % kv:
            raise ConfigError(
                f"model: hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={kv}: "
                "hidden_size must divide by num_heads and num_heads by num_kv_heads")


@dataclass
class SourceConfig:
    """One dataset of a pretraining mixture."""

    path: str = ""
    """Folder written by `megatrain-data build` (manifest.json, tokenizer/, shard-*.tar)."""
    weight: float = 1.0
    """Relative share of samples (any positive scale; LLEMMA: arXiv 2, web math 4, code 1)."""


@dataclass
class DataConfig:
    """What the run trains on: question/answer shards, or a pretraining mixture of sources."""

    shards: str = "data/linear1d/shards"
    """Question/answer shards from `megatrain-data deepmind shards`; used when `sources` is empty."""
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    """Pretraining mixture: name -> {path, weight}. When set, the run trains a causal LM on packed rows
    of these datasets instead of the question/answer task. Weights may change on --resume (a next
    data stage); per-source counters continue."""
    mixture_window: int = 1
    """Global batches per stratification window: every window holds exactly each source's quota."""
    attention_reset: bool = False
    """Packed rows: restart positions and attention at each document start (no cross-document attention)."""
    on_bad_shard: str = "error"
    """A shard whose sha256 differs from its manifest: `error` stops the run naming it; `skip` leaves
    it out (every rank alike) and counts it in the metrics as data/skipped_shards."""
    num_workers: int = 1
    """DataLoader worker processes per rank; 0 reads in the training process."""
    verify: bool = True
    """Check every shard's sha256 against the manifest before training (spread over the ranks)."""

    def __post_init__(self):
        if self.on_bad_shard not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_shard={self.on_bad_shard!r}: use error or skip")
        for name, source in self.sources.items():
            if not source.path:
                raise ConfigError(f"data.sources.{name}.path is empty; give the folder `megatrain-data build` wrote")
            if not source.weight > 0:
                raise ConfigError(f"data.sources.{name}.weight={source.weight}: weights must be positive; "
                                  "drop the source to leave it out")


@dataclass
class TrainConfig:
    """Length of the run, batch sizes, clipping, and when to stop early."""

    steps: int = 1000
    """Optimizer steps to train for (each is one global batch)."""
    micro_batch_size: int = 32
    """Samples per rank per forward/backward."""
    global_batch_size: int = 0
    """Samples per optimizer step over all ranks; 0 means micro_batch_size x data-parallel ranks."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off (DeepSpeed's own default is 1.0)."""
    exit_interval: int = 0
    """Stop this process after this many steps, with a checkpoint (as Megatron's --exit-interval); the
    schedule still runs to `steps`, so `--resume` continues as if never stopped. 0 runs to the end."""
    max_skipped_steps: int = 5
    """A step whose loss or gradient norm is not finite is skipped (no update, on every rank); more
    than this many skipped within skip_window steps stops the run with a checkpoint (megatrain/guard.py)."""
    skip_window: int = 100
    """The sliding window, in steps, over which skipped (non-finite) steps are counted against max_skipped_steps."""

    def __post_init__(self):
        if self.max_skipped_steps < 0 or self.skip_window < 1:
            raise ConfigError(f"train.max_skipped_steps={self.max_skipped_steps}, train.skip_window="
                              f"{self.skip_window}: use max_skipped_steps >= 0 and skip_window >= 1")


@dataclass
class OptimConfig:
    """AdamW (torch's, or DeepSpeedCPUAdam under parallel.offload_optimizer) and its LR schedule."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 1 / 30
    """Final LR as a fraction of lr (LLEMMA: cosine to 1/30)."""
    schedule: str = "cosine"
    """cosine (warmup then cosine to min_lr_ratio) | linear (warmup then linear to min_lr_ratio) | constant."""
    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps to lr; at most train.steps; 0 starts at lr."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, on matrices only (biases and norm weights get none)."""
    beta1: float = 0.9
    """AdamW's decay rate of the gradient's running mean."""
    beta2: float = 0.95
    """AdamW's decay rate of the squared gradient's running mean."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator for numerical stability."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r}: use cosine, linear or constant")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio}: must lie in [0, 1]")


@dataclass
class ParallelConfig:
    """How the model is split over the ranks: ZeRO stage, tensor and expert parallelism, offload."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3, passed through deepspeed_config()."""
    tp_degree: int = 1
    """Tensor-parallel ranks per model replica (DeepSpeed AutoTP): contiguous ranks split each layer's
    matrices; data-parallel ranks = world size / tp_degree, and ZeRO shards across those."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU and step there (DeepSpeedCPUAdam); needs zero_stage >= 1."""
    offload_params: bool = False
    """Keep parameters on the CPU between uses; needs zero_stage == 3."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them."""
    ep_degree: int = 1
    """Expert parallelism (model.family=moe, dropless_moe): each group of ep_degree consecutive data-parallel ranks
    splits every MoE layer's experts between them and exchanges tokens all-to-all; must divide both
    model.moe.num_experts and the data-parallel ranks."""
    fp32_grad_reduce: bool = True
    """Under bf16, accumulate gradients over micro-batches and reduce them across ranks in fp32, as
    Megatron-LM (--accumulate-allreduce-grads-in-fp32) and LLEMMA's GPT-NeoX config do; false keeps
    them in bf16 (half the gradient memory and traffic, ~3 significant digits per sum)."""
    collective_timeout_s: float = 600
    """How long any collective waits for a rank that died or hangs before the job fails (with a line
    naming the rank, exit code 3, for the scheduler to requeue; see docs/reliability.md). Longer than
    the slowest step, eval or checkpoint save; DeepSpeed's own default is 30 minutes."""


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and which carry a Hugging Face export."""

    interval: int = 100
    """Save every this many steps (and at the last step); 0 saves only at the end."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are deleted after a new one is complete."""
    on_save_failure: str = "stop"
    """A save that fails (disk full, I/O error) leaves the previous checkpoint and `latest` intact, then:
    stop (one line, exit 2) | continue (a warning; the next checkpoint tries again)."""

    hf_export: str = "last"
    """Which checkpoints carry `hf/`, the whole model as a Hugging Face folder (streamed from the ranks
    module by module, written by rank 0): every | last | never. `last`: the last checkpoint a process
    writes, i.e. at the run's final step and at a stop (train.exit_interval, SIGTERM/SIGUSR2, the
    non-finite guard), not the interval ones in between. Resume never reads hf/; `megatrain export RUN
    --step N --out DIR` writes it from any checkpoint on one CPU process."""

    def __post_init__(self):
        if self.on_save_failure not in ("stop", "continue"):
            raise ConfigError(f"checkpoint.on_save_failure={self.on_save_failure!r}: use stop or continue")
        if self.hf_export not in ("every", "last", "never"):
            raise ConfigError(f"checkpoint.hf_export={self.hf_export!r}: use every, last or never")


@dataclass
class EvalConfig:
    """The evaluator (megatrain/eval/): question/answer exact match on held-out problems."""

    released: str = "data/linear1d/released"
    """Released-format folder (DeepMind mathematics_dataset v1.0 layout) that eval reads."""
    modules: list[str] = field(default_factory=lambda: ["algebra__linear_1d"])
    """DeepMind modules that eval scores, each on its own (a table per module) and overall. On the
    command line: --eval.modules=a,b."""
    split: str = "interpolate"
    """Split folder of eval.released that eval scores (interpolate; the DeepMind release also has extrapolate)."""
    interval: int = 0
    """Run the evaluator every this many steps during training; 0 only at the end."""
    limit: int = 200
    """Problems scored by in-training evals (the final eval uses final_limit)."""
    final_limit: int = 1000
    """Problems per module scored by the end-of-run eval (and by `megatrain eval` without --limit); 0 skips it."""
    batch_size: int = 64
    """Questions per rank in one generation batch of an eval."""
    max_new_tokens: int = 24
    """Longest answer generated, in tokens (eval and `megatrain generate`)."""
    examples: int = 3
    """Held-out questions per module that the final eval prints beside the model's answers."""


@dataclass
class LogConfig:
    """Metrics written during training (rank 0)."""

    interval: int = 10
    """Write a metrics.jsonl line every this many steps."""
    tensorboard: bool = True
    """Also write the metrics as TensorBoard events, in the tensorboard/ folder of run.dir."""
    progress: bool = True
    """tqdm bar on rank 0."""


@dataclass
class Config:
    """The whole run: one section per concern, plus the precision."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = "auto"
    """auto | fp32 | bf16. auto trains in bf16 where the device computes it natively (CUDA with bf16,
    CPUs with avx512_bf16 or AMX) and fp32 elsewhere; a resumed run keeps its checkpoint's precision.
    The run's config.yaml records what auto chose (DeepSpeed keeps fp32 master weights in bf16)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision={self.precision!r}: use auto, fp32 or bf16")


# ----------------------------------------------------------------------------- parsing

def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, "a,b" for a list of str."""
    if typing.get_origin(tp) is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str) and item_type is str:
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}{where}")
        return [_coerce(item, item_type, f"{key}[{i}]", where) for i, item in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}{where}")
    return value


# Keys that moved, old -> new (section, key): configs written before the move (recipes, the
# config.yaml of existing run folders and checkpoints) keep loading, with a warning.
MOVED_KEYS = {("data", "eval_released"): ("eval", "released"), ("data", "eval_modules"): ("eval", "modules"),
              ("data", "eval_split"): ("eval", "split")}


def migrate(values: dict, where: str = "") -> dict:
    """A copy of nested config values with moved keys under their new names (warning on stderr)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for (old_section, old_key), (new_section, new_key) in MOVED_KEYS.items():
        section = out.get(old_section)
        if isinstance(section, dict) and old_key in section:
            out.setdefault(new_section, {})
            if isinstance(out[new_section], dict):
                out[new_section].setdefault(new_key, section.pop(old_key))
                if int(os.environ.get("RANK", 0)) == 0:  # every rank loads the config
                    print(f"warning: {old_section}.{old_key} is now {new_section}.{new_key}{where}; rename it "
                          "there", file=sys.stderr)
    return out


def _build(cls: type, values: dict, prefix: str, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}{where}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}{where}; known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", where)
        elif typing.get_origin(tp) is dict:  # name -> section, e.g. data.sources
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a mapping of names, got {value!r}{where}")
            item_type = typing.get_args(tp)[1]
            kwargs[name] = {str(k): _build(item_type, v, f"{prefix}{name}.{k}.", where) for k, v in value.items()}
        else:
            kwargs[name] = _coerce(value, tp, prefix + name, where)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """`--section.key=value` (or `--section.key value`) arguments to a nested dict; values parse as YAML."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
            raw, i = args[i + 1], i + 1
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else "")
        i += 1
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Defaults, then the YAML file, then the overrides.

    Args:
        path: a YAML file of values (sections as mappings); None for defaults only.
        overrides: `--section.key=value` strings, or an already nested dict.

    Returns:
        The validated (per-section) Config. Call `validate(cfg, world_size)` once the world is known.
    """
    values: dict = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f" (in {path})"
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; recipes are in configs/")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    values = migrate(values, where)
    cfg = _build(Config, values, "", where)  # a bad file is reported as the file's fault
    if overrides:
        over = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        over = migrate(over, " (on the command line)")
        cfg = _build(Config, _merge(values, over), "", " (on the command line)")
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """A copy of a loaded config with `--section.key=value` overrides applied and checked."""
    over = migrate(parse_overrides(overrides), " (on the command line)")
    return _build(Config, _merge(to_dict(cfg), over), "", " (on the command line)")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path, comment: str = "") -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file).

    Args:
        comment: lines written above the values as YAML comments (e.g. why auto chose a precision).
    """
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    atomic_write_text(path, header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- cross-section checks

def batch_plan(cfg: Config, dims: ParallelDims) -> BatchPlan:
    """The one batch plan (micro batch, accumulation, data-parallel ranks) that everything reads."""
    return BatchPlan.of(cfg.train.micro_batch_size, cfg.train.global_batch_size, dims.dp)


def validate(cfg: Config, world_size: int) -> ParallelDims:
    """Every check that spans sections or needs the world size, in one place (the model family's own
    checks, which need the vocabulary, are in parallelize.check).

    Returns:
        The parallel layout of this config on `world_size` ranks.
    """
    dims = ParallelDims(world_size, cfg.parallel.tp_degree, cfg.parallel.ep_degree)
    for key, value in (("train.steps", cfg.train.steps), ("train.micro_batch_size", cfg.train.micro_batch_size),
                       ("log.interval", cfg.log.interval), ("eval.batch_size", cfg.eval.batch_size)):
        if value < 1:
            raise ConfigError(f"{key}={value}: must be at least 1")
    for key, value in (("checkpoint.interval", cfg.checkpoint.interval), ("eval.interval", cfg.eval.interval),
                       ("optim.warmup_steps", cfg.optim.warmup_steps), ("data.num_workers", cfg.data.num_workers),
                       ("train.global_batch_size", cfg.train.global_batch_size),
                       ("train.grad_clip", cfg.train.grad_clip),
                       ("train.exit_interval", cfg.train.exit_interval)):
        if value < 0:
            raise ConfigError(f"{key}={value}: must not be negative")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: keep at least 1")
    batch_plan(cfg, dims)
    p = cfg.parallel
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2 and 3")
    if p.offload_optimizer and p.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
    if cfg.precision == "bf16" and p.zero_stage == 0:
        # Seen with DeepSpeed 0.19.8: its bf16 stage-0 optimizer (FP16_UnfusedOptimizer) steps once on
        # zero gradients inside deepspeed.initialize, applying weight decay and shifting AdamW's step count.
        raise ConfigError("precision=bf16 needs parallel.zero_stage >= 1: DeepSpeed's bf16 stage-0 optimizer "
                          "takes a spurious step at start; ZeRO-1 keeps the same fp32 master weights, sharded")
    if p.offload_params and p.zero_stage != 3:
        raise ConfigError("parallel.offload_params needs parallel.zero_stage=3")
    if cfg.data.sources and (cfg.eval.interval or cfg.eval.final_limit):
        raise ConfigError("eval scores question/answer exact match, which a pretraining mixture (data.sources) "
                          "does not have; set eval.interval=0 and eval.final_limit=0")
    if cfg.data.mixture_window < 1:
        raise ConfigError(f"data.mixture_window={cfg.data.mixture_window}: must be at least 1 global batch")
    if cfg.optim.warmup_steps > cfg.train.steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds train.steps={cfg.train.steps}")
    if not math.isfinite(cfg.optim.lr) or cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr}: must be a positive number")
    return dims
