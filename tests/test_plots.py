"""plots.py: curves.png of a run, its title (a preset or a --model folder), its axes and legends."""
import json

import pytest

import plots


def write_run(path, cfg, rows):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def figure_of(path):
    fig = plots.curves_figure(path)
    fig.canvas.draw()
    return fig


def test_a_model_run_is_titled_by_its_model_and_a_flat_curve_shows_its_values(tmp_path):
    rows = [{"step": s, "reward": 0.5, "entropy": 11.918431 + 1e-7 * (s % 2)} for s in range(1, 6)]
    write_run(tmp_path / "run", {"algo": "grpo", "preset": None, "model": "my/model", "seed": 3}, rows)
    fig = figure_of(tmp_path / "run")
    try:
        assert fig._suptitle.get_text() == "grpo, model my/model, seed 3"
        for ax in fig.axes:
            assert ax.yaxis.get_offset_text().get_text() == "", ax.get_title()     # no "1e-6+1.19e1"
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert labels == ["per step"]                       # 5 steps: no "moving average of 1"
    finally:
        plots.pyplot().close(fig)


def test_a_lab_run_is_titled_by_its_preset_and_averages_over_a_tenth_of_its_steps(tmp_path):
    rows = [{"step": s, "reward": s / 40, "entropy": 1 - s / 40} for s in range(1, 41)]
    write_run(tmp_path / "run", {"algo": "steer", "preset": "tiny", "model": None, "seed": 0}, rows)
    fig = figure_of(tmp_path / "run")
    try:
        assert fig._suptitle.get_text() == "steer, preset tiny, seed 0"
        assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["per step",
                                                                                 "moving average of 4 steps"]
    finally:
        plots.pyplot().close(fig)


def test_moving_average():
    assert plots.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plots.moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_curves_are_smoothed_labelled_and_titled(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"algo": "steer", "preset": "tiny", "seed": 4}))
    rows = [{"step": 0, "eval/avg@2": 0.2, "eval/greedy_acc": 0.5}]
    rows += [{"step": s, "reward": 0.07 - 0.0001 * s, "entropy": None if s == 5 else 0.5} for s in range(1, 41)]
    rows[-1].update({"eval/avg@2": 0.3, "eval/greedy_acc": 0.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plots.curves_figure(tmp_path)
    assert fig._suptitle.get_text() == "steer, preset tiny, seed 4"
    reward, entropy, held_out, _ = fig.axes
    assert reward.get_xlabel() == "RL step" and reward.get_ylabel() == "mean reward"
    assert "entropy" in entropy.get_ylabel() and held_out.get_ylabel() == "accuracy"
    raw, smooth = reward.get_lines()
    assert len(raw.get_xdata()) == 40 and smooth.get_ydata()[-1] == pytest.approx(0.07 - 0.0001 * 38.5)
    assert len(entropy.get_lines()[0].get_xdata()) == 39                    # the null is skipped
    plots.plot_curves(tmp_path)
    assert (tmp_path / "curves.png").stat().st_size > 0
