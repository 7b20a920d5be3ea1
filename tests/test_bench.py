"""benchmarks/bench.py: what it times covers every method of losses.LOSSES."""
import json

import pytest
import torch

import losses
from benchmarks import bench, bench_train
from conftest import ENDOFTEXT, IM_END


def test_the_losses_benchmark_times_every_registry_entry():
    entropy, mask = torch.rand(2, 8), torch.ones(2, 8)
    runs = bench.loss_runs(entropy, mask)
    assert {name for name, _ in runs} | {"grpo"} == set(losses.LOSSES)
    assert ("steer", {"form": "exact"}) in runs and ("opefo", {"form": "exact"}) in runs


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


def test_gpu_check_dry_run_writes_the_figures(qwen_files, tmp_path, monkeypatch):
    local = tmp_path / "cache" / qwen_files.name
    monkeypatch.setattr(bench_train, "SHARED_QWEN", qwen_files)
    monkeypatch.setattr(bench_train, "LOCAL_QWEN", local)
    out = tmp_path / "gpu_check.json"
    report = bench_train.main(["--gpu-check", "--dry-run", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert (local / "tokenizer.json").is_file() and (local / "chat_template.jinja").is_file()   # the copied files
    assert report["device"] == "CPU" and report["dry_run"] is True and report["ok"] is True
    assert set(report) == {"device", "dry_run", "torch", "transformers", "bench", "train", "end_of_turn", "seconds",
                           "ok"}
    bench = report["bench"]
    assert set(bench["phases"]) == {"generate", "bare_generate", "score", "stats", "update"}
    for name, ph in bench["phases"].items():
        assert ph["seconds"] > 0 and ph["peak_mb"] > 0, name
        assert ph["tokens_per_s"] == pytest.approx(ph["tokens"] / ph["seconds"])
    assert bench["phases"]["generate"]["tokens"] == 1 * 2 * 4                        # prompts x G x new tokens
    assert bench["phases"]["update"]["tokens"] == 2 * (8 + 4)
    assert 0 < bench["update_mfu"] < 1 and bench["matmul_tflops_per_s"] > 0
    tr = report["train"]
    assert tr["steps"] == 3 and [s["step"] for s in tr["per_step"]] == [1, 2, 3] and tr["prompt_tokens"] == 36
    for s in tr["per_step"]:
        assert set(s["tokens_per_s"]) == {"generate", "score", "stats", "update"}
        assert all(v > 0 for v in s["tokens_per_s"].values()) and s["peak_mem_mb"] > 0
        assert s["tokens_per_s"]["update"] == pytest.approx(2 * 2 * (36 + 6) / s["seconds"]["update"])
        assert s["response_length"] == 6 and s["truncation_rate"] == 1.0 and s["optimizer_steps"] == 2
        assert 0 < s["update_mfu"] < 1
    eot = report["end_of_turn"]
    assert eot["stop_token_ids"] == [ENDOFTEXT, IM_END] and eot["end_of_turn_id"] == IM_END
    assert eot["rows"] == 8 and eot["ended_at_im_end"] >= 4 and eot["im_end_inside_a_response"] == 0
    assert eot["pad_after_stop"] and eot["completions_showing_special_tokens"] == 0


def test_gpu_check_needs_the_files_and_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "SHARED_QWEN", tmp_path / "absent")
    monkeypatch.setattr(bench_train, "LOCAL_QWEN", tmp_path / "empty")
    with pytest.raises(SystemExit, match="configuration and tokenizer"):
        bench_train.qwen_files()
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench_train.main(["--gpu-check", "--json", str(tmp_path / "x.json")])
