"""config.py: the flags' --help groups and the method flags' mapping onto the loss keywords."""
import subprocess
import sys
from pathlib import Path

import pytest

import config
import losses
import run_dir
import tiny_lab
import train
from conftest import REWARD_MODULE, ROOT, TINY, error_line


def test_help_is_grouped_and_every_flag_is_in_one_group():
    parser = config.build_parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    for title in ("run", "data", "model", "rollout", "optimisation", "evaluation", *config.KNOB_GROUPS):
        assert groups[title], title
    assert groups["optimisation"][:2] == ["lr", "optimizer"] and "algo" in groups["run"]
    flags = [d for title, dests in groups.items() if title not in ("options", "positional arguments")
             for d in dests]
    assert sorted(flags) == sorted(set(flags))                                   # each flag once
    assert set(flags) == {a.dest for a in parser._actions} - {"help"}            # none outside a group
    assert {d for t in config.KNOB_GROUPS for d in groups[t]} == set(config.KNOB_FLAGS)


@pytest.mark.parametrize("key", sorted(config.KNOB_FLAGS))
def test_every_method_flag_names_one_knob_under_one_name(key):
    """A flag sets the keyword of the same name in every loss that has it (or the adaptive-entropy
    controller's); no per-method renames, and a flag that reaches no loss would be a typo."""
    _, name, _ = config.KNOB_FLAGS[key]
    assert isinstance(name, str)
    applies = [algo for algo in config.ALGOS if name in losses.LOSSES[algo].knobs
               or (losses.LOSSES[algo].adaptive and name in config.CONTROL_KEYS)]
    assert applies, key
    assert [k for k, (_, n, _) in config.KNOB_FLAGS.items() if n == name] == [key]      # one flag per knob


def test_the_ppo_clip_flags_reach_exactly_the_losses_that_take_them():
    for algo in config.ALGOS:
        cfg = dict({k: None for k in config.KNOB_FLAGS}, algo=algo, clip_low=0.1)
        if "clip_low" in losses.LOSSES[algo].knobs:
            assert config.knob_kwargs(cfg) == ({"clip_low": 0.1}, {})
        else:
            with pytest.raises(SystemExit, match=f"--clip-low does not apply to --algo {algo}"):
                config.knob_kwargs(cfg)
    no_clip_low = {a for a in config.ALGOS if "clip_low" not in losses.LOSSES[a].knobs}
    assert no_clip_low == {"opefo", "archer", "aspo", "kl_cov", "sapo"}


def test_adaptive_entropy_sends_the_controller_flags_to_the_controller():
    cfg = dict({k: None for k in config.KNOB_FLAGS}, algo="adaptive_entropy", entropy_coef=0.01, target_entropy=0.3,
               clip_high=0.3)
    assert config.knob_kwargs(cfg) == ({"clip_high": 0.3}, {"coef": 0.01, "target": 0.3})
    cfg["algo"] = "entropy_bonus"
    with pytest.raises(SystemExit, match="--target-entropy does not apply to --algo entropy_bonus"):
        config.knob_kwargs(cfg)
    del cfg["target_entropy"]
    assert config.knob_kwargs(dict(cfg, target_entropy=None)) == ({"coef": 0.01, "clip_high": 0.3}, {})


def test_method_data_defaults_come_from_the_registry():
    parse = lambda *argv: config.resolve(config.build_parser().parse_args(list(argv)), log=lambda m: None)  # noqa: E731
    for algo in config.ALGOS:
        cfg = parse("--algo", algo)
        for key, value in losses.LOSSES[algo].data_defaults.items():
            assert cfg[key] == value, (algo, key)
    assert parse("--algo", "dapo", "--no-drop-equal-groups", "--max-refill-rounds", "0")["drop_equal_groups"] is False


def test_a_model_without_cuda_runs_cpu_sized_and_says_so(monkeypatch):
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: False)
    said = []
    cfg = config.resolve(config.build_parser().parse_args(["--model", "m", "--dataset", "d.jsonl",
                                                           "--eval-dataset", "e.jsonl", "--group-size", "8"]),
                         log=said.append)
    assert (cfg["prompts_per_step"], cfg["group_size"], cfg["max_new_tokens"], cfg["eval_k"]) == (2, 8, 64, 4)
    assert said == ["no CUDA: sized for a CPU (set a flag to override): --prompts-per-step 2 --max-new-tokens 64 "
                    "--eval-k 4 --eval-size 16"]
    said.clear()
    config.resolve(config.build_parser().parse_args(["--model", "m", "--dataset", "d.jsonl"]), log=said.append)
    assert said == ["no CUDA: sized for a CPU (set a flag to override): --prompts-per-step 2 --group-size 4 "
                    "--max-new-tokens 64"]                     # no evaluation set: its sizes not mentioned
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)
    cfg = config.resolve(config.build_parser().parse_args(["--model", "m", "--dataset", "d.jsonl"]), log=said.append)
    assert (cfg["max_new_tokens"], cfg["prompts_per_step"]) == (1024, 8) and len(said) == 1


def test_resume_of_a_folder_that_is_not_there_says_so(tmp_path):
    with pytest.raises(SystemExit, match=f"--resume {tmp_path / 'nope'}: no such run directory"):
        config.parse(["--resume", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no config.json there \\(not a train.py run directory\\)"):
        config.parse(["--resume", str(tmp_path)])


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


def test_warmup_help_matches_the_schedule():
    text = " ".join(config.build_parser().format_help().split())
    assert "--lr * (n + 1) / N after n finished steps" in text
    assert train.lr_factor(0, dict(warmup_steps=4, lr_schedule="constant", steps=10)) == 1 / 4


@pytest.mark.parametrize("spec,message", [
    ("my_rewards", "expected MODULE:FUNCTION"), ("no_such_module:f", "cannot import no_such_module"),
    ("my_rewards:nothing", "my_rewards has no function nothing")])
def test_a_bad_reward_is_one_line_before_any_work(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    with pytest.raises(SystemExit, match=f"--reward {spec}: {message}"):
        config.parse(TINY + ["--reward", spec, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


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


def test_default_run_name_distinguishes_presets():
    names = {config.resolve(config.build_parser().parse_args(argv), log=lambda m: None)["out"]
             for argv in (["--preset", "tiny", "--algo", "steer", "--seed", "3"],
                          ["--preset", "qwen-0.5b-gsm8k", "--algo", "steer", "--seed", "3", "--dataset", "d.jsonl"])}
    assert names == {str(Path("runs") / "tiny-steer-seed3"), str(Path("runs") / "qwen-0.5b-gsm8k-steer-seed3")}


def test_corrupt_config_is_one_line_naming_the_file(run_copy, capsys):
    (run_copy / "config.json").write_text('{"algo": "grpo", ')
    line = error_line(capsys, ["--resume", str(run_copy), "--steps", "3"])
    assert f"{run_copy / 'config.json'} is damaged, not valid JSON" in line


def test_resume_refuses_flags_that_change_the_run(run_copy, capsys):
    line = error_line(capsys, ["--resume", str(run_copy), "--algo", "steer", "--lr", "1", "--no-drop-equal-groups",
                               "--steps", "3"])
    assert "--algo 'steer' (saved: 'grpo')" in line and "--lr 1.0 (saved: 0.01)" in line
    assert "--drop-equal-groups False (saved: False)" not in line                     # the same value is fine
    assert "only --steps, --eval-interval, --save-interval, --log-samples, --plot, --cache-dir" in line
    assert "exclude each other" in error_line(capsys, ["--resume", str(run_copy), "--overwrite"])
    assert "stays in its directory" in error_line(capsys, ["--resume", str(run_copy), "--out", str(run_copy) + "x"])
    args = config.build_parser().parse_args(["--resume", str(run_copy), "--steps", "5", "--eval-interval", "2",
                                            "--lr", "1e-2", "--preset", "tiny", "--out", str(run_copy)])
    cfg = config.resume_config(args)
    assert (cfg["steps"], cfg["eval_interval"], cfg["resume"]) == (5, 2, str(run_copy))
    bad = config.build_parser().parse_args(["--resume", str(run_copy), "--save-interval", "0"])
    with pytest.raises(SystemExit, match="--save-interval must be >= 1"):
        config.resume_config(bad)


# ------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv,message", [
    (["--save-interval", "0"], "--save-interval must be >= 1, got 0"),
    (["--algo", "steer", "--lambda-min", "0"], "--lambda-min: lambda_min=0.0 must be in (0, 1]"),
    (["--algo", "steer", "--lambda-min", "-0.5"], "--lambda-min: lambda_min=-0.5 must be in (0, 1]"),
    (["--algo", "steer", "--lambda-min", "1.5"], "--lambda-min: lambda_min=1.5 must be in (0, 1]"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0, got -1.0"),
    (["--clip-low", "-0.5"], "--clip-low: clip_low=-0.5 must be in [0, 1)"),
    (["--clip-low", "1"], "--clip-low: clip_low=1.0 must be in [0, 1)"),
    (["--algo", "archer", "--archer-quantile", "1.5"], "--archer-quantile: quantile=1.5 must be in [0, 1]"),
    (["--eval-interval", "-1"], "--eval-interval must be >= 0"),
    (["--eval-size", "0"], "--eval-size must be >= 1, got 0"),
    (["--eval-size", "-250"], "--eval-size must be >= 1, got -250"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--lr", "-1e-4"], "--lr must be > 0, got -0.0001"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens must be >= 1, got 0"),
    (["--group-size", "1"], "--group-size 1 trains nothing with --algo grpo"),
    (["--algo", "nope"], "argument --algo: invalid choice"),
    (["--steps", "x"], "argument --steps: invalid int value"),
])
def test_bad_flags_are_one_line_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tiny_lab, "warm_start", lambda *a, **k: pytest.fail("work started"))
    assert run_dir.cli(train.main, "train.py", ["--preset", "tiny", "--out", str(tmp_path / "run")] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_negative_numbers_parse_in_every_notation():
    args = config.build_parser().parse_args(["--lr", "-1e-4", "--clip-low=-2", "--kl-coef", "-.5"])
    assert (args.lr, args.clip_low, args.kl_coef) == (-1e-4, -2.0, -0.5)


def test_the_command_line_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--top-p", "0", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.py: error: --top-p must be in (0, 1], got 0.0"


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


def test_eval_flags_without_an_evaluation_set_warn_once(monkeypatch):
    monkeypatch.setattr(config.torch.cuda, "is_available", lambda: True)          # no CPU sizing line
    lines = []
    resolved(["--model", "m", "--dataset", "d.jsonl", "--eval-size", "5", "--eval-k", "2"], lines)
    assert lines == ["--eval-size and --eval-k ignored: there is no evaluation set (name one with --eval-dataset)"]
    lines.clear()
    resolved(["--model", "m", "--dataset", "d.jsonl", "--eval-dataset", "e.jsonl", "--eval-size", "5"], lines)
    assert lines == []


def test_opefo_says_it_forces_one_update():
    lines = []
    assert resolved(["--algo", "opefo", "--updates-per-batch", "4"], lines)["updates_per_batch"] == 1
    assert "--algo opefo: updates_per_batch 4 -> 1 (strictly on-policy: one optimizer step per rollout batch)" in lines


def test_cli_validation(capsys):
    with pytest.raises(SystemExit, match="--lambda-min does not apply to --algo grpo"):
        config.resolve(config.build_parser().parse_args(["--lambda-min", "0.5"]), log=lambda m: None)
    cfg = config.resolve(config.build_parser().parse_args(["--algo", "opefo", "--updates-per-batch", "4"]),
                               log=lambda m: None)
    assert cfg["preset"] == "tiny" and cfg["updates_per_batch"] == 1 and cfg["drop_equal_groups"] is False
    assert config.resolve(config.build_parser().parse_args(["--algo", "dapo"]), log=print)["drop_equal_groups"]
    assert "tiny lab" in capsys.readouterr().out
    cfg = config.resolve(config.build_parser().parse_args(["--algo", "archer"]), log=lambda m: None)
    assert losses.uses_reference(cfg["algo"], **config.knob_kwargs(cfg)[0])
    cfg = config.resolve(config.build_parser().parse_args(["--algo", "grpo"]), log=lambda m: None)
    assert not losses.uses_reference(cfg["algo"], **config.knob_kwargs(cfg)[0])
    cfg = config.resolve(config.build_parser().parse_args(["--algo", "kl_cov", "--kl-cov-coef", "2"]),
                               log=lambda m: None)
    assert config.knob_kwargs(cfg)[0] == {"kl_cov_coef": 2.0}
    assert not losses.uses_reference(cfg["algo"], **config.knob_kwargs(cfg)[0])          # its KL is to pi_old
    for action in config.build_parser()._actions:
        assert action.help, action.dest
    cfg = config.resolve(config.build_parser().parse_args(["--algo", "dapo", "--max-new-tokens", "100"]),
                               log=lambda m: None)
    assert (cfg["max_refill_rounds"], cfg["overlong_penalty"], cfg["overlong_cache"]) == (9, True, 20)
    cfg = config.resolve(config.build_parser().parse_args(["--algo", "grpo"]), log=lambda m: None)
    assert (cfg["max_refill_rounds"], cfg["overlong_penalty"], cfg["drop_equal_groups"]) == (0, False, False)


@pytest.mark.parametrize("argv,message", [
    (["--algo", "grpo", "--target-entropy", "1"], "--target-entropy does not apply to --algo grpo"),
    (["--algo", "kl_cov", "--kl-coef", "1"], "--kl-coef does not apply to --algo kl_cov"),
    (["--algo", "grpo", "--positive-weight", "1"], "--positive-weight does not apply to --algo grpo"),
    (["--algo", "clip_cov", "--clip-cov-ratio", "0"], r"--clip-cov-ratio: clip_cov_ratio=0.0 must be in \(0, 1\]"),
    (["--algo", "adaptive_entropy", "--target-entropy", "-1"], "--target-entropy: target=-1.0 must be >= 0"),
    (["--algo", "entropy_bonus", "--entropy-coef", "-1"], "--entropy-coef: coef=-1.0 must be >= 0"),
    (["--algo", "entropy_adv", "--entropy-adv-kappa", "0"], "--entropy-adv-kappa: kappa=0.0 must be > 0"),
    (["--algo", "forking", "--top-frac", "2"], "--top-frac: top_frac=2.0 must be in"),
    (["--algo", "dapo", "--overlong-cache", "30"], r"--overlong-cache must be in \[1, --max-new-tokens=20\]"),
    (["--algo", "grpo", "--overlong-cache", "3"], "--overlong-cache needs --overlong-penalty"),
    (["--algo", "grpo", "--max-refill-rounds", "2"], "--max-refill-rounds needs --drop-equal-groups"),
    (["--algo", "dapo", "--max-refill-rounds", "-1"], "--max-refill-rounds must be >= 0"),
])
def test_bad_flags_name_the_flag(argv, message):
    with pytest.raises(SystemExit, match=message):
        config.resolve(config.build_parser().parse_args(argv), log=lambda m: None)
