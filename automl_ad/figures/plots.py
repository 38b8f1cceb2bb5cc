"""Plots people would rather look at than read: the accuracy / speed / memory trade-off of a search."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pareto_plot(trials: list[dict], ranks, path: str | Path, title: str = "Search trials") -> Path:
    """Quality vs throughput (log), marker area = peak memory, colour = family; the front is outlined and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = np.asarray(ranks)
    families = sorted({t["family"] for t in trials})
    colours = {f: plt.cm.tab10(i % 10) for i, f in enumerate(families)}
    memory = np.array([t["memory_mb"] for t in trials], float)
    sizes = 20 + 280 * (memory - memory.min()) / (np.ptp(memory) or 1.0)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family in families:
        idx = [i for i, t in enumerate(trials) if t["family"] == family]
        ax.scatter([trials[i]["throughput"] for i in idx], [trials[i]["quality"] for i in idx], s=sizes[idx],
                   color=colours[family], alpha=0.55, label=family,
                   edgecolors=["black" if ranks[i] == 0 else "none" for i in idx], linewidths=1.5)
    front = sorted((i for i in range(len(trials)) if ranks[i] == 0), key=lambda i: trials[i]["throughput"])
    ax.plot([trials[i]["throughput"] for i in front], [trials[i]["quality"] for i in front], "k--", lw=0.8,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("throughput, images/s (log)")
    ax.set_ylabel("validation quality")
    ax.set_title(f"{title}: marker area = peak memory ({memory.min():.0f}-{memory.max():.0f} MB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def quality_time_plot(points: list[tuple[float, float]], path: str | Path,
                      title: str = "Best validation quality so far") -> Path:
    """The anytime curve of a search: best validation quality (a step line) against seconds into the search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times, qualities = zip(*sorted(points))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.step(times, qualities, where="post", color="tab:blue")
    ax.plot(times, qualities, "o", color="tab:blue", ms=4)
    ax.set_xlabel("seconds into the search")
    ax.set_ylabel("best validation quality")
    ax.set_title(f"{title}: {qualities[-1]:.3f} at {times[-1]:.0f} s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
