"""Tests of train.py on the real path's needs: local files without the Hub, evaluation flags, the frozen
reference under --bf16, weights-only checkpoints, the learning-rate schedule, samples with verdicts,
OPEFO's forced single update and the skip of zero-advantage rows.

Same set-up as test_train.py (untrained tiny lab model, parity reward); kept to a few seconds each.
"""
import json

import pytest
import torch

import tiny_lab
import train
from test_train import TINY, cache, parity_reward, read_rows, run, strip_timing  # noqa: F401 (fixtures)


def config(argv, lines=None):
    return train.resolve_config(train.build_parser().parse_args(argv),
                                log=(lines.append if lines is not None else lambda m: None))


def test_own_dataset_drops_the_presets_hub_evaluation_set():
    lines = []
    cfg = config(["--preset", "qwen-math-1.5b", "--model", "m", "--dataset", "d.jsonl"], lines)
    assert cfg["eval_dataset"] is None
    assert lines == ["--dataset given: the preset's evaluation set HuggingFaceH4/MATH-500 is not used "
                     "(name it with --eval-dataset to evaluate on it)"]
    cfg = config(["--preset", "qwen-math-1.5b", "--dataset", "d.jsonl", "--eval-dataset", "e.jsonl"])
    assert cfg["eval_dataset"] == "e.jsonl"
    assert config(["--preset", "qwen-math-1.5b"])["eval_dataset"] == "HuggingFaceH4/MATH-500"


@pytest.mark.parametrize("flag", ["--dataset", "--eval-dataset"])
def test_hub_failure_names_both_flags_and_leaves_no_run_directory(flag, tmp_path, cache):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"cannot load {flag} 'no-such-org/no-such-data'.*\n.*"
                                         r"--dataset / --eval-dataset path/to/file\.jsonl"):
        run(TINY + ["--cache-dir", cache, flag, "no-such-org/no-such-data", "--out", str(out)])
    assert not out.exists()


def test_eval_flags_without_an_evaluation_set_warn_once():
    lines = []
    config(["--model", "m", "--dataset", "d.jsonl", "--eval-size", "5", "--eval-k", "2"], lines)
    assert lines == ["--eval-size and --eval-k ignored: there is no evaluation set (name one with --eval-dataset)"]
    lines.clear()
    config(["--model", "m", "--dataset", "d.jsonl", "--eval-dataset", "e.jsonl", "--eval-size", "5"], lines)
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
    assert read_rows(tmp_path / "run" / "metrics.jsonl")[0] == {"step": 0}


def test_opefo_says_it_forces_one_update():
    lines = []
    assert config(["--algo", "opefo", "--updates-per-batch", "4"], lines)["updates_per_batch"] == 1
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
    ref, _ = train.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"), trainable=False)
    assert {p.dtype for p in ref.parameters()} == {torch.float32}
