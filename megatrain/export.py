"""The Hugging Face export: a model as a `save_pretrained` folder, written a module at a time.

In a run (`export_hf`, called by the Checkpointer on every rank). Every rank walks the model in the
same order, one module at a time. For each module:
- it gathers that module's ZeRO-3 partitions (`deepspeed.zero.GatheredParameters`, modifier_rank=None)
  and its AutoTP slices (DeepSpeed's `GatherReplacedLayerParams`, inside the ZeRO gather, as DeepSpeed's
  own `_zero3_consolidated_16bit_state_dict` nests them);
- rank 0 copies the whole tensors to its host memory;
- the partitions are released before the next module.
So no rank's device holds more than one gathered module (one layer's matrices, or one MoE layer's
experts), where gathering the whole model put all of it on every rank's device: 68 GB of bf16 per GPU
for a 34B model, exactly when ZeRO-3 is needed.

Rank 0 writes safetensors shards of at most SHARD_BYTES as they fill (ShardWriter), in the layout
`save_pretrained` writes: `model.safetensors` when one shard holds everything, else
`model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`. So its host memory holds at most
one shard plus one module, never the whole state dict (a 34B model's 68 GB beside 7 other ranks' host
buffers and, with optimizer offload, their Adam states). The tensors and names are save_pretrained's:
tied weights written once under the name transformers keeps, and its weight conversions reverted per
module (Qwen3-MoE's fused experts become per-expert matrices), both checked against save_pretrained in
tests/test_export.py.

Offline (`export_checkpoint`, the `megatrain export` command): one CPU process, no process group, reads
a DeepSpeed checkpoint through DeepSpeed's own readers and writes the same folder:
- ZeRO-0: the model file (`mp_rank_00_model_states.pt`) holds the whole module;
- ZeRO 1-3 at tp_degree 1: `zero_to_fp32` in lazy mode (the optimizer files memory-mapped, each
  ZeRO-3 parameter assembled when it is written; ZeRO 1/2 concatenate each parameter group's flat
  fp32 partitions, the whole fp32 model in host memory: DeepSpeed's reader does that);
- tp_degree > 1: DeepSpeed's universal checkpoint (`ds_to_universal`, one fp32 file per parameter,
  TP slices and ZeRO partitions merged), converted into a temporary folder beside the output (about
  3x the fp32 model on disk: it also writes the Adam moments) or read from the checkpoint's own
  `universal/` when a resume already converted it.
The fp32 master weights are cast to the precision the run trained in, which is what the live 16-bit
weights are after every step, so the tensors equal the in-run export's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from megatrain.data.tokenizer import Tokenizer, hf_tokenizer_config
from megatrain.errors import CheckpointError
from megatrain.files import atomic_write_text
from megatrain.model import ModelFamily, family
from megatrain.parallel.dims import World
from megatrain.parallel.zero import gathered_params, tp_gathered_params

HF_DIR = "hf"
"""The whole model as a save_pretrained folder, in checkpoints that checkpoint.hf_export gives one."""
HF_CONFIG_DIR = "hf_config"
"""In every checkpoint: the HF folder's files but the weights (config.json, generation_config.json, the
tokenizer files; a few KB), from which `megatrain export` writes the folder without the run."""
SHARD_BYTES = 5 * 2**30
"""Largest safetensors shard rank 0 holds before writing it (what transformers 4.x and the Hub use; one
tensor larger than this gets a shard of its own)."""
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def hf_weights_due(hf_export: str, last: bool) -> bool:
    """Whether a checkpoint gets `hf/`: checkpoint.hf_export `every`, or `last` for the last checkpoint
    a process writes (its final step, or a stop: exit_interval, a signal, the non-finite guard)."""
    return hf_export == "every" or (hf_export == "last" and last)


# ----------------------------------------------------------------------------- writing

class ShardWriter:
    """Writes tensors into safetensors shards as they come, closing a shard before it would pass
    `max_bytes`; `close()` gives them save_pretrained's names and writes the index when there are several."""

    def __init__(self, out_dir: Path, max_bytes: int = SHARD_BYTES):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes  # the folder is made by the first write
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # the names in each written shard
        self.total_bytes = self.total_numel = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + nbytes > self.max_bytes:
                self._flush()
            assert name not in self.pending and not any(name in s for s in self.shards), f"{name} written twice"
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += nbytes
            self.total_bytes += nbytes
            self.total_numel += tensor.numel()

    def _part(self, index: int) -> Path:
        return self.out_dir / f".part-{index:05d}.safetensors"

    def _flush(self) -> None:
        from safetensors.torch import save_file

        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_file(self.pending, str(self._part(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self._part(0).rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            file = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            self._part(i).rename(self.out_dir / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_parameters": self.total_numel, "total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(self.out_dir / "model.safetensors.index.json",
                          json.dumps(index, indent=2, sort_keys=True) + "\n")


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor of its own: a CPU tensor is copied too, since a gathered partition's memory may be
    released or reused once the gather ends."""
    return tensor.detach().to("cpu", copy=True)


def revert_conversions(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors under the names and layout a save_pretrained folder holds (transformers reverts its
    load-time conversions on save, e.g. Qwen3-MoE's fused experts into per-expert matrices). Applied to
    one module's tensors at a time, as save_pretrained itself does for offloaded models: every conversion
    of our families stays within one module."""
    from transformers import PreTrainedModel
    from transformers.core_model_loading import revert_weight_conversion

    if not tensors or not isinstance(model, PreTrainedModel):
        return tensors
    return dict(revert_weight_conversion(model, tensors))


def tied_duplicates(names_by_tensor: Iterable[list[str]], model: torch.nn.Module) -> set[str]:
    """The names save_pretrained leaves out: of the names sharing one tensor, those the model declares
    tied (`all_tied_weights_keys`, e.g. a tied `lm_head.weight`), keeping at least one."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    dropped = set()
    for names in names_by_tensor:
        if len(names) > 1:
            declared = [n for n in sorted(names) if n in tied]
            dropped.update(declared[: len(names) - 1] if len(declared) == len(names) else declared)
    return dropped


def write_hf_files(model: torch.nn.Module, out_dir: Path, tokenizer_path: Path | None,
                   model_family: ModelFamily) -> None:
    """Everything of the HF folder but the weights: config.json and generation_config.json as
    save_pretrained writes them (dtype and architectures set from the model), and the tokenizer files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    if tokenizer_path is None:
        return
    if tokenizer_path.is_dir():  # a dataset's tokenizer/ folder (sentencepiece or HF files)
        for file in sorted(tokenizer_path.iterdir()):
            shutil.copyfile(file, out_dir / file.name)
    else:
        shutil.copyfile(tokenizer_path, out_dir / "tokenizer.model")
    if (out_dir / "tokenizer.model").is_file() and not (out_dir / "tokenizer_config.json").is_file():
        tokenizer_config = hf_tokenizer_config(Tokenizer(out_dir / "tokenizer.model"), model_family.hf_tokenizer_class)
        atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2))


# ----------------------------------------------------------------------------- in a run

def hf_chunks(model: torch.nn.Module, model_family: ModelFamily, is_main: bool,
              on_gathered: Callable[[], None] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The model's HF tensors one module at a time, on the host of rank 0 (empty dicts elsewhere).

    Every rank must iterate it to the end, in step: each module's gathers are collectives. The family's
    `hf_modules` (an MoE layer with experts on several ranks) come as one chunk each, from
    `hf_module_tensors`; every other module gives its own parameters and persistent buffers.

    Args:
        on_gathered: called while each module's parameters are gathered (bench/zero_memory.py measures there).
    """
    observe = on_gathered or (lambda: None)
    units = model_family.hf_modules(model)
    names_by_param = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param[id(param)].append(name)
    ignored = set(getattr(model, "_keys_to_ignore_on_save", None) or ())  # as save_pretrained
    dropped = tied_duplicates(names_by_param.values(), model) | ignored

    def visit(module: torch.nn.Module, prefix: str) -> Iterator[dict[str, torch.Tensor]]:
        if prefix[:-1] in units:
            with gathered_params(module):  # an MoE layer: its router and this rank's experts
                observe()
                chunk = model_family.hf_module_tensors(prefix[:-1], module)
            yield chunk if is_main else {}
            return
        own = [(prefix + n, p) for n, p in module.named_parameters(recurse=False) if prefix + n not in dropped]
        params = [p for _, p in own]
        chunk = {}
        with gathered_params(params), tp_gathered_params(params, module):
            observe()
            if is_main:
                chunk.update((name, host_copy(p)) for name, p in own)
                chunk.update((prefix + n, host_copy(b)) for n, b in module.named_buffers(recurse=False)
                             if b is not None and n not in module._non_persistent_buffers_set)
        yield chunk
        for name, child in module.named_children():
            yield from visit(child, f"{prefix}{name}.")

    yield from visit(model, "")


def export_hf(engine, model_family: ModelFamily, out_dir: Path, world: World, tokenizer_path: Path | None,
              max_shard_bytes: int = SHARD_BYTES, on_gathered: Callable[[], None] | None = None) -> None:
    """Write the whole model as an HF folder from rank 0, streamed module by module (see the module
    docstring); every rank must call it. on_gathered: as hf_chunks'."""
    model = engine.module
    # ZeRO-3's optimizer (only it has these; DeepSpeed calls them around its own consolidation): release
    # every parameter still gathered or in flight (an eval's prefetch, which a gather cannot end on),
    # and afterwards gather the small persistent ones again.
    optimizer = getattr(engine, "optimizer", None)
    prologue, epilogue = (getattr(optimizer, f"checkpoint_event_{e}", None) for e in ("prologue", "epilogue"))
    if callable(prologue):
        prologue()
    # A failed write on rank 0 (a full disk) must not take it out of the walk: the other ranks would wait
    # in the next module's gather. It goes on gathering, writes nothing more, and raises at the end.
    writer = ShardWriter(out_dir, max_shard_bytes) if world.is_main else None
    failure = None
    for chunk in hf_chunks(model, model_family, world.is_main, on_gathered):
        if writer is not None and failure is None:
            failure = _attempt(lambda chunk=chunk: writer.add(revert_conversions(model, chunk)))
    if callable(epilogue):
        epilogue()
    if writer is not None and failure is None:
        failure = _attempt(lambda: (writer.close(), write_hf_files(model, out_dir, tokenizer_path, model_family)))
    _raise(failure, out_dir)


def _attempt(write: Callable[[], object]) -> Exception | None:
    """Run `write`; the exception it raised, kept for later (see export_hf), or None."""
    try:
        write()
    except Exception as error:  # noqa: BLE001 -- re-raised by _raise once the collectives are done
        return error
    return None


def _raise(failure: Exception | None, where: Path) -> None:
    """Raise a failure _attempt kept, as what Checkpointer reports as a failed write: OSError or RuntimeError
    (then naming the free space)."""
    if failure is None:
        return
    if isinstance(failure, (OSError, RuntimeError)):
        raise failure
    raise OSError(f"writing {where}: {failure}") from failure  # safetensors raises its own error type


def checkpoint_export(engine, model_family: ModelFamily, step_dir: Path, world: World, tokenizer_path: Path,
                      weights: bool) -> None:
    """A checkpoint's HF side: `hf_config/` always (rank 0; a few KB), `hf/` with the weights when
    `weights` (every rank must call it then, with the same `weights`; a failed write raises only after the
    collectives, on the rank it happened on)."""
    failure = None
    if world.is_main:
        failure = _attempt(lambda: write_hf_files(engine.module, step_dir / HF_CONFIG_DIR, tokenizer_path,
                                                  model_family))
    if weights:
        export_hf(engine, model_family, step_dir / HF_DIR, world, tokenizer_path)
    _raise(failure, step_dir / HF_CONFIG_DIR)


# ----------------------------------------------------------------------------- offline: megatrain export

def find_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint folder from a run folder (its `latest`, or `checkpoints/step_<step>`), a checkpoints/
    folder, or a step folder itself.

    Raises:
        CheckpointError: no such checkpoint.
    """
    from megatrain.run_dir import RunDir

    path = Path(path)
    if (path / "trainer.json").is_file() and step is None:
        return path
    for run in (RunDir(path), RunDir(path.parent)):
        if path not in (run.root, run.checkpoints):
            continue
        if step is not None:
            found = run.step_dir(step)
            if not found.is_dir():
                have = ", ".join(str(s) for s, _ in run.step_dirs()) or "none"
                raise CheckpointError(f"{found} does not exist (checkpoints of {run.root}: steps {have}); "
                                      "pass --step with one of those")
            return found
        if run.has_checkpoint():
            return run.latest()
    raise CheckpointError(f"{path} is not a megatrain run folder with checkpoints, nor a checkpoint folder; pass "
                          "a run folder (with --step N for another checkpoint than its latest) or checkpoints/step_<N>")


def require_hf(path: str | Path) -> None:
    """Refuse, naming the fix, a checkpoint without hf/ where a command reads the HF folder (eval, generate)."""
    try:
        step_dir = find_checkpoint(path)
    except CheckpointError:
        return  # not a checkpoint at all: the caller says so
    if not (step_dir / HF_DIR).is_dir():
        raise CheckpointError(f"{step_dir} holds no {HF_DIR}/ folder (checkpoint.hf_export writes it only into the "
                              f"checkpoints it names); write it with `megatrain export {step_dir} --out "
                              f"{step_dir / HF_DIR}` and run this again")


def _state_key(tensor) -> tuple | int:
    """What identifies one tensor in a reader's state dict, so that aliases (tied weights) are found:
    its storage for real tensors (torch.load gives aliases their own objects), else the object."""
    if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
        return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
    return id(tensor)


class _Universal(dict):
    """A universal checkpoint's `zero/<name>/fp32.pt` files as a lazy state dict (name -> path)."""

    def __init__(self, folder: Path):
        files = (p / "fp32.pt" for p in sorted((folder / "zero").iterdir()))
        super().__init__((f.parent.name, f) for f in files if f.is_file())

    @staticmethod
    def load(path: Path) -> torch.Tensor:
        return torch.load(path, map_location="cpu", weights_only=True)["param"]


def _deepspeed_state(step_dir: Path, zero_stage: int, tp: int, scratch: Path, workers: int
                     ) -> tuple[dict, Callable[[object], torch.Tensor]]:
    """(name -> lazy tensor, how to materialize one) for the training module's parameters and buffers."""
    from megatrain.checkpoint import UNIVERSAL, deepspeed_pickle_types

    if tp > 1:
        universal = step_dir / UNIVERSAL
        if not (universal / "zero").is_dir():
            universal = scratch / "universal"
            result = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
                 "--output_folder", str(universal), "--inject_missing_state", "--num_extract_workers", str(workers),
                 "--num_merge_workers", str(workers)], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise CheckpointError(f"DeepSpeed's universal-checkpoint conversion of {step_dir} (tp_degree={tp}) "
                                      f"failed: {last}")
        state = _Universal(universal)
        # A shared parameter's other names (a tied LM head): the universal checkpoint leaves some out and
        # writes others as one TP rank's unmerged slice (measured with ZeRO-1 x TP 2), so they are taken
        # from the parameter they alias, as DeepSpeed's model file records them.
        model_file = min(step_dir.glob("*mp_rank_00_model_states.pt"))
        with torch.serialization.safe_globals(deepspeed_pickle_types()):
            shared = torch.load(model_file, map_location="cpu", mmap=True, weights_only=True).get("shared_params", {})
        for alias, source in shared.items():
            if source in state:
                state[alias] = state[source]
        return state, _Universal.load
    if zero_stage == 0:
        with torch.serialization.safe_globals(deepspeed_pickle_types()):
            states = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True,
                                weights_only=True)
        return states["module"], lambda t: t
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout carries the command's answer
        state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name, lazy_mode=True)
    return state, lambda t: t.contiguous()


def _skeleton(hf_files: Path) -> torch.nn.Module:
    """The HF model of a folder's config.json, on the meta device: its names, tied weights and
    conversions, no memory."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(hf_files)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise CheckpointError(f"{hf_files / 'config.json'} names no transformers model class (architectures="
                              f"{config.architectures}); it was not written by megatrain")
    with torch.device("meta"):
        return model_class(config)


def export_checkpoint(step_dir: Path, out_dir: Path, workers: int = 1, max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Write checkpoint `step_dir`'s model as an HF folder at `out_dir`, on this one process.

    Raises:
        CheckpointError: a damaged or untrusted checkpoint, an output folder in the way, a layout the
            DeepSpeed readers cannot read (expert files).
    """
    from megatrain.checkpoint import check_pickles, damage, saved_config, saved_layout

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"--out {out_dir} exists and is not empty; give a new folder (nothing was written)")
    problem = damage(step_dir)
    if problem:
        raise CheckpointError(f"checkpoint {step_dir} is damaged ({problem}); export another one (--step)")
    hf_files = next((d for d in (step_dir / HF_CONFIG_DIR, step_dir / HF_DIR) if (d / "config.json").is_file()), None)
    if hf_files is None:
        raise CheckpointError(f"{step_dir} has neither {HF_CONFIG_DIR}/ nor {HF_DIR}/ (config and tokenizer files); "
                              "it was not written by megatrain")
    config = saved_config(step_dir)
    model_family = family(config.get("model", {}).get("family", "llama"))
    _, tp, _ = saved_layout(step_dir)
    zero_stage = int(config.get("parallel", {}).get("zero_stage", 2))
    if model_family.expert_parallel:
        # DeepSpeed 0.19.8: zero_to_fp32 stops at the MoE layer's per-expert files ("layer_0_expert_0_mp_rank_00_
        # model_states.pt is not a model state checkpoint", measured on a model.family=moe checkpoint),
        # ds_to_universal fails on them too (megatrain/resume_policy.py), and zero_to_fp32 refuses AutoEP's
        # ZeRO-3 expert partitions by design (_raise_if_autoep_zero3_partitioned_state; not measured here).
        raise CheckpointError(f"megatrain export cannot read model.family={model_family.name} checkpoints (DeepSpeed's "
                              "checkpoint readers do not read expert files); keep checkpoint.hf_export=last or every "
                              "in such runs, so that the checkpoints you need carry hf/")
    if zero_stage == 0 and tp > 1:
        # Each TP rank's model file holds its slices, and DeepSpeed's universal-checkpoint converter (the
        # reader that joins TP slices) needs ZeRO optimizer files, which ZeRO-0 does not write.
        raise CheckpointError(f"megatrain export cannot join the tensor-parallel slices of a ZeRO-0 checkpoint "
                              f"({step_dir}: tp_degree={tp}); keep checkpoint.hf_export=last or every in such runs, "
                              "or train with parallel.zero_stage 1-3")
    check_pickles(step_dir)  # DeepSpeed's readers unpickle without restriction
    skeleton = _skeleton(hf_files)
    dtype = getattr(torch, skeleton.config.dtype) if isinstance(skeleton.config.dtype, str) else skeleton.config.dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    scratch = out_dir.parent / f".tmp-{out_dir.name}-universal"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        state, materialize = _deepspeed_state(step_dir, zero_stage, tp, scratch, workers)
        expected = skeleton.state_dict()  # names and shapes, on the meta device
        tied = getattr(skeleton, "all_tied_weights_keys", None) or {}
        missing = [n for n in expected if n not in state and tied.get(n) not in state]
        if missing:
            raise CheckpointError(f"{step_dir} holds no {missing[0]} (and {len(missing) - 1} more) that "
                                  f"{type(skeleton).__name__} needs; it is not this config's checkpoint")
        by_tensor = defaultdict(list)
        for name in expected:
            if name in state:
                by_tensor[_state_key(state[name])].append(name)
        # An absent tied target is an alias its reader did not repeat (the universal checkpoint writes a
        # shared parameter once): save_pretrained leaves those out too.
        dropped = (tied_duplicates(by_tensor.values(), skeleton) | {n for n in expected if n not in state}
                   | set(getattr(skeleton, "_keys_to_ignore_on_save", None) or ()))
        writer = ShardWriter(tmp, max_shard_bytes)
        for _, names in _by_module(n for n in expected if n not in dropped):
            chunk = {}
            for name in names:
                tensor = materialize(state[name])
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise CheckpointError(f"{step_dir}: {name} has shape {tuple(tensor.shape)}, the config's model "
                                          f"{tuple(expected[name].shape)}; it is not this config's checkpoint")
                chunk[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            writer.add(revert_conversions(skeleton, chunk))
        writer.close()
        for file in sorted(hf_files.iterdir()):  # config, generation config, tokenizer files
            if file.is_file() and not any(file.match(w) for w in WEIGHT_FILES):
                shutil.copyfile(file, tmp / file.name)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _by_module(names: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """Consecutive names grouped by their module (everything before the last dot)."""
    current, group = None, []
    for name in names:
        prefix = name.rpartition(".")[0]
        if group and prefix != current:
            yield current, group
            group = []
        current = prefix
        group.append(name)
    if group:
        yield current, group
