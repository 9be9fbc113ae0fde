"""``dplit federate --config X.yaml [--rounds N] [--output_dir DIR]``: a federated run in Flower's simulation engine."""

from __future__ import annotations

import argparse
import logging
import os

from dplit.cli.main import error_exit


def main(argv: list[str]) -> int:
    """Runs the config's federated training; returns the exit code (2 for a mistake in the input)."""
    parser = argparse.ArgumentParser(
        prog="dplit federate",
        description="Federated learning with user-level DP (DP-FedAvg) on Flower, simulated on this machine, with "
        "per-user-group metrics (data size and vocabulary buckets) in a run folder `dplit report` reads.",
    )
    parser.add_argument("--config", required=True, help="a federated YAML config (e.g. configs/fed_sent140_dp.yaml)")
    parser.add_argument("--rounds", type=int, default=None, help="override federated.rounds")
    parser.add_argument("--output_dir", default=None, help="override output_dir (the run goes to its version_N)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dplit.federated.config import load_config
    from dplit.federated.simulation import simulate

    try:
        cfg = load_config(args.config)
        if args.output_dir is not None:
            cfg.output_dir = args.output_dir
        outcome = simulate(cfg, args.rounds)
    except (ValueError, FileNotFoundError, ImportError) as err:
        if os.environ.get("DPLIT_TRACEBACK"):
            raise
        return error_exit(f"{type(err).__name__}: {err}")
    eps = outcome.last.get("privacy/epsilon")
    privacy = f", user-level epsilon {eps:.3f}" if eps is not None else " (non-private)"
    print(
        f"federated run written to {outcome.run_dir}: val/acc {outcome.last.get('val/acc', float('nan')):.4f}{privacy}"
    )
    return 0


__all__ = ["main"]
