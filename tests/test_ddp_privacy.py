"""DP under 2-process DDP on CPU (gloo): noise added once across ranks, ranks in sync, same epsilon as 1 process."""

from __future__ import annotations

import math

import pytest
import torch
from dp_helpers import TinyData, run_ddp_job, tiny_task, trainer
from test_privacy_callback import clipped_sum, per_example_grads, rdp_epsilon

from dplit.callbacks import DifferentialPrivacy


def _run(tmp_path, sigma: float, steps: int, mode: str = "hooks", algorithm: str = "dpsgd") -> list[dict]:
    out = tmp_path / "ddp"
    run_ddp_job("ddp_dp_job.py", [str(out), str(sigma), str(steps), mode, algorithm], tmp_path)
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]


def _check_steps(ranks: list[dict], sigma: float) -> None:
    b = ranks[0]["batch_size"]
    assert ranks[0]["sample_rate"] == pytest.approx(40 / 400)  # the global q = B/N, as the accountant assumes
    task = tiny_task(lr=1.0, hidden=256)
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 3
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        torch.testing.assert_close(s0["before"], s1["before"])  # ranks start every step in sync...
        torch.testing.assert_close(s0["after"], s1["after"])  # ...and end it in sync
        # the two ranks' Poisson draws are disjoint shards of one global draw; the update must be the
        # single-process DP-SGD update on their union: (sum of clipped grads + N(0, sigma^2 C^2)) / B, lr = 1
        clipped = sum(clipped_sum(per_example_grads(task, s0["before"], s["batch"]), 1.0) for s in (s0, s1))
        noise = (s0["before"] - s0["after"]) - clipped / b
        if sigma < 1e-6:
            torch.testing.assert_close(s0["before"] - s0["after"], clipped / b, rtol=1e-4, atol=1e-7)
        else:
            assert abs(noise.std().item() / (sigma / b) - 1) < 0.05, "noise std must be sigma*C/B (not sqrt(2)x)"
            assert abs(noise.mean().item()) < 5 * sigma / b / math.sqrt(noise.numel())


@pytest.mark.ddp
def test_ddp_adds_noise_once_and_keeps_ranks_in_sync(tmp_path):
    sigma, steps = 2.0, 3
    ranks = _run(tmp_path, sigma, steps)
    _check_steps(ranks, sigma)
    for r in ranks:
        assert r["accountant_steps"] == steps
        assert r["epsilon"] == pytest.approx(rdp_epsilon(0.1, sigma, steps, 1e-3), rel=0.01)


@pytest.mark.ddp
def test_ddp_update_equals_single_process_update_on_the_union_batch(tmp_path):
    """Without noise, 2 ranks give exactly the single-process clipped-mean update for the same sampled examples."""
    _check_steps(_run(tmp_path, 1e-9, 3), 1e-9)


@pytest.mark.ddp
def test_ddp_checkpoint_resumes_on_one_device(tmp_path):
    steps = 3
    _run(tmp_path, 2.0, steps)
    last = tmp_path / "ddp.ckpt" / "last.ckpt"
    dp = DifferentialPrivacy(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-3, insecure_testing_seed=11)
    t = trainer(tmp_path, [dp], max_steps=2 * steps, max_epochs=5)
    t.fit(tiny_task(lr=1.0, hidden=256), datamodule=TinyData(n=400, batch_size=40), ckpt_path=last)
    assert dp.accountant.steps == 2 * steps  # the accountant continues across a change of device count
    assert dp.epsilon == pytest.approx(rdp_epsilon(0.1, 2.0, 2 * steps, 1e-3), rel=0.01)


@pytest.mark.ddp
def test_ddp_final_parameters_equal_a_one_process_dp_sgd_with_the_same_samples_and_noise_seed(tmp_path):
    """Replays the run in one process, independently of Opacus: the same sampled examples (the union of the ranks'
    shards), clipping by per-example autograd, Gaussian noise from rank 0's noise seed drawn parameter by parameter,
    plain SGD. The 2-rank run's final parameters must equal it up to float tolerance."""
    sigma, steps, c, lr = 2.0, 3, 1.0, 1.0
    ranks = _run(tmp_path, sigma, steps)
    b = ranks[0]["batch_size"]
    task = tiny_task(lr=lr, hidden=256)
    shapes = [p.shape for p in task.parameters()]
    noise_rng = torch.Generator().manual_seed(11 + 7_919)  # seed=11 in the job; rank 0 adds the noise
    params = ranks[0]["steps"][0]["before"].clone()
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        clipped = sum(clipped_sum(per_example_grads(task, params, s["batch"]), c) for s in (s0, s1))
        noise = torch.cat(
            [torch.normal(0.0, sigma * c, size=shape, generator=noise_rng).reshape(-1) for shape in shapes]
        )
        params = params - lr * (clipped + noise) / b
    torch.testing.assert_close(params, ranks[0]["steps"][-1]["after"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(params, ranks[1]["steps"][-1]["after"], rtol=1e-4, atol=1e-5)


@pytest.mark.ddp
def test_ddp_spawn_trains_privately(tmp_path):
    """strategy=ddp_spawn (processes started by multiprocessing, no script relaunch): the run completes, and the
    epsilon rank 0 reports back to the main process is the single-process value for the same global q."""
    dp = DifferentialPrivacy(noise_multiplier=2.0, max_grad_norm=1.0, delta=1e-3, insecure_testing_seed=11)
    t = trainer(
        tmp_path, [dp], strategy="ddp_spawn", devices=2, use_distributed_sampler=False, max_steps=3, log_every_n_steps=1
    )
    t.fit(tiny_task(lr=1.0, hidden=256), datamodule=TinyData(n=400, batch_size=40))
    assert t.callback_metrics["privacy/steps"].item() == 3
    assert t.callback_metrics["privacy/epsilon"].item() == pytest.approx(rdp_epsilon(0.1, 2.0, 3, 1e-3), rel=0.01)


@pytest.mark.ddp
@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_fast_clipping_modes_under_ddp_clip_before_the_all_reduce_and_noise_once(mode, tmp_path):
    """Ghost and book-keeping clipping under 2-rank DDP: the noise-free update is the single-process clipped mean
    of the union batch (DDP's own all-reduce of raw gradients is off), and with noise the update's noise std is
    sigma*C/B (added once across ranks, not sqrt(2) times)."""
    _check_steps(_run(tmp_path, 1e-9, 3, mode), 1e-9)
    ranks = _run(tmp_path, 2.0, 3, mode)
    _check_steps(ranks, 2.0)
    assert ranks[0]["epsilon"] == pytest.approx(rdp_epsilon(0.1, 2.0, 3, 1e-3), rel=0.01)


@pytest.mark.ddp
def test_dpsgd_f_under_ddp_counts_the_union_batch_and_every_rank_applies_the_same_bounds(tmp_path):
    ranks = _run(tmp_path, 1e-9, 3, "hooks", "dpsgd_f")
    b = ranks[0]["batch_size"]
    task = tiny_task(lr=1.0, hidden=256)
    bounds = torch.full((2,), 2.0, dtype=torch.float64)  # first step: no estimate, C_k = 2 C0
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        torch.testing.assert_close(s0["after"], s1["after"])
        grads = torch.cat([per_example_grads(task, s0["before"], s["batch"]) for s in (s0, s1)]).double()
        groups = torch.cat([s["batch"][2] for s in (s0, s1)])
        norms = grads.norm(dim=1)
        clipped = (grads * (bounds[groups] / norms).clamp(max=1.0)[:, None]).sum(0)
        torch.testing.assert_close((s0["before"] - s0["after"]).double(), clipped / b, rtol=1e-4, atol=1e-7)
        over = norms > 1.0  # the union's counts (both ranks' shards) set the next step's bounds
        m = torch.stack([(over & (groups == k)).sum() for k in (0, 1)]).double()
        o = torch.stack([(~over & (groups == k)).sum() for k in (0, 1)]).double()
        frac = torch.where(m + o > 0, m / (m + o), torch.ones(2, dtype=torch.float64))
        bounds = 1 + frac / (frac.mean() + 1e-8)
    for r in ranks:
        state = torch.tensor(r["algorithm_state"]["bounds"], dtype=torch.float64)
        torch.testing.assert_close(state, bounds, atol=1e-4, rtol=0)
