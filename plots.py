"""Figures: a run's curves.png (train.py --plot) and the matplotlib set-up the toy and compare.py share.

    python -c "import plots; plots.plot_curves('runs/tiny-grpo-seed0')"     # curves.png of a finished run
"""
import json
from pathlib import Path

import losses
from run_dir import read_jsonl


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def moving_average(values, window):
    """Trailing mean over the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _series(rows, key):
    """(steps, values) of `key` over the rows that hold a number for it (null, from a NaN, is skipped)."""
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def curves_figure(run_dir):
    """The figure of curves.png: reward and entropy per step (raw, faint, and a moving average over about a
    tenth of the steps), held-out avg@k and greedy accuracy at each evaluation, and the four-quadrant
    first-order entropy change per step (flow/<q>_exact, stacked: increases above 0, decreases below); a
    null value (a step without an update) is skipped. Titled with the algorithm, the preset (or model) and
    the seed of the run's config.json."""
    plt = pyplot()
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in rows if any(k.startswith("eval/avg@") for k in r)]
    train = [r for r in rows if "reward" in r]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, key, label in zip(axes, ("reward", "entropy"), ("mean reward", "mean token entropy (nats)")):
        steps, values = _series(train, key)
        window = max(1, len(values) // 10)
        ax.plot(steps, values, color="C0", alpha=0.3 if window > 1 else 1.0, lw=0.8, label="per step")
        if window > 1:
            ax.plot(steps, moving_average(values, window), color="C0", label=f"moving average of {window} steps")
        ax.set(title=key, xlabel="RL step", ylabel=label)
        ax.legend(fontsize=8)
    avg = next((k for k in evals[0] if k.startswith("eval/avg@")), None) if evals else None
    if avg:
        for key, marker, label in ((avg, "o", avg), ("eval/greedy_acc", "s", "greedy")):
            axes[2].plot(*_series(evals, key), marker=marker, label=label)
        axes[2].legend(fontsize=8)
    axes[2].set(title="held-out accuracy", xlabel="RL step", ylabel="accuracy")
    flow = [r for r in train if all(r.get(f"flow/{q}_exact") is not None for q in losses.QUADRANTS)]
    steps = [r["step"] for r in flow]
    up, down = [0.0] * len(flow), [0.0] * len(flow)
    for q in losses.QUADRANTS:
        values = [r[f"flow/{q}_exact"] for r in flow]
        base = [u if v >= 0 else d for v, u, d in zip(values, up, down)]
        axes[3].bar(steps, values, bottom=base, label=q, width=0.8)
        up = [u + max(v, 0.0) for v, u in zip(values, up)]
        down = [d + min(v, 0.0) for v, d in zip(values, down)]
    if flow:
        axes[3].plot(steps, [r["flow/total_exact"] for r in flow], color="k", marker=".", label="total")
        axes[3].legend(fontsize="x-small", ncol=2)
    axes[3].axhline(0.0, color="grey", linewidth=0.5)
    axes[3].set(title="first-order entropy change by quadrant", xlabel="RL step", ylabel="first-order dH (nats)")
    for ax in axes:
        ax.ticklabel_format(axis="y", useOffset=False)       # a flat curve: its values, not "1e-6+1.19e1"
    source = f"model {cfg['model']}" if cfg.get("model") else f"preset {cfg.get('preset')}"
    fig.suptitle(f"{cfg['algo']}, {source}, seed {cfg['seed']}")
    fig.tight_layout()
    return fig


def plot_curves(run_dir):
    """Write curves.png (curves_figure) into the run directory."""
    fig = curves_figure(run_dir)
    fig.savefig(Path(run_dir) / "curves.png", dpi=100)
    pyplot().close(fig)
