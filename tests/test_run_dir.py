"""run_dir.py: Ctrl-C during a run (a checkpoint at the step it ends, the resume command named), and the
messages of a run that wrote no checkpoint, which must agree on the one command that works."""
import json
import signal

import pytest

import run_dir
import train
from test_train import TINY, cache, read_rows, strip_timing  # noqa: F401 (fixture)


def ctrl_c_at(monkeypatch, step, how):
    """rl_step raises SIGINT (as a terminal's Ctrl-C does) or KeyboardInterrupt during RL step `step`."""
    real, calls = train.rl_step, []

    def rl_step(*a, **k):
        calls.append(1)
        if len(calls) == step:
            if how == "signal":
                signal.raise_signal(signal.SIGINT)
            else:
                raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "rl_step", rl_step)


def test_ctrl_c_before_the_first_checkpoint_finishes_the_step_and_writes_one(tmp_path, cache, capsys,
                                                                            monkeypatch):
    argv = TINY + ["--cache-dir", cache, "--steps", "4", "--save-interval", "50", "--eval-interval", "0"]
    whole = train.main(argv + ["--out", str(tmp_path / "whole")])
    ctrl_c_at(monkeypatch, 2, "signal")
    out = tmp_path / "run"
    assert run_dir.cli(train.main, "train.py", argv + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Ctrl-C: stopping after this step with a checkpoint" in err
    assert f"interrupted: the last checkpoint is {out / 'checkpoints' / 'step_000002'}; continue with: python " \
           f"train.py --resume {out}" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler          # the handler is put back
    monkeypatch.undo()
    train.main(["--resume", str(out)])
    assert [strip_timing(r) for r in read_rows(out / "metrics.jsonl")] == [strip_timing(r) for r in whole]


def test_a_run_stopped_before_any_checkpoint_is_started_again_by_the_command_both_messages_name(
        tmp_path, cache, capsys, monkeypatch):
    ctrl_c_at(monkeypatch, 2, "interrupt")                # a second Ctrl-C: stopped at once
    out = tmp_path / "run"
    argv = TINY + ["--cache-dir", cache, "--steps", "3", "--save-interval", "50", "--out", str(out)]
    assert run_dir.cli(train.main, "train.py", argv) == 130
    assert f"no checkpoint was written yet; start again with --overwrite --out {out}" in capsys.readouterr().err
    monkeypatch.undo()
    assert run_dir.cli(train.main, "train.py", argv) == 2
    rerun = capsys.readouterr().err
    assert "holds no checkpoint to resume: give --overwrite to start again" in rerun and "--resume" not in rerun
    assert run_dir.cli(train.main, "train.py", ["--resume", str(out)]) == 2
    resume = capsys.readouterr().err
    assert "wrote no checkpoint, so it cannot be resumed" in resume and f"--overwrite --out {out}" in resume
    assert len(train.main(argv + ["--overwrite"])) == 4
    assert json.loads((out / "config.json").read_text())["steps"] == 3
