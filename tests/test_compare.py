"""Tests of compare.py: resuming (finished runs are read, unfinished ones continue), the statistics, one
small end-to-end comparison through train.py subprocesses (about 20 s on 2 CPU cores), and the report over
synthetic finished run directories (no training): the written paths, the few-seeds note, zero-width
intervals, and curves.png's seed count and spread bands."""
import json
import math

import pytest

import compare
import toy_bandit


def fake_run(path, steps, done, checkpoint):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"steps": steps}))
    rows = [{"step": s} for s in range(done + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9')  # torn line
    if checkpoint:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "latest").write_text("step_000001")


def test_run_cell_skips_finished_resumes_unfinished_restarts_the_rest(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    fake_run(tmp_path / "done", steps=2, done=2, checkpoint=True)
    fake_run(tmp_path / "half", steps=2, done=1, checkpoint=True)
    fake_run(tmp_path / "fresh", steps=2, done=0, checkpoint=False)
    for name in ("done", "half", "fresh"):
        assert compare.run_cell(tmp_path / name, ["--algo", "grpo"], 3) == (tmp_path / name, 0)
    assert len(calls) == 2                                        # the finished run is not redone
    assert calls[0][-2:] == ["--resume", str(tmp_path / "half")]
    assert calls[1][2:8] == ["--out", str(tmp_path / "fresh"), "--threads", "3", "--measure-entropy-change", "--algo"]
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()   # never checkpointed: started again


def test_small_comparison_end_to_end_and_resume(tmp_path, monkeypatch):
    flags = ("--tiny-sft-steps 0 --prompts-per-step 2 --group-size 4 --max-new-tokens 4 "
             f"--eval-size 2 --eval-k 4 --eval-interval 1 --save-interval 1 --cache-dir {tmp_path / 'cache'}")
    argv = ["--algos", "grpo", "steer", "--seeds", "2", "--jobs", "2", "--out", str(tmp_path),
            "--train-flags", flags, "--steps", "2"]
    compare.main(argv)
    root = tmp_path / "default"
    data = json.loads((root / "results.json").read_text())
    assert set(data["summary"]) == {"start model", "grpo", "steer"} and len(data["runs"]["steer"]) == 2
    start = data["summary"]["start model"]["eval/pass@4"][0]
    assert start == pytest.approx(sum(r["eval/pass@4 start"] for r in data["runs"]["grpo"]) / 2)
    assert "entropy end" in data["summary"]["grpo"] and "eval/pass@4" in data["runs"]["grpo"][0]
    text = (root / "table.md").read_text()
    assert "| grpo |" in text and "| start model |" in text and "flow/pos_likely_exact" in text
    monkeypatch.setattr(compare.subprocess, "call", lambda *a, **k: pytest.fail("a finished run was redone"))
    compare.main(argv)                                           # every run finished: only the tables again


# --------------------------------------------------------------- synthetic finished runs (no training)
def synthetic_run(path, steps=4, entropy=0.5, pass_at=0.6, seed=0):
    """A finished run directory as train.py leaves it: config.json (steps) and metrics.jsonl, step 0 the start
    model's evaluation, every step an entropy, the last one an evaluation too."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"steps": steps, "seed": seed}))
    evals = {"eval/n": 4, "eval/avg@64": pass_at / 2, "eval/pass@64": pass_at, "eval/distinct": 1.0 + pass_at}
    rows = [{"step": 0, **{k: v - 0.1 * (k != "eval/n") for k, v in evals.items()}}]
    for s in range(1, steps + 1):
        row = {"step": s, "reward": 0.5, "entropy": entropy + 0.01 * s, "entropy/fork": 2 * entropy,
               "entropy/other": entropy / 2}
        rows.append({**row, **(evals if s == steps else {})})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def synthetic_lab(tmp_path, monkeypatch, values):
    """Synthetic finished runs {cell: [(entropy, pass@64) per seed]} and compare.main's argv for them; returns
    (root, argv). Nothing is trained: the warm start and train.py are stubbed out (a run that is redone fails)."""
    monkeypatch.setattr(compare.tiny_lab, "warm_start", lambda *a, **k: None)
    monkeypatch.setattr(compare.subprocess, "call", lambda *a, **k: pytest.fail("a finished run was redone"))
    root = tmp_path / "default"
    seeds = range(len(next(iter(values.values()))))
    for name, per_seed in values.items():
        for s, (ent, p) in zip(seeds, per_seed):
            synthetic_run(root / f"{name}-seed{s}", entropy=ent, pass_at=p, seed=s)
    argv = ["--algos", *values, "--seeds", str(len(seeds)), "--jobs", "1", "--out", str(tmp_path)]
    return root, argv


def test_main_prints_the_path_of_each_written_file(tmp_path, monkeypatch, capsys):
    root, argv = synthetic_lab(tmp_path, monkeypatch, {"grpo": [(0.5, 0.6), (0.6, 0.7), (0.55, 0.65)],
                                                       "steer": [(0.7, 0.6), (0.8, 0.7), (0.75, 0.65)]})
    compare.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    names = ("table.md", "results.json", "curves.png", "strips.png")
    assert lines[-4:] == [f"wrote {root / name}" for name in names]
    assert all((root / name).stat().st_size > 0 for name in names)


def test_few_seeds_are_flagged_above_the_table(tmp_path, monkeypatch):
    two = {"grpo": [(0.5, 0.6), (0.6, 0.7)], "steer": [(0.7, 0.6), (0.9, 0.7)]}
    root, argv = synthetic_lab(tmp_path / "two", monkeypatch, two)
    compare.main(argv)
    text = (root / "table.md").read_text()
    note = "2 seeds: the 95% intervals use t = 12.7 and are wide; use 5 or more seeds to decide a claim"
    assert note in text and text.index(note) < text.index("| run |")
    root, argv = synthetic_lab(tmp_path / "one", monkeypatch, {"grpo": [(0.5, 0.6)], "steer": [(0.9, 0.7)]})
    compare.main(argv)
    text = (root / "table.md").read_text()
    assert "1 seed: no confidence intervals and no paired tests" in text
    assert text.index("1 seed:") < text.index("| run |") and "Verdict" not in text
    three = {k: v + [v[0]] for k, v in two.items()}
    root, argv = synthetic_lab(tmp_path / "three", monkeypatch, three)
    compare.main(argv)
    text = (root / "table.md").read_text()
    assert "seeds:" not in text.split("| run |")[0]
    assert text.startswith("3 seeds, 4 steps; start / end: mean over steps 1-2 / 3-4; eval: the held-out sets at "
                           "step 4\n\n| run |")


def test_claims_of_the_setting_are_decided_on_seed_matched_differences(tmp_path, monkeypatch):
    """Three synthetic seeds: STEER's entropy is GRPO's + 0.1 + a seed-shared offset: unpaired intervals would
    overlap, the paired difference does not; the table and results.json carry the claim's rows."""
    per_seed = [0.3, 0.5, 0.7]                                   # a large seed effect shared by both cells
    root, argv = synthetic_lab(tmp_path, monkeypatch, {
        "grpo": [(e, 0.6) for e in per_seed], "steer": [(e + 0.1 + 0.001 * i, 0.6) for i, e in enumerate(per_seed)]})
    compare.main(argv)
    text = (root / "table.md").read_text()
    assert "**STEER: entropy stays stable where GRPO collapses** (`steer-stable`, default; paired over 3 seeds" in text
    row = next(line for line in text.splitlines() if line.startswith("| steer | grpo | entropy end (+)"))
    assert "+0.101 [" in row and row.endswith("| nan | reproduced |")     # no leverage logged: the effect decides
    decided = json.loads((root / "results.json").read_text())["claims"]["steer-stable"]
    entropy = next(t for t in decided["tests"] if t["metric"] == "entropy end")
    assert entropy["n"] == 3 and entropy["mean"] == pytest.approx(0.101) and entropy["p_holm"] < 0.05
    assert compare.mean_ci([0.625] * 3) == (0.625, 0.0) and compare.mean_ci([0.1] * 3) == (0.1, 0.0)


def test_curves_figure_names_the_seed_count_and_shades_the_spread():
    from matplotlib.collections import PolyCollection
    rows = {name: [synthetic_run_rows(entropy=e, pass_at=p) for e, p in per_seed]
            for name, per_seed in {"grpo": [(0.5, 0.6), (0.6, 0.7)], "steer": [(0.7, 0.5), (0.8, 0.9)]}.items()}
    fig = compare.curves_figure(rows)
    try:
        assert "mean over 2 seeds" in fig._suptitle.get_text()
        assert "min..max" in fig._suptitle.get_text()
        for ax in fig.axes:
            bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
            assert len(bands) == 2, ax.get_title()                # one band per cell in every panel
    finally:
        compare.plots.pyplot().close(fig)
    one = compare.curves_figure({"grpo": rows["grpo"][:1]})      # one seed: no spread to draw
    try:
        assert "1 seed" in one._suptitle.get_text() and not any(ax.collections for ax in one.axes)
    finally:
        compare.plots.pyplot().close(one)


def synthetic_run_rows(entropy, pass_at, steps=4):
    """The metrics rows of synthetic_run without a directory."""
    evals = {"eval/n": 4, "eval/avg@64": pass_at / 2, "eval/pass@64": pass_at, "eval/distinct": 1.0 + pass_at}
    return [{"step": 0, **evals}] + [{"step": s, "entropy": entropy + 0.01 * s, **(evals if s == steps else {})}
                                     for s in range(1, steps + 1)]


def test_every_setting_resolves_and_the_clip_regime_takes_eight_updates_at_half_the_lr():
    import config
    cfgs = {(setting, name): config.resolve(config.build_parser().parse_args(argv), log=lambda m: None)
            for setting, cells in compare.SETTINGS.items() for name, argv in cells.items()}
    regime = {name: cfg for (setting, name), cfg in cfgs.items() if setting == "clip-regime"}
    for name, cfg in regime.items():
        assert (cfg["updates_per_batch"], cfg["lr"]) == (8, config.PRESETS["tiny"]["lr"] / 2), name
    assert {"aspo", "ce-gppo", "archer-no-kl", "steer-extreme-exact", "grpo-extreme"} <= set(regime)
    extreme = regime["grpo-extreme"]
    assert (extreme["algo"], extreme["clip_low"], extreme["clip_high"]) == ("grpo", 0.99, 5.0)


def test_the_clip_table_gives_each_cells_clip_fractions_and_kl_over_steps():
    rows = synthetic_run_rows(entropy=0.5, pass_at=0.6)
    for r, (lo, kl) in zip(rows[1:], [(0.01, 1e-3), (0.02, 2e-3), (0.03, 3e-3), (0.06, 6e-3)]):
        r.update({"loss/clip_frac_low": lo, "loss/clip_frac_high": 0.0, "loss/approx_kl": kl})
    figures = compare.run_figures(rows)
    assert figures["loss/clip_frac_low"] == pytest.approx(0.03) and figures["loss/approx_kl"] == pytest.approx(3e-3)
    summary = compare.summarise({"grpo": [figures, {**figures, "loss/approx_kl": 5e-3}],
                                 "old": [compare.run_figures(synthetic_run_rows(0.5, 0.6))] * 2})
    text = compare.report(summary, 2, 4)
    clip = text.split("How often the clip binds")[1].split("\n\n")[1]
    assert clip.splitlines()[0] == "| run | loss/clip_frac_low | loss/clip_frac_high | loss/approx_kl |"
    assert clip.splitlines()[2] == ("| grpo | 3.00e-02 ± 0.00e+00 | 0.00e+00 ± 0.00e+00 | 4.00e-03 ± "
                                    f"{12.706 * math.sqrt(2e-6) / math.sqrt(2):.2e} |")
    assert len(clip.splitlines()) == 3                   # no row for the start model or a run without the metrics
    assert text.splitlines()[2].endswith("eval: the held-out sets at step 4")      # after the few-seeds note
    longer = compare.report(summary, 2, 4, longer={"old": 9}).splitlines()[2]     # dapo-generation's grpo-long
    assert longer.endswith("at step 4; old: 9 steps, its own windows and final evaluation")


def test_seeds_is_a_count_as_in_the_toy_and_steps_reaches_every_run(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(compare.tiny_lab, "warm_start", lambda *a, **k: None)
    monkeypatch.setattr(compare, "run_cell", lambda run_dir, args, threads: seen.append((run_dir.name, args))
                        or (synthetic_run(run_dir, steps=int(args[args.index("--steps") + 1])), (run_dir, 0))[1])
    compare.main(["--algos", "grpo", "--seeds", "3", "--steps", "30", "--jobs", "1", "--out", str(tmp_path)])
    assert [name for name, _ in seen] == ["grpo-seed0", "grpo-seed1", "grpo-seed2"]
    assert all(args[-4:] == ["--steps", "30", "--seed", str(s)] for s, (_, args) in enumerate(seen))
    text = (tmp_path / "default" / "table.md").read_text()
    assert text.startswith("3 seeds, 30 steps; start / end: mean over steps 1-10 / 21-30")
    with pytest.raises(SystemExit, match="--seeds must be >= 1, got 0"):
        compare.main(["--seeds", "0", "--out", str(tmp_path)])


def test_short_runs_get_windows_that_do_not_overlap():
    assert [compare.window(n) for n in (1, 2, 5, 19, 20, 100)] == [1, 1, 2, 9, 10, 10]
    rows = synthetic_run_rows(entropy=0.5, pass_at=0.6, steps=4)        # entropy 0.51, 0.52, 0.53, 0.54
    figures = compare.run_figures(rows)
    assert figures["entropy start"] == pytest.approx(0.515) and figures["entropy end"] == pytest.approx(0.535)


def test_ledger_reads_every_settings_results_and_the_toy(tmp_path, monkeypatch, capsys):
    """--ledger runs nothing: it reads SETTING/results.json under --out (and the toy's JSON) and prints the
    verdict tables with their sources' seeds and warm starts; without any, one line says so."""
    per_seed = [0.3, 0.5, 0.7]
    root, argv = synthetic_lab(tmp_path, monkeypatch, {
        "grpo": [(e, 0.6) for e in per_seed], "steer": [(e + 0.1 + 0.001 * i, 0.6) for i, e in enumerate(per_seed)]})
    compare.main(argv)
    capsys.readouterr()
    toy = tmp_path / "toy.json"
    toy_bandit.main(["--algos", "grpo", "--seeds", "2", "--steps", "3", "--json", str(toy)])
    stored = json.loads(toy.read_text())
    stored["claims"] = {}                       # the ledger decides anew from the per-seed figures
    toy.write_text(json.dumps(stored))
    capsys.readouterr()
    compare.main(["--ledger", "--out", str(root.parent), "--toy-json", str(toy)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Sources: default: 3 seeds, warm start ") and out[0].endswith(f"toy: 2 seeds ({toy})")
    assert "**STEER**" in out and any("`steer-stable`" in line and "| default |" in line for line in out)
    assert any("`opefo-flow`" in line and "| toy | grpo - 0, flow total (-) |" in line for line in out)
    with pytest.raises(SystemExit, match="no SETTING/results.json under"):
        compare.main(["--ledger", "--out", str(tmp_path / "empty")])
