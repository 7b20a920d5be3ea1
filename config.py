"""train.py's command line: the flags in --help groups, the presets, one table of defaults and every check,
all made before any work.

A flag left unset takes, in order: the preset's value (PRESETS), the method's data-side settings
(losses.LOSSES[algo].data_defaults: DAPO's dynamic sampling with refill and overlong penalty, Archer's
dropped groups), then DEFAULTS. A loss knob left unset keeps the loss function's own default (losses.py);
KNOB_FLAGS maps each method flag to the loss keyword it sets. A bad value is one SystemExit line naming the
flag (run_dir.cli turns it into exit status 2).

    python train.py --help
    from config import parse
    cfg, run_dir = parse(["--algo", "steer", "--steps", "10"])
"""
import argparse
import json
import sys
from pathlib import Path

import torch

import data
import losses
import rollout
import tiny_lab
from run_dir import one_line

ALGOS = tuple(losses.LOSSES)
DEFAULTS = dict(
    prompts_per_step=8, group_size=8, max_new_tokens=1024, temperature=1.0, top_p=1.0, lr=1e-6, steps=100,
    updates_per_batch=2, micro_batch_size=8, max_grad_norm=1.0, optimizer="adamw", eval_interval=20,
    eval_k=8, eval_size=None, eval_temperature=1.0, save_interval=20, log_samples=2, seed=0,
    dataset_split="train", eval_split="test", answer_format="auto", bf16=False, gradient_checkpointing=False,
    tiny_sft_steps=1500, drop_equal_groups=False, max_refill_rounds=0, overlong_penalty=False, overlong_cache=None,
    max_prompt_tokens=1024, system_prompt=rollout.DEFAULT_SYSTEM_PROMPT, cache_dir=str(tiny_lab.CACHE_DIR),
    measure_entropy_change=False, plot=False, overwrite=False,
    warmup_steps=0, lr_schedule="constant", save_optimizer=True, skip_zero_advantage=True, reward=None,
    report_to=None, threads=None,
)
PRESETS = {
    "tiny": dict(prompts_per_step=16, group_size=8, max_new_tokens=20, lr=5e-4, steps=100, updates_per_batch=2,
                 micro_batch_size=64, eval_interval=25, eval_k=64, eval_size=64, save_interval=50,
                 max_prompt_tokens=32,     # lab prompts are ~10 characters; the model has 64 positions
                 threads=1),               # a second thread gains little on the 0.1M model (README)
    "qwen-math-1.5b": dict(model="Qwen/Qwen2.5-Math-1.5B", dataset="DigitalLearningGmbH/MATH-lighteval",
                           eval_dataset="HuggingFaceH4/MATH-500", dataset_split="train", eval_split="test",
                           prompts_per_step=8, group_size=8, max_new_tokens=1024, lr=1e-6, steps=500,
                           micro_batch_size=8, eval_interval=50, eval_k=4, bf16=True, gradient_checkpointing=True),
    "qwen-0.5b-gsm8k": dict(model="Qwen/Qwen2.5-0.5B-Instruct", dataset="openai/gsm8k:main",
                            eval_dataset="openai/gsm8k:main", dataset_split="train", eval_split="test",
                            prompts_per_step=8, group_size=8, max_new_tokens=512, lr=1e-6, steps=200,
                            micro_batch_size=8, eval_interval=50, eval_k=4, eval_size=500, bf16=True,
                            gradient_checkpointing=True),
}
# --model without CUDA: GPU-sized defaults would take minutes per step and gigabytes on a laptop (1024 new
# tokens, 8 x 8 responses); these make a step take seconds to a minute. A flag you give overrides them.
CPU_DEFAULTS = dict(prompts_per_step=2, group_size=4, max_new_tokens=64, eval_k=4, eval_size=16)
# The method flags, by --help group: flag -> (type or choices, the keyword it sets, help). The keyword is the
# loss function's (per algorithm where the names differ); for adaptive_entropy the keywords of
# losses.entropy_control_init (CONTROL_KEYS) go to its controller. A flag the chosen loss does not take is
# refused (knob_kwargs).
CONTROL_KEYS = ("target", "coef", "delta", "coef_max")
KNOB_GROUPS = {
    "PPO clip (every loss with the ratio clip; Archer and ASPO: --dual-clip only; GSPO: the sequence ratio's)": {
        "clip_low": (float, "clip_low", "clip epsilon below 1"),
        "clip_high": (float, "clip_high", "clip epsilon above 1"),
        "dual_clip": (float, "dual_clip", "dual-clip constant c for negative advantages"),
        "agg": (losses.AGG_MODES, "agg", "loss aggregation mode (seq-mean-token-sum-norm divides by "
                                         "--max-new-tokens, Dr. GRPO's constant)")},
    "GRPO, DAPO, Dr. GRPO": {
        "kl_coef": (float, "kl_coef", "k3 KL coefficient to the frozen start model")},
    "STEER and OPEFO": {
        "lambda_min": (float, "lambda_min", "STEER's smallest token weight"),
        "first_order_form": (losses.FIRST_ORDER_FORMS, "form", "STEER's Omega / OPEFO's flow form / Clip_V's "
                                                               "score")},
    "STEER's quadrant interventions (quadrant: GRPO with one weight per quadrant)": {
        f"scale_{q}": (float, q, f"weight of the {q.replace('_', ' ')} tokens' update (default 1)")
        for q in losses.QUADRANTS},
    "Archer and ASPO": {
        "archer_quantile": (float, "quantile", "per-response entropy quantile rho"),
        "clip_reasoning": (float, "clip_reasoning", "clip range on high-entropy tokens"),
        "clip_knowledge": (float, "clip_knowledge", "clip range on low-entropy tokens"),
        "kl_knowledge": (float, "kl_knowledge", "KL coefficient on low-entropy tokens")},
    "CE-GPPO and GPPO": {
        "gppo_beta_low": (float, "beta_low", "beta_1, the gradient kept on tokens clipped below (A < 0) "
                                             "(default 0.5; GPPO 1)"),
        "gppo_beta_high": (float, "beta_high", "beta_2, the gradient kept on tokens clipped above (A > 0) "
                                               "(default 1)")},
    "CISPO and SAPO (GSPO takes the PPO clip flags)": {
        "cispo_ratio_cap": (float, "ratio_cap", "CISPO: cap on the ratio itself, TRL's form (default: 1 + "
                                                "--clip-high; cispo_trl 5.0)"),
        "sapo_tau_pos": (float, "tau_pos", "SAPO: the gate's temperature for A > 0 (default 1.0)"),
        "sapo_tau_neg": (float, "tau_neg", "SAPO: the gate's temperature for A <= 0 (default 1.05)")},
    "ERC, Clip_B and Clip_V (gates on the entropy change)": {
        "erc_band_low": (float, "band_low", "ERC: lower end of the open band of H / H_old kept (default 0.95)"),
        "erc_band_high": (float, "band_high", "ERC: upper end of that band (default 1.05)"),
        "gate_mu": (float, "mu", "Clip_B / Clip_V: the cut in standard deviations (default 2.5; Clip_V 8.5)"),
        "gate_max_frac": (float, "max_frac", "Clip_V: the most tokens it drops among A < 0, as a fraction "
                                             "(default 1e-4)")},
    "entropy bonus and adaptive entropy (Skywork-OR1)": {
        "entropy_coef": (float, "coef", "entropy_bonus's coefficient (default 0.001); adaptive_entropy's "
                                        "starting coefficient (default 0.005)"),
        "target_entropy": (float, "target", "adaptive: target mean token entropy (default 0.2)"),
        "entropy_coef_delta": (float, "delta", "adaptive: coefficient step per RL step (default 0.001)"),
        "entropy_coef_max": (float, "coef_max", "adaptive: largest coefficient (default 0.5)")},
    "Clip-Cov and KL-Cov": {
        "clip_cov_ratio": (float, "clip_cov_ratio", "Clip-Cov's fraction of tokens whose gradient is removed "
                                                    "(default 2e-4)"),
        "clip_cov_lb": (float, "cov_lb", "Clip-Cov's lower covariance bound (default 1)"),
        "clip_cov_ub": (float, "cov_ub", "Clip-Cov's upper covariance bound (default 5)"),
        "kl_cov_ratio": (float, "kl_cov_ratio", "KL-Cov's fraction (not percent) of top-covariance tokens "
                                                "(default 2e-3)"),
        "kl_cov_coef": (float, "kl_cov_coef", "KL-Cov's coefficient of |log pi - log pi_old| (default 1)")},
    "forking tokens, entropy-based advantage, W-REINFORCE": {
        "top_frac": (float, "top_frac", "forking: share of highest-entropy tokens that get the gradient (default "
                                        "0.2)"),
        "entropy_adv_alpha": (float, "alpha", "alpha in A + min(alpha H, |A| / kappa) (default 0.4)"),
        "entropy_adv_kappa": (float, "kappa", "kappa in A + min(alpha H, |A| / kappa) (default 2)"),
        "positive_weight": (float, "positive_weight", "W-REINFORCE's weight on positive samples (default 0.1)")},
}
KNOB_FLAGS = {flag: spec for group in KNOB_GROUPS.values() for flag, spec in group.items()}
# the range each flag must lie in, checked on the resolved configuration (unset flags skipped; the loss
# knobs are checked by the loss itself, check_knobs)
FLAG_RANGES = {
    **{k: (lambda v: v >= 1, ">= 1") for k in ("prompts_per_step", "group_size", "max_new_tokens", "steps",
                                              "updates_per_batch", "micro_batch_size", "eval_k", "save_interval",
                                              "eval_size", "max_prompt_tokens", "threads")},
    **{k: (lambda v: v >= 0, ">= 0") for k in ("log_samples", "tiny_sft_steps", "eval_temperature", "kl_coef",
                                              "kl_knowledge", "max_refill_rounds", "warmup_steps")},
    "eval_interval": (lambda v: v >= 0, ">= 0 (0: evaluate only at the start and the end)"),
    "lr": (lambda v: v > 0, "> 0"),
    "max_grad_norm": (lambda v: v > 0, "> 0"),
    "temperature": (lambda v: v > 0, "> 0 for RL rollouts"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
}
# flags that --resume accepts with a new value: the new total, and what is evaluated, logged, saved or plotted
# (evaluation forks the RNG, so none of them changes the training numbers)
RESUME_FLAGS = ("steps", "eval_interval", "save_interval", "log_samples", "plot", "cache_dir", "save_optimizer",
                "report_to")


def flag(key):
    """The command-line spelling of a configuration key: lr -> --lr, group_size -> --group-size."""
    return "--" + key.replace("_", "-")


# ------------------------------------------------------------------------------------------- the parser
class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block) and negative numbers in any notation as values:
    "--lr -1e-4" is read as --lr=-1e-4 (plain argparse takes "-1e-4" for an option), and then refused by
    check_ranges as out of range."""

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        joined = []
        for arg in args:
            if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _is_negative_number(arg):
                joined[-1] = f"{joined[-1]}={arg}"
            else:
                joined.append(arg)
        return super().parse_args(joined, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _is_negative_number(text):
    """True for "-1", "-1e-4", "-.5", "-inf": a value, not an option."""
    try:
        float(text)
    except ValueError:
        return False
    return text.startswith("-")


def build_parser():
    """Every flag defaults to None (unset); resolve fills it (see the module docstring)."""
    p = ArgumentParser(prog="train.py", description="RLVR training loop (GRPO, DAPO, Dr. GRPO, STEER, OPEFO, "
                       "Archer and the entropy interventions). A flag left unset takes the preset's value, then "
                       "the method's, then config.DEFAULTS; unset loss knobs keep losses.py's defaults.")
    on_off = dict(action=argparse.BooleanOptionalAction, default=None)
    g = p.add_argument_group("run").add_argument
    g("--algo", choices=ALGOS, help="loss / algorithm (default grpo)")
    g("--preset", choices=sorted(PRESETS), help="settings bundle; default: tiny without CUDA")
    g("--steps", type=int, help="RL steps (with --resume: the new total)")
    g("--seed", type=int, help="seed of sampling and data order")
    g("--threads", type=int, help="CPU threads of torch (default: 1 in the tiny lab, as compare.py runs it; "
      "torch's own otherwise)")
    g("--out", help="run directory (default runs/<preset>-<algo>-seed<seed>); must be empty or new")
    g("--overwrite", action="store_true", default=None,
      help="replace the run in a non-empty --out (removes only the files a run writes)")
    g("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint; other flags may only "
      f"repeat the saved values, except {', '.join(flag(k) for k in RESUME_FLAGS)}")
    g("--save-interval", type=int, help="checkpoint every N steps (and at the end)")
    g("--save-optimizer", **on_off, help="keep the optimizer state in checkpoints (default on); "
      "--no-save-optimizer saves weights, RNG and scheduler only: --resume then restarts AdamW's moments from "
      "zero (warned)")
    g("--log-samples", type=int, help="prompts per step whose G completions go to samples.jsonl, and problems "
      "per evaluation set whose greedy and first sampled completions go to eval_samples.jsonl")
    g("--plot", action="store_true", default=None, help="write curves.png")
    g("--report-to", choices=("tensorboard",), help="also write every metric to TensorBoard (run directory's tb/; "
      "needs the tensorboard package); metrics.jsonl stays the record")
    g("--measure-entropy-change", action="store_true", default=None,
      help="log predicted vs realised per-token entropy change (entropy_math.estimator_report)")
    g = p.add_argument_group("data").add_argument
    g("--dataset", help="training problems: a .jsonl file or a Hub dataset name[:config]")
    g("--eval-dataset", help="held-out problems, same forms as --dataset")
    g("--dataset-split", help="Hub split of --dataset")
    g("--eval-split", help="Hub split of --eval-dataset")
    g("--problem-field", help="row field holding the problem (default: problem or question)")
    g("--answer-field", help="row field holding the gold (default: answer, else solution)")
    g("--answer-format", choices=("auto", "plain", "gsm8k", "boxed"), help="how to read the gold from its field")
    g("--reward", metavar="MODULE:FUNCTION", help="your reward instead of the math verifier: function(completion, "
      "row) -> float or verifier.Score, row the dataset row (a dict with its fields, plus problem and answer); "
      "MODULE is imported from the working directory or the Python path")
    g("--max-prompt-tokens", type=int, help="problems whose prompt is longer are left out and counted "
      "(default 1024; 32 in the tiny lab)")
    g("--system-prompt", help="system message of the chat template "
      "(default: rollout.DEFAULT_SYSTEM_PROMPT; the tiny lab's template ignores it)")
    g = p.add_argument_group("model").add_argument
    g("--model", help="Hub name or local folder of the policy (not with --preset tiny)")
    g("--bf16", **on_off, help="bf16 autocast of every forward pass over float32 weights, on CUDA or CPU (on "
      "CPU faster only with bf16 matrix hardware such as AMX)")
    g("--gradient-checkpointing", **on_off, help="recompute activations in the backward pass")
    g("--tiny-sft-steps", type=int, help="supervised warm-start steps of the tiny lab (cached)")
    g("--cache-dir", help=f"tiny-lab warm-start cache (default {tiny_lab.CACHE_DIR})")
    g = p.add_argument_group("rollout").add_argument
    g("--prompts-per-step", type=int, help="prompts sampled per RL step")
    g("--group-size", type=int, help="responses per prompt (G)")
    g("--max-new-tokens", type=int, help="generation budget per response")
    g("--temperature", type=float, help="sampling temperature (also scales the scored logits)")
    g("--top-p", type=float, help="nucleus sampling threshold for rollouts")
    g("--drop-equal-groups", **on_off, help="drop groups whose rewards are all equal (default: on for dapo, "
      "archer)")
    g("--max-refill-rounds", type=int, help="DAPO's dynamic sampling: at most this many extra rounds of "
      "prompts per step until the batch holds --prompts-per-step groups with non-equal rewards (default: 9 "
      "for dapo, 0 = no refill otherwise; needs --drop-equal-groups)")
    g("--overlong-penalty", **on_off, help="DAPO's soft overlong punishment added to the reward (default: on "
      "for dapo)")
    g("--overlong-cache", type=int, help="L_cache of the overlong penalty in tokens: 0 up to "
      "max-new-tokens - L_cache, then linear to -1 at --max-new-tokens (default: 0.2 x --max-new-tokens)")
    g = p.add_argument_group("optimisation").add_argument
    g("--lr", type=float, help="learning rate")
    g("--optimizer", choices=("adamw", "sgd"), help="AdamW (default) or plain SGD (for first-order checks)")
    g("--updates-per-batch", type=int, help="optimizer steps (mini-batches) per rollout batch; 1 for OPEFO")
    g("--micro-batch-size", type=int, help="sequences per forward/backward (gradient accumulation)")
    g("--max-grad-norm", type=float, help="gradient clipping norm")
    g("--warmup-steps", type=int, help="linear learning-rate warmup over the first N RL steps: --lr * (n + 1) "
      "/ N after n finished steps (default 0, verl's; verl's DAPO recipe scripts use 10 at lr 1e-6)")
    g("--lr-schedule", choices=("constant", "cosine"), help="after the warmup: constant (default, verl's and "
      "DAPO's) or cosine decay towards 0 over the remaining --steps")
    g("--skip-zero-advantage", **on_off, help="leave rows with zero advantage out of the update's forward and "
      "backward when the loss gives them no gradient (no KL or entropy bonus; default on; parameters are the "
      "same)")
    g = p.add_argument_group("evaluation").add_argument
    g("--eval-interval", type=int, help="evaluate every N steps (0: only at start and end)")
    g("--eval-k", type=int, help="samples per held-out problem for avg@k / pass@k")
    g("--eval-size", type=int, help="use the first N held-out problems")
    g("--eval-temperature", type=float, help="sampling temperature of avg@k / pass@k")
    for title, flags in KNOB_GROUPS.items():
        g = p.add_argument_group(title).add_argument
        for key, (kind, _, text) in flags.items():
            g(flag(key), **(dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind)), help=text)
    return p


# ------------------------------------------------------------------------------------------- resolving
def parse(argv=None, log=print):
    """(configuration dict, run directory) from the command line: a new run's resolved flags (resolve) or a
    resumed run's saved ones (resume_config)."""
    args = build_parser().parse_args(argv)
    cfg = resume_config(args) if args.resume else resolve(args, log)
    check_environment(cfg)
    return cfg, Path(cfg["resume"] if args.resume else cfg["out"])


def resolve(args, log=print):
    """Fill the unset flags from the preset, the method's data-side settings and DEFAULTS; check everything.

    A preset's evaluation set belongs with its training set: with --dataset given, the preset's
    eval_dataset is not used (so a run on local files never reaches for the Hub); --eval-dataset names one.
    """
    cfg = vars(args).copy()
    cfg["algo"] = cfg["algo"] or "grpo"
    method = losses.LOSSES[cfg["algo"]]
    given = {k for k, v in cfg.items() if v is not None}
    if cfg["preset"] is None and cfg["model"] is None:
        if "dataset" in given:
            raise SystemExit(f"--dataset {cfg['dataset']} needs --model: without one the run would be the tiny lab, "
                             "whose model (a character-level Countdown solver) cannot learn your problems; give "
                             "--model (a Hub name or a local folder), or drop --dataset to run the lab")
        cfg["preset"] = "tiny" if not torch.cuda.is_available() else "qwen-0.5b-gsm8k"
        log(f"no --preset or --model: using --preset {cfg['preset']}"
            + (" (the offline tiny lab, since CUDA is not available)" if cfg["preset"] == "tiny" else ""))
    if cfg["preset"] == "tiny" and cfg["model"]:
        raise SystemExit("--model does not apply to --preset tiny (the tiny lab builds its own model)")
    preset = dict(PRESETS.get(cfg["preset"], {}))
    if cfg["preset"] == "tiny" and "dataset" in given:
        log(f"--dataset with --preset tiny: the lab's model trains on {cfg['dataset']}, scored by "
            f"{cfg['reward'] or 'the math verifier'}, and is evaluated on "
            f"{cfg['eval_dataset'] or 'the lab sets'}")
    if "dataset" in given and "eval_dataset" not in given and preset.get("eval_dataset"):
        log(f"--dataset given: the preset's evaluation set {preset.pop('eval_dataset')} is not used "
            "(name it with --eval-dataset to evaluate on it)")
    cpu = {} if cfg["preset"] or torch.cuda.is_available() else {k: v for k, v in CPU_DEFAULTS.items()
                                                                  if k not in given}
    shown = [f"{flag(k)} {v}" for k, v in cpu.items() if cfg["eval_dataset"] or not k.startswith("eval")]
    if shown:
        log("no CUDA: sized for a CPU (set a flag to override): " + " ".join(shown))
    for source in (preset, method.data_defaults, cpu, DEFAULTS):
        for k, v in source.items():
            if cfg.get(k) is None:
                cfg[k] = v
    if method.on_policy and cfg["updates_per_batch"] != 1:
        log(f"--algo {cfg['algo']}: updates_per_batch {cfg['updates_per_batch']} -> 1 "
            "(strictly on-policy: one optimizer step per rollout batch)")
        cfg["updates_per_batch"] = 1
    unused = [flag(k) for k in ("eval_size", "eval_k") if k in given]
    if unused and cfg["preset"] != "tiny" and not cfg.get("eval_dataset"):
        log(f"{' and '.join(unused)} ignored: there is no evaluation set (name one with --eval-dataset)")
    if cfg["overlong_penalty"] and cfg["overlong_cache"] is None:
        cfg["overlong_cache"] = losses.default_overlong_cache(cfg["max_new_tokens"])
    check(cfg)
    if cfg["out"] is None:
        name = cfg["preset"] or Path(cfg["model"]).name
        cfg["out"] = str(Path("runs") / f"{name}-{cfg['algo']}-seed{cfg['seed']}")
    return cfg


def resume_config(args):
    """The saved configuration of the run in args.resume, with the RESUME_FLAGS the user gave; an error naming
    every other flag whose value differs from the saved one (it would change the run)."""
    run_dir = Path(args.resume)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise SystemExit(f"--resume {run_dir}: no such run directory")
    if not path.is_file():
        raise SystemExit(f"--resume {run_dir}: no config.json there (not a train.py run directory)")
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path} is damaged, not valid JSON ({one_line(e, 120)}): the run cannot be resumed")
    if not isinstance(cfg, dict) or "algo" not in cfg:
        raise SystemExit(f"{path} is not a train.py configuration: the run cannot be resumed")
    cfg = {**DEFAULTS, **cfg}          # a setting newer than the run: its default, as the run had it
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if given.pop("overwrite", False):
        raise SystemExit("--overwrite and --resume exclude each other: --resume continues the run, "
                         "--overwrite starts a new one")
    out = given.pop("out", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise SystemExit(f"--out {out} differs from --resume {run_dir}: a resumed run stays in its directory")
    changed = [k for k, v in given.items() if k not in RESUME_FLAGS and v != cfg.get(k)]
    if changed:
        listed = ", ".join(f"{flag(k)} {given[k]!r} (saved: {cfg.get(k)!r})" for k in changed)
        allowed = ", ".join(flag(k) for k in RESUME_FLAGS)
        raise SystemExit(f"--resume {run_dir}: {listed} would change the run; with --resume only {allowed} "
                         f"may take new values")
    cfg.update({k: v for k, v in given.items() if k in RESUME_FLAGS})
    check_ranges(cfg)
    cfg["resume"] = str(run_dir)
    return cfg


# ------------------------------------------------------------------------------------------- checks
def check(cfg):
    """Every check of a new run's resolved configuration, before any work: ranges, the data-side flags'
    combinations, and the method flags (check_knobs)."""
    check_ranges(cfg)
    if cfg["preset"] != "tiny" and not cfg.get("dataset"):
        raise SystemExit("--dataset is required with --model (a .jsonl file or a Hub dataset name)")
    if cfg["max_refill_rounds"] and not cfg["drop_equal_groups"]:
        raise SystemExit("--max-refill-rounds needs --drop-equal-groups (a refill looks for groups to keep)")
    if cfg["overlong_penalty"]:
        if not 1 <= cfg["overlong_cache"] <= cfg["max_new_tokens"]:
            raise SystemExit(f"--overlong-cache must be in [1, --max-new-tokens={cfg['max_new_tokens']}], "
                             f"got {cfg['overlong_cache']}")
    elif cfg["overlong_cache"] is not None:
        raise SystemExit("--overlong-cache needs --overlong-penalty")
    check_knobs(cfg)


def check_environment(cfg):
    """What the flags ask of this machine, before any work: a GPU preset needs CUDA; a --model that names a
    local path must exist; --reward must import; --report-to tensorboard needs tensorboard."""
    if cfg["preset"] not in (None, "tiny") and not torch.cuda.is_available():
        raise SystemExit(f"--preset {cfg['preset']} trains {PRESETS[cfg['preset']]['model']} in bf16 and needs a "
                         "CUDA GPU, which this machine does not have (torch.cuda.is_available() is False); use "
                         "--preset tiny for the offline lab, or --model with a small local model")
    model = cfg.get("model")
    if model and not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise SystemExit(f"--model {model}: no such folder (a local model is a folder written by save_pretrained; "
                         "a Hub model is named organisation/name)")
    if cfg.get("reward"):
        data.reward_function(cfg["reward"])
    if cfg.get("report_to") == "tensorboard":
        try:
            from torch.utils import tensorboard  # noqa: F401  (it imports the tensorboard package)
        except ImportError:
            raise SystemExit("--report-to tensorboard needs the tensorboard package: pip install tensorboard") from None


def check_ranges(cfg):
    """A one-line error naming the flag for a value out of FLAG_RANGES, or a group size that trains nothing."""
    for key, (ok, wanted) in FLAG_RANGES.items():
        value = cfg.get(key)
        if value is not None and not ok(value):
            raise SystemExit(f"{flag(key)} must be {wanted}, got {value}")
    if cfg["group_size"] == 1:
        raise SystemExit(f"--group-size 1 trains nothing with --algo {cfg['algo']}: every advantage is relative "
                         f"to the group, so a lone response gets 0 and the reward never reaches the update; use "
                         f"2 or more")


def knob_kwargs(cfg):
    """(loss keywords, adaptive-entropy controller keywords) of the method flags the user set (KNOB_FLAGS);
    an error naming a flag the chosen method does not take."""
    method = losses.LOSSES[cfg["algo"]]
    loss_kw, control_kw = {}, {}
    for key, (_, name, _) in KNOB_FLAGS.items():
        if cfg.get(key) is None:
            continue
        if method.adaptive and name in CONTROL_KEYS:
            control_kw[name] = cfg[key]
        elif name in method.knobs:
            loss_kw[name] = cfg[key]
        else:
            raise SystemExit(f"{flag(key)} does not apply to --algo {cfg['algo']}")
    return loss_kw, control_kw


def check_knobs(cfg):
    """The method flags, checked before the run: a flag the algorithm does not take, or a value out of range
    (the loss's own check, on a one-token batch: losses.KnobError names the knob), is one SystemExit line
    naming the flag."""
    algo = cfg["algo"]
    kwargs, control = knob_kwargs(cfg)
    flag_of = {name: key for key, (_, name, _) in KNOB_FLAGS.items() if cfg.get(key) is not None}
    one = torch.zeros(1, 1)
    try:
        if losses.LOSSES[algo].adaptive:
            kwargs["coef"] = losses.entropy_control_init(**control)["coef"]
        if "generator" in losses.LOSSES[algo].knobs:
            kwargs["generator"] = torch.Generator()                 # leaves the global RNG alone
        losses.LOSSES[algo](logp=one, old_logp=one, advantages=torch.zeros(1), mask=torch.ones(1, 1), entropy=one,
                            exact_term=one, ref_logp=one, current_entropy=one, **kwargs)
    except losses.KnobError as e:
        raise SystemExit(f"{flag(flag_of[e.knob])}: {e}" if e.knob in flag_of else str(e)) from None
