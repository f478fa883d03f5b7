"""Helpers (no tests) for the CLI/recipe tests: a shipped recipe as a dict, shortened for a smoke run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qatsparse.cli import recipe_paths


def load_recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load(recipe_paths()[name].read_text())


def callback(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The init_args of the callback whose class_path ends with ``name``."""
    return next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(name))["init_args"]


def shortened(name: str, tmp_path: Path, max_steps: int, prune: int, qat: int, **sections: dict) -> Path:
    """Write recipe ``name`` with a short schedule, outputs in ``tmp_path`` and a warning gate; the
    ``sections`` (model=..., data=..., trainer=...) update the recipe's init_args/keys."""
    cfg = load_recipe(name)
    cfg["trainer"].update(max_steps=max_steps, default_root_dir=str(tmp_path / "runs" / name))
    logger = cfg["trainer"].get("logger")
    if isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}):
        logger["init_args"]["save_dir"] = str(tmp_path / "runs" / name)
    cfg["trainer"].update(sections.pop("trainer", {}))
    callback(cfg, "TwoFourSparsity")["start_step"] = prune
    q = callback(cfg, "QuantizationAwareTraining")
    q.update(start_step=qat, calib_batches=2)
    e = callback(cfg, "TensorRTExport")
    e.update(dirpath=str(tmp_path / "runs" / name), on_fail="warn")
    for key, changes in sections.items():
        cfg[key]["init_args"].update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
