"""What a run trains on, behind one interface: the trainer never asks which kind of data it holds.

Two kinds exist today: question/answer shards (`data.shards`, from `megatrain-data deepmind
shards`; loss on the answers) and a pretraining mixture of packed datasets (`data.sources`, from
`megatrain-data build`; loss on every token). Each gives the model's token ids, verifies its shards
against their manifests (spread over the ranks, one verdict for all), and makes the rank's loader,
whose batches have the same keys either way (input_ids, labels, real_tokens, and attention_mask,
position_ids or source where they apply).
"""

from __future__ import annotations

from megatrain.config import Config
from megatrain.data.loader import QALoader
from megatrain.data.mix_loader import MixtureLoader, open_mixture
from megatrain.data.packed import PackedDataset
from megatrain.data.shards import ShardSet
from megatrain.data.tokenizer import Tokenizer
from megatrain.errors import DataError
from megatrain.model import TokenIds, family
from megatrain.parallel.dims import BatchPlan, World
from megatrain.parallel.host import all_gather_object


def _everyone(found: list) -> list:
    """Every rank's findings, gathered on every rank, sorted (the same verdict everywhere)."""
    return sorted(f for part in all_gather_object(found) for f in part)


class QAData:
    """Question/answer shards (ShardSet): one stream, stratified over its modules."""

    def __init__(self, cfg: Config):
        self.cfg, self.shards = cfg, ShardSet(cfg.data.shards)
        self.tokenizer_path = self.shards.tokenizer_path
        tokenizer = Tokenizer(self.tokenizer_path)
        self.ids = TokenIds(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        self.family = family(cfg.model.family)
        if self.family.task == "causal_lm" and (tokenizer.sep_id is None or tokenizer.bos_id is None):
            raise DataError(f"{self.tokenizer_path} has no <sep> or <bos> piece, which model.family={cfg.model.family} "
                            "reads around the question; build the shards with megatrain-data's own tokenizer (no "
                            "--tokenizer), or train a seq2seq family (model.family=t5) on them")

    def verify(self, world: World) -> None:
        """Rank 0 hashes the shards (a Q/A set is small); a mismatch stops every rank."""
        found = []
        if world.is_main:
            try:
                self.shards.verify()
            except DataError as e:
                found.append(str(e))
        bad = _everyone(found)
        if bad:
            raise DataError(bad[0])

    def loader(self, world: World, plan: BatchPlan) -> QALoader:
        return QALoader(self.shards, self.cfg.run.seed, world.dp_rank, world.dp_size, plan.micro_batch_size,
                        self.cfg.model.max_seq_len, self.cfg.data.num_workers, plan.global_batch_size,
                        fixed_width=self.family.fixed_length, task=self.family.task)


class MixtureData:
    """A pretraining mixture: packed datasets by name, sampled by weight."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.datasets = open_mixture(cfg.data.sources, cfg.model.max_seq_len)
        first = self.datasets[sorted(self.datasets)[0]]  # open_mixture checked they share the tokenizer
        self.tokenizer_path = first.tokenizer_path
        self.ids = TokenIds(first.vocab_size, first.pad_id, first.manifest.get("bos_id"), first.eos_id)
        self.skipped: list[str] = []

    def verify(self, world: World) -> None:
        """Hash every shard, spread over the ranks. Bad shards stop the run under data.on_bad_shard=error;
        under skip they are left out (on every rank alike) and listed in self.skipped."""
        work = [(n, i) for n in sorted(self.datasets) for i in range(len(self.datasets[n].shards))]
        found = []
        for name, shard in work[world.rank::world.world_size]:
            try:
                if shard == 0:
                    self.datasets[name].verify_tokenizer()
                found += [("", name, *bad) for bad in self.datasets[name].find_bad_shards([shard])]
            except DataError as e:
                found.append((str(e), name, "", "", ""))
        bad = _everyone(found)
        fatal = [b for b in bad if b[0]]
        if fatal:
            raise DataError(fatal[0][0])
        if not bad:
            return
        if self.cfg.data.on_bad_shard == "error":
            _, name, shard, expected, actual = bad[0]
            raise DataError(f"shard {shard} of data.sources.{name} ({self.datasets[name].path}): sha256 mismatch "
                            f"(expected {expected}, got {actual}); {len(bad)} bad shard(s) in all. Rebuild it with "
                            "`megatrain-data build` (a rerun keeps intact shards), or set data.on_bad_shard=skip")
        self.skipped = [f"{name}/{shard}" for _, name, shard, _, _ in bad]
        if world.is_main:
            print(f"warning: skipping {len(bad)} shard(s) whose sha256 differs from the manifest: "
                  f"{', '.join(self.skipped)}", flush=True)
        self.datasets = {n: PackedDataset(d.path, exclude={s for _, m, s, _, _ in bad if m == n})
                         for n, d in self.datasets.items()}

    def loader(self, world: World, plan: BatchPlan) -> MixtureLoader:
        d = self.cfg.data
        return MixtureLoader(self.datasets, {n: s.weight for n, s in d.sources.items()}, self.cfg.run.seed,
                             world.dp_rank, world.dp_size, plan.micro_batch_size, plan.global_batch_size,
                             d.mixture_window, d.attention_reset, d.num_workers, self.skipped)


TrainingData = QAData | MixtureData


def open_data(cfg: Config) -> TrainingData:
    """The run's data, opened and checked for what needs no process group (manifests, tokenizer)."""
    if cfg.data.sources and family(cfg.model.family).task != "causal_lm":
        raise DataError(f"model.family={cfg.model.family} trains on question/answer shards (data.shards); packed "
                        "pretraining rows (data.sources) would need its span-corruption objective, which megatrain "
                        "does not have")
    return MixtureData(cfg) if cfg.data.sources else QAData(cfg)
