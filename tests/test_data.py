"""data.py: dataset rows to problems, and the errors that name the row and the field."""
import json

import pytest

import data


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
