"""Run a notebook through papermill with small parameters (the recommenders pattern)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def execute_notebook(name: str, tmp_path: Path, profile: str = "smoke", overrides: dict[str, Any] | None = None,
                     **params: Any) -> Path:
    """Execute ``notebooks/<name>`` with run and figure folders under ``tmp_path``; returns the executed copy.

    The notebook's ``parameters`` cell must define ``profile``, ``overrides``, ``run_root`` and
    ``figures_root``.
    """
    from lwlib.nbrun import KERNEL, execute_notebook as run

    out = tmp_path / "executed" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    # kernel python3 = this interpreter, whether or not the notebooks' "lwlib" kernelspec is registered
    run(REPO / "notebooks" / name, out,
        parameters={"profile": profile, "overrides": overrides or {}, "run_root": str(tmp_path / "runs"),
                    "figures_root": str(tmp_path / "figures"), **params},
        kernel_name=KERNEL, cwd=REPO / "notebooks", progress_bar=False)
    return out
