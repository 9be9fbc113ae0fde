"""Federated learning with user-level differential privacy (DP-FedAvg) on Flower, with per-user-group metrics.

Flower is optional (``pip install 'dplit[federated]'``): the readers, the DP-FedAvg aggregator and the evaluation
import without it; :mod:`dplit.federated.simulation`, :mod:`~dplit.federated.client` and
:mod:`~dplit.federated.server` load it when they run. Entry point: ``dplit federate --config X.yaml``.
"""

from dplit.federated.config import FederatedConfigError, FedRunConfig, load_config, parse_config
from dplit.federated.dp import DPFedAvg, calibrate_rounds, clip_update
from dplit.federated.leaf import LeafFormatError, read_leaf, read_leaf_file

__all__ = [
    "DPFedAvg",
    "FedRunConfig",
    "FederatedConfigError",
    "LeafFormatError",
    "calibrate_rounds",
    "clip_update",
    "load_config",
    "parse_config",
    "read_leaf",
    "read_leaf_file",
]
