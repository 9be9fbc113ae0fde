"""The private loader with worker processes (`num_workers > 0`, `persistent_workers`, `pin_memory`) keeps the
accountant's Poisson sampling, and the secret sampling stream is not handed to (or consumed by) the workers.

Participations are counted on what the workers actually deliver (each item carries its own index and the seed of the
worker process that loaded it) and compared with the sampling the accountant assumes: every example joins every step
independently with probability q = B/N.
"""

from __future__ import annotations

import torch
from dp_helpers import TinyData, tiny_task, trainer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from scipy import stats
from torch.utils.data import DataLoader, Dataset

from dplit.callbacks import DifferentialPrivacy
from dplit.privacy.config import PrivacyConfig
from dplit.privacy.engine import make_loader, plan_sampling
from dplit.privacy.stepping import BatchTrace

N, B = 60, 12  # q = 0.2, 5 steps an epoch


class _Indexed(Dataset):
    """Item i: (x = [i, seed of the loading process], y, group)."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return torch.tensor([i, torch.initial_seed() % 2**62]), torch.tensor(i % 2), torch.tensor(i % 2)


def _private_loader(seed: int) -> DataLoader:
    base = DataLoader(_Indexed(), batch_size=B, num_workers=2, persistent_workers=True, pin_memory=True)
    config = PrivacyConfig(noise_multiplier=1.0, max_grad_norm=1.0)
    return make_loader(
        base, config, plan=plan_sampling(base), trace=BatchTrace(), generator=torch.Generator().manual_seed(seed)
    )


def _epochs(loader: DataLoader, epochs: int) -> list[torch.Tensor]:
    return [batch[0] for _ in range(epochs) for batch in loader]  # each [b, 2]


def test_workers_deliver_poisson_batches_with_the_accountants_q():
    epochs = 80  # 400 steps
    batches = _epochs(_private_loader(seed=5), epochs)
    steps, q = len(batches), B / N
    assert steps == 5 * epochs
    counts = torch.zeros(N)
    for batch in batches:
        idx = batch[:, 0]
        assert len(idx.unique()) == len(idx)  # an example joins a step at most once
        counts[idx] += 1
    # total participations ~ Binomial(N * steps, q)
    assert stats.binomtest(int(counts.sum()), N * steps, q).pvalue > 1e-3
    # each example's count ~ Binomial(steps, q), independently: the dispersion is chi2(N) (a shuffled pass would
    # give every example the same count; a sampler ignoring some examples, a huge one)
    dispersion = float(((counts - steps * q) ** 2).sum() / (steps * q * (1 - q)))
    p = stats.chi2.cdf(dispersion, N)
    assert 1e-3 < p < 1 - 1e-3, dispersion
    # batch sizes ~ Binomial(N, q): mean and variance
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert abs(sizes.mean() - N * q) < 4 * (N * q * (1 - q) / steps) ** 0.5
    assert 0.7 < sizes.var() / (N * q * (1 - q)) < 1.4


def test_the_sampling_stream_is_the_samplers_alone_and_workers_get_other_seeds():
    """The batches equal a bare Poisson sampler's draws from the same generator (loading through workers consumed
    nothing of it), and two loaders with the same sampling seed give workers unrelated seeds (not derived from it)."""
    first, second = (_epochs(_private_loader(seed=9), 3) for _ in range(2))
    bare = UniformWithReplacementSampler(
        num_samples=N, sample_rate=B / N, steps=5, generator=torch.Generator().manual_seed(9)
    )
    expected = [sorted(batch) for _ in range(3) for batch in bare]
    assert [sorted(b[:, 0].tolist()) for b in first] == expected
    assert [sorted(b[:, 0].tolist()) for b in second] == expected
    seeds_first = {int(s) for b in first for s in b[:, 1]}
    seeds_second = {int(s) for b in second for s in b[:, 1]}
    assert len(seeds_first) == 2 and not seeds_first & seeds_second  # 2 persistent workers, fresh seeds each run


def test_lightning_run_with_workers_and_virtual_steps_accounts_every_logical_batch(tmp_path):
    """Prefetching workers run the sampler ahead of training: the batch records must still pair with the batches."""

    class WorkerData(TinyData):
        def train_dataloader(self) -> DataLoader:
            loader = super().train_dataloader()
            return DataLoader(loader.dataset, batch_size=self.batch_size, num_workers=2, persistent_workers=True)

    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=8)
    t = trainer(tmp_path, [dp], max_epochs=2)
    t.fit(tiny_task(), datamodule=WorkerData(n=200, batch_size=20))
    assert dp.loader is not None and dp.loader.num_workers == 2 and dp.loader.persistent_workers
    assert dp.accountant.steps == 2 * 10  # every logical batch of both epochs released once, none twice
