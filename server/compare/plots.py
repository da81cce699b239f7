"""The comparison's figures: metrics against rounds, and the Local-vs-Novel trade-off."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.compare.results import MethodResult

CURVES = {"local": "Local", "base": "Base", "novel": "Novel", "hm3": "HM3"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _curve(result: MethodResult, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounds every seed evaluated, and the mean and std over seeds there (in %)."""
    per_seed = [{row["round"]: row[metric] for row in s.curve if metric in row} for s in result.seeds]
    rounds = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    values = np.array([[p[r] for r in rounds] for p in per_seed], dtype=float) * 100
    if not rounds:
        return np.array([]), np.array([]), np.array([])
    return np.array(rounds), values.mean(axis=0), values.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(rounds))


def plot_curves(results: list[MethodResult], path: Path) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    last = max((row["round"] for r in results for s in r.seeds for row in s.curve), default=1)
    for ax, (metric, title) in zip(axes.flat, CURVES.items(), strict=True):
        for i, result in enumerate(results):
            rounds, mean, std = _curve(result, metric)
            if len(rounds) == 0:
                continue
            colour = f"C{i % 10}"
            if len(rounds) == 1:  # a method evaluated once (zero-shot): a level, not a curve
                ax.axhline(mean[0], color=colour, linestyle="--", label=result.method)
                ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=colour, alpha=0.12)
                continue
            ax.plot(rounds, mean, marker="o", color=colour, label=result.method)
            ax.fill_between(rounds, mean - std, mean + std, color=colour, alpha=0.18)
        ax.set_title(title)
        ax.set_ylabel("accuracy (%)")
        ax.set_xlim(0.8, last + 0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("round")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    fig.suptitle("Mean over seeds (shaded: ± one standard deviation)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tradeoff(results: list[MethodResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for i, result in enumerate(results):
        local, novel = result.values("local"), result.values("novel")
        if not local or len(local) != len(novel):
            continue
        colour = f"C{i % 10}"
        x, y = np.array(local) * 100, np.array(novel) * 100
        ax.scatter(x, y, color=colour, alpha=0.35, s=18)
        xerr, yerr = (x.std(ddof=1), y.std(ddof=1)) if len(x) > 1 else (0.0, 0.0)
        ax.errorbar(x.mean(), y.mean(), xerr=xerr, yerr=yerr, fmt="o", color=colour, capsize=3, markersize=8, label=result.method)
    ax.set_xlabel("Local accuracy (%): the client's own classes")
    ax.set_ylabel("Novel accuracy (%): unseen classes")
    ax.set_title("Personalisation vs generalisation (dots: seeds; bars: ± std)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
