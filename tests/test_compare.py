"""Tests of compare.py: resuming (finished runs are read, unfinished ones continue), the statistics, and one
small end-to-end comparison through train.py subprocesses (about 20 s on 2 CPU cores)."""
import json
import math

import pytest

import compare


def fake_run(path, steps, done, checkpoint):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"steps": steps}))
    rows = [{"step": s} for s in range(done + 1)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9')  # torn line
    if checkpoint:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "latest").write_text("step_000001")


def test_run_cell_skips_finished_resumes_unfinished_restarts_the_rest(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(compare.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    fake_run(tmp_path / "done", steps=2, done=2, checkpoint=True)
    fake_run(tmp_path / "half", steps=2, done=1, checkpoint=True)
    fake_run(tmp_path / "fresh", steps=2, done=0, checkpoint=False)
    for name in ("done", "half", "fresh"):
        assert compare.run_cell(tmp_path / name, ["--algo", "grpo"], 1) == (tmp_path / name, 0)
    assert len(calls) == 2                                        # the finished run is not redone
    assert calls[0][-2:] == ["--resume", str(tmp_path / "half")]
    assert calls[1][2:6] == ["--out", str(tmp_path / "fresh"), "--measure-entropy-change", "--algo"]
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()   # never checkpointed: started again


def test_mean_ci_and_separated_pairs():
    m, ci = compare.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(compare.mean_ci([5.0])[1]) and math.isnan(compare.mean_ci([None])[0])
    summary = {"a": {"entropy end": (1.0, 0.1)}, "b": {"entropy end": (1.5, 0.2)}, "c": {"entropy end": (1.2, 0.2)}}
    assert compare.separated_pairs(summary, keys=("entropy end",)) == [("entropy end", "a", "b")]


def test_small_comparison_end_to_end_and_resume(tmp_path, monkeypatch):
    flags = ("--steps 2 --tiny-sft-steps 0 --prompts-per-step 2 --group-size 4 --max-new-tokens 4 "
             f"--eval-size 2 --eval-k 4 --eval-interval 1 --save-interval 1 --cache-dir {tmp_path / 'cache'}")
    argv = ["--algos", "grpo", "steer", "--seeds", "0", "1", "--jobs", "2", "--out", str(tmp_path),
            "--train-flags", flags]
    compare.main(argv)
    root = tmp_path / "default"
    data = json.loads((root / "results.json").read_text())
    assert set(data["summary"]) == {"start model", "grpo", "steer"} and len(data["runs"]["steer"]) == 2
    start = data["summary"]["start model"]["eval/pass@4"][0]
    assert start == pytest.approx(sum(r["eval/pass@4 start"] for r in data["runs"]["grpo"]) / 2)
    assert "entropy end" in data["summary"]["grpo"] and "eval/pass@4" in data["runs"]["grpo"][0]
    text = (root / "table.md").read_text()
    assert "| grpo |" in text and "| start model |" in text and "flow/pos_likely_exact" in text
    monkeypatch.setattr(compare.subprocess, "call", lambda *a, **k: pytest.fail("a finished run was redone"))
    compare.main(argv)                                           # every run finished: only the tables again
