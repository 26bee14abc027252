"""An HTML report of a run, readable without Jupyter: ``<run>/report/index.html``.

The index page shows, in this order: the profile; the run's claims table where it exists (``<run>/claims.json``
or ``results/<profile>/claims.json``, rendered by :class:`lwlib.claims_view.ClaimsTable`, the same table as notebook
06, with its banner where the profile is too small for verdicts); the run's figures, embedded in the page (the
folder :func:`lwlib.config.figures_dir_for` names); every executed notebook of ``<run>/notebooks/`` rendered to
HTML with nbconvert (one file each beside the index), with its papermill status and times; the environment and
the run's manifests (the ``manifest*.json`` every stage writes: what ran it, time, git SHA, host).
``run_all.sh`` writes it at the end of a run and after a failure, for what ran.

Progress-bar widgets (tqdm in a notebook) are rendered as text from the widget state nbclient saved (their
final value), so the pages need no widget JavaScript; a notebook whose HTML is newer than it is not rendered
again.

An executed notebook converted by plain ``jupyter nbconvert --to html`` shows its progress bars only where the
page can load the widget JavaScript from a CDN (offline: nothing where the bars were);
``python -m lwlib.report NOTEBOOK.ipynb`` writes ``NOTEBOOK.html`` with the bars as text, needing nothing.

Usage::

    python -m lwlib.report runs/smoke            # -> runs/smoke/report/index.html
    python -m lwlib.report runs/smoke/notebooks/01_output_length_probe.ipynb   # -> ...ipynb's folder, .html
    write_report(prof.run_dir)
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import html
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .claims_view import ClaimsTable, banner_text
from .config import figures_dir_for
from .runs import REPO_ROOT, atomic_write_text

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
CLAIM_FIELDS = ("id", "paper", "rule", "measured", "reproduced")


# ------------------------------------------------------------------------------------------ widgets


def _strip_html(s: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", s or "")).replace("\u2007", " ").replace("\xa0", " ").strip()


def widget_text(model_id: str, state: dict[str, Any]) -> str | None:
    """A text line for a widget from its saved state: tqdm's bar (HTML, progress, HTML in an HBox) as
    ``desc: 100% |##########| 5/5 [00:01<00:00, 3.2it/s]`` with its final count; None when unknown."""
    model = state.get(model_id)
    if model is None:
        return None
    name, st = model.get("model_name", ""), model.get("state", {})
    if name in ("HTMLModel", "LabelModel", "HTMLMathModel"):
        return _strip_html(str(st.get("value", "")))
    if name in ("FloatProgressModel", "IntProgressModel"):
        lo, hi, v = float(st.get("min") or 0), float(st.get("max") or 0), float(st.get("value") or 0)
        frac = (v - lo) / (hi - lo) if hi > lo else 0.0
        return "|" + "#" * round(10 * frac) + " " * (10 - round(10 * frac)) + "|"
    children = [c.removeprefix("IPY_MODEL_") for c in st.get("children", [])]
    if not children:
        return None
    kinds = [state.get(c, {}).get("model_name") for c in children]
    if kinds == ["HTMLModel", "FloatProgressModel", "HTMLModel"]:  # tqdm.notebook's layout
        bar = state[children[1]]["state"]
        n, total = float(bar.get("value") or 0), float(bar.get("max") or 0)
        desc = re.sub(r"\s*\d+%$", "", widget_text(children[0], state) or "").rstrip(": ")
        right = widget_text(children[2], state) or ""
        timing = right[right.index("["):] if "[" in right else ""
        pct = f"{n / total:4.0%}" if total else ""
        count = f"{n:g}/{total:g}" if total else f"{n:g}"
        text = " ".join(x for x in (f"{desc}:" if desc else "", pct, widget_text(children[1], state), count, timing) if x)
        return text + (" (stopped by an error)" if bar.get("bar_style") == "danger" else "")
    parts = [widget_text(c, state) for c in children]
    return " ".join(p for p in parts if p) or None


def widgets_as_text(nb: Any) -> Any:
    """A copy of notebook ``nb`` whose widget outputs are plain text (from the saved widget state) and
    which carries no widget state: the HTML then needs no widget JavaScript from a CDN."""
    nb = copy.deepcopy(nb)
    state = (nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}) or {}).get("state", {})
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data")
            if not data or WIDGET_VIEW not in data:
                continue
            text = widget_text(data[WIDGET_VIEW].get("model_id", ""), state)
            data.pop(WIDGET_VIEW)
            if text is not None:
                data["text/plain"] = text
                for k in [k for k in data if k != "text/plain"]:
                    data.pop(k)
    nb.metadata.pop("widgets", None)
    return nb


# ------------------------------------------------------------------------------------------ pieces


@functools.cache
def _exporter() -> Any:
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab")


def render_notebook(path: Path, out: Path) -> Path:
    """``path`` (an executed notebook) as one HTML file ``out`` (nbconvert's lab template, widgets as text)."""
    import nbformat

    nb = widgets_as_text(nbformat.read(str(path), as_version=4))
    body, _ = _exporter().from_notebook_node(nb)
    return atomic_write_text(out, body)


def notebook_status(nb_json: dict[str, Any]) -> dict[str, Any]:
    """papermill's record of an executed notebook: status (finished / failed / not finished), start, end,
    duration (s) and the exception's name where it failed."""
    pm = nb_json.get("metadata", {}).get("papermill", {}) or {}
    failed = bool(pm.get("exception"))
    err = None
    if failed:
        for cell in nb_json.get("cells", []):
            for out in cell.get("outputs", []) or []:
                if out.get("output_type") == "error":
                    err = f"{out.get('ename')}: {out.get('evalue')}"
    status = "failed" if failed else ("finished" if pm.get("end_time") else "not finished")
    return {"status": status, "start": pm.get("start_time"), "end": pm.get("end_time"),
            "duration_s": pm.get("duration"), "error": err}


def collect_manifests(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``manifest*.json`` under ``run_dir`` (stages and models; not inside checkpoints or the report),
    as ``{"path": relative path, **manifest}``, oldest first."""
    out = []
    for p in sorted(run_dir.rglob("manifest*.json")):
        rel = p.relative_to(run_dir)
        if rel.parts[0] in ("report", "notebooks") or "checkpoints" in rel.parts or len(rel.parts) > 5:
            continue
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(m, dict):
            out.append({"path": str(rel), **m})
    return sorted(out, key=lambda m: str(m.get("time_utc", "")))


def find_claims(run_dir: Path) -> tuple[Path, list[dict[str, Any]]] | None:
    """``(path, records)`` of ``<run>/claims.json`` or else ``results/<profile>/claims.json``; None if neither.
    A file that is not a JSON list of records raises ``ValueError`` naming it."""
    for p in (run_dir / "claims.json", REPO_ROOT / "results" / run_dir.name / "claims.json"):
        if p.exists():
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from e
            if isinstance(data, dict) and isinstance(data.get("claims"), list):
                data = data["claims"]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ValueError(f"{p}: expected a list of claim records ({', '.join(CLAIM_FIELDS)})")
            return p, data
    return None


# ------------------------------------------------------------------------------------------ page

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px;max-width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}
th{background:#f3f3f3} code{font-size:13px} .ok{color:#1a7f37} .bad{color:#c62828} .muted{color:#777}
figure{margin:1em 0 2em} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:13px;color:#555}
"""
# the figures in the order of the notebooks (figures/README.md); others follow by name
FIGURE_ORDER = ("ruler_probe", "agentwrite_length_hist", "agentwrite_planned_vs_actual", "corpus_length_hist",
                "sft_loss", "ruler_base_vs_sft", "sft_arms_max_length", "ruler_sft_arms", "sft_length_cap_experiment",
                "sft_loss_all", "dpo_training", "ruler_sft_vs_dpo", "dpo_length_score_by_bucket", "nll_by_position",
                "longbench_write_scatter", "longbench_write_buckets", "ruler_all_models")


def _e(x: Any) -> str:
    if x is None:
        return '<span class="muted">-</span>'
    if isinstance(x, bool):
        return '<span class="ok">yes</span>' if x else '<span class="bad">no</span>'
    if isinstance(x, (dict, list)):
        x = json.dumps(x, ensure_ascii=False, default=str)
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _duration(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = int(s)
    return f"{s // 3600}h {s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def figures_html(folder: Path) -> str:
    """Every PNG of ``folder`` embedded in the page (base64: the report is one file), in :data:`FIGURE_ORDER`."""
    pngs = sorted(folder.glob("*.png"), key=lambda p: (FIGURE_ORDER.index(p.stem) if p.stem in FIGURE_ORDER
                                                       else len(FIGURE_ORDER), p.name))
    out = []
    for p in pngs:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        out.append(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
                   f"<figcaption><code>{html.escape(p.name)}</code></figcaption></figure>")
    return "".join(out)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, render: bool = True) -> Path:
    """Write ``<run_dir>/report/index.html`` (or ``out_dir/index.html``) and one HTML page per executed
    notebook; returns the index. ``render=False`` links the notebooks without rendering them."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    name = run_dir.name

    nb_rows = []
    for nb_path in sorted((run_dir / "notebooks").glob("*.ipynb")):
        try:
            st = notebook_status(json.loads(nb_path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            st = {"status": f"unreadable ({e})", "start": None, "end": None, "duration_s": None, "error": None}
        page = out / f"{nb_path.stem}.html"
        link = None
        if render:
            try:
                if not page.exists() or page.stat().st_mtime < nb_path.stat().st_mtime:
                    render_notebook(nb_path, page)
                link = page.name
            except Exception as e:  # noqa: BLE001 (one bad notebook must not lose the rest of the report)
                st["error"] = (st["error"] + "; " if st["error"] else "") + f"HTML rendering failed: {type(e).__name__}: {e}"
        elif page.exists():
            link = page.name
        cls = {"finished": "ok", "failed": "bad"}.get(st["status"], "muted")
        title = f'<a href="{html.escape(link)}">{html.escape(nb_path.stem)}</a>' if link else html.escape(nb_path.stem)
        nb_rows.append([title, f'<span class="{cls}">{html.escape(st["status"])}</span>', _e(st["start"]),
                        _e(st["end"]), _e(_duration(st["duration_s"])), _e(st["error"]),
                        f'<a href="{html.escape(_rel(nb_path, out))}">.ipynb</a>'])

    manifests = collect_manifests(run_dir)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>run {html.escape(name)}</title>"
             f"<style>{_CSS}</style></head><body><h1>Run <code>{html.escape(name)}</code></h1>",
             f"<p class='muted'>{html.escape(str(run_dir))}</p>"]
    prof = next((m["config"]["profile"] for m in reversed(manifests)
                 if isinstance(m.get("config"), dict) and isinstance(m["config"].get("profile"), dict)), None)
    if prof:
        rows = [["profile", prof.get("profile")], ["source", prof.get("source")],
                ["description", prof.get("description")], ["model", prof.get("model")],
                ["device / dtype", f"{prof.get('device', 'auto')} / {prof.get('dtype', 'auto')}"]]
        if prof.get("overrides"):
            rows.append(["overrides", prof["overrides"]])
        parts += ["<h2>Profile</h2>", _table(["field", "value"], rows)]

    try:
        claims = find_claims(run_dir)
    except ValueError as e:
        claims = None
        parts += ["<h2>Claims</h2>", f"<p class='bad'>{_e(e)}</p>"]
    if claims:
        path, recs = claims
        parts += ["<h2>Claims</h2>", ClaimsTable(recs, profile=prof).to_html(),
                  f"<p class='muted'>from <code>{html.escape(str(path))}</code></p>"]
    elif banner_text(prof):
        parts.append(ClaimsTable([], profile=prof).to_html().replace("<p>No claim measured in this run.</p>", ""))

    figs = figures_dir_for(run_dir)
    if figs.is_dir() and any(figs.glob("*.png")):
        parts += ["<h2>Figures</h2>", f"<p class='muted'>from <code>{html.escape(str(figs))}</code> "
                  "(figures/README.md says what each shows)</p>", figures_html(figs)]

    parts += ["<h2>Notebooks</h2>", _table(["notebook", "status", "start", "end", "took", "error", "executed copy"],
                                           nb_rows, raw=True) if nb_rows else "<p>No executed notebook yet.</p>"]

    if manifests:
        latest = manifests[-1]
        vers = latest.get("versions") or {}
        parts += ["<h2>Environment</h2>",
                  _table(["", "value"], [["git SHA", latest.get("git_sha")], ["host", latest.get("host")],
                                         *[[k, v] for k, v in vers.items()]])]
        for key in ("torch", "transformers"):
            seen = sorted({str((m.get("versions") or {}).get(key)) for m in manifests})
            if len(seen) > 1:
                parts.append(f"<p class='bad'>The stages ran with {len(seen)} versions of {key}: {_e(', '.join(seen))}</p>")
        parts += ["<h2>Manifests</h2>",
                  _table(["file", "written by", "time (UTC)", "git SHA", "host"],
                         [[m["path"], manifest_command(m), m.get("time_utc"), _short_sha(m.get("git_sha")),
                           m.get("host")] for m in manifests])]
        shas = sorted({str(m.get("git_sha")) for m in manifests})
        if len(shas) > 1:
            parts.append(f"<p class='bad'>The stages ran at {len(shas)} different commits: {_e(', '.join(shas))}</p>")
    parts.append("</body></html>\n")
    return atomic_write_text(out / "index.html", "\n".join(parts))


def _rel(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def _short_sha(sha: Any) -> str | None:
    return None if not sha else str(sha)[:12] + ("-dirty" if str(sha).endswith("-dirty") else "")


def manifest_command(m: dict[str, Any]) -> str:
    """What wrote a manifest: its ``command`` (:func:`lwlib.runs.run_command`), else its command line, where that
    says more than a Jupyter kernel's ``ipykernel_launcher -f <kernel file>``."""
    if m.get("command"):
        return str(m["command"])
    argv = [str(a) for a in m.get("argv") or []]
    if argv and Path(argv[0]).name.startswith("ipykernel"):
        return "a Jupyter kernel (notebook not recorded)"
    return " ".join(argv) or "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lwlib.report", description="Write RUN_DIR/report/index.html: the "
                                 "claims, figures, executed notebooks as HTML and manifests of a run; or, given an "
                                 "executed notebook, that notebook as HTML with its progress bars as text.")
    ap.add_argument("run_dir", help="a run folder, e.g. runs/smoke, or an executed notebook (.ipynb)")
    ap.add_argument("--out", default=None, help="report folder (default RUN_DIR/report; for a notebook: the HTML "
                    "file, default beside it)")
    ap.add_argument("--no-render", action="store_true", help="link the notebooks without rendering them to HTML")
    args = ap.parse_args(argv)
    try:
        if args.run_dir.endswith(".ipynb"):
            src = Path(args.run_dir)
            if not src.is_file():
                raise FileNotFoundError(f"no notebook {src}")
            index = render_notebook(src, Path(args.out) if args.out else src.with_suffix(".html"))
        else:
            index = write_report(args.run_dir, args.out, render=not args.no_render)
    except (FileNotFoundError, ValueError) as e:
        print(f"lwlib.report: {e}", file=sys.stderr)
        return 1
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
