"""Tests of evaluation.py's command (python evaluation.py --model DIR --data FILE.jsonl): the figures, the
per-problem samples file, seeding, checkpoint folders and bad input; and evaluate()'s on_problem records.

The model is the tiny lab's untrained one (tiny_lab.warm_start(0, ...), built once per file into the pytest
temp folder); the data a synthetic JSON Lines file written by the test, and the first 3 MATH-500 problems
when ../shared/data is present. Generation budgets are a few tokens, so the file runs in seconds on CPU.
"""
import contextlib
import json
import shutil
import subprocess
import sys

import pytest

import data
import evaluation
import run_dir
import tiny_lab
import verifier

ROOT = evaluation.Path(evaluation.__file__).resolve().parent
SYNTH = [{"problem": "What is 1+1?", "answer": "2"}, {"problem": "What is 2*3?", "answer": "6"},
         {"problem": "What is 9-4?", "answer": "5"}, {"problem": "Name the next prime after 3.", "answer": "5"}]
FAST = ["--k", "4", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny lab's untrained model folder (model + tokenizer), shared with test_train.py's cache."""
    return tiny_lab.warm_start(0, str(tmp_path_factory.getbasetemp() / "tiny_cache"), log=lambda msg: None)


@pytest.fixture
def synth(tmp_path):
    path = tmp_path / "synth.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SYNTH))
    return path


def parity_score(completion, gold):
    """Correct when the completion's character codes have an even sum: a deterministic mixed reward."""
    ok = sum(map(ord, completion)) % 2 == 0
    return verifier.Score(float(ok), completion[-3:], ok, False)


def evaluate_cli(model, data_file, out, *extra):
    return evaluation.main(["--model", str(model), "--data", str(data_file), "--out", str(out), *FAST, *extra])


def read(out):
    figures = json.loads((out / "figures.json").read_text())
    return figures, run_dir.read_jsonl(out / "samples.jsonl")


def test_figures_agree_with_the_samples_file(model_dir, synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(verifier, "score", parity_score)
    returned = evaluate_cli(model_dir, synth, tmp_path / "out")
    saved, records = read(tmp_path / "out")
    figures = saved["figures"]
    assert figures == returned
    assert list(figures) == ["skipped_gold", "n", "avg@4", "pass@1", "pass@2", "pass@4", "distinct", "greedy_acc"]
    assert figures["n"] == 4 and figures["skipped_gold"] == 0 and saved["too_long"] == 0
    assert saved["settings"]["k"] == 4 and saved["settings"]["seed"] == 0

    # one record per problem, in order, with the greedy completion and k sampled ones
    assert [r["problem_index"] for r in records] == [0, 1, 2, 3]
    assert [(r["prompt"], r["gold"]) for r in records] == [(row["problem"], row["answer"]) for row in SYNTH]
    for r in records:
        assert len(r["samples"]) == 4
        for s in [r["greedy"], *r["samples"]]:
            assert set(s) == {"completion", "answer", "correct", "truncated"}
            assert s["correct"] == parity_score(s["completion"], None).correct
            assert s["answer"] == s["completion"][-3:]
        assert r["n_correct"] == sum(s["correct"] for s in r["samples"])
        assert r["source"] == f"{synth}, row {r['problem_index'] + 1}"

    # the figures recomputed from the file
    c = [r["n_correct"] for r in records]
    assert 0 < sum(c) < 16, "the parity reward should give a mixed picture"
    assert figures["avg@4"] == pytest.approx(sum(c) / 16)
    for j in (1, 2, 4):
        assert figures[f"pass@{j}"] == pytest.approx(sum(evaluation.pass_at_k(4, n, j) for n in c) / 4)
    assert figures["pass@1"] == pytest.approx(figures["avg@4"])
    assert figures["greedy_acc"] == pytest.approx(sum(r["greedy"]["correct"] for r in records) / 4)
    distinct = [len({" ".join(s["completion"].split()) for s in r["samples"] if s["correct"]}) for r in records]
    assert figures["distinct"] == pytest.approx(sum(distinct) / 4)

    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{model_dir.name} on synth.jsonl: 4 problems, k=4")
    assert printed[1:-2] == [f"  {key:<12} {figures[key]:.3f}" for key in list(figures)[2:]]
    assert printed[-2:] == [f"samples: {tmp_path / 'out' / 'samples.jsonl'}",
                           f"figures: {tmp_path / 'out' / 'figures.json'}"]


def test_all_correct_reward_gives_one_everywhere(model_dir, synth, tmp_path, monkeypatch):
    monkeypatch.setattr(verifier, "score", lambda completion, gold: verifier.Score(1.0, "x", True, False))
    figures = evaluate_cli(model_dir, synth, tmp_path / "out", "--k", "8")
    assert [key for key in figures if key.startswith(("avg", "pass"))] == ["avg@8", "pass@1", "pass@2", "pass@4",
                                                                           "pass@8"]
    for key, value in figures.items():
        if key not in ("n", "skipped_gold", "distinct"):
            assert value == 1.0, key
    _, records = read(tmp_path / "out")
    assert len(records) == 4 and all(len(r["samples"]) == 8 and r["n_correct"] == 8 for r in records)
    texts = [len({" ".join(s["completion"].split()) for s in r["samples"]}) for r in records]
    assert figures["distinct"] == pytest.approx(sum(texts) / 4) and figures["distinct"] > 1


def test_same_seed_same_output(model_dir, synth, tmp_path, monkeypatch):
    monkeypatch.setattr(verifier, "score", parity_score)
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        evaluate_cli(model_dir, synth, tmp_path / name, "--seed", seed)
    a, b, c = (read(tmp_path / name) for name in "abc")
    assert a == b
    assert a[1] != c[1], "another seed should draw other samples"
    assert [r["greedy"] for r in a[1]] == [r["greedy"] for r in c[1]]       # greedy does not depend on the seed


def test_skipped_gold_is_counted(model_dir, synth, tmp_path, monkeypatch):
    monkeypatch.setattr(verifier, "score", lambda completion, gold: verifier.Score(
        0.0, None, None if gold == "6" else True, False))
    figures = evaluate_cli(model_dir, synth, tmp_path / "out", "--size", "3")
    assert figures["n"] == 2 and figures["skipped_gold"] == 1 and figures["avg@4"] == 1.0
    _, records = read(tmp_path / "out")
    assert [r["n_correct"] for r in records] == [4, None, 4]


def test_checkpoint_folder_and_default_out(model_dir, synth, tmp_path, monkeypatch):
    """runs/X/checkpoints/step_N (model under model/) and its model folder evaluate the same weights; the
    default --out is runs/eval-<name>-<data stem>, a checkpoint named <run>-step_N."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(verifier, "score", parity_score)
    ckpt = tmp_path / "runs" / "grpo-x" / "checkpoints" / "step_000002"
    shutil.copytree(model_dir, ckpt / "model")
    (ckpt / "trainer_state.pt").write_bytes(b"")
    fast = [*FAST, "--size", "2"]
    evaluation.main(["--model", str(ckpt), "--data", str(synth), *fast])
    evaluation.main(["--model", str(ckpt / "model"), "--data", str(synth), *fast, "--out", "runs/direct"])
    evaluation.main(["--model", str(model_dir), "--data", str(synth), *fast])
    by_ckpt = read(tmp_path / "runs" / "eval-grpo-x-step_000002-synth")
    direct = read(tmp_path / "runs" / "direct")
    plain = read(tmp_path / "runs" / f"eval-{model_dir.name}-synth")
    assert by_ckpt[0]["settings"]["model"] == str(ckpt / "model")
    assert by_ckpt[1] == direct[1] == plain[1] and len(plain[1]) == 2
    assert by_ckpt[0]["figures"] == plain[0]["figures"]


def test_math500_first_three(model_dir, shared_data, tmp_path):
    """The real verifier on MATH-500's first 3 problems: the untrained tiny model, its context widened from 64
    positions so the prompts fit (its rotary embeddings take any length), scores 0 everywhere."""
    path, wide = shared_data / "math500.jsonl", tmp_path / "wide"
    shutil.copytree(model_dir, wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=4096)))
    figures = evaluate_cli(wide, path, tmp_path / "out", "--size", "3", "--k", "2")
    assert figures == {"skipped_gold": 0, "n": 3, "avg@2": 0.0, "pass@1": 0.0, "pass@2": 0.0, "distinct": 0.0,
                       "greedy_acc": 0.0}
    _, records = read(tmp_path / "out")
    gold = [item["answer"] for item in data.load_items(str(path), "test")[:3]]
    assert [r["gold"] for r in records] == gold and gold[0] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert all(len(r["samples"]) == 2 and r["n_correct"] == 0 for r in records)


@pytest.mark.parametrize("case, expected", [
    ("k0", "--k must be at least 1, got 0"),
    ("size0", "--size must be at least 1, got 0"),
    ("no_model", "--model {tmp}/nowhere: no such folder"),
    ("empty_model", "--model {tmp}: neither a model folder (no config.json) nor a checkpoint folder"),
    ("no_data", "--data {tmp}/missing.jsonl: no such file"),
    ("no_field", "--data {tmp}/bad.jsonl, row 2: field 'problem' (the problem) is missing"),
    ("not_json", "--data {tmp}/bad.jsonl, row 1: not valid JSON"),
])
def test_bad_input_is_one_line_and_exit_2(case, expected, model_dir, synth, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text({"no_field": '{"problem": "1+1?", "answer": "2"}\n{"answer": "4"}\n',
                    "not_json": "[\n"}.get(case, ""))
    argv = {"k0": ["--k", "0"], "size0": ["--size", "0"], "no_model": ["--model", str(tmp_path / "nowhere")],
            "empty_model": ["--model", str(tmp_path)], "no_data": ["--data", str(tmp_path / "missing.jsonl")],
            "no_field": ["--data", str(bad)], "not_json": ["--data", str(bad)]}[case]
    out = tmp_path / "out"
    rc = run_dir.cli(evaluation.main, "evaluation.py",
                     ["--model", str(model_dir), "--data", str(synth), "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("evaluation.py: error: ")
    assert expected.format(tmp=tmp_path) in err
    assert not out.exists(), "nothing is done before the input is checked"


def test_the_command(model_dir, tmp_path):
    """python evaluation.py as a process (the __main__ path through run_dir.cli): a row without the problem
    field is one line on stderr, exit status 2, nothing on stdout and no output folder. A whole run is
    tested in-process above (one process start costs ~10 s of imports)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"answer": "4"}\n')
    cmd = [sys.executable, str(ROOT / "evaluation.py"), "--model", str(model_dir), "--data", str(bad),
           "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "out").exists()
    assert done.stderr.startswith(f"evaluation.py: error: --data {bad}, row 2: field 'problem' (the problem) "
                                  "is missing") and done.stderr.count("\n") == 1


def test_on_problem_records_match_kept_samples(model_dir, monkeypatch):
    """evaluate(): on_problem gets every problem with all k samples; the kept samples (what train.py logs) are
    its greedy and first sampled completion; the callback changes neither figures nor kept samples."""
    import torch

    monkeypatch.setattr(verifier, "score", parity_score)
    model, tok = data.load_model(str(model_dir), device=torch.device("cpu"), trainable=False)
    items = [{"problem": row["problem"], "answer": row["answer"]} for row in SYNTH]
    kwargs = dict(k=3, temperature=1.0, top_p=1.0, max_new_tokens=5, chunk=3, system_prompt=None,
                  autocast=contextlib.nullcontext, prefix="eval_x", keep=2, score_fn=data.verify)
    records = []
    torch.manual_seed(7)
    figures, kept = evaluation.evaluate(model, tok, items, on_problem=records.append, **kwargs)
    torch.manual_seed(7)
    assert evaluation.evaluate(model, tok, items, **kwargs) == (figures, kept)
    assert [r["problem_index"] for r in records] == [0, 1, 2, 3] and all(len(r["samples"]) == 3 for r in records)
    assert all(r["set"] == "eval_x" and r["source"] is None for r in records)
    assert len(kept) == 4
    for sample, (r, kind) in zip(kept, [(records[0], "greedy"), (records[0], "sample"),
                                        (records[1], "greedy"), (records[1], "sample")]):
        shown = r["greedy"] if kind == "greedy" else r["samples"][0]
        assert sample == {"set": "eval_x", "problem_index": r["problem_index"], "prompt": r["prompt"],
                          "gold": r["gold"], "kind": kind, **shown}
    assert figures["eval_x/avg@3"] == pytest.approx(sum(r["n_correct"] for r in records) / 12)


def test_a_run_directory_is_named_as_such_with_its_checkpoints(model_dir, tmp_path):
    run = tmp_path / "runs" / "tiny-grpo-seed0"
    shutil.copytree(model_dir, run / "checkpoints" / "step_000050" / "model")
    (run / "config.json").write_text(json.dumps({"algo": "grpo"}))             # a run's config, not a model's
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match=rf"--model {run} is a train.py run directory, not a model: give one of "
                                         rf"its checkpoints \({run / 'checkpoints' / 'step_000050'}\)"):
        evaluation.main(["--model", str(run), "--data", "lab:test"])


def test_the_labs_own_held_out_set_with_the_labs_reward_and_budget(model_dir, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(tiny_lab, "score", lambda c, item: seen.append(item) or verifier.Score(1.0, None, True, False))
    figures = evaluation.main(["--model", str(model_dir), "--data", "lab:unique", "--size", "3", "--k", "2",
                               "--out", str(tmp_path / "out")])
    assert figures["n"] == 3 and figures["avg@2"] == 1.0
    assert [it["problem"] for it in seen[:2]] == [tiny_lab.datasets()[1]["unique"][0]["problem"]] * 2
    settings = read(tmp_path / "out")[0]["settings"]
    assert settings["max_new_tokens"] == 20 and settings["data"] == "lab-unique"
    with pytest.raises(SystemExit, match="--data lab:nope: the lab's held-out sets are lab:test, lab:unique"):
        evaluation.main(["--model", str(model_dir), "--data", "lab:nope"])


def test_prompts_that_do_not_fit_the_context_are_refused_or_left_out_with_a_warning(model_dir, synth, tmp_path,
                                                                                    capsys):
    with pytest.raises(SystemExit, match="--max-new-tokens 1024 does not fit the model's context of 64 positions"):
        evaluation.main(["--model", str(model_dir), "--data", str(synth), "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="every problem's prompt is longer than 4 tokens"):
        evaluation.main(["--model", str(model_dir), "--data", str(synth), "--max-new-tokens", "60"])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"problem": "x" * 80, "answer": "1"}) + "\n" + synth.read_text())
    figures = evaluation.main(["--model", str(model_dir), "--data", str(long), "--out", str(tmp_path / "b"), *FAST])
    assert figures["n"] == 4
    assert "left out 1 problems whose prompt is longer than 58 tokens" in capsys.readouterr().err


def test_a_long_evaluation_in_a_log_prints_progress_with_the_time_left(model_dir, synth, tmp_path, capsys,
                                                                      monkeypatch):
    clock = iter(range(0, 10_000, 7))                           # every reading 7 s later
    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: next(clock))
    evaluation.main(["--model", str(model_dir), "--data", str(synth), "--out", str(tmp_path / "out"), *FAST,
                     "--chunk", "1"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("problems ")]
    assert [line.split(",")[0] for line in lines] == ["problems 2/4", "problems 3/4", "problems 4/4"]
    assert lines[-1].endswith("about 0s left") and "about" in lines[0]


def test_a_model_folder_that_does_not_load_suggests_what_evaluation_takes(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--model", str(tmp_path / "m"), "--data", "lab:test"])
    assert "checkpoint folder runs/X/checkpoints/step_N" in str(e.value) and "--preset" not in str(e.value)


@pytest.mark.parametrize("n,c,k,expected", [(4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 0, 4, 0.0), (4, 4, 1, 1.0),
                                            (5, 2, 3, 0.9)])
def test_pass_at_k(n, c, k, expected):
    assert evaluation.pass_at_k(n, c, k) == pytest.approx(expected)
