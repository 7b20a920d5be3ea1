"""Tests for toy_bandit.py (budget: the whole file well under 40 s on 2 CPU cores)."""
import functools
import json
import math

import pytest
import torch

import evaluation
import losses
import toy_bandit
from toy_bandit import Config

SHORT = Config(steps=25)          # enough steps for learning to start, fast


@pytest.fixture(autouse=True)
def _one_thread():
    """The toy's tensors are tiny: one thread is fastest, and extra threads spin on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_task_has_documented_h_star_and_correct_sets():
    correct, init, variants, h_star = toy_bandit.make_task(Config(), torch.Generator().manual_seed(0))
    assert correct.sum(-1).tolist() == [4, 1, 4, 1, 4, 1]           # forks at even positions, K // 2 correct
    assert h_star == pytest.approx(3 * math.log(4) / 6)
    assert init.shape == (6, 8)
    # variants keep 2 of the 4 correct fork tokens and never accept a token the task rejects
    assert variants.shape == (64, 6, 8)
    assert variants[:, 0::2].sum(-1).eq(2).all() and variants[:, 1::2].sum(-1).eq(1).all()
    assert not (variants & ~correct).any()
    # biased toward the correct tokens, but rewards are not always 1
    acc = toy_bandit.exact_accuracy(init, correct).item()
    assert 0.05 < acc < 0.5


def test_pass_at_k_unbiased_estimator_hand_values():          # evaluation.pass_at_k, the lab's too
    assert evaluation.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert evaluation.pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)     # 1 - C(2,2)/C(4,2)
    assert evaluation.pass_at_k(10, 0, 4) == 0.0
    assert evaluation.pass_at_k(10, 10, 4) == 1.0
    with pytest.raises(ValueError, match="pass@16"):
        evaluation.pass_at_k(8, 3, 16)


def test_is_correct_and_exact_accuracy_agree_with_sampling():
    gen = torch.Generator().manual_seed(1)
    correct, init, _, _ = toy_bandit.make_task(Config(), gen)
    tokens = toy_bandit.sample_responses(init, 20000, gen)
    empirical = toy_bandit.is_correct(tokens, correct).float().mean().item()
    assert empirical == pytest.approx(toy_bandit.exact_accuracy(init, correct).item(), abs=0.01)


def test_same_seed_gives_identical_summary_and_other_seed_differs():
    a = toy_bandit.run("steer", 3, SHORT)
    b = toy_bandit.run("steer", 3, SHORT)
    c = toy_bandit.run("steer", 4, SHORT)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["entropy_curve"] != c["entropy_curve"]


def test_grpo_collapses_below_h_star_while_accuracy_rises():
    """The toy's headline: default GRPO solves the task and ends below the target entropy H*."""
    for seed in range(3):
        r = toy_bandit.run("grpo", seed, Config())
        assert r["accuracy"] > 0.95 and r["accuracy_curve"][0] < 0.3
        assert r["entropy_curve"][0] > r["h_star"] > r["entropy"]
        assert r["steps_to_90"] is not None and r["steps_to_90"] < 50
        # SGD on a tabular policy: the summed exact first-order changes track the realised change,
        # the paper's (1 - pi)^2 approximation less well
        assert r["r_first_order_exact"] > 0.99
        assert r["r_first_order_paper"] < r["r_first_order_exact"]


def test_toy_uses_losses_registry(monkeypatch):
    """Changing losses.LOSSES['grpo'] changes the toy's trajectory: the toy has no loss of its own."""
    base = toy_bandit.run("grpo", 0, SHORT)
    calls = []
    real = losses.LOSSES["grpo"]

    @functools.wraps(real.fn)                            # the same signature, so the same knobs
    def frozen(**kw):
        calls.append(kw["logp"].shape)
        loss, metrics = real.fn(**kw)
        return loss * 0.0, metrics                       # no gradient: the policy must not move

    monkeypatch.setitem(losses.LOSSES, "grpo", real._replace(fn=frozen))    # the same entry, another function
    frozen_run = toy_bandit.run("grpo", 0, SHORT)
    assert len(calls) == SHORT.steps * SHORT.updates
    assert calls[0] == (SHORT.groups * SHORT.G, SHORT.T)
    assert frozen_run["entropy_curve"] == [frozen_run["entropy_curve"][0]] * (SHORT.steps + 1)
    assert base["entropy_curve"] != frozen_run["entropy_curve"]


def test_steer_knob_reaches_the_loss():
    """STEER with lambda_min = 1 is DAPO's loss (same clip range; dual clip never binds here), so the
    toy's trajectories coincide; the default lambda_min = 0.7 changes them."""
    dapo = toy_bandit.run("dapo", 0, SHORT)
    steer_one = toy_bandit.run("steer", 0, Config(steps=25, lambda_min=1.0))
    steer = toy_bandit.run("steer", 0, SHORT)
    assert steer_one["entropy_curve"] == pytest.approx(dapo["entropy_curve"], abs=1e-6)
    assert steer["entropy_curve"] != pytest.approx(dapo["entropy_curve"], abs=1e-4)


def test_drgrpo_uses_unnormalised_advantages(monkeypatch):
    seen = []
    real = losses.group_advantages
    monkeypatch.setattr(losses, "group_advantages",
                        lambda r, g, **kw: seen.append(kw.get("std_normalize", True)) or real(r, g, **kw))
    toy_bandit.run("drgrpo", 0, Config(steps=2))
    toy_bandit.run("grpo", 0, Config(steps=2))
    assert seen == [False, False, True, True]


def test_opefo_takes_one_update_per_batch(monkeypatch):
    calls = []
    real = losses.LOSSES["opefo"]
    spy = functools.wraps(real.fn)(lambda **kw: calls.append(1) or real.fn(**kw))
    monkeypatch.setitem(losses.LOSSES, "opefo", real._replace(fn=spy))
    toy_bandit.run("opefo-exact", 0, Config(steps=5, updates=4))
    assert len(calls) == 5


def test_first_order_correlation_of_a_small_sgd_step_is_one():
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(50, 3, 5, generator=gen)
    weights = torch.randn(50, 3 * 5, generator=gen)
    lr = 1e-3
    pi = torch.softmax(before, -1)
    w = weights.view(50, 3, 5)
    dz = lr * (w - w.sum(-1, keepdim=True) * pi)         # sum_b W_b (e_b - pi): the SGD step on sum W log pi
    r_exact, r_paper = toy_bandit.first_order_correlations(before, before + dz, weights, lr)
    assert r_exact > 0.9999
    assert r_paper < 0.99


def test_cli_json_has_documented_fields(tmp_path, capsys):
    path = tmp_path / "toy.json"
    toy_bandit.main(["--algos", "grpo,opefo-exact", "--seeds", "2", "--steps", "5", "--json", str(path),
                     "--plot", str(tmp_path / "toy.png")])
    out = capsys.readouterr().out
    assert "H* = 0.693" in out and "opefo-exact" in out and "mean" in out
    assert out.splitlines()[-2:] == [f"wrote {path}", f"wrote {tmp_path / 'toy.png'}"]
    data = json.loads(path.read_text())
    assert data["config"]["steps"] == 5 and data["wall_s"] > 0
    assert [(r["algo"], r["seed"]) for r in data["runs"]] == [("grpo", 0), ("grpo", 1), ("opefo-exact", 0),
                                                              ("opefo-exact", 1)]
    fields = {"algo", "seed", "accuracy", "entropy", "h_star", "entropy_over_h_star", "steps_to_90",
              "pass_at_k_variants", "pass_at_k_train", "distinct_correct", "possible_correct",
              "r_first_order_exact", "r_first_order_paper", "clipfrac", "flow", "entropy_curve",
              "accuracy_curve", "start", "leverage_changed", "leverage_l1"}
    ks = ["1", "4", "16", "64", "256"]
    for r in data["runs"]:
        assert set(r) == fields
        assert list(r["pass_at_k_variants"]) == ks == list(r["pass_at_k_train"])
        assert len(r["entropy_curve"]) == len(r["accuracy_curve"]) == 6
        assert 0 <= min(r["pass_at_k_variants"].values()) and sorted(r["pass_at_k_variants"].values()) == [
            r["pass_at_k_variants"][k] for k in ks] and r["pass_at_k_variants"]["256"] <= 1
        assert set(r["start"]) == {"pass_at_k_variants", "pass_at_k_train", "distinct_correct", "accuracy",
                                   "entropy_over_h_star"}
    start = [r["start"] for r in data["runs"]]
    assert start[0] == start[2] and start[1] == start[3] and start[0] != start[1]   # the seed's start policy
    assert data["runs"][0]["leverage_l1"] == 0.0 and data["runs"][2]["leverage_l1"] > 0.05
    assert data["claims"]["opefo-flow"]["verdict"] in ("reproduced", "not reproduced")


def test_bad_flags_are_named(capsys):
    with pytest.raises(SystemExit):
        toy_bandit.parse_args(["--algos", "grpo,ppo"])
    assert "--algos: unknown ppo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_bandit.parse_args(["--G", "1"])
    assert "--G" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_bandit.parse_args(["--eval-samples", "8"])
    assert "--eval-samples must be >= 16" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown algorithm"):
        toy_bandit.run("ppo", 0, SHORT)


def test_sparkline_maps_range_onto_blocks():
    assert toy_bandit.sparkline([0.0, 1.0], 0.0, 1.0, width=2) == "▁█"
    assert toy_bandit.sparkline([0.0] * 10 + [1.0] * 10, 0.0, 1.0, width=4) == "▁▁██"


def test_default_algorithms_run_with_their_curves():
    results = [toy_bandit.run(a, 0, Config(steps=10)) for a in toy_bandit.DEFAULT_ALGOS]
    assert {r["algo"] for r in results} == set(toy_bandit.DEFAULT_ALGOS)
    assert all(len(r["entropy_curve"]) == 11 and len(r["accuracy_curve"]) == 11 for r in results)


def test_plot_and_json_problems_stop_before_the_run(monkeypatch, tmp_path):
    def no_run(*a, **k):
        raise AssertionError("the run started")
    monkeypatch.setattr(toy_bandit, "run", no_run)
    with pytest.raises(SystemExit, match="does not exist"):
        toy_bandit.main(["--json", str(tmp_path / "missing" / "toy.json")])
    with pytest.raises(SystemExit, match="is a folder"):
        toy_bandit.main(["--plot", str(tmp_path)])


def test_clip_flags_reach_the_losses_that_take_them(monkeypatch):
    seen = {}
    for name in ("grpo", "steer", "archer", "opefo"):
        real = losses.LOSSES[name]

        @functools.wraps(real.fn)                        # the same signature, so the same knobs
        def spy(_real=real.fn, _name=name, **kw):
            seen[_name] = {k: kw.get(k) for k in ("clip_low", "clip_high", "dual_clip")}
            return _real(**kw)
        monkeypatch.setitem(losses.LOSSES, name, real._replace(fn=spy))
    cfg = Config(steps=1, clip_low=0.99, clip_high=5.0, dual_clip=3.0)
    for algo in ("grpo", "steer", "archer", "opefo"):
        toy_bandit.run(algo, 0, cfg)
    assert seen["grpo"] == seen["steer"] == {"clip_low": 0.99, "clip_high": 5.0, "dual_clip": 3.0}
    assert seen["archer"] == {"clip_low": None, "clip_high": None, "dual_clip": 3.0}   # its own token clips
    assert seen["opefo"] == {"clip_low": None, "clip_high": None, "dual_clip": None}   # no ratio at all
    assert toy_bandit.parse_args(["--clip-low", "0.99", "--clip-high", "5"])[2].clip_high == 5.0


@pytest.mark.parametrize("algo", toy_bandit.INTERVENTIONS)
def test_interventions_run_and_their_flow_quadrants_add_up(algo):
    r = toy_bandit.run(algo, 0, Config(steps=15))
    parts = sum(r["flow"][q] for q in losses.QUADRANTS)
    # A = 0 tokens carry no policy-gradient weight here (no KL in these losses), so the quadrants are the total
    assert parts == pytest.approx(r["flow"]["total"], rel=1e-6, abs=1e-9)     # float32 sums
    assert r["accuracy_curve"][-1] > r["accuracy_curve"][0]           # every one of them learns the task


def test_adaptive_entropy_above_its_target_is_grpo():
    """Skywork-OR1's controller only switches the bonus on below its target (0.2 nats); the toy's entropy
    stays above it for these steps, so the run is GRPO's, number for number."""
    a = toy_bandit.run("adaptive-entropy", 0, Config(steps=15))
    b = toy_bandit.run("grpo", 0, Config(steps=15))
    assert min(a["entropy_curve"]) > 0.2
    assert a["entropy_curve"] == b["entropy_curve"]


def _header(out):
    """The report's lines above its table (the table starts with the column names)."""
    lines = out.splitlines()
    return lines[:next(i for i, line in enumerate(lines) if line.startswith("algo"))]


def test_header_names_the_clip_flags_and_the_methods_they_reach(capsys):
    """--clip-low 0.99 --clip-high 5 (STEER's extreme scenario) is stated in the header, with the methods of
    the run it reaches and those it does not (read off losses.LOSSES[...].knobs); a run without clip flags
    has no such line."""
    toy_bandit.main(["--steps", "1", "--seeds", "1", "--eval-samples", "16", "--variants", "2"])
    assert not [line for line in _header(capsys.readouterr().out) if "clip" in line]
    toy_bandit.main(["--steps", "1", "--seeds", "1", "--eval-samples", "16", "--variants", "2",
                     "--clip-low", "0.99", "--clip-high", "5"])
    lines = [line for line in _header(capsys.readouterr().out) if "clip_low" in line]
    assert len(lines) == 1
    line = lines[0]
    assert "clip_low 0.99, clip_high 5 " in line and "dual_clip" in line     # the one not given: defaults
    reach, _, rest = line.partition(" reach ")
    reached, _, not_reached = rest.partition("; not ")
    assert reached.split(", ") == ["grpo", "grpo-onpolicy", "dapo", "steer", "steer-exact"]
    for name in ("opefo", "opefo-exact", "archer"):
        assert f" {name} (" in " " + not_reached or f" {name}," in " " + not_reached
    assert "no ratio clip" in not_reached and "only --dual-clip" in not_reached
    assert not any(f" {name}" in " " + reached for name in ("opefo", "archer"))


def test_header_clip_line_follows_the_registry(monkeypatch):
    """Which methods a clip flag reaches comes from the registry's knobs, not from a list in the toy."""
    cfg = Config(dual_clip=3.0)
    line = toy_bandit.clip_note(["grpo", "archer", "opefo"], cfg)
    assert line.startswith("clip flags: dual_clip 3 ") and "reaches grpo, archer;" in line and "not opefo" in line
    real = losses.LOSSES["grpo"]

    def no_clip(*, logp, old_logp, advantages, mask, agg="token"):         # a grpo without any clip knob
        return real.fn(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, agg=agg)
    monkeypatch.setitem(losses.LOSSES, "grpo", real._replace(fn=no_clip))
    line = toy_bandit.clip_note(["grpo", "archer", "opefo"], cfg)
    assert "reaches archer;" in line and "not grpo, opefo (no ratio clip)" in line
    assert toy_bandit.clip_note(["grpo"], Config()) is None


def test_plot_legend_sits_next_to_the_panels(monkeypatch, tmp_path):
    """--plot writes a PNG whose legend (one entry per method, and H*) lies inside the figure, right next
    to the panels: the gap between the right panel's frame and the legend is small, and so is the margin
    to the right of the legend (no empty band). Measured on the figure as it is saved."""
    import matplotlib.figure
    seen = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        real_savefig(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        seen.append(dict(labels=[[t.get_text() for t in leg.get_texts()] for leg in legends],
                         legend=[leg.get_window_extent(renderer) for leg in legends], figure=fig.bbox.frozen(),
                         right=max(ax.get_window_extent(renderer).x1 for ax in fig.axes)))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    path = tmp_path / "toy.png"
    algos = ["grpo", "dapo", "steer", "steer-exact", "opefo", "opefo-exact", "archer"]
    toy_bandit.main(["--algos", ",".join(algos), "--seeds", "1", "--steps", "3", "--eval-samples", "16",
                     "--variants", "2", "--plot", str(path)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (m,) = seen
    assert m["labels"] == [algos + ["H*"]]                       # one legend
    (box,), frame = m["legend"], m["figure"]
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    gap = box.x0 - m["right"]                                   # right panel's frame -> legend
    assert 0 <= gap < 0.03 * frame.width, (gap, frame.width)
    assert frame.x1 - box.x1 < 0.03 * frame.width, (frame.x1 - box.x1, frame.width)


@pytest.mark.parametrize("algo", ["aspo", "ce-gppo", "gppo"])
def test_clip_successors_run_outside_the_default_set(algo):
    """ASPO, CE-GPPO and GPPO are in ALGOS (--algos), not in the default run (its output stays as it was)."""
    assert algo not in toy_bandit.DEFAULT_ALGOS
    r = toy_bandit.run(algo, 0, Config(steps=15))
    assert r["accuracy_curve"][-1] > r["accuracy_curve"][0]
    if algo != "aspo":                  # no KL: A = 0 tokens carry no weight, the quadrants are the total
        assert sum(r["flow"][q] for q in losses.QUADRANTS) == pytest.approx(r["flow"]["total"], rel=1e-6, abs=1e-9)


def test_clip_successors_take_their_knobs(monkeypatch):
    """ASPO takes Archer's quantile and knowledge-token KL and only --dual-clip of the clip flags; CE-GPPO and
    GPPO take all three."""
    seen = {}
    for name in ("aspo", "ce_gppo", "gppo"):
        real = losses.LOSSES[name]

        @functools.wraps(real.fn)                        # the same signature, so the same knobs
        def spy(_real=real.fn, _name=name, **kw):
            seen[_name] = {k: kw.get(k) for k in ("clip_low", "clip_high", "dual_clip", "quantile", "kl_knowledge")}
            return _real(**kw)
        monkeypatch.setitem(losses.LOSSES, name, real._replace(fn=spy))
    cfg = Config(steps=1, clip_low=0.1, clip_high=0.3, dual_clip=4.0, archer_quantile=0.7, archer_kl=0.002)
    for algo in ("aspo", "ce-gppo", "gppo"):
        toy_bandit.run(algo, 0, cfg)
    assert seen["aspo"] == {"clip_low": None, "clip_high": None, "dual_clip": 4.0, "quantile": 0.7,
                            "kl_knowledge": 0.002}
    assert seen["ce_gppo"] == seen["gppo"] == {"clip_low": 0.1, "clip_high": 0.3, "dual_clip": 4.0, "quantile": None,
                                               "kl_knowledge": None}
