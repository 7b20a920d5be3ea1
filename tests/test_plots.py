"""plots.py: curves.png of a run, its title (a preset or a --model folder), its axes and legends."""
import json

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
