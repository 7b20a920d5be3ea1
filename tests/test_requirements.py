"""The install: requirements.txt and requirements-integrations.txt against the lock (requirements-lock.txt),
and the imports an upstream release has broken before (transformers' model code with a stale `kernels`).

In CI (CI=true) TRL and verl must import and every installed package must be at its locked version; elsewhere
the TRL and verl checks skip without them and the installed set is not checked (your environment is yours).
"""
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

IN_CI = os.environ.get("CI") == "true"


def requirements(name):
    """The Requirement objects of a requirements file (comments and options left out)."""
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def lock():
    """{canonical name: Version} of requirements-lock.txt."""
    pins = {}
    for line in (ROOT / "requirements-lock.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)$", line)
        if m:
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def need(module):
    """Import a module of the integrations: skip without it, except in CI, where it must be there."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (requirements-integrations.txt)")


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-integrations.txt"])
def test_the_lock_pins_every_requirement_inside_its_range(name):
    pins = lock()
    for req in requirements(name):
        key = canonicalize_name(req.name)
        assert key in pins, f"{req.name} ({name}) is not in requirements-lock.txt: run bash .ci/lock"
        assert req.specifier.contains(pins[key], prereleases=True), \
            f"requirements-lock.txt pins {req.name}=={pins[key]}, outside {name}'s {req.specifier}"


def test_the_lock_is_the_cpu_torch_the_readme_installs_and_says_how_it_is_made():
    text = (ROOT / "requirements-lock.txt").read_text()
    assert lock()[canonicalize_name("torch")] == Version("2.13.0")       # no +cpu: the pin fits a CUDA build too
    assert "bash .ci/lock" in text.splitlines()[1]
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert "pip install torch==2.13.0 && pip install -r requirements.txt -c requirements-lock.txt" in readme
    assert "pip install -r requirements-integrations.txt -c requirements-lock.txt" in readme
    assert "-r requirements.txt -r requirements-integrations.txt -c requirements-lock.txt" in ci


@pytest.mark.skipif(not IN_CI, reason="outside CI your environment need not be the locked set")
def test_ci_installed_exactly_the_locked_set():
    wrong = {}
    for key, pinned in lock().items():
        installed = Version(importlib.metadata.version(key))
        if installed.public != pinned.public:          # torch 2.13.0+cpu is the pin torch==2.13.0
            wrong[key] = f"{installed} (locked {pinned})"
    assert not wrong, f"installed versions differ from requirements-lock.txt: {wrong}"


def test_transformers_model_code_imports_and_runs():
    """transformers imports optional packages (`kernels`) as it loads model code; a stale one breaks every
    model import: train.py, the lab and the adapters alike."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    assert Qwen2ForCausalLM(cfg)(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 11)


def test_trl_grpo_trainer_and_verl_ppo_trainer_import():
    assert need("trl").GRPOTrainer.__name__ == "GRPOTrainer"
    need("verl")
    assert importlib.import_module("verl.trainer.ppo.ray_trainer").RayPPOTrainer.__name__ == "RayPPOTrainer"
    for adapter in ("trl_adapter", "verl_adapter"):      # they refuse any TRL or verl but the pinned ones
        importlib.import_module(adapter)


def test_the_readme_test_command_finds_the_modules_at_the_root(tmp_path):
    """`pytest` (the console script, not `python -m pytest`) does not put the working directory on sys.path:
    pytest.ini's `pythonpath = .` is what lets tests/conftest.py import the modules at the root."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-P", "-m", "pytest", "--collect-only", "-q", "tests/test_docs.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
