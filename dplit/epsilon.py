"""``dplit epsilon``: the privacy of a DP-SGD run from its public settings, like TF Privacy's compute_dp_sgd_privacy.

Example::

    dplit epsilon --dataset-size 60000 --batch-size 256 --epochs 60 --noise-multiplier 1.1
    dplit epsilon --dataset-size 60000 --batch-size 256 --epochs 60 --target-epsilon 3

A few human-readable lines go to stdout; the LAST line is just the number (epsilon, or the calibrated noise
multiplier with ``--target-epsilon``), so scripts can read it with ``tail -n 1``. Bad input exits with code 2.
"""

import argparse
import math
import sys
from fractions import Fraction

from dplit.privacy.accounting import (
    PRV_MAX_RDP_EPSILON,
    calibrate_noise_multiplier,
    calibrate_noise_multiplier_no_amplification,
    compute_epsilon,
    compute_epsilon_no_amplification,
)

PROG = "dplit epsilon"


def build_parser() -> argparse.ArgumentParser:
    """The ``dplit epsilon`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Epsilon of DP-SGD from its public settings (like TF Privacy's compute_dp_sgd_privacy), or the "
        "noise multiplier that reaches --target-epsilon. The last output line is just that number.",
        epilog=f"example: {PROG} --dataset-size 60000 --batch-size 256 --epochs 60 --noise-multiplier 1.1",
    )
    parser.add_argument("--dataset-size", type=int, required=True, metavar="N", help="training examples N")
    parser.add_argument("--batch-size", type=int, required=True, metavar="B", help="(expected) batch size B <= N")
    parser.add_argument("--epochs", type=float, required=True, metavar="E", help="epochs (may be fractional)")
    noise = parser.add_mutually_exclusive_group(required=True)
    noise.add_argument("--noise-multiplier", type=float, metavar="Z", help="noise std / clipping norm")
    noise.add_argument("--target-epsilon", type=float, metavar="EPS", help="calibrate the noise multiplier to this")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta, below 1/N (default: 1e-5)")
    parser.add_argument("--accountant", choices=["rdp", "prv", "gdp"], default="rdp", help="default: rdp")
    parser.add_argument(
        "--no-poisson",
        action="store_true",
        help="batches are shuffled fixed-size batches, not Poisson-sampled: claim no amplification by subsampling",
    )
    return parser


def _input_error(args: argparse.Namespace) -> str | None:
    """The first invalid flag, described; None when the input is valid."""
    if args.dataset_size < 1:
        return f"--dataset-size must be >= 1, got {args.dataset_size}"
    if not 1 <= args.batch_size <= args.dataset_size:
        return f"--batch-size must be between 1 and --dataset-size ({args.dataset_size}), got {args.batch_size}"
    if not (0 < args.epochs < math.inf):
        return f"--epochs must be positive and finite, got {args.epochs}"
    if args.noise_multiplier is not None and not (0 <= args.noise_multiplier < math.inf):
        return f"--noise-multiplier must be >= 0 and finite, got {args.noise_multiplier}"
    if args.target_epsilon is not None and not (0 < args.target_epsilon < math.inf):
        return f"--target-epsilon must be positive and finite, got {args.target_epsilon}"
    if not 0 < args.delta < 1:
        return f"--delta must be in (0, 1), got {args.delta}"
    return None


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Runs the calculator on ``argv`` (default: ``sys.argv[1:]``); returns the exit code (2 on bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed usage and the message naming the flag; --help exits 0
        return exc.code if isinstance(exc.code, int) else 2
    error = _input_error(args)
    if error is not None:
        return _fail(parser, error)
    n, b, delta, accountant = args.dataset_size, args.batch_size, args.delta, args.accountant
    if delta >= 1 / n:
        print(
            f"{PROG}: warning: --delta={delta:g} is not below 1/N = {1 / n:.3g}: publishing one random example "
            "outright satisfies such a guarantee. Use a smaller --delta.",
            file=sys.stderr,
        )
    q = b / n
    epochs = Fraction(str(args.epochs))  # exact: 0.3 epochs of N=1000, B=100 is 3 steps, not 4
    steps = math.ceil(epochs * n / b)
    epochs_participated = math.ceil(epochs)
    poisson = dict(sample_rate=q, steps=steps, delta=delta, accountant=accountant)
    no_amp = dict(epochs_participated=epochs_participated, delta=delta, accountant=accountant)
    try:
        if args.target_epsilon is None:
            sigma = args.noise_multiplier
        elif args.no_poisson:
            sigma = calibrate_noise_multiplier_no_amplification(target_epsilon=args.target_epsilon, **no_amp)
        else:
            sigma = calibrate_noise_multiplier(target_epsilon=args.target_epsilon, **poisson)
    except ValueError as exc:  # includes UnreachableEpsilonError, whose message says what to change
        return _fail(parser, f"--target-epsilon: {exc}")
    eps_poisson = compute_epsilon(noise_multiplier=sigma, **poisson)
    eps = compute_epsilon_no_amplification(noise_multiplier=sigma, **no_amp) if args.no_poisson else eps_poisson

    print(f"DP-SGD: N={n} examples, batch size B={b}, epochs={args.epochs:g}, delta={delta:g}, accountant={accountant}")
    print(f"sample rate q = B/N = {q:.6g}")
    print(f"steps = ceil(epochs * N / B) = {steps}")
    if args.no_poisson:
        print("sampling: shuffled fixed-size batches (not Poisson): amplification by subsampling is NOT claimed")
        print(
            f"bound: each example is in one batch per epoch, so the run composes {epochs_participated} Gaussian "
            f"mechanism(s) with noise multiplier {sigma:.6g} (zero-out adjacency, Kairouz et al. 2021): an upper bound"
        )
        print(
            f"for comparison only, if batches were Poisson-sampled: epsilon = {eps_poisson:.4g} "
            "(it can under-report the privacy loss of shuffled batches, Chua et al. 2024)"
        )
    else:
        print("sampling: Poisson (each example joins each batch independently with probability q), as assumed")
    if accountant == "gdp" and not args.no_poisson:
        print("note: gdp is a central-limit approximation and can under-report epsilon; prefer rdp or prv")
    if accountant == "prv" and eps > PRV_MAX_RDP_EPSILON:
        print(f"note: beyond epsilon {PRV_MAX_RDP_EPSILON:g} the RDP bound is reported (PRV is intractable there)")
    if args.target_epsilon is None:
        print(f"noise multiplier: {sigma:.6g}")
        print(f"epsilon: {eps:.6g} (delta={delta:g})")
        print(repr(float(eps)))
    else:
        print(f"noise multiplier: {sigma:.6g}, calibrated to epsilon {eps:.6g} <= target {args.target_epsilon:g}")
        print(repr(float(sigma)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
