"""What a new user meets on a first run: where the run goes, what evaluations print, the errors for the first
mistakes (a dataset on the lab, a GPU preset without a GPU, a model folder that is not there, a file whose rows
lack a field), a reward of their own, and the TensorBoard scalars."""
import json

import pytest

import config
import data
import train
from test_train import TINY, cache, read_rows  # noqa: F401 (fixture)


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


def test_a_dataset_without_a_model_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--dataset d.jsonl needs --model: .* tiny lab"):
        config.parse(["--dataset", "d.jsonl"])


def test_a_dataset_on_the_lab_preset_says_what_trains_on_what(capsys):
    config.resolve(config.build_parser().parse_args(["--preset", "tiny", "--dataset", "d.jsonl"]))
    assert ("--dataset with --preset tiny: the lab's model trains on d.jsonl, scored by the math verifier, and is "
            "evaluated on the lab sets") in capsys.readouterr().out


def test_a_gpu_preset_without_cuda_says_so_before_any_work():
    with pytest.raises(SystemExit, match="--preset qwen-math-1.5b trains Qwen/Qwen2.5-Math-1.5B in bf16 and needs "
                                         "a CUDA GPU"):
        config.parse(["--preset", "qwen-math-1.5b", "--dataset", "d.jsonl"])


@pytest.mark.parametrize("model", ["./no/such/model", "/no/such/model", "runs/x/checkpoints/step_000010"])
def test_a_model_folder_that_is_not_there_is_named(model):
    with pytest.raises(SystemExit, match=f"--model {model}: no such folder"):
        config.parse(["--model", model, "--dataset", "d.jsonl"])


def test_a_missing_answer_is_named_by_the_field_the_file_uses(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2"}) + "\n")
    with pytest.raises(data.DataError, match=r"row 2: field 'answer' \(the answer\) is missing"):
        data.load_items(str(path), "train")


def test_warmup_help_matches_the_schedule():
    text = " ".join(config.build_parser().format_help().split())
    assert "--lr * (n + 1) / N after n finished steps" in text
    assert train.lr_factor(0, dict(warmup_steps=4, lr_schedule="constant", steps=10)) == 1 / 4


REWARD_MODULE = '''
def reward(completion, row):
    """0.5 per '=' sign in the completion, at most 1: a shaped reward the verifier knows nothing of."""
    return min(1.0, 0.5 * completion.count("="))
'''


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


@pytest.mark.parametrize("spec,message", [
    ("my_rewards", "expected MODULE:FUNCTION"), ("no_such_module:f", "cannot import no_such_module"),
    ("my_rewards:nothing", "my_rewards has no function nothing")])
def test_a_bad_reward_is_one_line_before_any_work(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    with pytest.raises(SystemExit, match=f"--reward {spec}: {message}"):
        config.parse(TINY + ["--reward", spec, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


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


def test_the_lab_runs_on_one_thread_unless_told(tmp_path, cache, monkeypatch):
    parse = lambda *argv: config.resolve(config.build_parser().parse_args(list(argv)), log=lambda m: None)  # noqa: E731
    assert parse("--preset", "tiny")["threads"] == 1 and parse("--preset", "tiny", "--threads", "2")["threads"] == 2
    assert parse("--model", "m", "--dataset", "d.jsonl")["threads"] is None          # torch's own default
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        parse("--threads", "0")
    seen = []
    monkeypatch.setattr(train.torch, "set_num_threads", seen.append)
    train.main(TINY + ["--cache-dir", cache, "--out", str(tmp_path / "run"), "--steps", "1", "--threads", "2"])
    assert seen[0] == 2
