"""Tests of train.py: the RL loop end to end on the tiny lab, resume, checkpoints, data plumbing, switches.

Budget given: the whole file under 90 s on 2 CPU cores. The loop tests use an untrained tiny model (no
warm start) and replace the lab's reward by a deterministic function of the completion (even sum of
character codes -> 1.0), so every group has a real advantage signal without any training; the lab's task and reward are tested
in test_tiny_lab.py, the verifier in test_verifier.py and its use here (gold parsing, skipping) below.
"""
import functools
import json
import types

import pytest
import torch

import config
import data
import evaluation
import losses
import rollout
import run_dir
import tiny_lab
import train
import verifier
from benchmarks import bench_train
from conftest import ENDOFTEXT, H_CHATTY, IM_END, REWARD_MODULE, TINY, read_rows, strip_timing


def run(argv):
    return train.main(argv)



# per algorithm: flags that make its own machinery visible in two steps
ALGO_FLAGS = {"steer": ["--measure-entropy-change"],
              "adaptive_entropy": ["--target-entropy", "10", "--entropy-coef", "0.01", "--entropy-coef-delta", "0.002"],
              "clip_cov": ["--clip-cov-lb", "-100", "--clip-cov-ub", "100", "--clip-cov-ratio", "0.1",
                           "--micro-batch-size", "3"]}


@pytest.mark.parametrize("algo", config.ALGOS)
def test_end_to_end_and_resume(algo, tmp_path, cache, parity_reward):
    full, part = tmp_path / "full", tmp_path / "part"
    common = (TINY + ["--algo", algo, "--cache-dir", cache, "--save-interval", "1", "--eval-interval", "1"]
              + ALGO_FLAGS.get(algo, []))
    run(common + ["--steps", "2", "--out", str(full)])
    rows = read_rows(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("reward", "accuracy", "entropy", "response_length", "truncation_rate", "loss/loss",
                    "loss/pg_loss", "time/generate", "time/score", "time/stats", "time/update",
                    "tokens_per_s/generate", "peak_mem_mb", "grad_norm", "groups_kept_frac", "refill_rounds"):
            assert key in r, key
        assert r["groups_kept"] >= 1 and r["updates"] == min(1 if algo == "opefo" else 2, r["groups_kept"])
        assert torch.isfinite(torch.tensor(r["loss/loss"])) and r["grad_norm"] > 0
        assert 0 < r["entropy"] < 5.0                       # log(99) = 4.6 is the ceiling
        # the four quadrants (and the A = 0 tokens) partition the update's tokens and its entropy change
        for k in ("exact", "paper", "count"):
            parts = [r[f"flow/{q}_{k}"] for q in losses.QUADRANTS + ("zero_adv",)]
            scale = sum(abs(v) for v in parts)          # float32 sums; OPEFO balances the paper flow to ~0
            assert sum(parts) == pytest.approx(r[f"flow/total_{k}"], abs=1e-6 * scale + 1e-12), k
        assert r["flow/total_count"] == r["update_tokens"] and r["flow/total_exact"] != 0
        if algo not in ("archer", "kl_cov"):                 # no KL term: A = 0 tokens carry no weight
            assert r["flow/zero_adv_exact"] == 0
    assert "eval/avg@2" in rows[2] and "eval/pass@2" in rows[2] and "eval/greedy_acc" in rows[0]
    assert (full / "checkpoints" / "latest").read_text() == "step_000002"
    assert (full / "checkpoints" / "step_000002" / "model" / "model.safetensors").exists()
    assert (full / "checkpoints" / "step_000001" / "trainer_state.pt").exists()     # the previous one is kept
    assert len(read_rows(full / "samples.jsonl")) == 2 * 4            # every completion of one prompt per step
    if algo == "archer":                    # the frozen reference is loaded and the KL is live
        assert rows[2]["loss/kl_knowledge"] > 0
    if algo == "steer":
        assert -1 <= rows[1]["dH/pearson_exact"] <= 1 and rows[1]["dH/tokens"] > 0
        assert 0 < rows[1]["loss/weight_min"] <= rows[1]["loss/weight_max"] <= 1
    if algo == "adaptive_entropy":          # entropy below the target: alpha = c, and c grows by delta a step
        assert [r["entropy_control/alpha"] for r in rows[1:]] == pytest.approx([0.01, 0.012])
        assert [r["loss/coef"] for r in rows[1:]] == pytest.approx([0.01, 0.012])
        assert [r["entropy_control/coef"] for r in rows[1:]] == pytest.approx([0.012, 0.014])
        saved = torch.load(full / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=False)
        assert saved["entropy_control"]["coef"] == pytest.approx(0.014) and saved["entropy_control"]["steps"] == 2
    if algo == "clip_cov":                  # the batch's draw, exact over micro-batches of 3 rows
        assert all(0 < r["loss/cov_frac"] <= 0.11 for r in rows[1:])

    # interrupted after step 1, resumed to step 2: the same numbers as the uninterrupted run
    run(common + ["--steps", "1", "--out", str(part)])
    run(["--resume", str(part), "--steps", "2"])
    resumed = read_rows(part / "metrics.jsonl")
    assert [strip_timing(r) for r in resumed] == [strip_timing(r) for r in rows]


def _update_batch(cache):
    """A rollout of the untrained lab model (2 prompts x 3) with fixed advantages and its behaviour statistics."""
    path = tiny_lab.warm_start(0, cache)
    torch.manual_seed(0)
    base, tok = data.load_model(str(path), device=torch.device("cpu"))
    ro = train.rollout.generate(base, tok, ["1+2", "3*4"], group_size=3, max_new_tokens=5)
    batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.response_mask,
             "prompt_length": ro.prompt_length, "advantages": torch.tensor([1.0, -0.5, -0.5, 0.3, 0.7, -1.0])}
    stats = train.rollout.response_stats(base, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask)
    batch.update(old_logp=stats["logp"], entropy=stats["entropy"], exact_term=stats["exact_term"])
    return path, base, batch


def _one_update(path, batch, algo, micro, knobs=None, **flags):
    """train.update with one optimizer step (plain SGD, lr 1) from the lab's start model; (metrics, parameters)."""
    model, _ = data.load_model(str(path), device=torch.device("cpu"))
    cfg = dict(algo=algo, group_size=3, updates_per_batch=1, micro_batch_size=micro, max_grad_norm=1e9,
               measure_entropy_change=False, temperature=1.0, max_new_tokens=5, **flags)
    cfg.update({k: None for k in config.KNOB_FLAGS if k not in cfg})
    opt = torch.optim.SGD(model.parameters(), lr=1.0)

    def stats_fn(b, with_grad=False, with_entropy=True):
        return train.rollout.response_stats(model, b["input_ids"], b["attention_mask"], b["prompt_length"],
                                            b["mask"], with_grad=with_grad, with_entropy=with_entropy)
    out = train.update(model, opt, batch, cfg, stats_fn, knobs=knobs)
    return out, torch.cat([p.detach().flatten() for p in model.parameters()])


MICRO_CASES = [("dapo", {}, None), ("grpo", dict(agg="seq-mean-token-mean"), None), ("steer", {}, None),
               ("opefo", {}, None), ("entropy_bonus", dict(entropy_coef=0.1), None),
               ("adaptive_entropy", {}, dict(coef=0.05)), ("adaptive_entropy", dict(entropy_coef=0.02), None),
               ("clip_cov", dict(clip_cov_lb=-100.0, clip_cov_ub=100.0, clip_cov_ratio=0.3), "generator"),
               ("kl_cov", dict(kl_cov_ratio=0.3), None), ("forking", {}, None), ("entropy_adv", {}, None),
               ("w_reinforce", {}, None)]


def test_micro_batching_gives_the_same_update(tmp_path, cache):
    """One update with micro-batches of 1 sequence equals one with the whole mini-batch (batch_statistics:
    global normalisers, STEER's mini-batch M, OPEFO's batch flow totals, Clip-Cov's draw sliced per
    micro-batch, KL-Cov's and forking's cuts; the entropy bonus's current entropy with its gradient)."""
    path, base, batch = _update_batch(cache)
    start = torch.cat([p.detach().flatten() for p in base.parameters()])
    for algo, flags, knobs in MICRO_CASES:
        results = []
        for micro in (6, 1):
            extra = {"generator": torch.Generator().manual_seed(3)} if knobs == "generator" else knobs
            results.append(_one_update(path, batch, algo, micro, knobs=extra, **flags))
        (out_a, par_a), (out_b, par_b) = results
        # the loss sums float32 terms of both signs (OPEFO's -w A log pi): 1e-7 of cancellation error is rounding
        assert out_a["loss/loss"] == pytest.approx(out_b["loss/loss"], rel=1e-5, abs=1e-6), algo
        assert out_a["flow/total_exact"] == pytest.approx(out_b["flow/total_exact"], rel=1e-4, abs=1e-9), algo
        assert torch.allclose(par_a, par_b, atol=1e-6), algo
        assert not torch.equal(par_a, start), algo
        if algo == "clip_cov":
            assert out_a["loss/cov_frac"] == pytest.approx(out_b["loss/cov_frac"]) and out_a["loss/cov_frac"] > 0.2
        if algo in ("entropy_bonus", "adaptive_entropy"):
            assert out_a["loss/coef"] == pytest.approx((knobs or {}).get("coef", flags.get("entropy_coef")))
            assert out_a["loss/entropy_bonus"] > 0



def test_micro_batch_metrics_merge_as_the_registry_says(cache):
    """STEER's omega_max / weight_max are maxima and weight_min a minimum over the mini-batch, whatever the
    micro-batch size (losses.LOSSES["steer"].reductions); pg_loss is summed, the other metrics token-averaged.
    (train.py used to token-average every metric but the sums, so micro-batches of 1 reported a mean of
    per-row maxima.)"""
    path, _, batch = _update_batch(cache)
    (whole, _), (ones, _) = (_one_update(path, batch, "steer", micro) for micro in (6, 1))
    for key in ("omega_max", "weight_max", "weight_min", "pg_loss", "weight_mean", "clip_frac_high"):
        assert ones[f"loss/{key}"] == pytest.approx(whole[f"loss/{key}"], rel=1e-5, abs=1e-7), key
    assert whole["loss/weight_min"] < whole["loss/weight_mean"] < whole["loss/weight_max"]

def test_entropy_bonus_moves_the_parameters_through_the_entropy(cache):
    """alpha > 0 changes the update against alpha = 0 (the entropy's gradient reaches the model), and the
    flow quadrants, which see only w on log pi(a), stay those of the PPO part."""
    path, _, batch = _update_batch(cache)
    (with_bonus, par_a), (without, par_b) = (_one_update(path, batch, "entropy_bonus", 6, entropy_coef=c)
                                             for c in (0.5, 0.0))
    assert not torch.allclose(par_a, par_b, atol=1e-6)
    assert with_bonus["flow/total_exact"] == pytest.approx(without["flow/total_exact"], rel=1e-6)


def test_flow_quadrants_match_the_hand_formula(cache):
    """GRPO's first update (r = 1, no clip, token-mean): w = A / num_tokens on every valid token, so the
    logged total is -sum A g_exact / N and each quadrant the same sum over its tokens."""
    path, _, batch = _update_batch(cache)
    out, _ = _one_update(path, batch, "grpo", 2)
    mask = batch["mask"].bool()
    adv = batch["advantages"][:, None].expand_as(mask)
    g = losses.first_order_term(batch["old_logp"], batch["entropy"], batch["exact_term"], "exact")
    contrib = torch.where(mask, -adv * g / mask.sum(), 0.0).double()
    likely = (batch["old_logp"] + batch["entropy"]) > 0
    hand = {"pos_likely": (adv > 0) & likely, "pos_unlikely": (adv > 0) & ~likely,
            "neg_likely": (adv < 0) & likely, "neg_unlikely": (adv < 0) & ~likely}
    for q, sel in hand.items():
        assert out[f"flow/{q}_exact"] == pytest.approx(float(contrib[sel & mask].sum()), rel=1e-4, abs=1e-10), q
        assert out[f"flow/{q}_count"] == int((sel & mask).sum()), q
    assert out["flow/total_exact"] == pytest.approx(float(contrib.sum()), rel=1e-4)
    assert out["flow/zero_adv_count"] == 0


@pytest.mark.parametrize("algo,flags,expected", [
    ("entropy_bonus", ["--entropy-coef", "0.03"], {"coef": 0.03}),
    ("clip_cov", ["--clip-cov-ratio", "0.01", "--clip-cov-lb", "0.5", "--clip-cov-ub", "7"],
     {"clip_cov_ratio": 0.01, "cov_lb": 0.5, "cov_ub": 7.0}),
    ("kl_cov", ["--kl-cov-ratio", "0.05", "--kl-cov-coef", "2"], {"kl_cov_ratio": 0.05, "kl_cov_coef": 2.0}),
    ("forking", ["--top-frac", "0.3", "--clip-high", "0.3"], {"top_frac": 0.3, "clip_high": 0.3}),
    ("entropy_adv", ["--entropy-adv-alpha", "0.2", "--entropy-adv-kappa", "3"], {"alpha": 0.2, "kappa": 3.0}),
    ("w_reinforce", ["--positive-weight", "0.5"], {"positive_weight": 0.5}),
])
def test_new_flags_reach_the_loss(algo, flags, expected, tmp_path, cache, parity_reward, monkeypatch):
    """A spy on LOSSES[algo] and batch_statistics: every micro-batch call gets the flags' values under the
    loss's keywords; unset knobs are not passed (losses.py's defaults hold)."""
    calls, stat_calls = [], []
    real, real_stats = losses.LOSSES[algo], losses.batch_statistics

    def spy(**kw):
        calls.append(kw)
        return real(**kw)

    def stats_spy(name, **kw):
        stat_calls.append(kw)
        return real_stats(name, **kw)
    monkeypatch.setitem(losses.LOSSES, algo, real._replace(fn=functools.wraps(real.fn)(spy)))   # same knobs
    monkeypatch.setattr(losses, "batch_statistics", stats_spy)
    run(TINY + ["--algo", algo, "--cache-dir", cache, "--steps", "1", "--out", str(tmp_path / "r"),
                "--eval-interval", "0", "--eval-size", "1", "--micro-batch-size", "2"] + flags)
    assert calls[0]["mask"].shape == (1, 1)                  # config.check_knobs on a one-token batch
    calls = calls[1:]
    assert len(calls) == 4 and len(stat_calls) == 2          # 2 mini-batches of 4 rows, micro-batches of 2
    for kw in calls + stat_calls:
        assert {k: kw[k] for k in expected} == expected
    untouched = {"clip_low", "dual_clip", "agg"} - {k for f in flags for k in [f.lstrip("-").replace("-", "_")]}
    assert not untouched & set(calls[0])
    if algo == "clip_cov":
        assert isinstance(stat_calls[0]["generator"], torch.Generator)
        assert calls[0]["cov_selected"].shape == calls[0]["mask"].shape == (2, calls[0]["mask"].shape[1])
    if algo == "entropy_bonus":
        assert calls[0]["current_entropy"].requires_grad


def test_dynamic_sampling_refills_to_the_requested_groups(tmp_path, cache, monkeypatch):
    """The first round's groups all have equal rewards (0), later rounds alternate 0/1 within each group:
    one refill round gives the 2 requested groups."""
    count = [0]
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: ({}, []))   # every score call is a training one

    def score(response, item):
        count[0] += 1
        ok = count[0] > 8 and count[0] % 2 == 0
        return verifier.Score(float(ok), "", ok, False)
    monkeypatch.setattr(tiny_lab, "score", score)
    out = tmp_path / "refill"
    run(TINY + ["--algo", "dapo", "--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0",
                "--eval-size", "1", "--no-overlong-penalty"])
    row = read_rows(out / "metrics.jsonl")[1]
    assert (row["refill_rounds"], row["groups_sampled"], row["groups_kept"], row["groups_all_equal"]) == (1, 4, 2, 2)
    assert row["groups_kept_frac"] == 0.5 and row["updates"] == 2 and row["update_tokens"] > 0
    assert row["reward"] == pytest.approx(sum(n > 8 and n % 2 == 0 for n in range(1, 17)) / 16)


def test_dynamic_sampling_stops_at_the_cap(tmp_path, cache, monkeypatch):
    """Every group has equal rewards: --max-refill-rounds 3 extra rounds, then no update."""
    monkeypatch.setattr(tiny_lab, "score", lambda response, item: verifier.Score(0.0, "", False, False))
    out = tmp_path / "cap"
    run(TINY + ["--algo", "dapo", "--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0",
                "--eval-size", "1", "--max-refill-rounds", "3", "--plot"])
    row = read_rows(out / "metrics.jsonl")[1]
    assert (row["refill_rounds"], row["groups_sampled"], row["groups_kept"], row["updates"]) == (3, 8, 0, 0)
    assert row["groups_kept_frac"] == 0.0 and row["flow/total_exact"] is None
    assert (out / "curves.png").exists()                      # the null flow step is skipped, not drawn


def test_dapo_refill_resumes_bit_exactly(tmp_path, cache, monkeypatch):
    """Half the problems (by their text) always score 0, so refills happen; the refill draws prompts from the
    data order and samples with the global RNG, and a resumed run still repeats the uninterrupted one."""
    def score(response, item):
        ok = sum(map(ord, item["problem"])) % 2 == 1 and sum(map(ord, response)) % 2 == 0
        return verifier.Score(float(ok), "", ok, False)
    monkeypatch.setattr(tiny_lab, "score", score)
    common = TINY + ["--algo", "dapo", "--cache-dir", cache, "--save-interval", "1", "--eval-interval", "1",
                     "--eval-size", "1", "--prompts-per-step", "3"]
    run(common + ["--steps", "3", "--out", str(tmp_path / "full"), "--plot"])
    rows = read_rows(tmp_path / "full" / "metrics.jsonl")
    height, width, _ = __import__("matplotlib.image").image.imread(tmp_path / "full" / "curves.png").shape
    assert (width, height) == (1700, 400)                     # four panels, the fourth the quadrant flow
    assert sum(r["refill_rounds"] for r in rows[1:]) > 0 and all(r["groups_kept"] <= 3 for r in rows[1:])
    run(common + ["--steps", "1", "--out", str(tmp_path / "part")])
    run(["--resume", str(tmp_path / "part"), "--steps", "3"])
    resumed = read_rows(tmp_path / "part" / "metrics.jsonl")
    assert [strip_timing(r) for r in resumed] == [strip_timing(r) for r in rows]


def test_resume_of_a_run_from_before_the_dapo_flags(tmp_path, cache, parity_reward):
    """A config.json without max_refill_rounds / overlong_penalty / overlong_cache (a DAPO run started before
    they existed) resumes with both parts off, as it was trained."""
    out = tmp_path / "old"
    run(TINY + ["--algo", "dapo", "--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0",
                "--eval-size", "1", "--max-refill-rounds", "0", "--no-overlong-penalty"])
    cfg = json.loads((out / "config.json").read_text())
    for key in ("max_refill_rounds", "overlong_penalty", "overlong_cache"):
        del cfg[key]
    (out / "config.json").write_text(json.dumps(cfg))
    run(["--resume", str(out), "--steps", "2"])
    row = read_rows(out / "metrics.jsonl")[2]
    assert row["refill_rounds"] == 0 and "overlong_penalty" not in row
    assert json.loads((out / "config.json").read_text())["max_refill_rounds"] == 0



def test_overlong_penalty_shapes_the_advantages(tmp_path, cache, monkeypatch):
    """A constant verifier reward makes every group all-equal, so only the penalty gives an advantage
    (L_cache = L_max = 6: -length / 6): within each group a longer response gets a lower advantage, and the
    logged mean penalty is that of the responses the loss saw."""
    monkeypatch.setattr(tiny_lab, "score", lambda response, item: verifier.Score(1.0, "", True, False))
    seen = []
    real = losses.LOSSES["dapo"]

    def spy(**kw):
        seen.append((kw["advantages"], kw["mask"].sum(1)))
        return real(**kw)
    monkeypatch.setitem(losses.LOSSES, "dapo", real._replace(fn=functools.wraps(real.fn)(spy)))
    out = tmp_path / "long"
    run(TINY + ["--algo", "dapo", "--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0",
                "--eval-size", "1", "--no-drop-equal-groups", "--max-refill-rounds", "0", "--overlong-cache", "6",
                "--no-skip-zero-advantage"])                 # the loss sees every group, also all-equal ones
    row = read_rows(out / "metrics.jsonl")[1]
    groups = [s for s in seen if len(s[0]) == 4]             # not config.check_knobs' or uses_reference's probes
    assert len(groups) == 2 and all(len(a) == 4 for a, _ in groups)       # one group per mini-batch
    lengths = torch.cat([n for _, n in groups])
    assert row["overlong_penalty"] == pytest.approx(float((-lengths / 6).clamp(-1, 0).mean()), abs=1e-6)
    assert row["reward"] == 1.0 and sum(float(a.abs().sum()) for a, _ in groups) > 0
    for adv, n in groups:
        for i in range(4):
            for j in range(4):
                if n[i] > n[j]:
                    assert adv[i] < adv[j]
                if n[i] == n[j]:
                    assert adv[i] == adv[j]


def test_nonfinite_loss_skips_the_step(tmp_path, cache, parity_reward, monkeypatch):
    def nan_loss(logp, old_logp, advantages, mask, *, num_tokens=None, num_seqs=None, norm_length=None):
        return logp.sum() * float("nan"), {"pg_loss": float("nan")}
    monkeypatch.setitem(losses.LOSSES, "grpo", losses.LOSSES["grpo"]._replace(fn=nan_loss))
    out = tmp_path / "nan"
    run(TINY + ["--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0"])
    row = read_rows(out / "metrics.jsonl")[1]          # strict JSON: no NaN, null instead
    assert row["updates"] == 0 and row["skipped_nonfinite"] == 2
    assert row["grad_norm"] is None and row["flow/total_exact"] is None
    start = data.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"))[0]
    saved = data.load_model(str(out / "checkpoints" / "step_000001" / "model"), device=torch.device("cpu"))[0]
    for a, b in zip(start.parameters(), saved.parameters()):
        assert torch.equal(a, b)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, cache, monkeypatch):
    model, tok = data.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    rng = train.random.Random(0)
    run_dir.save_checkpoint(tmp_path, 1, model=model, tok=tok, optimizer=opt, data_rng=rng, order=[3, 1])

    def crash(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(train.torch, "save", crash)
    with pytest.raises(RuntimeError):
        run_dir.save_checkpoint(tmp_path, 2, model=model, tok=tok, optimizer=opt, data_rng=rng, order=[1])
    latest = run_dir.latest_checkpoint(tmp_path)
    assert latest.name == "step_000001"
    state = torch.load(latest / "trainer_state.pt", weights_only=False)
    assert state["step"] == 1 and state["rng"]["order"] == [3, 1]


def test_unparseable_gold_is_skipped_and_counted(tmp_path, cache):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n"
                    + json.dumps({"problem": "2+2", "answer": "\\frac{"}) + "\n")
    out = tmp_path / "run"
    run(TINY + ["--cache-dir", cache, "--dataset", str(data), "--steps", "1", "--out", str(out),
                "--eval-interval", "0", "--eval-dataset", str(data)])
    rows = read_rows(out / "metrics.jsonl")
    assert rows[1]["skipped_unparseable_gold"] == 1 and rows[1]["groups_kept"] <= 1
    assert rows[0]["eval/skipped_gold"] == 1 and rows[0]["eval/n"] == 1


def test_bf16_and_gradient_checkpointing_switches(tmp_path, cache, parity_reward, monkeypatch):
    seen = {}
    real = data.load_model

    def spy(*a, **k):
        model, tok = real(*a, **k)
        seen.setdefault("model", model)
        return model, tok
    monkeypatch.setattr(data, "load_model", spy)
    out = tmp_path / "bf16"
    run(TINY + ["--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0", "--bf16",
                "--gradient-checkpointing", "--algo", "grpo", "--kl-coef", "0.1"])
    row = read_rows(out / "metrics.jsonl")[1]
    assert torch.isfinite(torch.tensor(row["loss/loss"])) and row["grad_norm"] > 0 and "loss/kl" in row
    assert seen["model"].is_gradient_checkpointing
    assert next(seen["model"].parameters()).dtype == torch.float32        # fp32 master weights





def test_a_run_ends_with_one_summary_line_and_names_the_plot_it_writes(tmp_path, cache, capsys):
    out = tmp_path / "run"
    rows = run(TINY + ["--cache-dir", cache, "--out", str(out), "--steps", "2", "--plot"])
    err = capsys.readouterr().err.splitlines()
    assert f"wrote {out / 'curves.png'}" in err and (out / "curves.png").is_file()
    last = rows[-1]
    assert err[-1].startswith("done: 2 steps, ") and err[-1].endswith(f"; run directory {out}")
    assert (f"last step reward {last['reward']:.3f}, entropy {last['entropy']:.3f}; eval: avg@2 "
            f"{last['eval/avg@2']:.3f}, pass@2 {last['eval/pass@2']:.3f}, greedy {last['eval/greedy_acc']:.3f}, "
            f"distinct {last['eval/distinct']:.2f}; eval_unique: avg@2") in err[-1]


def test_a_model_run_in_a_log_says_each_phase_of_a_step(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    model = tiny_lab.warm_start(0, cache, log=lambda m: None)
    problems = tmp_path / "d.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"{a}+{a}", "answer": str(2 * a)}) + "\n" for a in range(4)))
    run(["--model", str(model), "--dataset", str(problems), "--steps", "1", "--max-new-tokens", "4",
         "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.splitlines()
    phases = [line for line in err if line.startswith("step 1: ") and "checkpoint" not in line]
    assert phases == ["step 1: generating 2 x 4 responses", "step 1: scoring", "step 1: log-probs", "step 1: update"]


def test_a_run_names_its_directory_and_prints_each_evaluation_with_its_time(tmp_path, cache, capsys):
    out = tmp_path / "run"
    train.main(TINY + ["--cache-dir", cache, "--out", str(out), "--steps", "2", "--eval-interval", "1"])
    err = capsys.readouterr().err.splitlines()
    assert f"run directory: {out}" in err
    steps = [i for i, line in enumerate(err) if line.startswith(("step 1/2:", "step 2/2:"))]
    evals = [i for i, line in enumerate(err) if line.startswith(("step 1 evaluation, ", "step 2 evaluation, "))]
    assert len(steps) == len(evals) == 2 and all(s < e for s, e in zip(steps, evals))   # the step's line first
    rows = read_rows(out / "metrics.jsonl")
    assert f"{rows[1]['time/eval']:.1f}s: eval: avg@2 {rows[1]['eval/avg@2']:.3f}, pass@2" in err[evals[0]]
    assert len(err[evals[0]]) < 200                    # the headline figures; every one is in metrics.jsonl



def test_a_reward_of_ones_own(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    out = tmp_path / "run"
    rows = train.main(TINY + ["--cache-dir", cache, "--out", str(out), "--steps", "2", "--reward", "my_rewards:reward",
                              "--log-samples", "2"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4                       # every completion of the 2 logged prompts, 2 steps
    for s in samples:
        assert s["reward"] == min(1.0, 0.5 * s["completion"].count("=")) and s["correct"] == (s["reward"] > 0)
    for step in (1, 2):
        rewards = [s["reward"] for s in samples if s["step"] == step]
        assert rows[step]["reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert json.loads((out / "config.json").read_text())["reward"] == "my_rewards:reward"


def test_tensorboard_gets_the_same_scalars(tmp_path, cache):
    pytest.importorskip("tensorboard", reason="tensorboard is optional (installed with the integrations in CI)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    rows = train.main(TINY + ["--cache-dir", cache, "--out", str(out), "--steps", "2", "--report-to", "tensorboard"])
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    for key in ("reward", "entropy", "eval/avg@2", "flow/total_exact"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["step"]: r[key] for r in rows if isinstance(r.get(key), (int, float))}
        assert logged.keys() == expected.keys() and all(logged[s] == pytest.approx(v) for s, v in expected.items())


def lab_files(tmp_path, cache):
    """The tiny lab's model folder and four of its problems as a local .jsonl: a run with --model/--dataset."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": it["problem"], "answer": it["answer"]}) + "\n"
                            for it in tiny_lab.datasets()[0][:4]))
    return str(tiny_lab.warm_start(0, cache)), str(data)


def test_run_without_evaluation_set_prints_no_empty_start_line(tmp_path, cache, capsys):
    model, data = lab_files(tmp_path, cache)
    run(["--model", model, "--dataset", str(data), "--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
         "--max-new-tokens", "4", "--out", str(tmp_path / "run")])
    assert "step 0 (start model)" not in capsys.readouterr().err
    assert not any(k.startswith("eval") for k in read_rows(tmp_path / "run" / "metrics.jsonl")[0])


def test_frozen_reference_under_bf16_gives_exactly_zero_kl(tmp_path, cache, parity_reward):
    """One update per batch: the policy equals the reference when the KL is taken, so it must be 0, not a
    bf16 rounding floor."""
    out = tmp_path / "kl"
    run(TINY + ["--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0", "--bf16",
                "--kl-coef", "0.1", "--updates-per-batch", "1"])
    row = read_rows(out / "metrics.jsonl")[1]
    assert row["updates"] == 1 and row["grad_norm"] > 0
    assert row["loss/kl"] == 0.0
    ref, _ = data.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"), trainable=False)
    assert {p.dtype for p in ref.parameters()} == {torch.float32}


def test_lr_factor_warmup_then_constant_or_cosine():
    def factors(schedule, warmup, steps):
        cfg = dict(lr_schedule=schedule, warmup_steps=warmup, steps=steps)
        return [train.lr_factor(done, cfg) for done in range(steps)]
    assert factors("constant", 0, 3) == [1.0, 1.0, 1.0]
    assert factors("constant", 2, 4) == [0.5, 1.0, 1.0, 1.0]
    assert factors("cosine", 2, 4) == pytest.approx([0.5, 1.0, 1.0, 0.5])
    assert factors("cosine", 0, 3) == pytest.approx([1.0, 0.75, 0.25])


def test_schedule_is_logged_and_resumes_bit_for_bit(tmp_path, cache, parity_reward):
    common = TINY + ["--cache-dir", cache, "--save-interval", "1", "--eval-interval", "2", "--warmup-steps", "2",
                     "--lr-schedule", "cosine"]
    full = tmp_path / "full"
    run(common + ["--steps", "4", "--out", str(full)])
    rows = read_rows(full / "metrics.jsonl")
    assert [r["lr"] for r in rows[1:]] == pytest.approx([5e-3, 1e-2, 1e-2, 5e-3])
    saved = torch.load(full / "checkpoints" / "step_000004" / "trainer_state.pt", weights_only=False)
    assert saved["scheduler"]["last_epoch"] == 4 and "optimizer" in saved
    interrupted = tmp_path / "interrupted"
    run(common + ["--steps", "2", "--out", str(interrupted)])
    run(["--resume", str(interrupted), "--steps", "4"])
    assert [strip_timing(r) for r in read_rows(interrupted / "metrics.jsonl")] == [strip_timing(r) for r in rows]


def test_weights_only_checkpoint_and_its_resume(tmp_path, cache, parity_reward, capsys):
    out = tmp_path / "w"
    run(TINY + ["--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0",
                "--no-save-optimizer"])
    saved = torch.load(out / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=False)
    assert "optimizer" not in saved and saved["step"] == 1 and saved["scheduler"]["last_epoch"] == 1
    capsys.readouterr()
    rows = run(["--resume", str(out), "--steps", "2"])
    assert [r["step"] for r in rows] == [2] and rows[0]["updates"] >= 1
    assert ("--resume: step_000001 holds no optimizer state (--no-save-optimizer): AdamW restarts from zero "
            "moments, so the run will differ from an uninterrupted one") in capsys.readouterr().err


def test_samples_keep_the_whole_group_and_evaluations_their_verdicts(tmp_path, cache, parity_reward):
    out = tmp_path / "s"
    run(TINY + ["--cache-dir", cache, "--steps", "2", "--out", str(out), "--eval-interval", "1",
                "--log-samples", "2"])
    samples = read_rows(out / "samples.jsonl")
    assert [r["step"] for r in samples] == [1] * 8 + [2] * 8                 # 2 prompts x G = 4, every step
    first = samples[:4]
    assert len({r["prompt"] for r in first}) == 1 and len({r["prompt"] for r in samples[:8]}) == 2
    for r in samples:
        assert r["correct"] is (r["reward"] == 1.0)                          # the parity reward's verdict
        assert isinstance(r["truncated"], bool) and isinstance(r["advantage"], float)
    assert sum(r["advantage"] for r in first) == pytest.approx(0.0, abs=1e-6)
    assert all(len(r["completion"]) < 6 for r in samples if not r["truncated"])      # ended by EOS within 6
    assert any(r["truncated"] for r in samples) and not all(r["truncated"] for r in samples)
    evals = read_rows(out / "eval_samples.jsonl")
    # steps 0, 1, 2 x sets eval (2 of its 3 problems) and eval_unique x greedy + first sample
    assert len(evals) == 3 * 2 * 2 * 2
    assert {(r["step"], r["set"], r["problem_index"], r["kind"]) for r in evals} == {
        (s, p, i, k) for s in (0, 1, 2) for p in ("eval", "eval_unique") for i in (0, 1) for k in ("greedy", "sample")}
    for r in evals:
        assert r["correct"] == (r["answer"] is not None and r["correct"]) and isinstance(r["truncated"], bool)
        assert set(r) == {"step", "set", "problem_index", "prompt", "gold", "kind", "completion", "answer",
                          "correct", "truncated"}


def zero_adv_batch(cache):
    """3 prompts x G = 3 rows from the untrained lab model; group 1's advantages are all 0 (equal rewards)."""
    path = tiny_lab.warm_start(0, cache)
    base, tok = data.load_model(str(path), device=torch.device("cpu"))
    ro = train.rollout.generate(base, tok, ["1+2", "3*4", "5-1"], group_size=3, max_new_tokens=5)
    stats = train.rollout.response_stats(base, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask)
    return path, {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.response_mask,
                  "prompt_length": ro.prompt_length, "old_logp": stats["logp"], "entropy": stats["entropy"],
                  "exact_term": stats["exact_term"], "ref_logp": stats["logp"],
                  "advantages": torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0, 0.3, 0.7, -1.0])}


def one_update(path, batch, skip, **settings):
    """train.update with AdamW on a fresh copy of the model; (metrics, parameters, rows run with gradient).
    Clip-Cov's draw gets a generator seeded the same in every call."""
    model, _ = data.load_model(str(path), device=torch.device("cpu"))
    cfg = dict(algo="grpo", group_size=3, updates_per_batch=1, micro_batch_size=3, max_grad_norm=1.0,
               measure_entropy_change=False, temperature=1.0, max_new_tokens=5, skip_zero_advantage=skip)
    cfg.update({k: None for k in config.KNOB_FLAGS})
    cfg.update(settings)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ran = []

    def stats_fn(b, with_grad=False, with_entropy=True):
        if with_grad:
            ran.append(b["mask"].shape[0])
        return train.rollout.response_stats(model, b["input_ids"], b["attention_mask"], b["prompt_length"],
                                            b["mask"], with_grad=with_grad, with_entropy=with_entropy)
    knobs = {"generator": torch.Generator().manual_seed(0)} if cfg["algo"] == "clip_cov" else None
    out = train.update(model, opt, batch, cfg, stats_fn, knobs=knobs)
    return out, [p.detach().clone() for p in model.parameters()], sum(ran)


@pytest.mark.parametrize("settings", [
    dict(algo="grpo"), dict(algo="dapo"), dict(algo="drgrpo"), dict(algo="steer"), dict(algo="opefo"),
    dict(algo="archer", kl_knowledge=0.0), dict(algo="grpo", agg="seq-mean-token-mean"),
    dict(algo="clip_cov", clip_cov_ratio=0.5), dict(algo="forking"), dict(algo="w_reinforce"),
    dict(algo="entropy_adv"),
    dict(algo="steer", updates_per_batch=2),          # 2nd mini-batch = group 1 alone: an all-skipped AdamW step
    dict(algo="grpo", updates_per_batch=2, measure_entropy_change=True)])
def test_zero_advantage_rows_skipped_with_identical_parameters(cache, settings):
    path, batch = zero_adv_batch(cache)
    (out_a, par_a, ran_a), (out_b, par_b, ran_b) = (one_update(path, batch, skip, **settings) for skip in (False, True))
    assert out_a["rows_skipped_zero_adv"] == 0 and out_b["rows_skipped_zero_adv"] == 3
    assert (ran_a, ran_b) == (9, 6)
    assert out_a["updates"] == out_b["updates"] == settings.get("updates_per_batch", 1)
    assert out_a["loss/loss"] == out_b["loss/loss"] and out_a["grad_norm"] == out_b["grad_norm"]
    assert all(torch.equal(a, b) for a, b in zip(par_a, par_b))
    start, _ = data.load_model(str(path), device=torch.device("cpu"))
    assert not all(torch.equal(a, b) for a, b in zip(par_a, start.parameters()))


def test_zero_advantage_rows_scattered_with_micro_batches_of_one(cache):
    path, batch = zero_adv_batch(cache)
    batch["advantages"] = torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.5, 0.0, -0.5])
    runs = [one_update(path, batch, skip, algo="steer", micro_batch_size=1) for skip in (False, True)]
    assert runs[1][0]["rows_skipped_zero_adv"] == 5 and runs[1][2] == 4
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("settings", [dict(algo="grpo", kl_coef=0.1), dict(algo="archer"), dict(algo="kl_cov"),
                                      dict(algo="entropy_bonus"), dict(algo="adaptive_entropy")])
def test_zero_advantage_rows_kept_when_a_term_needs_them(cache, settings):
    path, batch = zero_adv_batch(cache)
    out, _, ran = one_update(path, batch, True, **settings)
    assert out["rows_skipped_zero_adv"] == 0 and ran == 9


def test_which_losses_allow_the_skip():
    mb = {"advantages": torch.tensor([0.0, 1.0]), "mask": torch.ones(2, 2), "entropy": torch.ones(2, 2)}

    def rows(algo, **cfg):
        run = dict({k: None for k in config.KNOB_FLAGS}, algo=algo, max_new_tokens=4, **cfg)
        reads = losses.uses_reference(algo, **config.knob_kwargs(run)[0])
        return train.zero_advantage_rows(mb, run, reads).tolist()
    for algo in ("grpo", "dapo", "drgrpo", "steer", "opefo"):
        assert rows(algo) == [True, False], algo
    assert rows("archer", kl_knowledge=0.0) == [True, False] and rows("archer") == [False, False]
    assert rows("grpo", kl_coef=0.1) == rows("grpo", skip_zero_advantage=False) == [False, False]
    for algo in ("clip_cov", "forking", "w_reinforce", "entropy_adv"):
        assert rows(algo) == [True, False], algo
    for algo in ("entropy_bonus", "adaptive_entropy", "kl_cov"):
        assert rows(algo) == [False, False], algo
    mb["entropy"][0, 1] = -1e-7                 # rounding below 0: entropy_adv's A' = min(0.4 H, 0) is not 0
    assert rows("entropy_adv") == [False, False] and rows("forking") == [True, False]
    assert {name for name, m in losses.LOSSES.items() if m.zero_rows is None} == \
        {"entropy_bonus", "adaptive_entropy", "kl_cov"}


@pytest.fixture
def parity_verifier(monkeypatch):
    """verifier.score -> reward 1.0 when the completion has an even number of characters, so that a random
    model's groups get real advantages (the gold is still parsed by the real verifier)."""
    real = verifier.score

    def score(response, gold):
        s = real("\\boxed{0}", gold)
        ok = len(response) % 2 == 0
        return types.SimpleNamespace(reward=float(ok), answer=response[-3:], correct=ok, timed_out=False) \
            if s.correct is not None else s
    monkeypatch.setattr(verifier, "score", score)


def test_train_two_steps_with_the_real_tokenizer(chatty, qwen_tok, tmp_path, parity_verifier):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    chatty.save_pretrained(tmp_path / "model")
    qwen_tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in bench_train.arithmetic_items(6)))
    run = tmp_path / "run"
    rows = train.main(["--model", str(tmp_path / "model"), "--dataset", str(data), "--algo", "grpo", "--steps", "2",
                       "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "8",
                       "--micro-batch-size", "4", "--lr", "1e-3", "--eval-interval", "0", "--save-interval", "2",
                       "--log-samples", "2", "--out", str(run)])
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert 1 <= r["response_length"] <= 8 and r["truncation_rate"] < 1      # <|im_end|> ended some responses
        assert r["entropy"] == pytest.approx(H_CHATTY, abs=0.3)
        assert r["updates"] == 2 and r["skipped_nonfinite"] == 0 and r["grad_norm"] > 0
    samples = [json.loads(ln) for ln in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4 and all(s["prompt"].startswith("What is ") for s in samples)  # steps x prompts x G
    assert not any("<|" in s["completion"] for s in samples)
    saved = run / "checkpoints" / "step_000002" / "model"
    reloaded_tok = AutoTokenizer.from_pretrained(saved)
    assert reloaded_tok.chat_template == qwen_tok.chat_template and rollout.end_of_turn_id(reloaded_tok) == IM_END
    assert (reloaded_tok.eos_token_id, reloaded_tok.pad_token_id) == (IM_END, ENDOFTEXT)
    trained = AutoModelForCausalLM.from_pretrained(saved)
    moved = [n for n, q in trained.named_parameters() if not torch.equal(q, chatty.state_dict()[n])]
    assert "lm_head.weight" in moved and len(moved) > 10
