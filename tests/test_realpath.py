"""Tests of train.py on the real path's needs: local files without the Hub, evaluation flags, the frozen
reference under --bf16, weights-only checkpoints, the learning-rate schedule, samples with verdicts,
OPEFO's forced single update and the skip of zero-advantage rows.

Same set-up as test_train.py (untrained tiny lab model, parity reward); kept to a few seconds each.
"""
import json

import pytest
import torch

import config
import data
import losses
import tiny_lab
import train
from test_train import TINY, cache, parity_reward, read_rows, run, strip_timing  # noqa: F401 (fixtures)


def resolved(argv, lines=None):
    return config.resolve(config.build_parser().parse_args(argv),
                          log=(lines.append if lines is not None else lambda m: None))


def test_own_dataset_drops_the_presets_hub_evaluation_set():
    lines = []
    cfg = resolved(["--preset", "qwen-math-1.5b", "--model", "m", "--dataset", "d.jsonl"], lines)
    assert cfg["eval_dataset"] is None
    assert lines == ["--dataset given: the preset's evaluation set HuggingFaceH4/MATH-500 is not used "
                     "(name it with --eval-dataset to evaluate on it)"]
    cfg = resolved(["--preset", "qwen-math-1.5b", "--dataset", "d.jsonl", "--eval-dataset", "e.jsonl"])
    assert cfg["eval_dataset"] == "e.jsonl"
    assert resolved(["--preset", "qwen-math-1.5b"])["eval_dataset"] == "HuggingFaceH4/MATH-500"


@pytest.mark.parametrize("flag", ["--dataset", "--eval-dataset"])
def test_hub_failure_names_both_flags_and_leaves_no_run_directory(flag, tmp_path, cache):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"cannot load {flag} 'no-such-org/no-such-data'.*Offline alternatives: "
                                         r"local JSON Lines files \(--dataset / --eval-dataset path/to/file\.jsonl"):
        run(TINY + ["--cache-dir", cache, flag, "no-such-org/no-such-data", "--out", str(out)])
    assert not out.exists()


def test_eval_flags_without_an_evaluation_set_warn_once(monkeypatch):
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)          # no CPU sizing line
    lines = []
    resolved(["--model", "m", "--dataset", "d.jsonl", "--eval-size", "5", "--eval-k", "2"], lines)
    assert lines == ["--eval-size and --eval-k ignored: there is no evaluation set (name one with --eval-dataset)"]
    lines.clear()
    resolved(["--model", "m", "--dataset", "d.jsonl", "--eval-dataset", "e.jsonl", "--eval-size", "5"], lines)
    assert lines == []


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


def test_opefo_says_it_forces_one_update():
    lines = []
    assert resolved(["--algo", "opefo", "--updates-per-batch", "4"], lines)["updates_per_batch"] == 1
    assert "--algo opefo: updates_per_batch 4 -> 1 (strictly on-policy: one optimizer step per rollout batch)" in lines


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


def test_bench_trl_without_trl_exits_2(monkeypatch, capsys):
    from benchmarks import bench_trl
    monkeypatch.setitem(__import__("sys").modules, "trl", None)          # import trl -> ImportError
    assert bench_trl.main([]) == 2
    assert "pip install -r requirements-integrations.txt" in capsys.readouterr().err


def test_bench_trl_runs_both_sides_and_prints_the_ratio(cache, capsys):
    pytest.importorskip("trl", reason="TRL is not installed (pip install -r requirements-integrations.txt)")
    from benchmarks import bench_trl
    assert bench_trl.main(["--prompts", "2", "--group-size", "4", "--max-new-tokens", "4", "--updates", "2",
                           "--micro-batch-size", "2", "--steps", "2", "--warmup", "1", "--tiny-sft-steps", "0",
                           "--cache-dir", cache]) == 0
    out = capsys.readouterr().out
    assert "2 pairs after 1 warm-up" in out and "median ratio train.py / TRL: " in out
    with pytest.raises(SystemExit, match="must split into --updates 2 mini-batches"):
        bench_trl.main(["--prompts", "3", "--group-size", "1"])
