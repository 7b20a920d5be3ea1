"""Held-out figures of a policy: avg@k, unbiased pass@k, distinct correct solutions and greedy accuracy;
and the command that evaluates a model or a checkpoint on a benchmark file without training.

train.py evaluates the starting model, every --eval-interval steps and the last step (evaluate_sets); the toy
uses the same pass_at_k. Sampling uses torch's global RNG, forked and seeded per evaluation, so evaluating
never changes the training run.

    from evaluation import evaluate, pass_at_k
    figures, samples = evaluate(model, tok, items, k=8, temperature=1.0, top_p=1.0, max_new_tokens=512,
                                chunk=8, system_prompt=None, autocast=contextlib.nullcontext)

The command (main): a model folder (save_pretrained) or a train.py checkpoint folder (runs/X/checkpoints/
step_N, the model under model/) on a JSON Lines benchmark file in the formats of ../shared/data (MATH-500,
AIME24, AMC23, Minerva, GSM8K; data.load_items), scored by the math verifier:

    python evaluation.py --model runs/grpo-run/checkpoints/step_000100 --data ../shared/data/math500.jsonl
    python evaluation.py --model path/to/model --data aime24.jsonl --k 16 --size 10 --bf16 --out runs/eval-aime

It prints avg@k, unbiased pass@j (j = 1, 2, 4, .. k: pass_ks), distinct and greedy accuracy, with a progress
bar over the problems on a terminal, and writes into --out (default runs/eval-<model name>-<data file stem>,
a checkpoint named <run>-step_N): samples.jsonl, one record per problem (problem_index, prompt = the problem
text, gold, source, n_correct, the greedy completion and the k sampled ones, each with its extracted
answer, verdict and truncated flag; evaluate's on_problem), and figures.json (the figures, the number of
prompts left out as longer than --max-prompt-tokens, the settings). A re-run replaces both files. Sampling
is seeded (--seed, default 0): the same command gives the same output on the same machine; the samples
also depend on --chunk (problems per generation call). Bad input (a missing file or field, a --model
folder that does not exist, a flag out of range) is one line on stderr and exit status 2 before any work.
"""
import math
import time
from pathlib import Path

import torch

import rollout


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k); k <= n."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(k):
    """The j of the reported pass@j: 1, 2, 4, ... up to k, and k itself."""
    ks = [1 << i for i in range(k.bit_length()) if 1 << i <= k]
    return ks if ks[-1] == k else ks + [k]


def _graded(completion, score, truncated):
    """One completion with its verdict: the fields of a sample record."""
    return {"completion": completion, "answer": score.answer, "correct": score.correct, "truncated": bool(truncated)}


def evaluate(model, tok, items, *, k, temperature, top_p, max_new_tokens, chunk, system_prompt, autocast,
             score_fn, prefix="eval", keep=0, on_problem=None):
    """Held-out figures under `prefix`/: avg@k and unbiased pass@j (j = 1, 2, 4, .. and k) from k samples at
    `temperature`; "distinct", the mean number of distinct correct completions per problem among the k
    (whitespace-collapsed text: a diversity measure that falls when a policy narrows onto one solution);
    and greedy accuracy. score_fn(completion, item) -> verifier.Score. Items whose gold cannot be parsed
    (correct None) are skipped and counted.
    Returns (figures, samples): samples holds, for the first `keep` problems, the greedy completion and the
    first sampled one with their verdicts (set, problem index, prompt, gold, kind, completion, answer,
    correct, truncated).
    on_problem(record), when given, receives every problem as soon as its chunk is scored: set,
    problem_index, prompt (the problem text), gold, source, n_correct (None when skipped), greedy and
    samples (the k sampled completions), each completion as {completion, answer, correct, truncated}.

    Sampling uses torch's global RNG: the caller forks it so that evaluation does not change training.
    The draws depend on `chunk` (problems per generate call), so the same seed with another chunk samples
    other completions.
    """
    model.eval()
    correct, distinct, greedy, skipped, samples = [], [], [], 0, []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        prompts = [rollout.format_prompt(tok, it["problem"], system_prompt=system_prompt) for it in part]
        with torch.no_grad(), autocast():
            sampled = rollout.generate(model, tok, prompts, group_size=k, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p)
            greedy_ro = rollout.generate(model, tok, prompts, group_size=1, max_new_tokens=max_new_tokens,
                                         temperature=0.0)
        for j, it in enumerate(part):
            rows = range(j * k, (j + 1) * k)
            drawn = [_graded(sampled.completions[r], score_fn(sampled.completions[r], it), sampled.truncated[r])
                     for r in rows]
            verdicts = [d["correct"] for d in drawn]
            first = _graded(greedy_ro.completions[j], score_fn(greedy_ro.completions[j], it), greedy_ro.truncated[j])
            head = {"set": prefix, "problem_index": start + j, "prompt": it["problem"], "gold": it["answer"]}
            if start + j < keep:
                samples += [{**head, "kind": "greedy", **first}, {**head, "kind": "sample", **drawn[0]}]
            gold_ok = all(v is not None for v in verdicts)
            if on_problem is not None:
                on_problem({**head, "source": it.get("source"), "n_correct": sum(verdicts) if gold_ok else None,
                            "greedy": first, "samples": drawn})
            if not gold_ok:
                skipped += 1
                continue
            correct.append(sum(verdicts))
            distinct.append(len({" ".join(d["completion"].split()) for d in drawn if d["correct"]}))
            greedy.append(bool(first["correct"]))
    out = {f"{prefix}/skipped_gold": skipped, f"{prefix}/n": len(correct)}
    if correct:
        out[f"{prefix}/avg@{k}"] = sum(c / k for c in correct) / len(correct)
        for j in pass_ks(k):
            out[f"{prefix}/pass@{j}"] = sum(pass_at_k(k, c, j) for c in correct) / len(correct)
        out[f"{prefix}/distinct"] = sum(distinct) / len(distinct)
        out[f"{prefix}/greedy_acc"] = sum(greedy) / len(greedy)
    return out, samples


def summary(row):
    """One readable line with the headline evaluation figures of a metrics row, per set: avg@k, pass@k at
    the largest k, greedy accuracy and distinct correct solutions ("eval: avg@64 0.363, pass@64 0.680,
    greedy 0.410, distinct 1.20"); every figure stays in metrics.jsonl."""
    sets = dict.fromkeys(k.split("/")[0] for k in row if k.startswith("eval") and "/avg@" in k)
    parts = []
    for prefix in sets:
        figs = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(prefix + "/")}
        top = max((k for k in figs if k.startswith("pass@")), key=lambda k: int(k[5:]), default=None)
        shown = [k for k in figs if k.startswith("avg@")] + [top] * (top is not None)
        text = ", ".join(f"{k} {figs[k]:.3f}" for k in shown)
        text += f", greedy {figs['greedy_acc']:.3f}, distinct {figs['distinct']:.2f}" if "greedy_acc" in figs else ""
        parts.append(f"{prefix}: {text}")
    return "; ".join(parts)


def evaluate_sets(model, tok, eval_sets, cfg, step, autocast, device, on_samples):
    """evaluate() on every held-out set {prefix: (items, score_fn)} with the run's settings; returns the figures
    and time/eval. Sampling runs on a forked RNG seeded from (--seed, step), so evaluation never moves the
    training RNG. on_samples(record) receives each kept completion (eval_samples.jsonl)."""
    if not eval_sets:
        return {}
    t = time.perf_counter()
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg["seed"] * 1_000_003 + step)
        for prefix, (items, fn) in eval_sets.items():
            figures, samples = evaluate(
                model, tok, items, k=cfg["eval_k"], temperature=cfg["eval_temperature"], top_p=cfg["top_p"],
                max_new_tokens=cfg["max_new_tokens"],
                chunk=max(1, cfg["prompts_per_step"] * cfg["group_size"] // cfg["eval_k"]),
                system_prompt=cfg["system_prompt"], autocast=autocast, score_fn=fn, prefix=prefix,
                keep=cfg["log_samples"])
            out.update(figures)
            for r in samples:
                on_samples({"step": step, **r})
    out["time/eval"] = time.perf_counter() - t
    return out


# ------------------------------------------------------------------------------------------- the command line
def model_folder(path):
    """(the folder holding the model's config.json, a short name for it) for --model: a model folder written
    by save_pretrained, or a checkpoint folder of train.py (runs/X/checkpoints/step_N, model under model/).
    A checkpoint is named after its run and step (X-step_N). A one-line SystemExit when it is neither."""
    given = Path(path)
    if not given.is_dir():
        raise SystemExit(f"--model {path}: no such folder (a model folder written by save_pretrained, or a "
                         "checkpoint folder runs/X/checkpoints/step_N)")
    if (given / "metrics.jsonl").is_file() or (given / "checkpoints").is_dir():
        steps = sorted(p.name for p in (given / "checkpoints").glob("step_*"))
        raise SystemExit(f"--model {path} is a train.py run directory, not a model: give one of its checkpoints ("
                         + (", ".join(str(given / "checkpoints" / n) for n in steps) or "it has none yet") + ")")
    folder = given / "model" if (given / "model" / "config.json").is_file() else given
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {path}: neither a model folder (no config.json) nor a checkpoint folder "
                         "(no model/config.json)")
    ckpt = folder.resolve().parent
    if not (ckpt / "trainer_state.pt").is_file():
        return folder, given.resolve().name
    return folder, f"{ckpt.parent.parent.name}-{ckpt.name}" if ckpt.parent.name == "checkpoints" else ckpt.name


def build_parser():
    """The command's flags (config.ArgumentParser: a bad flag is one line, exit status 2)."""
    import config       # only the command needs it (and data, which imports this module, in main)

    p = config.ArgumentParser(
        prog="evaluation.py", description="Evaluate a model folder or a train.py checkpoint on a benchmark file "
        "(JSON Lines) without training: avg@k, unbiased pass@j, distinct correct and greedy accuracy, with every "
        "problem's completions saved.")
    a = p.add_argument
    a("--model", required=True, help="model folder (save_pretrained) or checkpoint folder runs/X/checkpoints/step_N")
    a("--data", required=True, help="benchmark file, JSON Lines (MATH-500, AIME24, AMC23, Minerva, GSM8K, ...), "
      "or lab:test / lab:unique, the tiny lab's held-out sets scored by its own reward")
    a("--k", type=int, default=8, help="samples per problem for avg@k and pass@j (default 8)")
    a("--size", type=int, help="evaluate the first N problems of the file (default all)")
    a("--temperature", type=float, default=1.0, help="sampling temperature of the k samples (default 1.0)")
    a("--top-p", type=float, default=1.0, help="nucleus threshold of the k samples (default 1.0)")
    a("--max-new-tokens", type=int, help="generation budget per completion (default 1024; 20 on lab:)")
    a("--max-prompt-tokens", type=int, default=1024, help="problems whose prompt is longer are left out and "
      "counted (default 1024)")
    a("--chunk", type=int, help="problems per generation call (default max(1, 64 // k)); the samples depend on it")
    a("--seed", type=int, default=0, help="seed of the sampling (default 0): the same seed gives the same output")
    a("--out", help="output folder (default runs/eval-<model folder name>-<data file stem>); its samples.jsonl and "
      "figures.json are replaced")
    a("--bf16", action="store_true", help="run the forward passes under bfloat16 autocast")
    a("--system-prompt", default=rollout.DEFAULT_SYSTEM_PROMPT, help="system prompt ('' for none; default train.py's)")
    a("--problem-field", help="field of the problem (default: problem, else question)")
    a("--answer-field", help="field of the gold answer (default: answer, else solution)")
    a("--answer-format", default="auto", choices=("auto", "plain", "gsm8k", "boxed"),
      help="how the gold answer is read from its field (data.row_to_item; default auto)")
    return p


def check_args(args):
    """The flags' ranges, one line naming the flag."""
    checks = (("--k", args.k, args.k >= 1, "at least 1"),
              ("--size", args.size, args.size is None or args.size >= 1, "at least 1"),
              ("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0 = greedy)"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
              ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens is None or args.max_new_tokens >= 1,
               "at least 1"),
              ("--max-prompt-tokens", args.max_prompt_tokens, args.max_prompt_tokens >= 1, "at least 1"),
              ("--chunk", args.chunk, args.chunk is None or args.chunk >= 1, "at least 1"))
    for name, value, ok, wanted in checks:
        if not ok:
            raise SystemExit(f"{name} must be {wanted}, got {value}")


def load_data(args):
    """(items, score function, path) of --data: a JSON Lines benchmark scored by the math verifier, or the
    tiny lab's held-out set lab:test / lab:unique scored by the lab's reward (its default --max-new-tokens 20)."""
    import data

    if args.data.startswith("lab:"):
        import config
        import tiny_lab

        sets = tiny_lab.datasets()[1]
        if args.data[4:] not in sets:
            raise SystemExit(f"--data {args.data}: the lab's held-out sets are " + ", ".join(f"lab:{n}" for n in sets))
        args.max_new_tokens = args.max_new_tokens or config.PRESETS["tiny"]["max_new_tokens"]
        return sets[args.data[4:]], tiny_lab.score, Path(f"lab-{args.data[4:]}")
    args.max_new_tokens = args.max_new_tokens or 1024
    path = Path(args.data)
    if not path.is_file():
        raise SystemExit(f"--data {args.data}: no such file")
    try:
        items = data.load_items(str(path), "test", problem_field=args.problem_field, answer_field=args.answer_field,
                                answer_format=args.answer_format, flag="--data")
    except data.DataError as e:
        raise SystemExit(f"--data {e}") from None
    return items, data.verify, path


def fit_context(model, args):
    """The longest prompt that fits the model's context (max_position_embeddings) with --max-new-tokens
    after it, at most --max-prompt-tokens; refused when --max-new-tokens alone does not fit."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None or args.max_prompt_tokens + args.max_new_tokens <= context:
        return args.max_prompt_tokens
    if args.max_new_tokens >= context:
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {context} "
                         f"positions (max_position_embeddings): give at most {context - 1} and shorter prompts")
    return context - args.max_new_tokens


def main(argv=None):
    """python evaluation.py --model DIR --data FILE.jsonl ...: check every input, then evaluate() with a
    progress bar, print the figures and write samples.jsonl (one record per problem) and figures.json.
    Returns the figures (keys without the eval/ prefix). A user error is SystemExit with one line."""
    import json
    import random
    import sys

    import data
    import run_dir
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    check_args(args)
    folder, name = model_folder(args.model)
    items, score_fn, path = load_data(args)
    items = items[:args.size] if args.size else items
    out = Path(args.out) if args.out else Path("runs") / f"eval-{name}-{path.stem}"
    run_dir.check_writable(out, "--out")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = data.load_model(str(folder), device=device, trainable=False, offline="a model folder written by "
                                 "save_pretrained, or a checkpoint folder runs/X/checkpoints/step_N")
    limit = fit_context(model, args)
    items, too_long = data.drop_long_prompts(items, tok, limit, args.system_prompt)
    if not items:
        raise SystemExit(f"every problem's prompt is longer than {limit} tokens (--max-prompt-tokens, or the "
                         f"model's context less --max-new-tokens {args.max_new_tokens})")
    if too_long:
        print(f"left out {too_long} problems whose prompt is longer than {limit} tokens (--max-prompt-tokens, or "
              f"the model's context less --max-new-tokens)", file=sys.stderr)
    autocast = data.autocast_factory(device, args.bf16)
    samples_path, figures_path = out / "samples.jsonl", out / "figures.json"
    samples_path.write_text("")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    chunk = args.chunk or max(1, 64 // args.k)
    t = time.perf_counter()
    with tqdm(total=len(items), desc="problems", unit="problem", disable=not sys.stderr.isatty()) as bar:
        def on_problem(record):
            run_dir.append_jsonl(samples_path, record)
            bar.update(1)
            done = record["problem_index"] + 1
            spent = time.perf_counter() - t          # in a log: each tenth, once it takes a while
            if bar.disable and spent > 10 and done * 10 // len(items) > (done - 1) * 10 // len(items):
                print(f"problems {done}/{len(items)}, {spent:.0f}s, about {spent * (len(items) - done) / done:.0f}s "
                      "left", file=sys.stderr)
        figures, _ = evaluate(model, tok, items, k=args.k, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, chunk=chunk, system_prompt=args.system_prompt,
                              autocast=autocast, score_fn=score_fn, on_problem=on_problem)
    figures = {key.split("/", 1)[1]: value for key, value in figures.items()}
    seconds = time.perf_counter() - t
    settings = dict(model=str(folder), data=str(path), size=args.size, k=args.k, temperature=args.temperature,
                    top_p=args.top_p, max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    chunk=chunk, seed=args.seed, bf16=args.bf16, system_prompt=args.system_prompt,
                    problem_field=args.problem_field, answer_field=args.answer_field,
                    answer_format=args.answer_format, device=device.type)
    figures_path.write_text(json.dumps({"figures": figures, "too_long": too_long, "settings": settings}, indent=1))

    print(f"{name} on {path.name}: {figures['n']} problems, k={args.k}, temperature {args.temperature}, "
          f"{seconds:.1f}s" + (f"; {too_long} left out (prompt over {limit} tokens)" if too_long else "")
          + (f"; {figures['skipped_gold']} skipped (gold not parseable)" if figures["skipped_gold"] else ""))
    shown = [key for key in figures if key not in ("n", "skipped_gold")]
    for key in shown:
        print(f"  {key:<12} {figures[key]:.3f}")
    if not shown:
        print("  no figures: no problem has a gold answer the verifier can read")
    print(f"samples: {samples_path}\nfigures: {figures_path}")
    return figures


if __name__ == "__main__":
    import sys

    from run_dir import cli

    sys.exit(cli(main, "evaluation.py"))
