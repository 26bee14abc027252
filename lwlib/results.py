"""A run's results for the repository: the small files of a run folder (metrics, claims, summaries, loss logs, step
profiles, NLL curves, per-notebook timings, environment) copied to ``results/<profile>/``, without generations or checkpoints.

``run_all.sh`` calls it after the last notebook; by hand::

    python -m lwlib.results runs/gpu            # runs/gpu -> results/gpu
    export_results("runs/gpu")                  # the same from Python
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .runs import REPO_ROOT, atomic_write_bytes, atomic_write_json

# small files worth keeping, as glob patterns relative to the run folder
PATTERNS = (
    "claims.json", "corpus/stats.json", "agentwrite/summary.json", "probe/metrics.json", "probe/*/*/summary.json",
    "sft/metrics.json", "sft/data_stats.json", "sft/train_log.json", "sft/cap_experiment.json", "sft/arms.json",
    "sft/*/data_stats.json", "sft/*/train_log.json", "dpo/data_stats.json", "dpo/train_log.json",
    "sft/train_profile.json", "sft/*/train_profile.json", "dpo/train_profile.json", "dpo/s*/train_profile.json",
    "dpo/s*/data_stats.json", "dpo/s*/train_log.json", "dpo/s*/length_plan.json", "dpo/length_plan.json", "dpo/length_score_difference.json", "dpo/comparison.json", "dpo/bench_summary.json",
    "nll/summary.json", "nll/claim.json", "nll/*/curve.csv", "nll/*/summary.json", "bench/summary.json",
    # the general answers another model wrote (small; a run made over several sittings restores them)
    "sft/general_self_distill.jsonl", "sft/general_self_distill.jsonl.fingerprint.json",
    # a run trained again in a later sitting (lwlib.sft.rebuild_run): its comparison with the first training
    "sft/rebuild.json", "sft/*/rebuild.json",
)
REBUILT_LOG = "train_log.rebuilt.json"  # where a rebuild's own loss log is exported (:func:`export_results`)


def default_results_root() -> Path:
    """``$LWLIB_RESULTS`` if set, else ``results/`` in the repository."""
    import os

    return Path(os.environ.get("LWLIB_RESULTS", REPO_ROOT / "results"))


def notebook_timing(run_dir: str | Path) -> dict[str, Any]:
    """Per executed notebook in ``<run>/notebooks``: papermill's start, end, seconds and whether it failed
    (``notebooks``: the newest execution of each), and every execution seen so far (``passes``, kept in
    ``<run>/timing_passes.json``: a run made over several sittings, or resumed, runs a notebook more than once and
    its executed copy keeps only the last). ``total_seconds`` sums the passes.

    Usage: ``notebook_timing("runs/gpu")["total_seconds"]``"""
    run = Path(run_dir)
    out: dict[str, Any] = {}
    for nb in sorted(run.joinpath("notebooks").glob("*.ipynb")):
        try:
            meta = json.loads(nb.read_text(encoding="utf-8"))["metadata"].get("papermill", {})
        except (OSError, ValueError, KeyError) as e:
            out[nb.name] = {"error": f"unreadable: {e}"}
            continue
        out[nb.name] = {"start": meta.get("start_time"), "end": meta.get("end_time"),
                        "seconds": None if meta.get("duration") is None else round(float(meta["duration"]), 1),
                        "failed": bool(meta.get("exception"))}
    path = run / "timing_passes.json"
    try:
        passes = json.loads(path.read_text(encoding="utf-8"))["passes"] if path.exists() else []
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a list of notebook passes ({e}); move it away to start over") from None
    seen = {(p["notebook"], p.get("start")) for p in passes}
    for name, v in out.items():
        if v.get("start") and (name, v["start"]) not in seen:
            passes.append({"notebook": name, **v})
    passes.sort(key=lambda p: p.get("start") or "")
    if passes:
        atomic_write_json(path, {"passes": passes})
    done = [p["seconds"] for p in passes if p.get("seconds") is not None]
    return {"notebooks": out, "passes": passes, "total_seconds": round(sum(done), 1) if done else None}


def newest_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The stage manifest written last by its own ``time_utc``, at any depth of the run folder (a stage's, a training
    run's, a probe's: :func:`lwlib.report.collect_manifests`): the machine and code of the run's latest sitting. File
    times mislead where a run folder was copied or unpacked (2026-12-07: a corpus built on a CPU and carried to the
    GPU machine looked newer than the runs trained there). None if there is none.

    Usage: ``newest_manifest("runs/gpu")["versions"]["gpu"]``"""
    from .report import collect_manifests

    found = collect_manifests(Path(run_dir))
    return found[-1] if found else None


def export_results(run_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Copy the small result files of the run folder ``run_dir`` to ``dest`` (default ``results/<its name>``), write
    ``timing.json`` (:func:`notebook_timing`) and ``environment.json`` (versions, git SHA, host and resolved profile
    of the newest stage manifest).

    A training run trained again in a later sitting (``train_log.recorded.json`` beside its ``train_log.json``:
    :func:`lwlib.sft.rebuild_run`) keeps the first training's log as its ``train_log.json`` (the run's record, and
    what the rebuild's model fingerprint hashes, so the next sitting's rebuild resumes the same stores); the
    rebuild's own log is exported as ``train_log.rebuilt.json`` beside ``rebuild.json``."""
    run = Path(run_dir)
    if not run.exists():
        raise FileNotFoundError(f"{run} does not exist: run the notebooks first")
    dest = Path(dest) if dest else default_results_root() / run.name
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in PATTERNS:
        for src in sorted(run.glob(pattern)):
            rel = src.relative_to(run)
            first = src.with_name("train_log.recorded.json")
            if src.name == "train_log.json" and first.exists():
                atomic_write_bytes(dest / rel.with_name(REBUILT_LOG), src.read_bytes())
                copied.append(str(rel.with_name(REBUILT_LOG)))
                src = first
            atomic_write_bytes(dest / rel, src.read_bytes())
            copied.append(str(rel))
    atomic_write_json(dest / "timing.json", notebook_timing(run))
    m = newest_manifest(run)
    if m:
        atomic_write_json(dest / "environment.json", {k: m.get(k) for k in ("versions", "git_sha", "host", "time_utc")}
                          | {"profile": (m.get("config") or {}).get("profile")})
    atomic_write_json(dest / "files.json", {"run_dir": str(run), "files": copied})
    return dest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lwlib.results", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="the run folder (runs/<profile name>)")
    ap.add_argument("--dest", default=None, help="target folder (default: results/<run folder name>)")
    args = ap.parse_args(argv)
    print(f"[results] {export_results(args.run_dir, args.dest)}")


if __name__ == "__main__":
    main()
