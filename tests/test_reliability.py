"""Tests of train.py's guards: run directories that never lose data, flags checked before any work with
one-line errors (exit status 2), bad data files named with their row, long prompts left out, resume that
survives damaged checkpoints and logs, valid JSON in metrics.jsonl, and output a person can follow.

Budget: under 60 s on 2 CPU cores. The runs use the untrained tiny model (--tiny-sft-steps 0) for one or
two steps; the finished run the resume tests start from is built once per module and copied.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import config
import data
import losses
import plots
import run_dir
import tiny_lab
import train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--tiny-sft-steps", "0", "--prompts-per-step", "2", "--group-size", "4",
        "--max-new-tokens", "6", "--eval-size", "2", "--eval-k", "2", "--lr", "1e-2", "--log-samples", "1",
        "--eval-interval", "0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_cache"))


def tiny(cache, out, *extra):
    return TINY + ["--cache-dir", cache, "--out", str(out), *extra]


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def error_line(capsys, argv):
    """Run the command line on argv; assert exit status 2 and one line on stderr; return that line."""
    assert run_dir.cli(train.main, "train.py", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory):
    """A finished two-step run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(tiny(cache, out, "--steps", "2", "--save-interval", "1"))
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# ------------------------------------------------------------------------------------------- run directories
def test_non_empty_out_is_refused_and_overwrite_removes_only_run_files(tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / "notes.txt").write_text("mine")
    line = error_line(capsys, tiny(cache, out, "--steps", "1"))
    assert "is not empty" in line and "no checkpoint to resume" in line and "--overwrite" in line
    (out / "checkpoints" / "step_000001").mkdir(parents=True)               # resumable: --resume is named
    line = error_line(capsys, tiny(cache, out, "--steps", "1"))
    assert "is not empty" in line and f"--resume {out}" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == '{"step": 0}\n'
    monkeypatch.setattr(train, "setup", lambda cfg, out, log: None)          # the claim, not the run
    monkeypatch.setattr(train, "loop", lambda state, cfg, out, log: [])
    assert run_dir.cli(train.main, "train.py", tiny(cache, out, "--steps", "1", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]          # the lock is released too


def test_empty_existing_out_is_accepted(tmp_path, cache, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(train, "setup", lambda cfg, out, log: None)
    monkeypatch.setattr(train, "loop", lambda state, cfg, out, log: [])
    assert run_dir.cli(train.main, "train.py", tiny(cache, out, "--steps", "1")) == 0


def test_default_run_name_distinguishes_presets():
    names = {config.resolve(config.build_parser().parse_args(argv), log=lambda m: None)["out"]
             for argv in (["--preset", "tiny", "--algo", "steer", "--seed", "3"],
                          ["--preset", "qwen-0.5b-gsm8k", "--algo", "steer", "--seed", "3", "--dataset", "d.jsonl"])}
    assert names == {str(Path("runs") / "tiny-steer-seed3"), str(Path("runs") / "qwen-0.5b-gsm8k-steer-seed3")}


def test_a_second_run_into_a_locked_directory_stops(tmp_path, cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = run_dir.take_lock(out, log=print)
    try:
        line = error_line(capsys, tiny(cache, out, "--steps", "1"))
        assert f"in use by another run (process {os.getpid()} on" in line
    finally:
        run_dir.release_lock(out, held)
    assert not (out / ".lock").exists()


def test_a_lock_left_by_an_ended_process_is_taken_over(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (tmp_path / ".lock").write_text(f"{ended.pid} somehost\n")
    messages = []
    held = run_dir.take_lock(tmp_path, log=messages.append)
    assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert len(messages) == 1 and f"process {ended.pid} on somehost" in messages[0] and "no longer running" in messages[0]
    run_dir.release_lock(tmp_path, held)


def test_unwritable_out_and_cache_dir_fail_before_any_work(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(tiny_lab, "warm_start", lambda *a, **k: pytest.fail("work started"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = error_line(capsys, tiny(cache, blocker / "run", "--steps", "1"))
    assert f"--out {blocker / 'run'}" in line
    line = error_line(capsys, TINY + ["--cache-dir", str(blocker / "cache"), "--out", str(tmp_path / "r")])
    assert f"--cache-dir {blocker / 'cache'} is not writable" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line(tmp_path, cache, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert "is not writable" in error_line(capsys, tiny(cache, out, "--steps", "1"))
    finally:
        out.chmod(0o700)


def test_save_keeps_the_previous_checkpoint_only(tmp_path, cache, capsys):
    model, tok = data.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    rng = train.random.Random(0)
    capsys.readouterr()
    for step in (1, 2, 3):
        run_dir.save_checkpoint(tmp_path, step, model=model, tok=tok, optimizer=opt, data_rng=rng, order=[])
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]
    err = capsys.readouterr().err
    assert "Writing model shards" not in err                       # transformers' bars are quiet
    data.load_model(str(tmp_path / "checkpoints" / "step_000003" / "model"), device=torch.device("cpu"))
    assert "Loading weights" not in capsys.readouterr().err


def test_a_checkpoint_written_truncated_never_becomes_latest(tmp_path, cache, monkeypatch):
    model, tok = data.load_model(str(tiny_lab.warm_start(0, cache)), device=torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters())
    rng = train.random.Random(0)
    run_dir.save_checkpoint(tmp_path, 1, model=model, tok=tok, optimizer=opt, data_rng=rng, order=[])
    real = torch.save

    def short_write(obj, path):                 # a disk that silently loses the end of the file
        real(obj, path)
        truncate(Path(path))
    monkeypatch.setattr(train.torch, "save", short_write)
    with pytest.raises(zipfile.BadZipFile):
        run_dir.save_checkpoint(tmp_path, 2, model=model, tok=tok, optimizer=opt, data_rng=rng, order=[])
    assert run_dir.latest_checkpoint(tmp_path).name == "step_000001"
    assert not (tmp_path / "checkpoints" / "step_000002").exists()


# ------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model/model.safetensors"])
def test_resume_falls_back_to_the_previous_checkpoint(run_copy, damaged, capsys):
    truncate(run_copy / "checkpoints" / "step_000002" / damaged)
    rows = train.main(["--resume", str(run_copy), "--steps", "3"])
    err = capsys.readouterr().err
    assert "step_000002 does not load" in err and "falling back to step_000001" in err
    assert "resuming" in err and "from step 1" in err
    assert [r["step"] for r in read_rows(run_copy / "metrics.jsonl")] == [0, 1, 2, 3]
    assert [r["step"] for r in rows] == [2, 3]
    assert (run_copy / "checkpoints" / "latest").read_text() == "step_000003"


def test_resume_drops_a_half_written_last_line(run_copy, capsys):
    for name in ("metrics.jsonl", "samples.jsonl"):
        with open(run_copy / name, "a") as fh:
            fh.write('{"step": 3, "rew')
    train.main(["--resume", str(run_copy), "--steps", "3"])
    err = capsys.readouterr().err
    assert "metrics.jsonl: dropping the half-written last line" in err
    assert "samples.jsonl: dropping the half-written last line" in err
    assert "step 3/3: reward" in err                           # one line per step when stderr is not a terminal
    assert [r["step"] for r in read_rows(run_copy / "metrics.jsonl")] == [0, 1, 2, 3]
    assert [r["step"] for r in read_rows(run_copy / "samples.jsonl")] == [s for s in (1, 2, 3) for _ in range(4)]


def test_a_damaged_line_inside_the_log_is_named(run_copy, capsys):
    lines = (run_copy / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run_copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    line = error_line(capsys, ["--resume", str(run_copy), "--steps", "3"])
    assert f"{run_copy / 'metrics.jsonl'}, line 2: not valid JSON" in line


def test_resume_at_or_below_the_saved_step_says_so(run_copy, capsys):
    assert "already at step 2" in error_line(capsys, ["--resume", str(run_copy), "--steps", "2"])
    assert "already at step 2" in error_line(capsys, ["--resume", str(run_copy)])


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


def test_ctrl_c_names_the_last_checkpoint_and_exits_130(tmp_path, cache, capsys, monkeypatch):
    real, calls = train.rl_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "rl_step", interrupted)
    out = tmp_path / "run"
    assert run_dir.cli(train.main, "train.py", tiny(cache, out, "--steps", "3", "--save-interval", "1")) == 130
    err = capsys.readouterr().err
    assert f"interrupted: the last checkpoint is {out / 'checkpoints' / 'step_000001'}" in err
    assert f"--resume {out}" in err and "Traceback" not in err
    assert not (out / ".lock").exists()


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


def test_unreachable_model_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    line = error_line(capsys, ["--model", "no-such-org/no-such-model", "--dataset", str(data),
                               "--out", str(tmp_path / "run")])
    assert "cannot load model 'no-such-org/no-such-model'" in line and "Offline alternatives" in line


def test_help_texts_and_docstrings_cite_no_issue_numbers():
    import entropy_math
    texts = [config.build_parser().format_help(), train.__doc__, entropy_math.__doc__]
    texts += [f.__doc__ or "" for mod in (train, entropy_math) for f in vars(mod).values()
              if callable(f) and getattr(f, "__module__", None) == mod.__name__]
    assert not [t for t in texts if "(issue" in t.lower()]


# ------------------------------------------------------------------------------------------- data files
@pytest.mark.parametrize("content,row,what", [
    ('{"problem": "1+1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1"), 2, "not UTF-8"),
    ('{"problem": "1+1", "answer": "2"}\n'.encode("utf-16"), 1, "not UTF-8"),
    (bytes(range(255, -1, -1)) * 4, 1, "not UTF-8"),
    (b"\x00\x01\x02 binary\n", 1, "not valid JSON"),
    (b'[\n  {"problem": "1+1", "answer": "2"}\n]\n', 1, "looks like a JSON array"),
    (b'[{"problem": "1+1", "answer": "2"}]\n', 1, "a JSON array: write one object per line"),
], ids=["latin-1", "utf-16", "binary", "control-bytes", "json-array", "one-line-array"])
def test_bad_data_files_name_file_and_row(tmp_path, content, row, what):
    path = tmp_path / "data.json"
    path.write_bytes(content)
    with pytest.raises(data.DataError) as e:
        data.load_items(str(path), "train")
    message = str(e.value)
    assert message.startswith(f"{path}, row {row}: ") and what in message and "UTF-8 JSON Lines" in message
    assert "\n" not in message


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"problem": "1+1", "answer": "2"}).encode() + b"\n")
    assert data.load_items(str(path), "train")[0]["answer"] == "2"


def test_bad_row_stops_the_command_line_before_the_warm_start(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(tiny_lab, "warm_start", lambda *a, **k: pytest.fail("work started"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n" + json.dumps({"problem": "x"}) + "\n")
    line = error_line(capsys, tiny(cache, tmp_path / "run", "--dataset", str(data)))
    assert f"{data}, row 2: field 'answer'" in line          # the field row 1 uses
    line = error_line(capsys, tiny(cache, tmp_path / "run2", "--dataset", str(tmp_path / "missing.jsonl")))
    assert "missing.jsonl not found" in line


def test_drop_long_prompts_counts_exactly(cache):
    tok = tiny_lab.tokenizer()
    items = [{"problem": "7" * n} for n in range(1, 60)]
    for limit in (5, 20, 32, 57):
        kept, dropped = data.drop_long_prompts(items, tok, limit, "ignored")
        lengths = [len(tok(train.rollout.format_prompt(tok, it["problem"]), add_special_tokens=False)["input_ids"])
                   for it in items]
        assert [it["problem"] for it in kept] == [it["problem"] for it, n in zip(items, lengths) if n <= limit]
        assert dropped == sum(n > limit for n in lengths)


def test_long_prompts_never_reach_the_model(tmp_path, cache, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"problem": "1,2,3>6", "answer": "6"},
                                                         {"problem": "9" * 10_000, "answer": "1"},
                                                         {"problem": "2,2,3>7", "answer": "7"}]))
    seen = []
    real = train.rollout.generate

    def spy(model, tok, prompts, **k):
        seen.extend(prompts)
        return real(model, tok, prompts, **k)
    monkeypatch.setattr(train.rollout, "generate", spy)
    out = tmp_path / "run"
    train.main(tiny(cache, out, "--dataset", str(data), "--steps", "2"))
    assert "left out 1 train problems whose prompt is longer than --max-prompt-tokens 32" in capsys.readouterr().err
    assert read_rows(out / "metrics.jsonl")[0]["too_long_prompts/train"] == 1
    assert seen and max(map(len, seen)) < 40


# ------------------------------------------------------------------------------------------- outputs
def test_nan_is_written_as_null(tmp_path, cache, monkeypatch):
    def nan_loss(**kw):
        return kw["logp"].sum() * float("nan"), {"pg_loss": float("nan")}
    monkeypatch.setitem(losses.LOSSES, "grpo", losses.LOSSES["grpo"]._replace(fn=nan_loss))
    out = tmp_path / "nan"
    train.main(tiny(cache, out, "--steps", "1", "--no-skip-zero-advantage"))       # the loss runs on every row

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    rows = [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["updates"] == 0 and rows[1]["grad_norm"] is None


def test_json_safe():
    assert run_dir.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x", "d": 2}) == \
        {"a": None, "b": [1.0, None], "c": "x", "d": 2}


def test_moving_average():
    assert plots.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plots.moving_average([2.0, 4.0], 1) == [2.0, 4.0]


def test_curves_are_smoothed_labelled_and_titled(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"algo": "steer", "preset": "tiny", "seed": 4}))
    rows = [{"step": 0, "eval/avg@2": 0.2, "eval/greedy_acc": 0.5}]
    rows += [{"step": s, "reward": 0.07 - 0.0001 * s, "entropy": None if s == 5 else 0.5} for s in range(1, 41)]
    rows[-1].update({"eval/avg@2": 0.3, "eval/greedy_acc": 0.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plots.curves_figure(tmp_path)
    assert fig._suptitle.get_text() == "steer, preset tiny, seed 4"
    reward, entropy, held_out, _ = fig.axes
    assert reward.get_xlabel() == "RL step" and reward.get_ylabel() == "mean reward"
    assert "entropy" in entropy.get_ylabel() and held_out.get_ylabel() == "accuracy"
    raw, smooth = reward.get_lines()
    assert len(raw.get_xdata()) == 40 and smooth.get_ydata()[-1] == pytest.approx(0.07 - 0.0001 * 38.5)
    assert len(entropy.get_lines()[0].get_xdata()) == 39                    # the null is skipped
    plots.plot_curves(tmp_path)
    assert (tmp_path / "curves.png").stat().st_size > 0
