"""run_dir.py: Ctrl-C during a run (a checkpoint at the step it ends, the resume command named), and the
messages of a run that wrote no checkpoint, which must agree on the one command that works."""
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import data
import losses
import run_dir
import tiny_lab
import train
from conftest import TINY, error_line, read_rows, strip_timing, tiny, truncate


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


# ------------------------------------------------------------------------------------------- outputs
def test_nan_is_written_as_null(tmp_path, cache, monkeypatch):
    def nan_loss(logp, old_logp, advantages, mask, *, num_tokens=None, num_seqs=None, norm_length=None):
        return logp.sum() * float("nan"), {"pg_loss": float("nan")}
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
