"""Tests of tiny_lab.py: the task generator, the exact reward, fork detection, the warm start, and a short
GRPO run that narrows the forks. Budget: under 60 s on 2 CPU cores (one fast warm start for the file)."""
import collections
import itertools
import json
import random

import pytest
import torch

import rollout
import tiny_lab
import train

FAST_SFT = 600        # warm-start steps of the fast configuration used here (the lab default is 1500)


def brute_force_solutions(numbers, target):
    """Every order of the numbers and every pair of operators, left to right: ((a o b) o c), written with the
    larger operand first and non-negative results (an independent enumeration of tiny_lab.solutions)."""
    found = set()
    for a, b, c in itertools.permutations(numbers):
        for o1, o2 in itertools.product("+-*", repeat=2):
            r = tiny_lab.OPS[o1](a, b)
            if a < b or r < 0:
                continue
            t = tiny_lab.OPS[o2](max(r, c), min(r, c))
            if t == target:
                found.add(f"{a}{o1}{b}={r} {max(r, c)}{o2}{min(r, c)}={t}")
    return sorted(found)


@pytest.fixture(scope="module")
def data():
    return tiny_lab.datasets()


def test_every_listed_solution_is_valid_and_none_is_missing(data):
    train_items, evals = data
    for item in train_items[:2000] + evals["test"] + evals["unique"]:
        assert item["solutions"] == brute_force_solutions(item["numbers"], int(item["answer"]))
        assert item["solutions"], item
        for s in item["solutions"]:
            assert tiny_lab.score(s, item).reward == 1.0
    counts = collections.Counter(len(i["solutions"]) for i in train_items)
    assert sum(k * v for k, v in counts.items()) / len(train_items) > 2.0      # forks are the rule


def test_held_out_sets_are_disjoint_from_training(data):
    train_items, evals = data
    seen = {t["problem"] for t in train_items}
    assert len(evals["test"]) == tiny_lab.DATA["test_size"] and len(evals["unique"]) == tiny_lab.DATA["unique_size"]
    assert not seen & {e["problem"] for e in evals["test"] + evals["unique"]}
    assert not {e["problem"] for e in evals["test"]} & {e["problem"] for e in evals["unique"]}
    assert all(len(e["solutions"]) == 1 for e in evals["unique"])


def test_solution_sampler_is_uniform(data):
    item = next(i for i in data[0] if len(i["solutions"]) == 3)
    rng = random.Random(0)
    n = 30000
    counts = collections.Counter(tiny_lab.sample_solution(item, rng) for _ in range(n))
    assert set(counts) == set(item["solutions"])
    chi2 = sum((c - n / 3) ** 2 / (n / 3) for c in counts.values())
    assert chi2 < 13.8                                                          # p = 0.001 at 2 dof


@pytest.mark.parametrize("completion,ok", [
    ("7+5=12 12+3=15", True), ("5+3=8 8+7=15", True), ("5+7=12 12+3=15", True),   # any operand order
    ("7+5=12 12+3=16", False),            # wrong arithmetic
    ("7+5=12 12+5=17", False),            # 5 used twice
    ("7+5=12", False),                    # 3 not used, 12 is not the target
    ("7+8=15", False),                    # 8 is not given
    ("7+5=12 12+3=15 15-0=15", False),    # 0 is not available
    ("7+5=12  12+3=15", False), ("", False), ("7+5=12 12+3=15x", False),          # malformed
])
def test_score_hand_cases(completion, ok):
    item = {"numbers": [3, 5, 7], "answer": "15", "solutions": tiny_lab.solutions((3, 5, 7), 15)}
    assert tiny_lab.solutions((3, 5, 7), 15) == ["5+3=8 8+7=15", "7+3=10 10+5=15", "7+5=12 12+3=15"]
    s = tiny_lab.score(completion, item)
    assert s.correct is ok and s.reward == float(ok)


def test_fork_mask_hand_case():
    item = {"numbers": [3, 5, 7], "answer": "15", "solutions": tiny_lab.solutions((3, 5, 7), 15)}
    m = tiny_lab.fork_mask(["7+5=12 12+3=15", "5+3=8 8+7=15", "9+"], [item] * 3, 16)
    # "7" (first number: 5 or 7), then after "7+": 3 or 5; the rest is forced
    assert m[0].nonzero().flatten().tolist() == [0, 2]
    assert m[1].nonzero().flatten().tolist() == [0]
    assert m[2].nonzero().flatten().tolist() == [0]       # left every solution after the first character


def test_tokenizer_is_character_level():
    tok = tiny_lab.tokenizer()
    text = "3,5,7>15:7+5=12 12+3=15"
    assert tok.decode(tok(text)["input_ids"]) == text and len(tok(text)["input_ids"]) == len(text)
    assert rollout.format_prompt(tok, "3,5,7>15") == "3,5,7>15:"


@pytest.fixture(scope="module")
def fast_start(tmp_path_factory):
    said = []
    path = tiny_lab.warm_start(FAST_SFT, tmp_path_factory.mktemp("lab_cache"), log=said.append)
    progress = [line.split(",")[0] for line in said[1:]]
    assert progress == ["tiny lab warm start: step 250/600", "tiny lab warm start: step 500/600",
                        "tiny lab warm start: step 600/600"], said          # progress, not a silent minute
    return path


def forced_entropy(model_dir, items):
    """Mean entropy at fork positions and elsewhere, teacher-forced on every listed solution of `items`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    texts, owners = [], []
    for it in items:
        for s in it["solutions"]:
            texts.append(s)
            owners.append(it)
    prompts = [tok(rollout.format_prompt(tok, it["problem"]), add_special_tokens=False)["input_ids"] for it in owners]
    p_len = max(map(len, prompts))
    width = max(map(len, texts)) + 1
    ids = torch.full((len(texts), p_len + width), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    resp = torch.zeros((len(texts), width))
    for i, (p, t) in enumerate(zip(prompts, texts)):
        r = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids[i, p_len - len(p):p_len + len(r)] = torch.tensor(p + r)
        attn[i, p_len - len(p):p_len + len(r)] = 1
        resp[i, :len(r)] = 1
    ent = rollout.response_stats(model, ids, attn, p_len, resp)["entropy"]
    forks = tiny_lab.fork_mask(texts, owners, width) & resp.bool()
    return float(ent[forks].mean()), float(ent[resp.bool() & ~forks].mean())


def test_fast_warm_start_spreads_probability_over_the_forks(fast_start, data):
    items = [i for i in data[1]["test"] if len(i["solutions"]) >= 2][:40]
    fork, other = forced_entropy(fast_start, items)
    assert 0.5 < fork < 1.1          # measured 0.80: between log 2 and log 3, a spread over the valid choices
    assert other < 0.65 * fork       # measured 0.42: elsewhere the next character is forced by arithmetic


def test_short_grpo_run_lowers_fork_entropy(fast_start, tmp_path):
    out = tmp_path / "grpo"
    train.main(["--preset", "tiny", "--algo", "grpo", "--tiny-sft-steps", str(FAST_SFT),
                "--cache-dir", str(fast_start.parent), "--steps", "20", "--lr", "1e-3", "--eval-interval", "0",
                "--eval-size", "1", "--eval-k", "1", "--save-interval", "100", "--seed", "0", "--out", str(out)])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    first = sum(r["entropy/fork"] for r in rows[:3]) / 3
    last = sum(r["entropy/fork"] for r in rows[-3:]) / 3
    assert last < 0.8 * first        # measured 0.677 -> 0.494 (steps 1-3 -> 18-20)
