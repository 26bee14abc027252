"""Two checkouts sharing one virtual environment: a notebook's kernel started in checkout B (as JupyterLab starts it,
in B's notebooks/) imports B's lwlib and writes into B's runs/ and figures/, or where $LWLIB_RUNS says, figures
included (env/lwlib_checkout.py, installed by env/setup.sh; lwlib.config.figures_dir_for)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, lwlib, lwlib.runs
from lwlib.config import load_profile
from lwlib.plots import pyplot, save_figure
prof = load_profile("smoke")
fig, ax = pyplot().subplots()
fig_path = save_figure(fig, prof.figures_dir() / "ruler_probe.png")
print("RESULT " + json.dumps({"lwlib": lwlib.__file__, "repo_root": str(lwlib.runs.REPO_ROOT),
                              "run_dir": str(prof.stage_dir("probe")), "figure": str(fig_path)}))
"""


@pytest.fixture(scope="module")
def checkout_b(tmp_path_factory) -> Path:
    """A second checkout of the working tree (uncommitted changes included), without a venv of its own."""
    hook = Path(sysconfig.get_paths()["purelib"]) / "_lwlib_checkout.pth"
    if not hook.exists():
        pytest.fail(f"{hook} missing: this venv was set up before env/lwlib_checkout.py existed; run env/setup.sh")
    b = tmp_path_factory.mktemp("two") / "checkout_b"
    shutil.copytree(ROOT / "lwlib", b / "lwlib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "notebooks", b / "notebooks")
    shutil.copy(ROOT / "pyproject.toml", b / "pyproject.toml")
    return b


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LWLIB_RUNS", "LWLIB_FIGURES",
                                                            "LWLIB_CHECKOUT")}
    return {**env, **extra}


def _result(text: str) -> dict[str, str]:
    line = next(x for x in text.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_kernel_in_checkout_b_runs_b(checkout_b):
    """What JupyterLab does: the project's kernel "lwlib" started with the notebook's folder as working directory."""
    from jupyter_client.manager import start_new_kernel

    b = checkout_b
    assert Path(__import__("lwlib").__file__).parent.parent == ROOT  # this process: the venv's own checkout
    km, kc = start_new_kernel(kernel_name="lwlib", cwd=str(b / "notebooks"), env=_clean_env())
    out: list[str] = []
    try:
        reply = kc.execute_interactive(PROBE, timeout=120, output_hook=lambda m: out.append(
            m["content"].get("text", "") if m["msg_type"] == "stream" else ""))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert reply["content"]["status"] == "ok", "".join(out)
    got = _result("".join(out))
    assert got["lwlib"] == str(b / "lwlib" / "__init__.py") and got["repo_root"] == str(b)
    assert got["run_dir"] == str(b / "runs" / "smoke" / "probe") and Path(got["run_dir"]).is_dir()
    assert got["figure"] == str(b / "figures" / "smoke" / "ruler_probe.png") and Path(got["figure"]).exists()


def test_lwlib_runs_moves_runs_and_figures_and_pythonpath_wins(checkout_b, tmp_path):
    b, elsewhere = checkout_b, tmp_path / "elsewhere"
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=b / "notebooks", capture_output=True, text=True,
                         env=_clean_env(LWLIB_RUNS=str(elsewhere)), timeout=300)
    got = _result(run.stdout)
    assert got["repo_root"] == str(b) and got["run_dir"] == str(elsewhere / "smoke" / "probe")
    assert got["figure"] == str(elsewhere / "smoke" / "figures" / "ruler_probe.png")  # figures follow the run
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=b / "notebooks", capture_output=True, text=True,
                         env=_clean_env(LWLIB_RUNS=str(elsewhere), LWLIB_FIGURES=str(tmp_path / "figs")), timeout=300)
    assert _result(run.stdout)["figure"] == str(tmp_path / "figs" / "smoke" / "ruler_probe.png")
    # an explicit PYTHONPATH (run_all.sh's) and a process outside any checkout keep their lwlib
    code = "import lwlib; print('RESULT ' + __import__('json').dumps({'lwlib': lwlib.__file__}))"
    run = subprocess.run([sys.executable, "-c", code], cwd=b / "notebooks", capture_output=True, text=True,
                         env=_clean_env(PYTHONPATH=str(ROOT)), timeout=300)
    assert _result(run.stdout)["lwlib"] == str(ROOT / "lwlib" / "__init__.py")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=_clean_env(), timeout=300)
    assert _result(run.stdout)["lwlib"] == str(ROOT / "lwlib" / "__init__.py")
