"""Loss curves of a run as a PNG, from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from megatrain.files import atomic_binary_file
from megatrain.run_dir import RunDir


def save_loss_plot(run_dir: Path) -> Path | None:
    """Plot `loss` and every `loss/<source>` of the run's metrics.jsonl against the step, as loss.png.

    A resumed run appends to metrics.jsonl, so a step can appear twice (the part of a run redone
    after a requeue); the later line wins. Written atomically.

    Returns:
        The PNG's path, or None when the run has logged no loss yet.
    """
    # A Figure of its own draws with Agg: no display on cluster nodes, and no pyplot state to import.
    from matplotlib.figure import Figure

    run = RunDir(run_dir)
    metrics = run.metrics
    series: dict[str, dict[int, float]] = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if key == "loss" or key.startswith("loss/"):
                    series.setdefault(key, {})[record["step"]] = value
    if "loss" not in series:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.subplots()
    for key in ["loss", *sorted(k for k in series if k != "loss")]:
        steps = sorted(series[key])
        ax.plot(steps, [series[key][s] for s in steps], label="total" if key == "loss" else key[len("loss/"):],
                linewidth=2.2 if key == "loss" else 1.2, color="black" if key == "loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per label token)")
    ax.set_yscale("log")
    ax.set_title(Path(run_dir).name)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_binary_file(run.loss_plot) as file:
        fig.savefig(file, format="png")
    return run.loss_plot
