"""Run a notebook through papermill with small parameters (the recommenders pattern); a stand-in repository
for running ``run_all.sh`` without the real notebooks; a stand-in executed copy (papermill's metadata only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def write_executed(path: Path, start: str | None = "2026-11-23T15:00:00+00:00",
                   seconds: float | None = 60.0, overrides: dict[str, Any] | None = None, failed: bool = False) -> None:
    """An executed notebook copy holding only papermill's metadata: started at ``start``, ``seconds`` long (None:
    cut off, no end time), run with ``--set`` ``overrides`` on profile smoke, ``failed`` or not."""
    meta = {"start_time": start, "end_time": None if seconds is None else "2026-11-23T15:12:32+00:00",
            "duration": seconds, "exception": failed or None,
            "parameters": {"profile": "smoke", "overrides": overrides or {}}}
    path.write_text(json.dumps({"cells": [], "metadata": {"papermill": meta}, "nbformat": 4, "nbformat_minor": 5}))


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


def fake_repo(tmp_path: Path, papermill: str | None = None, notebooks: dict[str, Any] | None = None) -> Path:
    """A copy of ``run_all.sh`` in ``tmp_path/repo`` beside a no-op ``env/setup.sh``, this checkout's ``lwlib`` and
    a ``.venv`` that is this interpreter's environment: ``run_all.sh`` runs there without setting anything up.

    ``papermill``: None = the real papermill; else the text of a script that stands in for it. ``notebooks``:
    ``{file name: nbformat notebook}`` to run (None = the repository's notebooks, linked).
    """
    import shutil
    import sys

    import nbformat
    import pytest

    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the tests to run in a virtual environment (the runner calls .venv/bin/...)")
    repo = tmp_path / "repo"
    (repo / "env").mkdir(parents=True)
    shutil.copy(REPO / "run_all.sh", repo / "run_all.sh")
    (repo / "env" / "setup.sh").write_text("#!/bin/sh\nexit 0\n")
    (repo / "env" / "setup.sh").chmod(0o755)
    (repo / "lwlib").symlink_to(REPO / "lwlib")
    venv = repo / ".venv"
    (venv / "bin").mkdir(parents=True)
    shutil.copy(Path(sys.prefix) / "pyvenv.cfg", venv / "pyvenv.cfg")
    for sub in ("lib", "lib64", "share"):
        if (Path(sys.prefix) / sub).exists():
            (venv / sub).symlink_to(Path(sys.prefix) / sub)
    (venv / "bin" / "python").symlink_to(Path(sys.prefix) / "bin" / "python")
    if papermill is None:
        (venv / "bin" / "papermill").symlink_to(Path(sys.prefix) / "bin" / "papermill")
    else:
        (venv / "bin" / "papermill").write_text(papermill)
        (venv / "bin" / "papermill").chmod(0o755)
    if notebooks is None:
        (repo / "notebooks").symlink_to(REPO / "notebooks")
    else:
        (repo / "notebooks").mkdir()
        for name, nb in notebooks.items():
            nbformat.write(nb, str(repo / "notebooks" / name))
    return repo
