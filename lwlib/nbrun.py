"""Run notebooks headless: papermill with this project's kernel settings (``run_all.sh``, the notebook tests).

Two settings differ from bare papermill:

* kernel ``python3`` unless another is named: jupyter_client resolves it to the interpreter that runs
  papermill (the venv's python), whether or not the ``lwlib`` kernelspec is registered. The committed
  notebooks name ``lwlib`` ("Python (lwlib)", what JupyterLab should pick, ``env/set_kernelspec.py``), but
  a kernelspec of that name registered elsewhere (``~/.local``, another checkout) may start another
  environment's python, so executed runs never rely on it.
* CurveZMQ transport encryption (``KernelManager.transport_encryption = "auto"``, when pyzmq has curve
  support): the kernel manager provisions the keys, and ipykernel 7 no longer prints "Kernel is running over
  TCP without encryption" for every notebook.

And the executed notebook's progress bars (tqdm's widgets) are written out as text from their final state
(:func:`lwlib.report.widgets_as_text`, also after a failure): a widget needs its JavaScript, which plain
``jupyter nbconvert --to html`` loads from a CDN (offline: nothing where the bars were) and GitHub's viewer not
at all; as text every viewer shows ``generate: 100% |##########| 48/48 [01:12<00:00]``.

:func:`rerun_reason` is ``run_all.sh --resume``'s test of whether a notebook's executed copy is done.

Usage::

    python -m lwlib.nbrun IN.ipynb OUT.ipynb -y "{profile: smoke}" --cwd notebooks   # papermill's options
    execute_notebook("notebooks/01_output_length_probe.ipynb", out, {"profile": "smoke"}, cwd="notebooks")
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

KERNEL = "python3"


def kernel_config() -> Any:
    """The traitlets config papermill passes to nbclient's kernel manager (transport encryption on)."""
    from traitlets.config import Config

    c = Config()
    try:
        import zmq

        if zmq.has("curve"):
            c.KernelManager.transport_encryption = "auto"
    except ImportError:
        pass
    return c


def execute_notebook(input_path: str | Path, output_path: str | Path, parameters: dict[str, Any] | None = None,
                     cwd: str | Path | None = None, kernel_name: str = KERNEL, progress_bar: bool = False,
                     **kwargs: Any) -> Any:
    """``papermill.execute_notebook`` with :data:`KERNEL` and :func:`kernel_config`; returns the executed notebook."""
    import papermill as pm

    try:
        return pm.execute_notebook(str(input_path), str(output_path), parameters=parameters or {},
                                   kernel_name=kernel_name, cwd=str(cwd) if cwd is not None else None,
                                   progress_bar=progress_bar, config=kernel_config(), **kwargs)
    finally:
        bars_as_text(output_path)


def bars_as_text(path: str | Path) -> None:
    """Rewrite the executed notebook ``path`` with its widget outputs as text (nothing to do without widgets)."""
    import nbformat

    from .report import WIDGET_VIEW, widgets_as_text

    path = Path(path)
    if not path.is_file() or WIDGET_VIEW not in path.read_text(encoding="utf-8"):
        return
    nbformat.write(widgets_as_text(nbformat.read(str(path), as_version=4)), str(path))


def rerun_reason(executed: str | Path, run_dir: str | Path, params: dict[str, Any]) -> str | None:
    """Why ``run_all.sh --resume`` runs a notebook again, or None to skip it: its executed copy ``executed`` is
    missing, unreadable, cut off (no end time) or failed; it ran with other ``--set`` values than ``params``'
    ``overrides`` (papermill's parameters); or it left units waiting for a later sitting
    (:func:`lwlib.runs.waiting_units` in ``run_dir``).

    Usage: ``rerun_reason("runs/gpu/notebooks/03_sft.ipynb", "runs/gpu", {"profile": "gpu", "overrides": {}})``"""
    import json

    from .runs import waiting_units

    try:
        meta = json.loads(Path(executed).read_text(encoding="utf-8"))["metadata"].get("papermill", {})
    except (OSError, ValueError, KeyError, AttributeError):
        return "no readable executed copy"
    if not meta.get("end_time"):
        return "cut off before its end"
    if meta.get("exception"):
        return "failed"
    before = (meta.get("parameters") or {}).get("overrides") or {}
    if before != (params.get("overrides") or {}):
        return f"finished earlier with other --set values ({before or 'none'})"
    waiting = waiting_units(run_dir, Path(executed).name)
    if waiting:
        return f"finished earlier with runs waiting for a later sitting ({', '.join(waiting)})"
    return None


def main(argv: list[str] | None = None) -> None:
    """papermill's command line, with :data:`KERNEL` as the default kernel and :func:`kernel_config`."""
    import papermill.cli as cli

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a in ("-k", "--kernel") or a.startswith("--kernel=") for a in args) and "--help" not in args:
        args += ["-k", KERNEL]
    execute = cli.execute_notebook

    def run(*a: Any, **kw: Any) -> Any:
        kw.setdefault("config", kernel_config())
        try:
            return execute(*a, **kw)
        finally:
            out = kw.get("output_path", a[1] if len(a) > 1 else None)
            if out and out != "-":
                bars_as_text(out)

    cli.execute_notebook = run
    cli.papermill.main(args=args, prog_name="python -m lwlib.nbrun")


if __name__ == "__main__":
    main()
