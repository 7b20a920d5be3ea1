"""data.py: dataset rows to problems, and the errors that name the row and the field."""
import json

import pytest
import torch

import data
import tiny_lab
import train
import verifier
from conftest import TINY, error_line, read_rows, tiny


@pytest.mark.parametrize("row, message", [
    ({"problem": "1+1", "gold": "2"}, "no answer field: neither 'answer' nor 'solution' is present; fields present: "
                                      "['gold', 'problem'] (choose one with --answer-field)"),
    ({"text": "1+1", "answer": "2"}, "no problem field: neither 'problem' nor 'question' is present; fields present: "
                                     "['answer', 'text'] (choose one with --problem-field)"),
])
def test_a_first_row_without_either_default_field_names_both(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_items(str(path), "train")
    assert str(e.value) == f"{path}, row 1: {message}"


def test_a_missing_answer_is_named_by_the_field_the_file_uses(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2"}) + "\n")
    with pytest.raises(data.DataError, match=r"row 2: field 'answer' \(the answer\) is missing"):
        data.load_items(str(path), "train")


def test_unreachable_model_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    line = error_line(capsys, ["--model", "no-such-org/no-such-model", "--dataset", str(data),
                               "--out", str(tmp_path / "run")])
    assert "cannot load model 'no-such-org/no-such-model'" in line and "Offline alternatives" in line


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


@pytest.mark.parametrize("flag", ["--dataset", "--eval-dataset"])
def test_hub_failure_names_both_flags_and_leaves_no_run_directory(flag, tmp_path, cache):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"cannot load {flag} 'no-such-org/no-such-data'.*Offline alternatives: "
                                         r"local JSON Lines files \(--dataset / --eval-dataset path/to/file\.jsonl"):
        train.main(TINY + ["--cache-dir", cache, flag, "no-such-org/no-such-data", "--out", str(out)])
    assert not out.exists()


def test_shared_benchmark_files_load_with_their_mapping(shared_data):
    first = {name: data.load_items(str(shared_data / name), "test")[0]["answer"]
             for name in ("math500.jsonl", "gsm8k_test.jsonl", "aime24.jsonl", "amc23.jsonl", "minerva_math.jsonl")}
    assert first["math500.jsonl"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first["gsm8k_test.jsonl"] == "18"
    assert first["amc23.jsonl"] == "27.0"
    assert first["aime24.jsonl"] == "204"
    assert verifier.score("\\boxed{1.6}", first["minerva_math.jsonl"]).correct   # \boxed{1.6} in the solution
    assert len(data.load_items(str(shared_data / "gsm8k_test.jsonl"), "test")) == 1319


def test_local_file_field_mapping_and_bad_rows(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"q": "What is 2+2?", "sol": "so \\boxed{4}", "a": 4}) + "\n")
    assert data.load_items(str(good), "train", problem_field="q", answer_field="a")[0]["answer"] == "4"
    assert data.load_items(str(good), "train", problem_field="q", answer_field="sol")[0]["answer"] == "4"
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"problem": "x", "answer": "1"}) + "\n" + json.dumps({"problem": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl, row 2: field 'answer'"):      # the field row 1 uses
        data.load_items(str(bad), "train")
    bad.write_text(json.dumps({"problem": "", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'problem'"):
        data.load_items(str(bad), "train")
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"row 1: not valid JSON"):
        data.load_items(str(bad), "train")
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"row 1: field 'answer' has no gsm8k answer"):
        data.load_items(str(bad), "train", answer_format="gsm8k")


def test_offline_errors_name_the_alternatives():
    with pytest.raises(SystemExit, match="Offline alternatives.*--preset tiny"):
        data.load_items("no-such-org/no-such-dataset", "train")
    with pytest.raises(SystemExit, match="Offline alternatives.*--preset tiny"):
        data.load_model("no-such-org/no-such-model", device=torch.device("cpu"))
