"""Headless notebook runs: console progress lines (lwlib.progress), papermill with the project's kernel
settings (lwlib.nbrun: no unencrypted-TCP warning), and the notebooks' kernelspec (env/set_kernelspec.py)."""

import json
import os
import subprocess
import sys

import nbformat

from lwlib import progress
from lwlib.progress import ConsoleLines
from lwlib.runs import REPO_ROOT


def test_console_lines_at_each_tenth_and_at_the_end():
    c = ConsoleLines("generate", 20, fd=None, every_s=1e9)
    got = [(n, c.update(n)) for n in range(1, 21)]
    lines = [line for _, line in got if line]
    assert [n for n, line in got if line] == [2, 4, 6, 8, 10, 12, 14, 16, 18]  # the end: the closing line
    assert lines[0].endswith("] generate:  10% 2/20 [00:00<00:00]") and " 90% 18/20" in lines[-1]
    assert c.close(20).endswith("100% 20/20 [00:00<00:00] done") and c.close(20) is None
    assert c.update(20) is None
    slow = ConsoleLines("one big step", 2, fd=None, every_s=0.0)  # time-based lines between tenths
    assert slow.update(0) is not None and "0/2" in slow.update(0)
    unknown = ConsoleLines("stream", None, fd=None, every_s=0.0)
    assert unknown.update(7).endswith("stream: 7 [00:00]")


def test_tqdm_writes_console_lines_only_when_asked(monkeypatch):
    r, w = os.pipe()
    monkeypatch.setattr(progress, "console_fd", lambda: w)
    for _ in progress.tqdm(range(5), desc="score", mininterval=0):
        pass
    monkeypatch.setattr(progress, "console_fd", lambda: None)
    for _ in progress.tqdm(range(5), desc="quiet", mininterval=0):
        pass
    os.close(w)
    text = os.read(r, 65536).decode()
    os.close(r)
    assert "quiet" not in text and text.count("score:") == 5 and text.splitlines()[-1].endswith("5/5 [00:00<00:00] done")


def test_a_step_without_progress_still_prints_lines(monkeypatch):
    import select

    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.05)
    r, w = os.pipe()
    c = ConsoleLines("one long batch", 3, fd=w, every_s=0.2)
    ready, _, _ = select.select([r], [], [], 10)  # the heartbeat thread sleeps at most 5 s before it sees the change
    c.close(0)
    os.close(w)
    text = os.read(r, 65536).decode()
    os.close(r)
    assert ready and "one long batch:   0% 0/3" in text.splitlines()[0]


def test_console_fd_is_off_outside_a_kernel(monkeypatch):
    monkeypatch.setenv("LWLIB_CONSOLE_PROGRESS", "1")
    assert progress.console_fd() is None  # pytest's stderr is not ipykernel's: the bar is on the console already
    monkeypatch.setenv("LWLIB_CONSOLE_PROGRESS", "0")
    assert progress.console_fd() is None


def test_notebook_run_prints_progress_on_the_console_not_in_the_notebook(tmp_path):
    """A real kernel through ``python -m lwlib.nbrun`` (papermill's command line): lwlib's bar writes its lines
    to the console, the executed notebook keeps only the bar, and no unencrypted-TCP warning appears."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("n = 4", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from lwlib.progress import tqdm\nfor i in tqdm(range(n), desc='steps', "
                                          "mininterval=0):\n    pass\nprint('done', n)")]
    nb.metadata["kernelspec"] = {"name": "lwlib", "display_name": "Python (lwlib)", "language": "python"}
    src, out = tmp_path / "t.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, str(src))
    env = {**os.environ, "LWLIB_CONSOLE_PROGRESS": "1", "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-m", "lwlib.nbrun", str(src), str(out), "-p", "n", "5", "--cwd", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr
    assert "without encryption" not in console
    assert "steps: 100% 5/5" in console and console.count("] steps:") == 5, console[-2000:]
    executed = json.loads(out.read_text())
    text = json.dumps(executed["cells"])
    assert "done 5" in text and "[lwlib" not in text
    # the bar as text from its final state (lwlib.nbrun.bars_as_text): offline nbconvert and any viewer show it
    assert "steps: 100% |##########| 5/5" in text and "widget-view" not in text and "widgets" not in executed["metadata"]
    assert executed["metadata"]["papermill"]["parameters"] == {"n": 5}  # kernel python3, not the notebook's lwlib


def test_committed_notebooks_name_the_project_kernel():
    """JupyterLab opens the notebooks with "Python (lwlib)" (registered by env/setup.sh): env/set_kernelspec.py."""
    for p in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        spec = json.loads(p.read_text(encoding="utf-8"))["metadata"].get("kernelspec")
        assert spec == {"name": "lwlib", "display_name": "Python (lwlib)", "language": "python"}, p.name


def test_set_kernelspec_script(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 中文 title")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    p = tmp_path / "a.ipynb"
    p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    script = [sys.executable, str(REPO_ROOT / "env" / "set_kernelspec.py")]
    r = subprocess.run([*script, "--check", str(p)], capture_output=True, text=True)
    assert r.returncode == 1 and "a.ipynb" in r.stderr
    assert subprocess.run([*script, str(p)], capture_output=True).returncode == 0
    after = json.loads(p.read_text(encoding="utf-8"))
    assert after["metadata"]["kernelspec"]["name"] == "lwlib" and after["cells"] == json.loads(json.dumps(nb))["cells"]
    assert "中文" in p.read_text(encoding="utf-8")
    assert subprocess.run([*script, "--check", str(p)]).returncode == 0
