"""Run folders (resumable JSONL, atomic files, manifests) and profiles."""

import json
import os
import subprocess
from dataclasses import dataclass, field

import pytest

from lwlib.config import from_dict, load_profile
from lwlib.decodings import profile_decodings
from lwlib.probe import ProbeConfig
from lwlib.runs import (REPO_ROOT, JsonlStore, atomic_write_json, read_jsonl, read_log_history,
                        training_finished, write_manifest)


def test_store_resumes_and_refuses_duplicates(tmp_path):
    p = tmp_path / "a" / "out.jsonl"
    s = JsonlStore(p)
    s.append({"id": "x", "v": 1})
    s.append({"id": "y", "v": 2})
    with pytest.raises(ValueError, match="already stored"):
        s.append({"id": "x", "v": 3})
    s2 = JsonlStore(p)  # a new process resuming
    assert "x" in s2 and "y" in s2 and "z" not in s2 and len(s2) == 2
    assert s2.get("y")["v"] == 2


def test_store_drops_torn_last_line(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": 1, "v": "ok"}\n{"id": 2, "v": "tor')
    s = JsonlStore(p)
    assert s.dropped_torn_line and len(s) == 1
    s.append({"id": 2, "v": "again"})
    assert [r["id"] for r in read_jsonl(p)] == [1, 2]


def test_store_bad_middle_line_names_file_and_line(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"out\.jsonl:2"):
        JsonlStore(p)
    p.write_text('{"id": 1}\n{"other": 2}\n')
    with pytest.raises(ValueError, match=r"out\.jsonl:2: record has no field 'id'"):
        JsonlStore(p)


def test_atomic_write_and_manifest(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert not list(tmp_path.glob(".*tmp"))
    umask = os.umask(0); os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    m = json.loads(write_manifest(tmp_path, {"lr": 1e-5}).read_text())
    assert m["config"] == {"lr": 1e-5}
    assert m["versions"]["torch"] and m["versions"]["transformers"] and "git_sha" in m


@pytest.mark.parametrize("name", ["smoke", "gpu", "gpu_short", "paper"])
def test_builtin_profiles_load_every_section(name):
    prof = load_profile(name)
    assert prof.name == name and prof.model
    cfg = prof.section("probe", ProbeConfig)
    assert cfg.max_new_tokens > 0 and set(cfg.languages) <= {"en", "zh"}
    decs = profile_decodings(prof)
    assert decs[0].name == "paper" and decs[0].temperature == 0.5 and decs[0].repetition_penalty == 1.0
    if name == "paper":
        assert cfg.max_new_tokens == 32768 and len(decs) == 1


def test_profile_overrides_and_errors(tmp_path):
    prof = load_profile("smoke", overrides={"probe.lengths": [2000], "seed": 7}, run_root=tmp_path)
    assert prof.section("probe", ProbeConfig).lengths == [2000] and prof.seed == 7
    assert prof.stage_dir("probe") == tmp_path / "smoke" / "probe"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nprobe:\n  max_new_tokenz: 5\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: probe: unknown field\(s\) \['max_new_tokenz'\]"):
        load_profile(bad).section("probe", ProbeConfig)
    with pytest.raises(FileNotFoundError, match="built-in profiles"):
        load_profile("nope")


def test_from_dict_nested():
    @dataclass
    class Inner:
        a: int = 1

    @dataclass
    class Outer:
        inner: Inner = field(default_factory=Inner)
        b: str = "x"

    assert from_dict(Outer, {"inner": {"a": 5}}).inner.a == 5
    with pytest.raises(ValueError, match=r"here\.inner: unknown field"):
        from_dict(Outer, {"inner": {"zzz": 5}}, where="here")


def test_run_all_resume_skips_finished_notebooks_and_runs_the_rest(tmp_path):
    """./run_all.sh --resume skips a notebook whose executed copy papermill finished without error and runs
    one that was cut off (no end_time): here it fails at once on a profile that does not exist."""
    out = tmp_path / "nope" / "notebooks"
    out.mkdir(parents=True)
    names = sorted(p.name for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for name in names:
        cut = name.startswith("04")
        meta = {"papermill": {"end_time": None if cut else "2026-11-23T15:12:32+00:00", "exception": None}}
        (out / name).write_text(json.dumps({"cells": [], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))
    r = subprocess.run(["./run_all.sh", "nope", "--resume"], cwd=REPO_ROOT, capture_output=True, text=True,
                       env={**os.environ, "LWLIB_RUNS": str(tmp_path)}, timeout=300)
    skipped = [n for n in names if f"{n}: finished earlier (--resume), skipped" in r.stdout]
    assert skipped == [n for n in names if n[:2] in ("01", "02", "03")], r.stdout  # stops at the failure in 04
    assert r.returncode == 1 and "04_dpo.ipynb FAILED for profile nope" in r.stderr
    assert "./run_all.sh nope --resume" in r.stderr


def test_training_finished_and_log_history(tmp_path):
    model = tmp_path / "sft" / "model"
    model.mkdir(parents=True)
    assert not training_finished(model)
    (model / "config.json").write_text("{}")
    assert not training_finished(model)  # killed after saving the model, before the log
    with pytest.raises(FileNotFoundError, match="train with lwlib.sft.train_sft"):
        read_log_history(model, "lwlib.sft.train_sft")
    atomic_write_json(model.parent / "train_log.json", {"log_history": [{"step": 1, "loss": 2.0}]})
    assert training_finished(model)
    assert read_log_history(model, "x") == read_log_history(model.parent, "x") == [{"step": 1, "loss": 2.0}]
