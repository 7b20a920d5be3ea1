"""A run's directory: what train.py writes, how it is locked, checkpointed and resumed, and its exit codes.

Files (default runs/<preset>-<algo>-seed<seed>):
    config.json          the resolved configuration (config.py), read back by --resume
    metrics.jsonl        one line per RL step; step 0 holds the evaluation of the starting model; a value that
                         is not finite is written as null (json_safe)
    samples.jsonl        every completion of the first --log-samples prompts of each step, with reward,
                         correct, truncated and advantage
    eval_samples.jsonl   per evaluation and set, the greedy and first sampled completion of the first
                         --log-samples problems, with verdicts
    checkpoints/step_NNNNNN, checkpoints/latest   (save_checkpoint); with --plot, curves.png (plots.py); with
    --report-to tensorboard, tb/ (the same scalars as metrics.jsonl, for a dashboard; reporter)

Nothing is lost:
    a new run refuses a non-empty --out unless --overwrite is given, which removes only RUN_FILES;
    the lock file .lock (an flock held for the whole run, holding "pid host") stops a second run into the
    same directory; a lock left by a process that is gone is taken over with a message;
    a checkpoint is written into a temporary folder, checked, renamed, and only then named by `latest`
    (atomic replace); the previous one is kept, older ones removed;
    --resume loads the newest checkpoint that loads, falling back to the previous one with a message, and
    drops a half-written last line of the JSON Lines logs; it continues a run bit for bit on CPU (same
    metrics except TIMING_KEYS) when the checkpoint holds the optimizer state (--no-save-optimizer: AdamW
    restarts, warned). Which flags --resume accepts is config.RESUME_FLAGS.

Exit status of the command line (cli): 0 done; 2 a user error, one line on stderr (a bad flag, data file
or run directory, an unreachable model or dataset), raised as SystemExit(message) before any work;
130 interrupted by Ctrl-C: the first finishes the step and writes a checkpoint (stop_on_ctrl_c), a second
stops at once; the message names the checkpoint to resume from. A traceback means a bug.
"""
import contextlib
import fcntl
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import torch

# the files and folders a run writes into its directory (what --overwrite removes)
RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", "curves.png", "checkpoints", "tb")
LOGS = ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl")
LOCK_FILE = ".lock"
# metrics whose values depend on the machine's speed, not on the run's numbers
TIMING_KEYS = ("time/", "tokens_per_s", "peak_mem_mb")


def peak_mem_mb(device):
    """Peak memory of the run so far: CUDA's allocator on a GPU, the process's resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB


def one_line(error, limit):
    """The message of an exception on one line, at most `limit` characters."""
    return " ".join(str(error).split())[:limit]


def cli(main, prog, argv=None):
    """Run main(argv) as a command: a user error (SystemExit with a message) is printed as one line and
    gives exit status 2, Ctrl-C 130."""
    try:
        main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"{prog}: error: {e.code}", file=sys.stderr)
            return 2
        return e.code
    except KeyboardInterrupt:
        print("interrupted before the run started", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' progress bars ("Loading weights", "Writing model shards") inside the block."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------- JSON Lines
def json_safe(value):
    """`value` with every NaN or infinite float (also inside dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_jsonl(path, record):
    """Append one record to a JSON Lines file (non-finite floats written as null)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def reporter(run_dir, report_to):
    """report(row): every number of a metrics row to TensorBoard (run_dir/tb, scalar per key at the row's step)
    when report_to is "tensorboard"; otherwise nothing. metrics.jsonl stays the record."""
    if report_to != "tensorboard":
        return lambda row: None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def report(row):
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, value, row["step"])
        writer.flush()
    return report


def read_jsonl(path):
    """The records of a JSON Lines file; a half-written last line (a run killed while writing it) is left out."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise
    return records


# ------------------------------------------------------------------------------------------- the directory
def check_writable(folder, flag):
    """Create `folder` if needed and write a file into it; a one-line error naming `flag` when that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SystemExit(f"{flag} {folder} is not writable ({e.strerror or e})") from None


def take_lock(run_dir, log):
    """Hold run_dir/.lock for the life of the run: an exclusive flock on a file holding "pid host". Returns
    the open file (closing it, or the process ending, releases the lock). A lock held by another process is
    an error naming it; a lock file left behind by a process that has ended is taken over with a message."""
    path = Path(run_dir) / LOCK_FILE
    while True:
        try:
            fh = open(path, "a+")
        except OSError as e:
            raise SystemExit(f"--out {run_dir} is not writable ({e.strerror or e})") from None
        fh.seek(0)
        owner = fh.read().split()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            who = f"process {owner[0]} on {owner[1]}" if len(owner) == 2 else "another process"
            raise SystemExit(f"{run_dir} is in use by another run ({who}, lock file {path}); wait for it to "
                             f"end or choose another --out") from None
        except OSError as e:            # a file system without locks
            fh.close()
            raise SystemExit(f"--out {run_dir}: cannot lock {path} ({e.strerror or e})") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino:
            break
        fh.close()                      # the file was removed by its owner in between: lock the new one
    if owner:
        log(f"{path}: taking over the lock of process {' on '.join(owner[:2])}, which is no longer running")
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()} {socket.gethostname()}\n")
    fh.flush()
    return fh


def release_lock(run_dir, fh):
    """Remove run_dir/.lock and release the flock taken by take_lock."""
    (Path(run_dir) / LOCK_FILE).unlink(missing_ok=True)
    fh.close()


def claim_run_dir(run_dir, cfg, log):
    """Create the run directory, take its lock (take_lock) and check it may be written: a new run refuses a
    directory that holds anything unless cfg["overwrite"], which removes the RUN_FILES of the previous run
    (nothing else). Returns the lock's file."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {run_dir}: cannot create the run directory ({e.strerror or e})") from None
    lock = take_lock(run_dir, log)
    try:
        present = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if not cfg.get("resume") and present:
            if not cfg["overwrite"]:
                shown = ", ".join(present[:4]) + (", ..." if len(present) > 4 else "")
                if not any((run_dir / "checkpoints").glob("step_*")):
                    raise SystemExit(f"--out {run_dir} is not empty ({shown}) and holds no checkpoint to resume: "
                                     f"give --overwrite to start again (it removes only a run's files), or "
                                     f"choose another --out")
                raise SystemExit(f"--out {run_dir} is not empty ({shown}): continue that run with --resume "
                                 f"{run_dir}, choose another --out, or give --overwrite to replace it")
            for name in RUN_FILES:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
            log(f"--overwrite: removed the previous run's files in {run_dir}")
        check_writable(run_dir, "--out")
    except BaseException:
        release_lock(run_dir, lock)
        raise
    return lock


# ------------------------------------------------------------------------------------------- checkpoints
def rng_state(data_rng, order, generator=None):
    """Every RNG the run draws from: torch (CPU and CUDA), python's global random, the data order (the
    data-order RNG and the unvisited rest of the current epoch's shuffled order) and Clip-Cov's generator."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "data": data_rng.getstate(),
            "order": list(order), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "clip_cov": generator.get_state() if generator is not None else None}


def set_rng_state(saved, data_rng, generator=None):
    """Restore what rng_state saved; returns the data order to continue with."""
    torch.set_rng_state(saved["torch"])
    random.setstate(saved["python"])
    data_rng.setstate(saved["data"])
    if saved["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    if generator is not None:
        generator.set_state(saved["clip_cov"])
    return list(saved["order"])


def save_checkpoint(run_dir, step, *, model, tok, optimizer, data_rng, order, generator=None,
                    entropy_control=None, scheduler=None, with_optimizer=True):
    """checkpoints/step_NNNNNN with model + tokenizer (save_pretrained) and trainer_state.pt, atomically.

    trainer_state.pt: the step, rng_state (with Clip-Cov's generator), the adaptive entropy controller's
    state (losses.entropy_control_init's dict, or None), the learning-rate scheduler's state and, unless
    with_optimizer is False (--no-save-optimizer: weights-only, about a third of the size with AdamW),
    the optimizer's state.
    Written into a temporary folder, checked to load (check_checkpoint), renamed into place, then the
    `latest` pointer file is replaced with os.replace. The previous checkpoint (the one `latest` named) is
    kept, so a new one damaged later (a truncated file) still leaves one to resume from; older ones are
    removed. A crash at any point leaves the previous checkpoint as `latest`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    previous = latest_checkpoint(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    state = {"step": step, "rng": rng_state(data_rng, order, generator), "entropy_control": entropy_control,
             "scheduler": scheduler.state_dict() if scheduler is not None else None}
    if with_optimizer:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, tmp / "trainer_state.pt")
    check_checkpoint(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    point_latest(run_dir, final)
    for old in root.glob("step_*"):
        if old not in (final, previous):
            shutil.rmtree(old, ignore_errors=True)
    return final


def point_latest(run_dir, ckpt):
    """Make checkpoints/latest name the checkpoint folder `ckpt` (atomic replace)."""
    pointer = Path(run_dir) / "checkpoints" / ".latest.tmp"
    pointer.write_text(Path(ckpt).name)
    os.replace(pointer, pointer.with_name("latest"))


def check_checkpoint(ckpt):
    """Raise if checkpoint folder `ckpt` is incomplete or truncated, without reading the tensors: the zip
    directory at the end of trainer_state.pt (torch.save's format) and every model/*.safetensors file's
    header and length are checked."""
    from safetensors import safe_open

    with zipfile.ZipFile(Path(ckpt) / "trainer_state.pt"):
        pass
    weights = sorted((Path(ckpt) / "model").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no model weights (*.safetensors) in {Path(ckpt) / 'model'}")
    for path in weights:
        with safe_open(path, "pt"):
            pass


def resume_checkpoint(run_dir, log):
    """(checkpoint folder, trainer state) to resume from: the one `latest` names, or, when it does not load,
    the newest older one that does (with a message; `latest` is pointed at it)."""
    root = Path(run_dir) / "checkpoints"
    named = latest_checkpoint(run_dir)
    older = sorted((p for p in root.glob("step_*") if p != named), key=lambda p: p.name, reverse=True)
    candidates = ([named] if named else []) + older
    for n, ckpt in enumerate(candidates):
        try:
            check_checkpoint(ckpt)
            state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        except Exception as e:          # whatever the damage, the next candidate may load
            nxt = f"falling back to {candidates[n + 1].name}" if n + 1 < len(candidates) else "no older checkpoint"
            log(f"checkpoint {ckpt} does not load ({type(e).__name__}: {one_line(e, 120)}); {nxt}")
            continue
        if ckpt != named:
            point_latest(run_dir, ckpt)
        return ckpt, state
    if not candidates:
        raise SystemExit(f"--resume {run_dir}: the run there wrote no checkpoint, so it cannot be resumed: start "
                         f"it again with the same flags and --overwrite --out {run_dir}")
    raise SystemExit(f"--resume {run_dir}: no checkpoint that loads under {root}")


def latest_checkpoint(run_dir):
    """Path of the checkpoint named by checkpoints/latest, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def truncate_jsonl(path, last_step, log):
    """Keep only the lines of a JSON Lines log whose "step" is <= last_step (the resumed run rewrites the rest).

    A half-written last line (a run killed while writing it) is dropped with a message; a damaged line
    elsewhere is an error naming the file and the line.
    """
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    kept = []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if n == len(lines):
                log(f"{path}: dropping the half-written last line {n}")
                break
            raise SystemExit(f"{path}, line {n}: not valid JSON; the run's log is damaged (remove or repair "
                             f"that line to resume)") from None
        if row["step"] <= last_step:
            kept.append(raw.decode("utf-8") + "\n")
    path.write_text("".join(kept), encoding="utf-8")


@contextlib.contextmanager
def open_run(run_dir, cfg, log):
    """Hold the run directory for the length of the block: claimed and locked (claim_run_dir); Ctrl-C
    (KeyboardInterrupt) ends the run with SystemExit(130) after naming the last checkpoint; a directory the run created and left
    empty (it failed before writing anything: data, model) is removed."""
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    lock = claim_run_dir(run_dir, cfg, log)
    try:
        yield run_dir
    except KeyboardInterrupt:
        ckpt = latest_checkpoint(run_dir)
        where = (f"the last checkpoint is {ckpt}; continue with: python train.py --resume {run_dir}" if ckpt
                 else f"no checkpoint was written yet; start again with --overwrite --out {run_dir}")
        log(f"interrupted: {where}")
        raise SystemExit(130) from None
    finally:
        release_lock(run_dir, lock)
        if fresh and not any(run_dir.iterdir()):
            run_dir.rmdir()


@contextlib.contextmanager
def stop_on_ctrl_c(log):
    """Within the block, the first Ctrl-C (SIGINT) only asks to stop: the block gets stop_asked() -> True and
    is expected to finish its step, write a checkpoint and raise KeyboardInterrupt. A second Ctrl-C
    interrupts at once. Outside the main thread (no signal handlers there) Ctrl-C interrupts as usual."""
    asked = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def ask(signum, frame):
        asked.append(signum)
        signal.signal(signal.SIGINT, previous)
        log("Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to stop at once, losing the "
            "steps since the last checkpoint)")
    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


def restore(run_dir, ckpt, saved, cfg, *, optimizer, scheduler, data_rng, generator, log):
    """Load a checkpoint's trainer state (resume_checkpoint's `saved`) into the optimizer, the scheduler and
    the RNGs, and cut the logs back to its step. Returns the data order to continue with."""
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    elif cfg["optimizer"] == "adamw":
        log(f"--resume: {ckpt.name} holds no optimizer state (--no-save-optimizer): AdamW restarts from "
            "zero moments, so the run will differ from an uninterrupted one")
    if saved.get("scheduler") is not None:      # a checkpoint from before the schedule flags: constant
        scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    order = set_rng_state(saved["rng"], data_rng, generator)
    for name in LOGS:
        truncate_jsonl(run_dir / name, saved["step"], log)
    log(f"resuming {run_dir} from step {saved['step']} ({ckpt.name})")
    return order


def write_config(run_dir, cfg):
    """config.json: the resolved configuration (what --resume reads back)."""
    (Path(run_dir) / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
