"""A config's twin (``X_dp.yaml`` <-> ``X_nodp.yaml``, ``quickstart.yaml`` <-> ``quickstart_nodp.yaml``) and where it
writes, so a run can say which command compares it with its twin, and the report can name a config that exists."""

from __future__ import annotations

from pathlib import Path

import yaml


def twin_config(config: str | Path) -> Path | None:
    """The twin of ``config`` in the same folder, if that file exists: DP <-> non-DP."""
    path = Path(config)
    stem = path.stem
    if stem.endswith("_nodp"):
        names = [stem[: -len("_nodp")] + "_dp", stem[: -len("_nodp")]]
    elif stem.endswith("_dp"):
        names = [stem[: -len("_dp")] + "_nodp"]
    else:
        names = [stem + "_nodp"]
    for name in names:
        twin = path.with_name(name + path.suffix)
        if twin.is_file() and twin.resolve() != path.resolve():
            return twin
    return None


def config_root_dir(config: str | Path) -> str | None:
    """``trainer.default_root_dir`` of a config file (None when it sets none or cannot be read)."""
    try:
        data = yaml.safe_load(Path(config).read_text())
    except (OSError, yaml.YAMLError):
        return None
    trainer = data.get("trainer") if isinstance(data, dict) else None
    root = trainer.get("default_root_dir") if isinstance(trainer, dict) else None
    return str(root) if root else None


def shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter commands), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


__all__ = ["config_root_dir", "shown", "twin_config"]
