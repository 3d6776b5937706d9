"""Model families: single-device `nn.Module`s and everything the trainer needs to know about them.

The trainer never names a model class. It asks the family (`family(cfg.model.family)`) to build the
model, to say which config fields fix parameter shapes, how many FLOPs a token costs, whether and
how tensor parallelism may split it, how to run a batch into a loss (with named parts, e.g. an MoE
auxiliary loss), how to group parameters for the optimizer, and how to read and write a Hugging Face
folder. Parallelism is applied afterwards (megatrain/parallel/parallelize.py), ZeRO last.
"""

from __future__ import annotations

import importlib
import json

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatrain.errors import ConfigError


@dataclass(frozen=True)
class TokenIds:
    """What a model takes from its tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int


@dataclass
class ModelOutput:
    """One forward over a training batch. The model computes no loss of its own: the trainer scores the
    logits against the labels, weighing every label token of the optimizer step alike (objective.py)."""

    logits: torch.Tensor
    extra_loss: torch.Tensor | None = None
    """What the family adds to the objective for this micro-batch, already weighted (an MoE's router
    losses); averaged over the step's micro-batches and ranks, not weighted by tokens."""
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    """Scalars worth logging under these names, averaged over micro-batches, steps and ranks: terms of
    `extra_loss` (an MoE's `loss_part/aux`) and figures of the forward (an expert's share of the tokens)."""


class ModelFamily:
    """The interface every family implements; defaults fit a Hugging Face causal LM."""

    name: str = ""
    shape_fields: tuple[str, ...] = ()
    """ModelConfig fields that fix parameter shapes: a checkpoint with other values cannot be loaded."""
    supports_tp: bool = False
    """The model carries a tensor-parallel plan (transformers' `base_model_tp_plan`: module name patterns ->
    colwise / rowwise) that DeepSpeed's AutoTP applies; False: no tensor parallelism."""
    task: str = "causal_lm"
    """How a question/answer pair becomes a batch: `causal_lm` (`<bos> question <sep> answer <eos>` in one
    row, loss on the answer) or `seq2seq` (question to the encoder, answer as the decoder's labels)."""
    hf_model_types: tuple[str, ...] = ()
    """The `model_type`s of the HF folders this family continues training from (model.from_pretrained)."""
    hf_tokenizer_class: str = "PreTrainedTokenizerFast"
    """What AutoTokenizer builds from the export's sentencepiece tokenizer.model (data/tokenizer.py)."""
    expert_parallel: bool = False
    """Its experts can be split over data-parallel ranks (parallel.ep_degree); such a checkpoint holds one
    file per expert and resumes only on its own layout."""
    fixed_length: bool = False
    """Pad every question/answer micro-batch to model.max_seq_len: an MoE's expert capacity is counted
    per micro-batch, and expert-parallel ranks exchange buffers of that capacity, so every rank's
    micro-batch must hold the same number of tokens. (Packed rows always do.)"""

    def build(self, cfg, ids: TokenIds, device_type: str = "cpu") -> torch.nn.Module:
        raise NotImplementedError

    def load_hf(self, path: str | Path, device_type: str = "cpu", **placement) -> torch.nn.Module:
        """A model from a local `save_pretrained` folder, in fp32. `placement`: from_pretrained's
        device_map / max_memory / offload_folder, for a model larger than the memory allowed
        (megatrain eval/generate --max-memory)."""
        raise NotImplementedError

    def hf_modules(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """Submodules, by name, whose HF tensors are not their own state dict (an MoE layer whose experts sit
        on several ranks): megatrain/export.py asks hf_module_tensors for those. Default: none."""
        return {}

    def hf_module_tensors(self, name: str, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The HF tensors of one hf_modules entry, under full HF names, as host tensors, on rank 0; None on
        the other ranks. Every rank calls it for each entry in the same order (it may gather across ranks),
        with that module's own parameters whole (ZeRO-3 gathers them around the call)."""
        raise NotImplementedError

    def hf_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model under HF names, for a model whose parameters are whole on every rank (one process,
        or ZeRO 0-2): rank 0 gets it, the others None; None everywhere when the model's own state dict is
        already that (no hf_modules). A run's checkpoints stream instead (megatrain/export.py)."""
        units = self.hf_modules(model)
        if not units:
            return None
        import torch.distributed as dist

        is_main = not dist.is_initialized() or dist.get_rank() == 0
        state = ({k: v.detach() for k, v in model.state_dict().items() if not any(k.startswith(f"{n}.") for n in units)}
                 if is_main else None)
        for name, module in units.items():
            part = self.hf_module_tensors(name, module)
            if is_main:
                state.update(part)
        return state

    def save_hf(self, model: torch.nn.Module, out_dir: Path, state_dict: dict | None = None) -> None:
        """`model` as a `save_pretrained` folder; `state_dict` (whole, unsharded) replaces its own tensors."""
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)

    def flops_per_token(self, cfg, model: torch.nn.Module) -> float:
        """Training FLOPs per token from the *active* parameters (an MoE counts the experts a token uses)."""
        raise NotImplementedError

    def check_pretrained(self, cfg, ids: TokenIds):
        """Refuse, with one line, a model.from_pretrained folder of another family or another tokenizer
        than the data's (reads its config.json only).

        Returns:
            The folder's transformers config (None without model.from_pretrained), for a family's own checks.
        """
        if not cfg.from_pretrained:
            return None
        from transformers import AutoConfig

        folder = Path(cfg.from_pretrained)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.from_pretrained={folder}: no config.json there; give a folder written by "
                              "save_pretrained (a checkpoint's hf/ folder, or a downloaded model)")
        safetensors, bins = sorted(folder.glob("*.safetensors")), sorted(folder.glob("*.bin"))
        if not safetensors and not bins:
            raise ConfigError(f"model.from_pretrained={folder}: config.json but no weights there (model.safetensors, "
                              "or model-*.safetensors with model.safetensors.index.json); copy the whole folder "
                              "save_pretrained wrote")
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            missing = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())
                             - {f.name for f in safetensors})
            if missing:
                raise ConfigError(f"model.from_pretrained={folder}: {index.name} lists {len(missing)} weight file(s) "
                                  f"missing there ({', '.join(missing[:3])}); copy the whole folder")
        if not safetensors and bins and not cfg.allow_bin_weights:
            raise ConfigError(f"model.from_pretrained={folder} has its weights only as .bin files, which are pickles "
                              "that can run code when loaded; convert them to safetensors, or set "
                              "model.allow_bin_weights=true if you trust the folder")
        config = AutoConfig.from_pretrained(folder)
        if config.model_type not in self.hf_model_types:
            owner = next((f.name for f in families().values() if config.model_type in f.hf_model_types), None)
            hint = f"use model.family={owner}" if owner else f"no megatrain family trains {config.model_type}"
            raise ConfigError(f"model.from_pretrained={folder} holds a {config.model_type} model, which "
                              f"model.family={self.name} does not train; {hint}")
        vocab = config.get_text_config().vocab_size
        if ids.vocab_size > vocab or config.eos_token_id not in (None, ids.eos_id):
            model_file = next(iter(sorted(folder.glob("*.model"))), folder / "<its sentencepiece .model>")
            raise ConfigError(f"the data's tokenizer (vocab {ids.vocab_size}, eos {ids.eos_id}) is not the one of "
                              f"{folder} (vocab {vocab}, eos {config.eos_token_id}); build the shards with that "
                              f"folder's tokenizer (megatrain-data ... --tokenizer {model_file})")
        return config

    def check_parallel(self, cfg, dims) -> None:
        """Refuse, with one line, a parallel layout (the whole Config's, on ParallelDims) this family
        cannot train; the default refuses expert parallelism."""
        if cfg.parallel.ep_degree > 1:
            raise ConfigError(f"parallel.ep_degree={cfg.parallel.ep_degree}: model.family={self.name} has no experts; "
                              "use model.family=moe or parallel.ep_degree=1")

    def shard_experts(self, model: torch.nn.Module, cfg, dims, rank: int) -> torch.nn.Module:
        """Keep on this rank only its expert-parallel share of the experts (parallel/expert.py); the
        default has none to shard."""
        return model

    def deepspeed_config(self, cfg, dims) -> dict:
        """Sections this family adds to the derived DeepSpeed JSON (parallel/zero.py), e.g. AutoEP's."""
        return {}

    def check_tp(self, cfg, vocab_size: int, tp_degree: int) -> None:
        """Refuse, with one line, a tp_degree this model cannot be split by."""
        if tp_degree > 1 and not self.supports_tp:
            raise ConfigError(f"parallel.tp_degree={tp_degree}: model.family={self.name} has no tensor-parallel "
                              "plan; train it with parallel.tp_degree=1 (ZeRO shards it instead)")

    def inputs(self, model: torch.nn.Module, batch: dict) -> dict:
        """The model's keyword arguments for a training batch. The labels stay out (transformers would
        compute a mean loss of its own from a second fp32 copy of the logits); a seq2seq decoder reads
        them shifted right behind its start token, as transformers does when given labels. No KV cache
        in training: it costs memory, and with one transformers ignores the position ids that reset
        attention at document boundaries (find_packed_sequence_indices)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if self.task == "seq2seq":
            hf_model = getattr(model, "module", model)  # the DeepSpeed engine's module
            inputs["decoder_input_ids"] = hf_model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return {**inputs, "use_cache": False}

    def forward(self, model: torch.nn.Module, batch: dict) -> ModelOutput:
        return ModelOutput(model(**self.inputs(model, batch)).logits)

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        """Weight decay on matrices only, not on norms and biases (as nanoGPT)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def num_params(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


FAMILIES = {
    "llama": "megatrain.model.llama:LlamaFamily",
    "moe": "megatrain.model.moe:MoEFamily",
    "dropless_moe": "megatrain.model.dropless_moe:DroplessMoEFamily",
    "t5": "megatrain.model.t5:T5Family",
    "switch_t5": "megatrain.model.switch_t5:SwitchT5Family",
    "lstm": "megatrain.model.lstm:LSTMFamily",
}
"""name -> "module:class". Imported on first use: each family pulls its transformers modeling code, and the
MoE ones (Qwen3-MoE) take seconds to import, which every rank of every run would pay for nothing."""


def families() -> dict[str, ModelFamily]:
    return {name: family(name) for name in FAMILIES}


def family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"model.family={name!r}: known families are {', '.join(sorted(FAMILIES))}")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
