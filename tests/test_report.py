"""The HTML report of a run (lwlib.report): written, linking every executed notebook, manifests and claims."""

import html
import json
import re
import sys

import nbformat
import pytest

from lwlib.plots import pyplot, save_figure
from lwlib.report import find_claims, main, manifest_command, widgets_as_text, write_report
from lwlib.runs import write_manifest

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _tqdm_widget_state(mid, desc, n, total, shown):
    """The widget models nbclient saves for one tqdm.notebook bar (HBox of HTML, FloatProgress, HTML)."""
    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "state": state}

    return {mid: model("HBoxModel", children=[f"IPY_MODEL_{mid}a", f"IPY_MODEL_{mid}b", f"IPY_MODEL_{mid}c"]),
            f"{mid}a": model("HTMLModel", value=f"{desc}:\u2007{round(100 * shown / total)}%"),
            f"{mid}b": model("FloatProgressModel", value=float(n), max=float(total), min=0.0, bar_style="success"),
            f"{mid}c": model("HTMLModel", value=f"\u2007{shown}/{total}\u2007[00:01&lt;00:00,\u20073.20it/s]")}


def _executed(path, name, failed=False):
    nb = nbformat.v4.new_notebook()
    out = [nbformat.v4.new_output("stream", name="stdout", text=f"hello from {name}\n")]
    bar = nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "w1", "version_major": 2},
                                                       "text/plain": "generate:   0%|          | 0/4"})
    nb.cells = [nbformat.v4.new_code_cell("print('hello')", outputs=out, execution_count=1),
                nbformat.v4.new_code_cell("run()", outputs=[bar], execution_count=2)]
    if failed:
        nb.cells.append(nbformat.v4.new_code_cell("1/0", execution_count=3, outputs=[nbformat.v4.new_output(
            "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])]))
    nb.metadata["papermill"] = {"start_time": "2026-12-01T10:00:00", "end_time": "2026-12-01T10:02:05",
                                "duration": 125.0, "exception": True if failed else None}
    nb.metadata["widgets"] = {WIDGET_STATE: {"state": _tqdm_widget_state("w1", "generate", 4, 4, 3),
                                             "version_major": 2, "version_minor": 0}}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))


def test_report_links_every_executed_notebook_with_manifest_and_claims(tmp_path, monkeypatch):
    run = tmp_path / "smoke"
    names = ["01_output_length_probe", "02_agentwrite", "04_dpo"]
    for n in names:
        _executed(run / "notebooks" / f"{n}.ipynb", n, failed=n == "04_dpo")
    monkeypatch.setenv("LWLIB_COMMAND", "./run_all.sh smoke (notebook 01_output_length_probe.ipynb)")
    write_manifest(run / "probe" / "base", {"profile": {"profile": "smoke", "source": "/x/smoke.yaml",
                                                        "model": "smollm2-135m-instruct", "overrides": {"probe.lengths": [1000]},
                                                        "too_small_for_verdicts": True}})
    monkeypatch.delenv("LWLIB_COMMAND")
    write_manifest(run / "nll", {"profile": {"profile": "smoke"}})  # written in a pytest process: its command line
    claims = [{"id": "ruler-cap", "paper": "max output ~2k words", "rule": "effective < 3000",
               "measured": {"words": 812, "ratio": 77.64999999999999}, "reproduced": True},
              {"id": "sft-longer", "paper": "SFT writes longer", "rule": "ratio > 1", "measured": 0.9, "reproduced": False}]
    (run / "claims.json").write_text(json.dumps(claims))
    figs = tmp_path / "figures"
    monkeypatch.setenv("LWLIB_FIGURES", str(figs))
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    save_figure(fig, figs / "smoke" / "nll_by_position.png")

    assert main([str(run)]) == 0
    index = (run / "report" / "index.html").read_text()
    links = re.findall(r'href="([^"]+\.html)"', index)
    assert links == [f"{n}.html" for n in names]
    for n in names:
        page = (run / "report" / f"{n}.html").read_text()
        assert f"hello from {n}" in page
        assert "generate: 100% |##########| 4/4 [00:01&lt;00:00, 3.20it/s]" in page  # final widget state, as text
        assert "0/4" not in page and WIDGET_VIEW not in page
        assert f'href="../notebooks/{n}.ipynb"' in index
    assert index.count('class="ok">finished') == 2 and 'class="bad">failed' in index
    assert "ZeroDivisionError: division by zero" in index and "2m 05s" in index
    assert "/x/smoke.yaml" in index and "probe.lengths" in index and "probe/base/manifest.json" in index
    assert "1 of 2 claims reproduced, 1 not reproduced" in index and "ruler-cap" in index
    assert "effective &lt; 3000" in index and "ratio: 77.6" in index and "77.649" not in index
    assert "far too small for these verdicts to mean anything" in index  # the banner of a smoke profile
    assert '<img alt="nll_by_position" src="data:image/png;base64,' in index  # the run's figures, embedded
    assert "./run_all.sh smoke (notebook 01_output_length_probe.ipynb)" in index
    assert html.escape(" ".join(sys.argv)) in index  # the nll manifest's command: this pytest process's own
    assert "ipykernel_launcher" not in index


def test_report_rerenders_only_changed_notebooks_and_reports_bad_claims(tmp_path):
    run = tmp_path / "r"
    _executed(run / "notebooks" / "01_x.ipynb", "one")
    write_report(run)
    page = run / "report" / "01_x.html"
    first = page.stat().st_mtime_ns
    write_report(run)
    assert page.stat().st_mtime_ns == first
    (run / "claims.json").write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match=r"claims\.json: expected a list of claim records"):
        find_claims(run)
    assert "expected a list of claim records" in write_report(run, render=False).read_text()
    assert main([str(tmp_path / "missing")]) == 1


def test_widgets_without_state_keep_their_text():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[nbformat.v4.new_output(
        "display_data", data={WIDGET_VIEW: {"model_id": "gone"}, "text/plain": "bar 2/4"})])]
    out = widgets_as_text(nb).cells[0].outputs[0]["data"]
    assert out == {"text/plain": "bar 2/4"} and WIDGET_VIEW in nb.cells[0].outputs[0]["data"]  # a copy


def test_one_notebook_to_html_with_its_bars_as_text(tmp_path):
    """What plain ``jupyter nbconvert --to html`` cannot do offline: the progress bars written out as text."""
    nb = tmp_path / "01_x.ipynb"
    _executed(nb, "one")
    assert main([str(nb)]) == 0
    page = (tmp_path / "01_x.html").read_text()
    assert "generate: 100% |##########| 4/4" in page and WIDGET_VIEW not in page
    assert main([str(tmp_path / "missing.ipynb")]) == 1


def test_manifest_command_of_older_manifests():
    kernel = ["/v/lib/python3.12/site-packages/ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"]
    assert manifest_command({"argv": kernel}) == "a Jupyter kernel (notebook not recorded)"
    assert manifest_command({"argv": kernel, "command": "Jupyter: notebooks/03_sft.ipynb"}) == "Jupyter: notebooks/03_sft.ipynb"
    assert manifest_command({"argv": ["-m", "lwlib.train", "sft"]}) == "-m lwlib.train sft"
