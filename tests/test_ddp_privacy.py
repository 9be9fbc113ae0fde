"""DP under 2-process DDP on CPU (gloo): noise added once across ranks, ranks in sync, same epsilon as 1 process."""

from __future__ import annotations

import math

import pytest
import torch
from dp_helpers import run_ddp_job, tiny_task
from test_privacy_callback import clipped_sum, per_example_grads, rdp_epsilon


@pytest.mark.ddp
def test_ddp_adds_noise_once_and_keeps_ranks_in_sync(tmp_path):
    sigma, steps = 2.0, 3
    out = tmp_path / "ddp"
    run_ddp_job("ddp_dp_job.py", [str(out), str(sigma), str(steps)], tmp_path)
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
    b = ranks[0]["batch_size"]
    assert ranks[0]["sample_rate"] == pytest.approx(40 / 400)  # the global q = B/N, as the accountant assumes
    task = tiny_task(lr=1.0, hidden=256)
    for i in range(steps):
        s0, s1 = ranks[0]["steps"][i], ranks[1]["steps"][i]
        torch.testing.assert_close(s0["before"], s1["before"])  # ranks start every step in sync...
        torch.testing.assert_close(s0["after"], s1["after"])  # ...and end it in sync
        # the two ranks' Poisson draws are disjoint shards of one global draw
        clipped = sum(clipped_sum(per_example_grads(task, s0["before"], s["batch"]), 1.0) for s in (s0, s1))
        noise = (s0["before"] - s0["after"]) - clipped / b  # lr = 1: update = (sum clip + N(0, s^2 C^2)) / B
        assert abs(noise.std().item() / (sigma / b) - 1) < 0.05, "noise std must be sigma*C/B (not sqrt(2)x)"
        assert abs(noise.mean().item()) < 5 * sigma / b / math.sqrt(noise.numel())
    for r in ranks:
        assert r["accountant_steps"] == steps
        assert r["epsilon"] == pytest.approx(rdp_epsilon(0.1, sigma, steps, 1e-3), rel=0.01)
