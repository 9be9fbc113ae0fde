"""Is class 8's accuracy under DP a decision-threshold problem? Post-hoc logit adjustment on finished runs.

For each given run (a sweep cell folder of ``scripts/reproduce_mnist_disparate_impact.py``), loads its final
checkpoint's ``MnistCNN``, evaluates the MNIST test set and re-scores it with the logits shifted by ``-tau log pi``
(Menon et al. 2021), ``pi`` the training class frequencies (class 8: 500 of 54,649). If the DP model's class-8 errors
were a bias toward the frequent classes, a larger ``tau`` would recover them. A diagnostic only: ``tau`` is scored on
the test set, and the class frequencies of the private training set are used without noise, so nothing here is a
private result.

    python scripts/diagnose_logit_adjustment.py runs/sweeps/mnist_di_m09/{nodp-seed0,dpsgd-sigma0.8-seed0}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dplit.data import ImbalancedMNISTDataModule
from dplit.models import MnistCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cells", type=Path, nargs="+")
    parser.add_argument("--root", default="../shared/data/mnist")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dm = ImbalancedMNISTDataModule(root=args.root, source="files", download=False, underrepresented={8: 500})
    dm.setup("fit")
    counts = torch.tensor(dm.train_class_counts, dtype=torch.float)
    log_prior = (counts / counts.sum()).log()
    print("| run | tau | overall | class 8 | worst class |\n|---|---|---|---|---|")
    for cell in args.cells:
        checkpoint = max(cell.glob("version_*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        net = MnistCNN()
        net.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")})
        net.eval()
        with torch.no_grad():
            batches = [(net(x), y) for x, y, _ in dm.val_dataloader()]
        logits, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        for tau in args.taus:
            pred = (logits - tau * log_prior).argmax(1)
            per_class = [(pred[y == k] == k).float().mean().item() for k in range(10)]
            overall = (pred == y).float().mean().item()
            scores = " | ".join(f"{100 * v:.1f}" for v in (overall, per_class[8], min(per_class)))
            print(f"| {cell.name} | {tau} | {scores} |")


if __name__ == "__main__":
    main()
