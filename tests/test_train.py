"""Tests of train.py: the RL loop end to end on the tiny lab, resume, checkpoints, data plumbing, switches.

Budget given: the whole file under 90 s on 2 CPU cores. The loop tests use an untrained tiny model (no
warm start) and replace the lab's reward by a deterministic function of the completion (even sum of
character codes -> 1.0), so every group has a real advantage signal without any training; the lab's task and reward are tested
in test_tiny_lab.py, the verifier in test_verifier.py and its use here (gold parsing, skipping) below.
"""
import json
import types

import pytest
import torch

import losses
import tiny_lab
import train
import verifier

TINY = ["--preset", "tiny", "--tiny-sft-steps", "0", "--prompts-per-step", "2", "--group-size", "4",
        "--max-new-tokens", "6", "--eval-size", "3", "--eval-k", "2", "--lr", "1e-2", "--log-samples", "1"]


@pytest.fixture
def cache(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "tiny_cache")     # one warm-start folder for the whole file


@pytest.fixture
def parity_reward(monkeypatch):
    """The lab's reward -> 1.0 when the completion's character codes have an even sum."""
    def score(response, item):
        ok = sum(map(ord, response)) % 2 == 0
        return verifier.Score(float(ok), response[-3:], ok, False)
    monkeypatch.setattr(tiny_lab, "score", score)


def run(argv):
    return train.main(argv)


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def strip_timing(row):
    return {k: v for k, v in row.items() if not k.startswith(train.TIMING_KEYS)}


@pytest.mark.parametrize("algo", train.ALGOS)
def test_end_to_end_and_resume(algo, tmp_path, cache, parity_reward):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["--measure-entropy-change"] if algo == "steer" else []
    common = TINY + ["--algo", algo, "--cache-dir", cache, "--save-interval", "1", "--eval-interval", "1"] + extra
    run(common + ["--steps", "2", "--out", str(full)])
    rows = read_rows(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("reward", "accuracy", "entropy", "response_length", "truncation_rate", "loss/loss",
                    "loss/pg_loss", "time/generate", "time/score", "time/stats", "time/update",
                    "tokens_per_s/generate", "peak_mem_mb", "grad_norm"):
            assert key in r, key
        assert r["groups_kept"] >= 1 and r["updates"] == min(1 if algo == "opefo" else 2, r["groups_kept"])
        assert torch.isfinite(torch.tensor(r["loss/loss"])) and r["grad_norm"] > 0
        assert 0 < r["entropy"] < 5.0                       # log(99) = 4.6 is the ceiling
    assert "eval/avg@2" in rows[2] and "eval/pass@2" in rows[2] and "eval/greedy_acc" in rows[0]
    assert (full / "checkpoints" / "latest").read_text() == "step_000002"
    assert (full / "checkpoints" / "step_000002" / "model" / "model.safetensors").exists()
    assert not (full / "checkpoints" / "step_000001").exists()
    assert len(read_rows(full / "samples.jsonl")) == 2
    if algo == "archer":                    # the frozen reference is loaded and the KL is live
        assert rows[2]["loss/kl_knowledge"] > 0
    if algo == "steer":
        assert -1 <= rows[1]["dH/pearson_exact"] <= 1 and rows[1]["dH/tokens"] > 0
        assert 0 < rows[1]["loss/weight_min"] <= rows[1]["loss/weight_max"] <= 1

    # interrupted after step 1, resumed to step 2: the same numbers as the uninterrupted run
    run(common + ["--steps", "1", "--out", str(part)])
    run(["--resume", str(part), "--steps", "2"])
    resumed = read_rows(part / "metrics.jsonl")
    assert [strip_timing(r) for r in resumed] == [strip_timing(r) for r in rows]


def test_micro_batching_gives_the_same_update(tmp_path, cache):
    """One update with micro-batches of 1 sequence equals one with the whole mini-batch (global normalisers,
    STEER's mini-batch M, OPEFO's batch flow totals)."""
    path = tiny_lab.warm_start(0, cache)
    torch.manual_seed(0)
    base, tok = train.load_model(str(path), device=torch.device("cpu"))
    ro = train.rollout.generate(base, tok, ["1+2", "3*4"], group_size=3, max_new_tokens=5)
    batch = {"input_ids": ro.input_ids, "attention_mask": ro.attention_mask, "mask": ro.response_mask,
             "prompt_length": ro.prompt_length, "advantages": torch.tensor([1.0, -0.5, -0.5, 0.3, 0.7, -1.0])}
    stats = train.rollout.response_stats(base, ro.input_ids, ro.attention_mask, ro.prompt_length, ro.response_mask)
    batch.update(old_logp=stats["logp"], entropy=stats["entropy"], exact_term=stats["exact_term"])
    for algo, agg in (("dapo", None), ("grpo", "seq-mean-token-mean"), ("steer", None), ("opefo", None)):
        results = []
        for micro in (6, 1):
            model, _ = train.load_model(str(path), device=torch.device("cpu"))
            cfg = dict(algo=algo, group_size=3, updates_per_batch=1, micro_batch_size=micro, max_grad_norm=1e9,
                       measure_entropy_change=False, temperature=1.0, max_new_tokens=5, agg=agg)
            cfg.update({k: None for k in train.LOSS_KNOBS if k not in cfg})
            opt = torch.optim.SGD(model.parameters(), lr=1.0)

            def stats_fn(b, with_grad=False, with_entropy=True):
                return train.rollout.response_stats(model, b["input_ids"], b["attention_mask"], b["prompt_length"],
                                                    b["mask"], with_grad=with_grad, with_entropy=with_entropy)
            out = train.update(model, opt, batch, cfg, stats_fn)
            results.append((out["loss/loss"], torch.cat([p.detach().flatten() for p in model.parameters()])))
        (loss_a, par_a), (loss_b, par_b) = results
        assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1e-7), algo
        assert torch.allclose(par_a, par_b, atol=1e-6), algo
        assert not torch.equal(par_a, torch.cat([p.detach().flatten() for p in base.parameters()])), algo


def test_nonfinite_loss_skips_the_step(tmp_path, cache, parity_reward, monkeypatch):
    def nan_loss(**kw):
        return kw["logp"].sum() * float("nan"), {"pg_loss": float("nan")}
    monkeypatch.setitem(losses.LOSSES, "grpo", nan_loss)
    out = tmp_path / "nan"
    run(TINY + ["--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0"])
    row = read_rows(out / "metrics.jsonl")[1]
    assert row["updates"] == 0 and row["skipped_nonfinite"] == 2
    start = train.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"))[0]
    saved = train.load_model(str(out / "checkpoints" / "step_000001" / "model"), device=torch.device("cpu"))[0]
    for a, b in zip(start.parameters(), saved.parameters()):
        assert torch.equal(a, b)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, cache, monkeypatch):
    model, tok = train.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    rng = train.random.Random(0)
    train.save_checkpoint(tmp_path, 1, model, tok, opt, rng, [3, 1])

    def crash(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(train.torch, "save", crash)
    with pytest.raises(RuntimeError):
        train.save_checkpoint(tmp_path, 2, model, tok, opt, rng, [1])
    latest = train.latest_checkpoint(tmp_path)
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
    real = train.load_model

    def spy(*a, **k):
        model, tok = real(*a, **k)
        seen.setdefault("model", model)
        return model, tok
    monkeypatch.setattr(train, "load_model", spy)
    out = tmp_path / "bf16"
    run(TINY + ["--cache-dir", cache, "--steps", "1", "--out", str(out), "--eval-interval", "0", "--bf16",
                "--gradient-checkpointing", "--algo", "grpo", "--kl-coef", "0.1"])
    row = read_rows(out / "metrics.jsonl")[1]
    assert torch.isfinite(torch.tensor(row["loss/loss"])) and row["grad_norm"] > 0 and "loss/kl" in row
    assert seen["model"].is_gradient_checkpointing
    assert next(seen["model"].parameters()).dtype == torch.float32        # fp32 master weights


@pytest.mark.parametrize("n,c,k,expected", [(4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 0, 4, 0.0), (4, 4, 1, 1.0),
                                            (5, 2, 3, 0.9)])
def test_pass_at_k(n, c, k, expected):
    assert train.pass_at_k(n, c, k) == pytest.approx(expected)


def test_shared_benchmark_files_load_with_their_mapping(shared_data):
    first = {name: train.load_items(str(shared_data / name), "test")[0]["answer"]
             for name in ("math500.jsonl", "gsm8k_test.jsonl", "aime24.jsonl", "amc23.jsonl", "minerva_math.jsonl")}
    assert first["math500.jsonl"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first["gsm8k_test.jsonl"] == "18"
    assert first["amc23.jsonl"] == "27.0"
    assert first["aime24.jsonl"] == "204"
    assert verifier.score("\\boxed{1.6}", first["minerva_math.jsonl"]).correct   # \boxed{1.6} in the solution
    assert len(train.load_items(str(shared_data / "gsm8k_test.jsonl"), "test")) == 1319


def test_local_file_field_mapping_and_bad_rows(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"q": "What is 2+2?", "sol": "so \\boxed{4}", "a": 4}) + "\n")
    assert train.load_items(str(good), "train", problem_field="q", answer_field="a")[0]["answer"] == "4"
    assert train.load_items(str(good), "train", problem_field="q", answer_field="sol")[0]["answer"] == "4"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n" + json.dumps({"problem": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl, row 2: field 'solution'"):
        train.load_items(str(bad), "train")
    bad.write_text(json.dumps({"problem": "", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'problem'"):
        train.load_items(str(bad), "train")
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"row 1: not valid JSON"):
        train.load_items(str(bad), "train")
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'answer' has no gsm8k answer"):
        train.load_items(str(bad), "train", answer_format="gsm8k")


def test_offline_errors_name_the_alternatives():
    with pytest.raises(SystemExit, match="Offline alternatives.*--preset tiny"):
        train.load_items("no-such-org/no-such-dataset", "train")
    with pytest.raises(SystemExit, match="Offline alternatives.*--preset tiny"):
        train.load_model("no-such-org/no-such-model", device=torch.device("cpu"))


def test_cli_validation(capsys):
    with pytest.raises(SystemExit, match="--lambda-min does not apply to --algo grpo"):
        train.resolve_config(train.build_parser().parse_args(["--lambda-min", "0.5"]), log=lambda m: None)
    cfg = train.resolve_config(train.build_parser().parse_args(["--algo", "opefo", "--updates-per-batch", "4"]),
                               log=lambda m: None)
    assert cfg["preset"] == "tiny" and cfg["updates_per_batch"] == 1 and cfg["drop_equal_groups"] is False
    assert train.resolve_config(train.build_parser().parse_args(["--algo", "dapo"]), log=print)["drop_equal_groups"]
    assert "tiny lab" in capsys.readouterr().out
    cfg = train.resolve_config(train.build_parser().parse_args(["--algo", "archer"]), log=lambda m: None)
    assert train.needs_reference(cfg)
    cfg = train.resolve_config(train.build_parser().parse_args(["--algo", "grpo"]), log=lambda m: None)
    assert not train.needs_reference(cfg)
    for action in train.build_parser()._actions:
        assert action.help, action.dest


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)      # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        train.main(["--plot", "--out", str(tmp_path / "p")])
