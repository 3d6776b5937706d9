"""Weighted mixtures of datasets as pure functions of (seed, global sample index).

Stratified, not sampled: the stream is cut into windows of `window_samples` consecutive global
samples (a whole number of global batches), and every window holds exactly `quotas[s]` samples of
source s, the largest-remainder apportionment of the window to the weights. The proportions are
therefore exact in every window (exactly the weights whenever window_samples x weight is whole;
otherwise within one sample per window). Inside a window the slots are shuffled, so every rank and
micro-batch gets a mix. The j-th sample a source contributes overall is that source's own global
index j, which its `SampleOrder` turns into a row; small sources simply run more epochs.

A run can change weights when it resumes (a next data stage): the new `Stage` starts at the
consumed sample count and each source continues from the samples it had already given.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from megatrain.errors import ConfigError


def quotas(weights: dict[str, float], window_samples: int) -> dict[str, int]:
    """Samples per window for each source: largest remainder of `window_samples` by weight.

    Ties go to the source that sorts first by name, so the result is the same on every rank.

    Raises:
        ConfigError: A weight is not positive, or a source would get no sample in a window.
    """
    for name, weight in weights.items():
        if not weight > 0:
            raise ConfigError(f"data.sources.{name}.weight={weight}: weights must be positive; "
                              "drop the source to leave it out")
    names = sorted(weights)
    total = sum(weights[n] for n in names)
    exact = np.array([weights[n] / total * window_samples for n in names])
    counts = np.floor(exact).astype(np.int64)
    remainder = exact - counts
    extra = window_samples - int(counts.sum())
    # stable sort on -remainder: equal remainders keep name order
    for i in np.argsort(-remainder, kind="stable")[:extra]:
        counts[i] += 1
    result = dict(zip(names, counts.tolist()))
    starved = [n for n, c in result.items() if c == 0]
    if starved:
        raise ConfigError(f"data.sources.{starved[0]}.weight={weights[starved[0]]} gets no sample in a mixture "
                          f"window of {window_samples} samples; raise data.mixture_window (global batches per "
                          "window) or the weight")
    return result


def source_seed(seed: int, name: str) -> tuple[int, int]:
    """Each source's own shuffle seed: independent of the other sources and of their order."""
    return seed, zlib.crc32(name.encode())


@dataclass(frozen=True)
class Stage:
    """One stretch of the stream with fixed weights.

    Attributes:
        start_sample: Global sample index where this stage begins (a step boundary).
        window_samples: Samples per stratification window.
        quotas: Samples per window for each source.
        offsets: Samples each source had given before start_sample.
    """

    start_sample: int
    window_samples: int
    quotas: dict[str, int]
    offsets: dict[str, int]

    def to_dict(self) -> dict:
        return {"start_sample": self.start_sample, "window_samples": self.window_samples,
                "quotas": dict(self.quotas), "offsets": dict(self.offsets)}

    @classmethod
    def from_dict(cls, d: dict) -> Stage:
        return cls(int(d["start_sample"]), int(d["window_samples"]), {k: int(v) for k, v in d["quotas"].items()},
                   {k: int(v) for k, v in d["offsets"].items()})


class Mixture:
    """Maps global sample indices of one stage to (source name, that source's sample index)."""

    def __init__(self, stage: Stage, seed: int):
        self.stage, self.seed = stage, seed
        self.names = sorted(stage.quotas)
        q = np.array([stage.quotas[n] for n in self.names], dtype=np.int64)
        assert q.sum() == stage.window_samples, "quotas must fill the window"
        self._quota = q
        # slot -> source position in self.names; a window's slots are shuffled per (stage, window)
        self._slot_source = np.repeat(np.arange(len(q)), q)
        self._offset = np.array([stage.offsets.get(n, 0) for n in self.names], dtype=np.int64)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # One source: every window is all of it, in order; no shuffle to draw per window.
        self._one_source = ((np.zeros(stage.window_samples, np.int64), np.arange(stage.window_samples))
                            if len(q) == 1 else None)

    def _window(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Per position in a window: its source, and how many earlier positions have that source."""
        if self._one_source is not None:
            return self._one_source
        cached = self._cache.get(window)
        if cached is None:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            rng = np.random.default_rng([self.seed, self.stage.start_sample, window])
            sources = self._slot_source[rng.permutation(self.stage.window_samples)]
            # Numbering each source's positions in stream order keeps every prefix of the stream a
            # prefix of each source, so a stage can also begin in the middle of a window.
            rank = np.empty_like(sources)
            for s in range(len(self.names)):
                here = sources == s
                rank[here] = np.arange(int(here.sum()))
            cached = self._cache[window] = (sources, rank)
        return cached

    def locate(self, global_indices) -> tuple[np.ndarray, np.ndarray]:
        """(source positions in `names`, per-source sample indices) for global sample indices of this stage."""
        g = np.asarray(global_indices, dtype=np.int64) - self.stage.start_sample
        assert (g >= 0).all(), "index before the stage's start"
        windows, positions = np.divmod(g, self.stage.window_samples)
        if windows.size and windows.min() == windows.max():  # one window: most micro-batches
            window_sources, window_rank = self._window(int(windows[0]))
            sources = window_sources[positions]
            return sources, self._offset[sources] + windows * self._quota[sources] + window_rank[positions]
        sources, inside = np.empty_like(g), np.empty_like(g)
        for window in np.unique(windows):
            here = windows == window
            window_sources, window_rank = self._window(int(window))
            sources[here], inside[here] = window_sources[positions[here]], window_rank[positions[here]]
        return sources, self._offset[sources] + windows * self._quota[sources] + inside

    def consumed(self, global_sample: int) -> dict[str, int]:
        """Samples each source has given once the stream reaches `global_sample` (exclusive)."""
        g = global_sample - self.stage.start_sample
        windows, position = divmod(g, self.stage.window_samples)
        partial = np.bincount(self._window(windows)[0][:position],
                              minlength=len(self.names)) if position else np.zeros(len(self.names), np.int64)
        counts = self._offset + windows * self._quota + partial
        return dict(zip(self.names, counts.tolist()))
