"""The problems and the model a run trains on: dataset rows to {problem, answer}, the policy and its
tokenizer, and the filter that keeps prompts within --max-prompt-tokens.

Datasets are local JSON Lines files (MATH-500, GSM8K, AIME, AMC, Minerva and your own, in the formats of
../shared/data) or Hub datasets "name[:config]"; a row that cannot be used is a one-line DataError naming
the file, the row and the field. The tiny lab (tiny_lab.py) brings its own problems, reward and model.

    from data import load_items, load_model
    items = load_items("math500.jsonl", "test")           # [{"problem", "answer", "source"}, ...]
    model, tok = load_model("path/to/model", device=torch.device("cpu"))
"""
import contextlib
import importlib
import json
import sys
from pathlib import Path

import torch

import rollout
import tiny_lab
import verifier
from run_dir import one_line, quiet_transformers


class DataError(ValueError):
    """A dataset file or row that cannot be used; the message names the file and the row."""


JSONL_HINT = "expected UTF-8 JSON Lines: one JSON object per line"


def _gsm8k_answer(text):
    """The number after GSM8K's "####" marker (thousands separators removed), or None."""
    if "####" not in text:
        return None
    value = text.rsplit("####", 1)[1].strip().replace(",", "")
    return value or None


def row_to_item(row, where, *, problem_field=None, answer_field=None, answer_format="auto"):
    """Map one dataset row (dict) to {"problem", "answer", "source", "row"}; raise ValueError naming `where`
    and the field. "row" is the row itself (a --reward function receives it).

    problem_field default: the first of "problem", "question" present. answer_field default: "answer" if
    present, else "solution" (load_items decides both once, from a file's first row). answer_format:
        plain  the field's value as text (JSON numbers such as AMC23's 27.0 become "27.0")
        gsm8k  the number after "####"
        boxed  the last \\boxed{...} of the field (verifier.extract_answer), e.g. Minerva's solution
        auto   gsm8k if the text contains "####", boxed if it contains \\boxed or the field is "solution",
               plain otherwise
    """
    if not isinstance(row, dict):
        hint = " (a JSON array: write one object per line instead)" if isinstance(row, list) else ""
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}{hint}; {JSONL_HINT}")
    fields = sorted(row)
    pf = problem_field or next((f for f in ("problem", "question") if f in row), None)
    af = answer_field or next((f for f in ("answer", "solution") if f in row), None)
    for field, what, defaults, option in ((pf, "problem", "'problem' nor 'question'", "--problem-field"),
                                          (af, "answer", "'answer' nor 'solution'", "--answer-field")):
        if field is None:
            raise DataError(f"{where}: no {what} field: neither {defaults} is present; fields present: {fields} "
                            f"(choose one with {option})")
    problem = row.get(pf)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field {pf!r} (the problem) is missing or empty; "
                        f"fields present: {fields} (choose one with --problem-field)")
    raw = row.get(af)
    if raw is None or isinstance(raw, (dict, list, bool)) or (isinstance(raw, str) and not raw.strip()):
        raise DataError(f"{where}: field {af!r} (the answer) is missing, empty or not text/number: {raw!r}; "
                        f"fields present: {fields} (choose one with --answer-field)")
    text = raw if isinstance(raw, str) else json.dumps(raw)
    fmt = answer_format
    if fmt == "auto":
        fmt = "gsm8k" if "####" in text else "boxed" if ("\\boxed" in text or af == "solution") else "plain"
    if fmt == "gsm8k":
        answer = _gsm8k_answer(text)
    elif fmt == "boxed":
        answer = verifier.extract_answer(text)
    elif fmt == "plain":
        answer = text.strip()
    else:
        raise DataError(f"unknown --answer-format {answer_format!r}; choose auto, plain, gsm8k or boxed")
    if not answer:
        raise DataError(f"{where}: field {af!r} has no {fmt} answer in {text[-80:]!r}")
    return {"problem": problem, "answer": answer, "source": where, "row": row}


def load_items(spec, split, *, problem_field=None, answer_field=None, answer_format="auto", flag="--dataset"):
    """Problems from a local JSON Lines file (path ending .jsonl/.json) or a Hub dataset "name[:config]".

    Every row must be usable: a bad row (not UTF-8, not JSON, not an object, a missing field) raises
    DataError (a ValueError) naming the file, the 1-based row and the problem. The fields are those of the
    first row (_fields_of). A UTF-8 byte-order mark is accepted.
    flag: the option that named `spec` (--dataset or --eval-dataset), for the error when the Hub fails.
    """
    fields = dict(problem_field=problem_field, answer_field=answer_field, answer_format=answer_format)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") or path.exists():
        if not path.is_file():
            raise DataError(f"dataset file {spec} not found")
        items = []
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                where = f"{path}, row {n}"
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                                    f"{e.start + 1}); {JSONL_HINT}") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    hint = (" (the file looks like a JSON array or a pretty-printed object: write one object per "
                            "line instead)" if n == 1 and line.strip() in ("[", "{") else "")
                    raise DataError(f"{where}: not valid JSON ({e.msg}){hint}; {JSONL_HINT}") from None
                if not items and isinstance(row, dict):
                    fields = _fields_of(row, fields)
                items.append(row_to_item(row, where, **fields))
        if not items:
            raise DataError(f"dataset file {path} has no rows")
        return items
    name, _, config = spec.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the hub is unreachable, the name is wrong, or the split does not exist
        raise SystemExit(f"cannot load {flag} {spec!r} (split {split!r}) from the Hugging Face Hub: "
                         f"{type(e).__name__}: {one_line(e, 200)}. Offline alternatives: local JSON Lines files "
                         f"(--dataset / --eval-dataset path/to/file.jsonl, with --problem-field/--answer-field), "
                         f"or --preset tiny.")
    fields = _fields_of(dict(ds[0]), fields) if len(ds) else fields
    return [row_to_item(dict(row), f"{spec}[{split}], row {n}", **fields) for n, row in enumerate(ds, 1)]


def _fields_of(first_row, fields):
    """The problem and answer fields of a whole file, chosen once from its first row (row_to_item's defaults),
    so that a later row lacking the field is named by the field the file uses; None where the first row has
    neither default (row_to_item then names both)."""
    return dict(fields, problem_field=fields["problem_field"] or next(
                    (f for f in ("problem", "question") if f in first_row), None),
                answer_field=fields["answer_field"] or next((f for f in ("answer", "solution") if f in first_row),
                                                            None))


def drop_long_prompts(items, tok, limit, system_prompt):
    """(the items whose prompt, as rollout.generate tokenizes it, has at most `limit` tokens; the number left
    out). A prompt is tokenized only when it could be too long: every token covers at least one UTF-8 byte
    (byte-level BPE, character-level) and the chat template puts a fixed text around the problem."""
    special = not getattr(tok, "chat_template", None)      # rollout.generate's rule for special tokens
    template = len(rollout.format_prompt(tok, "x", system_prompt=system_prompt).encode()) - 1
    frame = template + 2                                    # and at most two special tokens

    def fits(problem):
        if len(problem.encode()) + frame <= limit:
            return True
        prompt = rollout.format_prompt(tok, problem, system_prompt=system_prompt)
        return len(tok(prompt, add_special_tokens=special)["input_ids"]) <= limit
    kept = [it for it in items if fits(it["problem"])]
    return kept, len(items) - len(kept)


def autocast_factory(device, bf16):
    """A context-manager factory for the forward passes: bf16 autocast on `device` with --bf16, else none."""
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def load_model(name_or_path, *, device, gradient_checkpointing=False, trainable=True,
               offline="a local folder written by save_pretrained (--model path/to/model), or --preset tiny"):
    """(model, tokenizer) from a Hub name or local folder, SDPA attention; a clear error when unreachable.

    Weights stay float32 (the master copy AdamW updates); --bf16 runs the forward passes under autocast.
    A frozen reference (trainable=False) keeps float32 weights too and runs under the same autocast, so at
    identical weights its log-probs equal the policy's bit for bit (the KL is exactly 0); a bf16 copy would
    save 2 bytes per parameter but put a floor under the KL (6e-4 measured on Qwen2.5-0.5B).
    offline: what the error suggests instead (train.py's flags by default).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as e:      # no such folder and the Hub is unreachable, or has no such model
        where = "" if Path(name_or_path).exists() else "there is no such local folder, and the Hugging Face Hub says: "
        raise SystemExit(f"cannot load model {name_or_path!r}: {where}{one_line(e, 200)}. Offline alternatives: "
                         f"{offline}.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    if trainable:
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.eval().requires_grad_(False)
    return model, tok


def load_problems(cfg, log):
    """The run's problems: {"train_items", "eval_sets" {prefix: (items, score_fn)}, "score", "fork_mask"}, and
    cfg["start_model"] set. The user's files are read first, so a bad row stops the run before the lab's warm
    start. Rewards: the math verifier (verify), or --reward's function (custom_reward). The tiny
    lab brings its own model, reward (tiny_lab.score), fork marks and held-out sets "test" (logged as eval/)
    and "unique" (eval_unique/); a user's --dataset / --eval-dataset replace them."""
    score = custom_reward(reward_function(cfg["reward"])) if cfg.get("reward") else verify
    fork_mask, eval_sets = None, {}
    train_items = _load(cfg["dataset"], cfg["dataset_split"], cfg) if cfg.get("dataset") else None
    if cfg.get("eval_dataset"):
        eval_sets = {"eval": (_load(cfg["eval_dataset"], cfg["eval_split"], cfg, "--eval-dataset"), score)}
    if cfg["preset"] == "tiny":
        start_model = str(tiny_lab.warm_start(cfg["tiny_sft_steps"], cfg["cache_dir"], log))
        lab_train, lab_evals = tiny_lab.datasets()
        eval_sets = eval_sets or {"eval" if name == "test" else f"eval_{name}": (items, tiny_lab.score)
                                  for name, items in lab_evals.items()}
        if train_items is None:             # the lab's problems, with its reward unless --reward names one
            train_items, fork_mask = lab_train, tiny_lab.fork_mask
            score = score if cfg.get("reward") else tiny_lab.score
    else:
        start_model = cfg["model"]
    if cfg["eval_size"]:
        eval_sets = {name: (items[:cfg["eval_size"]], fn) for name, (items, fn) in eval_sets.items()}
    cfg["start_model"] = start_model
    return {"train_items": train_items, "eval_sets": eval_sets, "score": score, "fork_mask": fork_mask}


def reward_function(spec):
    """The function named by --reward MODULE:FUNCTION, imported from the working directory or the Python path."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"--reward {spec}: expected MODULE:FUNCTION, e.g. my_rewards:length_penalty")
    if str(Path.cwd()) not in sys.path:            # as `python -m`: the working directory's modules first
        sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module), name, None)
    except Exception as e:              # not found, or the module itself fails to import
        raise SystemExit(f"--reward {spec}: cannot import {module} ({type(e).__name__}: {one_line(e, 160)})") from None
    if not callable(fn):
        raise SystemExit(f"--reward {spec}: {module} has no function {name}")
    return fn


def verify(completion, item):
    """The math reward of a completion for a dataset item: verifier.score against the item's gold answer."""
    return verifier.score(completion, item["answer"])


def custom_reward(fn):
    """A --reward function as a score function: fn(completion, row) -> float or verifier.Score, row the item's
    dataset row. A float r becomes verifier.Score(r, None, correct=r > 0, timed_out=False): accuracy and
    pass@k count a positive reward as correct."""
    def score(completion, item):
        out = fn(completion, item.get("row", item))
        if isinstance(out, verifier.Score):
            return out
        return verifier.Score(float(out), None, float(out) > 0, False)
    return score


def _load(spec, split, cfg, flag="--dataset"):
    """load_items with the run's field mapping; a bad file or row becomes a one-line user error."""
    try:
        return load_items(spec, split, flag=flag, problem_field=cfg["problem_field"],
                          answer_field=cfg["answer_field"], answer_format=cfg["answer_format"])
    except DataError as e:
        raise SystemExit(str(e)) from None


def drop_too_long(problems, tok, cfg, log):
    """The problems whose prompt exceeds --max-prompt-tokens left out of every set (drop_long_prompts), with a
    message per set; returns {"train_items", "eval_sets", "too_long" {set: count}}."""
    limit, system = cfg["max_prompt_tokens"], cfg["system_prompt"]
    too_long = {}
    train_items, too_long["train"] = drop_long_prompts(problems["train_items"], tok, limit, system)
    eval_sets = {}
    for name, (items, fn) in problems["eval_sets"].items():
        kept, too_long[name] = drop_long_prompts(items, tok, limit, system)
        eval_sets[name] = (kept, fn)
    for name, n in too_long.items():
        if n:
            log(f"left out {n} {name} problems whose prompt is longer than --max-prompt-tokens {limit}")
    if not train_items:
        raise SystemExit(f"every training problem's prompt is longer than --max-prompt-tokens {limit}")
    return {"train_items": train_items, "eval_sets": eval_sets, "too_long": too_long}
