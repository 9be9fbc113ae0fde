"""DP-FedAvg's server side (McMahan et al. 2018, "Learning differentially private recurrent language models").

Per round, with N users, sampling rate q, clip S and noise multiplier z:

1. the server draws the participants by Poisson sampling (each user independently with probability q) from a
   SECRET generator (:func:`dplit.privacy.rng.make_generators`: OS entropy, never the published seed), and the
   round is recorded in the accountant at that moment, before any client sees the model: a round whose clients
   crash is still accounted (never half);
2. each participant's update (new minus global trainable parameters, one vector) is clipped to L2 norm S;
3. the clipped updates are SUMMED, Gaussian noise N(0, (z S)^2 I) is added ONCE to the sum, and the result is
   divided by the fixed expected number of participants q N (so one user changes the sum by at most S: the
   sensitivity the accountant assumes). A sampled client that does not reply contributes a zero update.

One round is one Poisson-subsampled Gaussian mechanism with (z, q) at the user level (add/remove one user's whole
data): epsilon over rounds is dplit's accountant (:class:`~dplit.privacy.accounting.PrivacyAccountant`), checked
against dp-accounting in the tests. Trust model: central DP with a trusted server (it sees raw client updates),
as Flower's server-side clipping wrappers and the paper.

Without privacy (``clip=None``) the same sampling feeds plain FedAvg: the mean of the received updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dplit.privacy.accounting import AccountantName, PrivacyAccountant, calibrate_noise_multiplier
from dplit.privacy.rng import make_generators


@dataclass(frozen=True)
class RoundPlan:
    """The participants of one round (user indices, sorted) and whether the round was accounted."""

    round: int
    participants: list[int]


def default_delta(num_users: int) -> float:
    """1 / N^1.1: below 1/N, as user-level (epsilon, delta)-DP needs."""
    return 1.0 / num_users**1.1


def calibrate_rounds(
    *, target_epsilon: float, sample_rate: float, rounds: int, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Smallest noise multiplier z whose epsilon after ``rounds`` rounds (one step each) is at most the target."""
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon, sample_rate=sample_rate, steps=rounds, delta=delta, accountant=accountant
    )


def clip_update(update: Tensor, clip: float) -> Tensor:
    """``update`` [P] scaled to L2 norm at most ``clip``: ``update * min(1, clip / ||update||)``."""
    norm = float(update.double().norm())
    return update * min(1.0, clip / norm) if norm > 0 else update


class DPFedAvg:
    """Sampling, clipping, noise and accounting of DP-FedAvg (or plain FedAvg when ``clip`` is None).

    Args:
        num_users: N, the population the sampling rate refers to.
        sample_rate: q.
        clip: S (None: no DP).
        noise_multiplier: z (required with ``clip``).
        delta: for the reported epsilon (default :func:`default_delta`).
        accountant: ``rdp`` or ``prv``.
        testing_seed: TESTS ONLY, reproducible sampling and noise (see ``dplit.privacy.rng``).
    """

    def __init__(
        self,
        *,
        num_users: int,
        sample_rate: float,
        clip: float | None = None,
        noise_multiplier: float | None = None,
        delta: float | None = None,
        accountant: AccountantName = "rdp",
        testing_seed: int | None = None,
    ) -> None:
        if num_users < 1:
            raise ValueError(f"DP-FedAvg needs at least one user, got num_users={num_users}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate (q) must be in (0, 1], got {sample_rate}")
        if (clip is None) != (noise_multiplier is None):
            raise ValueError("give both clip (S) and noise_multiplier (z) for DP-FedAvg, or neither for FedAvg")
        if clip is not None and not (clip > 0 and noise_multiplier is not None and noise_multiplier > 0):
            raise ValueError(f"need clip > 0 and noise_multiplier > 0, got {clip} and {noise_multiplier}")
        self.num_users, self.sample_rate = num_users, sample_rate
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.delta = default_delta(num_users) if delta is None else delta
        if self.private and not self.delta < 1.0 / num_users:
            raise ValueError(f"delta={self.delta:g} must be below 1/N = {1 / num_users:g} (N={num_users} users)")
        self.accountant = PrivacyAccountant(accountant)
        self._sampler, self._noise = make_generators(rank=0, testing_seed=testing_seed)
        self.rounds = 0

    @property
    def private(self) -> bool:
        return self.clip is not None

    @property
    def expected_participants(self) -> float:
        """q N: the fixed denominator of the DP average."""
        return self.sample_rate * self.num_users

    def sample_round(self) -> RoundPlan:
        """Poisson-samples the participants and, under DP, records the round in the accountant (before release)."""
        mask = torch.rand(self.num_users, generator=self._sampler) < self.sample_rate  # [N]
        self.rounds += 1
        if self.private:
            assert self.noise_multiplier is not None
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        return RoundPlan(self.rounds, mask.nonzero().flatten().tolist())

    def aggregate(self, updates: list[Tensor], num_params: int) -> Tensor:
        """The global update [P] from the participants' updates (each [P]; a missing reply is simply absent).

        DP: ``(sum_i clip(u_i) + N(0, (zS)^2 I)) / (qN)``, noise drawn once. FedAvg: the mean (zero if none).
        """
        for u in updates:
            if u.shape != (num_params,):
                raise ValueError(f"a client update has shape {tuple(u.shape)}, expected ({num_params},)")
        total = torch.zeros(num_params, dtype=torch.float64)
        if not self.private:
            for u in updates:
                total += u.double()
            return (total / max(1, len(updates))).float()
        assert self.clip is not None and self.noise_multiplier is not None
        for u in updates:
            total += clip_update(u.double(), self.clip)
        std = self.noise_multiplier * self.clip
        total += torch.normal(0.0, std, size=(num_params,), generator=self._noise, dtype=torch.float64)
        return (total / self.expected_participants).float()

    def epsilon(self) -> float:
        """User-level epsilon of the rounds accounted so far (inf without DP)."""
        return self.accountant.epsilon(self.delta) if self.private else math.inf


__all__ = ["DPFedAvg", "RoundPlan", "calibrate_rounds", "clip_update", "default_delta"]
