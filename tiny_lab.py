"""The offline tiny lab: a Countdown-style task with real forks, its tokenizer, model and cached warm start.

A problem gives three one-digit numbers and a target: "3,5,7>15". A solution combines two of the numbers,
then the result with the third, one step at a time, larger operand first:
    "3,5,7>15:"  ->  "7+5=12 12+3=15"   or   "5+3=8 8+7=15"   or   "7+3=10 10+5=15"
Every problem has one or more correct solutions (all are listed by `solutions`), and the model has to choose
among them at a few *fork* tokens (mostly the first step's operands and operator); everywhere else the next
character is forced by arithmetic. The supervised warm start draws each target uniformly among the valid
solutions, so the starting model spreads its probability over them: its entropy sits at the forks, where it
matters, and RL can be seen to keep, narrow or collapse it. This is what the original lab (one solution per
problem, entropy 0.07 nats, nothing to collapse) could not show.

The reward is exact: `score` checks that every step's arithmetic is right, each number is used exactly once,
and the last result is the target. The held-out sets:
    test     problems of the training distribution, never seen in training;
    unique   problems with exactly one solution (only one path succeeds): the coverage question of
             Yue et al. 2025, whether RLVR narrows what the model can still find at large k.
Diversity is measured as the number of distinct correct solutions among the k samples of a problem.

Run it through train.py (the default preset on a machine without CUDA):
    python train.py --algo grpo                      # one lab run: warm start (cached) + RL on CPU
    python compare.py                                 # every algorithm x 5 seeds, table and plot
Import:
    import tiny_lab
    train, evals = tiny_lab.datasets()               # lists of {"problem", "answer", "solutions", ...}
    tiny_lab.score("7+5=12 12+3=15", train[0])        # -> verifier.Score
"""
import hashlib
import json
import os
import platform
import random
import re
import shutil
import time
from pathlib import Path

import torch

# The lab's arithmetic. ATen's AVX-512 kernels round differently from its AVX2 ones, so one seed gives another
# warm start and other runs on an AVX-512 CPU (start avg@64 0.246 instead of 0.265). Pinned to AVX2 on x86-64
# unless ATEN_CPU_CAPABILITY is set: a lab run is then bit-identical on any AVX2 machine, and so are the
# tables. torch reads the variable when it first picks a kernel, so this works after `import torch`.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import rollout
import verifier
from run_dir import quiet_transformers

CACHE_DIR = Path(".cache") / "tiny_lab"
MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=192, max_position_embeddings=64)
DATA = dict(numbers=3, max_number=9, ops="+-*", max_target=99, train_size=20000, test_size=128, unique_size=128, seed=1234)
SFT = dict(batch_size=64, lr=3e-3, seed=0)
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
# the chat template keeps only the user message (the tiny model reads no system prompt) and appends ":"
# as the generation prompt, so a prompt is e.g. "3,5,7>15:"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}:{% endif %}")
STEP = re.compile(r"(\d+)([-+*])(\d+)=(-?\d+)")


# ------------------------------------------------------------------------------------------- tokenizer
def tokenizer():
    """Character-level PreTrainedTokenizerFast: <pad>=0, <eos>=1, <unk>=2, then printable ASCII and newline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>"] + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # one token per char
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False, padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ------------------------------------------------------------------------------------------- the task
def solutions(numbers, target):
    """Every correct solution of (numbers, target), sorted: two steps "x o y=r", larger operand first,
    o in + - *, each number used once, the last result equal to target. Intermediate results are >= 0."""
    found = set()
    n = list(numbers)
    for i in range(len(n)):
        for j in range(i + 1, len(n)):
            x, y = max(n[i], n[j]), min(n[i], n[j])
            rest = [n[k] for k in range(len(n)) if k not in (i, j)]
            for o1 in DATA["ops"]:
                f1 = OPS[o1]
                r = f1(x, y)
                u, v = max(r, rest[0]), min(r, rest[0])
                for o2 in DATA["ops"]:
                    if OPS[o2](u, v) == target:
                        found.add(f"{x}{o1}{y}={r} {u}{o2}{v}={target}")
    return sorted(found)


def problem_text(numbers, target):
    """The problem string, e.g. "3,5,7>15"."""
    return ",".join(map(str, numbers)) + f">{target}"


def make_problem(rng):
    """One random problem (numbers, target): numbers uniform in [1, max_number], target the result of a
    uniformly drawn two-step path (so targets reachable in several ways are more frequent), <= max_target."""
    while True:
        numbers = tuple(sorted(rng.randint(1, DATA["max_number"]) for _ in range(DATA["numbers"])))
        i, j = rng.sample(range(3), 2)
        x, y = max(numbers[i], numbers[j]), min(numbers[i], numbers[j])
        r = OPS[rng.choice(DATA["ops"])](x, y)
        rest = numbers[3 - i - j]
        target = OPS[rng.choice(DATA["ops"])](max(r, rest), min(r, rest))
        if 0 <= target <= DATA["max_target"]:
            return numbers, target


def _item(numbers, target, source):
    sols = solutions(numbers, target)
    return {"problem": problem_text(numbers, target), "answer": str(target), "numbers": list(numbers),
            "solutions": sols, "source": source}


def datasets():
    """(train, evals): the training problems and {"test": [...], "unique": [...]} held-out sets, lists of
    {"problem", "answer", "numbers", "solutions", "source"}. No held-out problem occurs in train."""
    rng = random.Random(DATA["seed"])
    seen, test, unique = set(), [], []
    while len(test) < DATA["test_size"] or len(unique) < DATA["unique_size"]:
        numbers, target = make_problem(rng)
        key = (numbers, target)
        if key in seen:
            continue
        n_sol = len(solutions(numbers, target))
        if len(test) < DATA["test_size"]:
            seen.add(key)
            test.append(_item(numbers, target, f"lab-test:{len(test)}"))
        elif n_sol == 1 and len(unique) < DATA["unique_size"]:
            seen.add(key)
            unique.append(_item(numbers, target, f"lab-unique:{len(unique)}"))
    train = []
    while len(train) < DATA["train_size"]:
        numbers, target = make_problem(rng)
        if (numbers, target) not in seen:
            train.append(_item(numbers, target, f"lab-train:{len(train)}"))
    return train, {"test": test, "unique": unique}


def parse(completion):
    """The steps of a completion as a canonical string "x o y=r u o v=t" (None if it is not a sequence of
    well-formed steps separated by single spaces)."""
    text = completion.strip()
    steps = text.split(" ")
    if not text or not all(STEP.fullmatch(s) for s in steps):
        return None
    return text


def score(completion, item):
    """Exact reward of one completion for a lab item -> verifier.Score(reward, answer, correct, timed_out).

    Correct iff every step "x o y=r" is right arithmetic, uses two available values (the numbers, then the
    results of earlier steps, each once), all numbers are used and the last result is the target.
    `answer` is the canonical solution string (used to count distinct solutions).
    """
    text = parse(completion)
    if text is None:
        return verifier.Score(0.0, None, False, False)
    pool = list(item["numbers"])
    result = None
    for s in text.split(" "):
        x, o, y, r = STEP.fullmatch(s).groups()
        x, y, r = int(x), int(y), int(r)
        if OPS[o](x, y) != r:
            return verifier.Score(0.0, text, False, False)
        for v in (x, y):
            if v not in pool:
                return verifier.Score(0.0, text, False, False)
            pool.remove(v)
        pool.append(r)
        result = r
    ok = len(pool) == 1 and result == int(item["answer"])
    return verifier.Score(1.0 if ok else 0.0, text, ok, False)


def fork_mask(completions, items, width):
    """(N, width) bool: True at response positions where the valid solutions consistent with the
    completion so far continue with two or more different characters (a fork). Positions past a
    completion's end, or after it has left every valid solution, are False. Character-level tokenizer:
    response position t is the t-th character of the completion (the EOS token follows the last one).
    """
    out = torch.zeros((len(completions), width), dtype=torch.bool)
    for row, (text, item) in enumerate(zip(completions, items)):
        alive = item["solutions"]
        for t in range(min(len(text), width)):
            nxt = {s[t] if t < len(s) else "" for s in alive}
            out[row, t] = len(nxt) > 1
            alive = [s for s in alive if t < len(s) and s[t] == text[t]]
            if not alive:
                break
    return out


def fork_entropy(fork_mask_fn, ro, items, entropy):
    """The entropy at the fork tokens, where valid solutions branch (entropy/fork), and elsewhere
    (entropy/other), of a rollout `ro` (rollout.Rollout) whose (N, R) token entropies are `entropy`;
    fork_mask_fn is fork_mask (the lab) and items the rollout's prompts' items."""
    mask = ro.response_mask.bool()
    forks = fork_mask_fn(ro.completions, [items[int(i)] for i in ro.prompt_index.tolist()],
                         mask.shape[1]).to(mask.device) & mask
    rest = mask & ~forks
    return {"entropy/fork": float(entropy[forks].mean()) if forks.any() else None,
            "entropy/other": float(entropy[rest].mean()) if rest.any() else None, "fork_tokens": int(forks.sum())}


def sample_solution(item, rng):
    """One of the item's correct solutions, drawn uniformly with the random.Random `rng`."""
    return rng.choice(item["solutions"])


# ------------------------------------------------------------------------------------------- warm start
def cpu_kernels():
    """The CPU kernels torch runs on ("AVX2", "AVX512", ...; "none" without a CPU capability query)."""
    return getattr(torch.backends.cpu, "get_cpu_capability", lambda: "none")()


def fingerprint(path):
    """The identity of a warm start: {"weights": 16 hex digits of the sha256 of its tensors (by name), and
    "torch", "transformers", "cpu_kernels" that made it}: results made from the same fingerprint can stand side
    by side. Read from path/fingerprint.json when the build wrote one."""
    path = Path(path)
    if (path / "fingerprint.json").is_file():
        return json.loads((path / "fingerprint.json").read_text())
    import transformers
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].contiguous().numpy().tobytes())
    return {"weights": digest.hexdigest()[:16], "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_kernels": cpu_kernels()}


def warm_start(sft_steps, cache_root=CACHE_DIR, log=print):
    """Path of the warm-started model (model + tokenizer, save_pretrained format), built once and cached.

    Supervised next-token training for sft_steps steps of SFT["batch_size"] problems, each with a solution
    drawn uniformly among its valid ones (loss on the response tokens only), on one thread (about 60 s for
    the default 1500 steps on a 2-core CPU). The cache key hashes every setting that changes the weights.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    key = json.dumps(dict(task="countdown-v1", model=MODEL, data=DATA, sft=SFT, steps=sft_steps,
                          torch=torch.__version__.split("+")[0], cpu_kernels=cpu_kernels()), sort_keys=True)
    path = Path(cache_root) / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (path / "config.json").exists():
        return path
    log(f"tiny lab: building the warm-started model ({sft_steps} supervised steps) in {path}")
    tok = tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # fastest for this model, and the summation order the tables were built with
    try:
        with torch.random.fork_rng():
            torch.manual_seed(SFT["seed"])
            config = Qwen2Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 bos_token_id=tok.eos_token_id, tie_word_embeddings=True, **MODEL)
            model = Qwen2ForCausalLM(config)
            model.generation_config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            train, _ = datasets()
            rng = random.Random(SFT["seed"])
            opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], weight_decay=0.0)
            model.train()
            began = time.perf_counter()
            for n in range(1, sft_steps + 1):
                batch = rng.sample(train, SFT["batch_size"])
                prompts = [tok(rollout.format_prompt(tok, b["problem"]), add_special_tokens=False)["input_ids"]
                           for b in batch]
                answers = [tok(sample_solution(b, rng), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                           for b in batch]
                width = max(len(p) + len(a) for p, a in zip(prompts, answers))
                ids = torch.full((len(batch), width), tok.pad_token_id)
                labels = torch.full((len(batch), width), -100)
                attn = torch.zeros((len(batch), width), dtype=torch.long)
                for i, (p, a) in enumerate(zip(prompts, answers)):
                    ids[i, :len(p) + len(a)] = torch.tensor(p + a)
                    labels[i, len(p):len(p) + len(a)] = torch.tensor(a)         # loss on the response only
                    attn[i, :len(p) + len(a)] = 1
                model(input_ids=ids, attention_mask=attn, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if n % 250 == 0 or n == sft_steps:
                    log(f"tiny lab warm start: step {n}/{sft_steps}, {time.perf_counter() - began:.0f}s")
    finally:
        torch.set_num_threads(threads)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with quiet_transformers():
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "fingerprint.json").write_text(json.dumps(fingerprint(tmp), indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, path)                                     # atomic; a concurrent builder may have won
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
