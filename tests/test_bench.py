"""benchmarks/bench.py: what it times covers every method of losses.LOSSES."""
import torch

import losses
from benchmarks import bench


def test_the_losses_benchmark_times_every_registry_entry():
    entropy, mask = torch.rand(2, 8), torch.ones(2, 8)
    runs = bench.loss_runs(entropy, mask)
    assert {name for name, _ in runs} | {"grpo"} == set(losses.LOSSES)
    assert ("steer", {"omega": "exact"}) in runs and ("opefo", {"flow": "exact"}) in runs
