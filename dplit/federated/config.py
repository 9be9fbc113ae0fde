"""The configuration of a federated run (``dplit federate --config X.yaml``): typed sections, validated on load.

Every key is an attribute of a dataclass below; an unknown key, a wrong type or an impossible value is refused
with the section, the key and the fix. ``privacy: null`` (or absent) is the non-private twin: plain FedAvg over the
same Poisson-sampled clients, no clipping, no noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class FederatedConfigError(ValueError):
    """A federated config that cannot run as written; the message names the key and the fix."""


@dataclass
class DataConfig:
    dataset: Literal["sent140", "shakespeare", "reddit"] = "sent140"
    """Which reader: LEAF Sent140 / LEAF Reddit JSON, or the Gutenberg Shakespeare texts (LEAF's split built)."""
    root: str = "../shared/data/leaf_sent140"
    """A LEAF JSON file or folder (sent140, reddit), or the folder of *_gut*.txt plays (shakespeare)."""
    min_samples: int = 2
    """Users with fewer samples are left out (each needs >= 1 training and >= 1 held-out sample)."""
    max_users: int | None = None
    """Keep only the first users (sorted by name); null keeps all."""
    eval_fraction: float = 0.25
    """This fraction of each user's samples (at least 1) is held out for the per-bucket evaluation: a random subset
    drawn from ``split_seed`` and the user's name (Sent140: LEAF's files list each user's tweets sorted by label, so
    the last ones would be all positive); for Shakespeare the user's last windows (text order, no overlap)."""
    split_seed: int = 0
    """Public seed of the per-user held-out split (not privacy-relevant)."""
    max_len: int = 32
    """Sent140: words per tweet; Reddit: words of context per next-word sample."""
    seq_len: int = 80
    """Shakespeare: characters of context per next-character sample (LEAF: 80)."""
    stride: int = 1
    """Shakespeare / Reddit: step between consecutive samples of a user's text (LEAF: 1)."""
    max_samples_per_user: int | None = None
    """Cap on each user's samples (the first ones kept); null keeps all."""
    size_bins: list[int] = field(default_factory=lambda: [5, 10])
    """Edges of the data-size buckets (training samples per user): [5, 10] -> <5, 5-9, >=10."""
    vocab_bins: list[int] = field(default_factory=lambda: [40, 80])
    """Edges of the vocabulary-size buckets (distinct words in a user's training data)."""
    vocab_file: str | None = None
    """Reddit: a fixed public word list (one per line) as the model's vocabulary; null builds it from the training
    users' words, a release DP-FedAvg does not cover (refused with ``privacy``; see dplit.federated.reddit)."""
    vocab_size: int = 10000
    """Reddit: words in the model's vocabulary (input and tied output), plus padding and out-of-vocabulary ids."""
    primary: Literal["vocab", "size"] = "vocab"
    """The bucketing reported under the plain names (``val/acc/group=<bucket>``); the other as ``val/acc/<attr>=``."""


@dataclass
class ModelConfig:
    hidden_size: int = 64
    num_layers: int = 1
    embedding_dim: int = 32
    oov_buckets: int = 5000
    """Sent140: hashed word rows (random init, trained)."""
    embedding_source: str | None = None
    """Sent140: ``kumo`` for the GloVe 6B 50d vectors from the `text` extra; null for random embeddings."""


@dataclass
class FederatedConfig:
    rounds: int = 20
    sample_rate: float = 0.05
    """q: each user joins a round independently with this probability (Poisson), drawn by the server."""
    local_epochs: int = 1
    local_lr: float = 0.5
    local_batch_size: int = 16
    server_lr: float = 1.0
    """The global model moves by server_lr * aggregated update."""
    round_timeout_s: float | None = None
    """Wait at most this long for the sampled clients; a missing reply counts as a zero update (see docs)."""
    eval_every: int = 1


@dataclass
class FedPrivacyConfig:
    clip: float = 1.0
    """S: each client's update (all trainable parameters, L2) is clipped to this norm on the server."""
    noise_multiplier: float | None = None
    """z: Gaussian noise std z*S on the SUM of clipped updates, once per round; or give target_epsilon."""
    target_epsilon: float | None = None
    """Calibrates z so that all planned rounds spend at most this user-level epsilon."""
    delta: float | None = None
    """Default 1/N^1.1 for N users; must be < 1/N."""
    accountant: Literal["rdp", "prv"] = "rdp"
    insecure_testing_seed: int | None = None
    """TESTS ONLY: sampling and noise derived from this public number (the reported epsilon does not hold)."""


@dataclass
class SimulationConfig:
    num_cpus: int = 2
    """CPUs Ray may use; one client trains per CPU at a time."""
    client_cpus: float = 1.0


@dataclass
class FedRunConfig:
    seed: int = 0
    """Public seed: model initialisation and data split. Never the sampling or the noise (OS entropy)."""
    output_dir: str = "runs/federated"
    """The run folder: metrics.csv, summary.json, config.yaml (readable by `dplit report`)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    privacy: FedPrivacyConfig | None = None
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "federated": FederatedConfig,
    "privacy": FedPrivacyConfig,
    "simulation": SimulationConfig,
}


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise FederatedConfigError(f"`{where}` must be a mapping of keys, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise FederatedConfigError(f"unknown key(s) {unknown} in `{where}`; known keys: {sorted(known)}")
    return cls(**values)


def parse_config(raw: dict[str, Any], source: str = "config") -> FedRunConfig:
    """Builds and validates a :class:`FedRunConfig` from a YAML mapping."""
    if not isinstance(raw, dict):
        raise FederatedConfigError(f"{source}: a federated config is a YAML mapping with sections {list(_SECTIONS)}")
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    cfg = _build(FedRunConfig, top, source)
    for name, cls in _SECTIONS.items():
        if name in raw and raw[name] is not None:
            setattr(cfg, name, _build(cls, raw[name], f"{source}: {name}"))
        elif name == "privacy":
            cfg.privacy = None
    validate(cfg)
    return cfg


def load_config(path: str | Path) -> FedRunConfig:
    """Reads and validates a federated YAML config."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"federated config {file} not found (`--config`)")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise FederatedConfigError(f"{file}: not valid YAML ({err})") from err
    return parse_config(raw, str(file))


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise FederatedConfigError(message)


def validate(cfg: FedRunConfig) -> None:
    """Refuses impossible values, naming the key and the fix."""
    d, f, p = cfg.data, cfg.federated, cfg.privacy
    _need(
        d.dataset in ("sent140", "shakespeare", "reddit"),
        f"data.dataset must be sent140/shakespeare/reddit, got {d.dataset!r}",
    )  # noqa: E501
    _need(d.min_samples >= 2, f"data.min_samples must be >= 2 (a training and a held-out sample), got {d.min_samples}")
    _need(0 < d.eval_fraction < 1, f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    for key in ("size_bins", "vocab_bins"):
        bins = getattr(d, key)
        _need(
            isinstance(bins, list) and all(isinstance(b, int) and b > 0 for b in bins) and bins == sorted(set(bins)),
            f"data.{key} must be increasing positive integers (bucket edges), got {bins!r}",
        )
    _need(d.vocab_size >= 1, f"data.vocab_size must be >= 1, got {d.vocab_size}")
    _need(
        d.dataset != "reddit" or p is None or d.vocab_file is not None,
        "data.vocab_file: a DP Reddit run needs a fixed public vocabulary file; a vocabulary built from the users' "
        "words is a release that user-level DP does not cover (set data.vocab_file, or privacy: null)",
    )
    _need(d.primary in ("vocab", "size"), f"data.primary must be 'vocab' or 'size', got {d.primary!r}")
    _need(f.rounds >= 1, f"federated.rounds must be >= 1, got {f.rounds}")
    _need(0 < f.sample_rate <= 1, f"federated.sample_rate (q) must be in (0, 1], got {f.sample_rate}")
    _need(f.local_epochs >= 1 and f.local_batch_size >= 1, "federated.local_epochs and local_batch_size must be >= 1")
    _need(f.local_lr > 0 and f.server_lr > 0, "federated.local_lr and server_lr must be > 0")
    _need(f.eval_every >= 1, f"federated.eval_every must be >= 1, got {f.eval_every}")
    if p is not None:
        _need(p.clip > 0, f"privacy.clip (S) must be > 0, got {p.clip}")
        _need(
            (p.noise_multiplier is None) != (p.target_epsilon is None),
            "privacy: give exactly one of `noise_multiplier` and `target_epsilon` (or `privacy: null` for no DP)",
        )
        _need(p.noise_multiplier is None or p.noise_multiplier > 0, "privacy.noise_multiplier must be > 0")
        _need(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon must be > 0")
        _need(p.delta is None or 0 < p.delta < 1, f"privacy.delta must be in (0, 1), got {p.delta}")
        _need(p.accountant in ("rdp", "prv"), f"privacy.accountant must be 'rdp' or 'prv', got {p.accountant!r}")


__all__ = [
    "DataConfig",
    "FedPrivacyConfig",
    "FedRunConfig",
    "FederatedConfig",
    "FederatedConfigError",
    "ModelConfig",
    "SimulationConfig",
    "load_config",
    "parse_config",
    "validate",
]
