"""Run folders (resumable JSONL, atomic files, manifests) and profiles."""

import json
import os
import subprocess
from dataclasses import dataclass, field

import pytest

from nbutil import fake_repo
from lwlib.config import from_dict, load_profile
from lwlib.decodings import profile_decodings
from lwlib.probe import ProbeConfig
from lwlib.runs import (REPO_ROOT, JsonlStore, StaleRunError, atomic_write_json, read_jsonl, read_log_history,
                        read_records, training_finished, write_manifest)


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


def test_store_adds_the_missing_newline_before_the_next_record(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": 1, "v": "ok"}')  # a valid last record whose newline was lost
    s = JsonlStore(p)
    assert not s.dropped_torn_line and len(s) == 1
    s.append({"id": 2, "v": "next"})
    assert p.read_text() == '{"id": 1, "v": "ok"}\n{"id": 2, "v": "next"}\n'
    assert [r["id"] for r in JsonlStore(p)] == [1, 2]


def test_store_duplicate_key_is_an_error_and_readers_do_not_cut(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "a", "v": 2}\n')
    with pytest.raises(ValueError, match=r"out\.jsonl:3: duplicate key 'a' \(first at line 1\)"):
        JsonlStore(p)
    with pytest.raises(ValueError, match=r"out\.jsonl:3: duplicate key 'a'"):
        read_records(p)
    p.write_text('{"id": "a"}\n{"id": "b", "v": "tor')  # a writer mid-append: a reader ignores, never cuts
    assert [r["id"] for r in read_records(p)] == ["a"] and p.read_text().endswith('"tor')


def test_store_fingerprint_written_checked_adopted(tmp_path, recwarn):
    p = tmp_path / "out.jsonl"
    s = JsonlStore(p, fingerprint={"model": "m", "gen": {"max_new_tokens": 8, "temperature": 0.5}}, stage="probe")
    fp = json.loads((tmp_path / "out.jsonl.fingerprint.json").read_text())
    assert fp["fingerprint"]["gen"]["max_new_tokens"] == 8 and fp["id"]
    s.append({"id": 1})
    JsonlStore(p, fingerprint={"gen": {"temperature": 0.5, "max_new_tokens": 8}, "model": "m"})  # same, any order
    with pytest.raises(StaleRunError, match=r"gen\.max_new_tokens: 8 -> 16.*set probe\.overwrite: true") as e:
        JsonlStore(p, fingerprint={"model": "m", "gen": {"max_new_tokens": 16, "temperature": 0.5}}, stage="probe")
    assert isinstance(e.value, ValueError) and e.value.changed == {"gen.max_new_tokens": (8, 16)}
    # a setting added to the code later is adopted with a warning (the records predate it), then checked
    JsonlStore(p, fingerprint={"model": "m", "gen": {"max_new_tokens": 8, "temperature": 0.5}, "decoding": "d1"})
    assert any("not in the stored fingerprint" in str(w.message) for w in recwarn)
    with pytest.raises(StaleRunError, match='decoding: "d1" -> "d2"'):
        JsonlStore(p, fingerprint={"model": "m", "gen": {"max_new_tokens": 8, "temperature": 0.5}, "decoding": "d2"})
    # records from before fingerprints existed: adopted with a warning
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text('{"id": 1}\n')
    with pytest.warns(UserWarning, match="without a fingerprint.*adopting"):
        JsonlStore(legacy, fingerprint={"model": "m"})
    with pytest.raises(StaleRunError):
        JsonlStore(legacy, fingerprint={"model": "other"})
    # an empty store takes the new settings without a word
    empty = tmp_path / "empty.jsonl"
    JsonlStore(empty, fingerprint={"model": "a"})
    JsonlStore(empty, fingerprint={"model": "b"})
    assert json.loads((tmp_path / "empty.jsonl.fingerprint.json").read_text())["fingerprint"] == {"model": "b"}


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
    one that was cut off (no end_time): here a stand-in papermill that fails at once. The executed copies live
    in the run folder the profile's name gives (not the file's name)."""
    repo = fake_repo(tmp_path, papermill="#!/bin/sh\necho \"papermill $*\"\nexit 1\n")
    prof_file = tmp_path / "copy_of_something.yaml"
    prof_file.write_text("name: nope\nmodel: x\n")
    out = tmp_path / "runs" / "nope" / "notebooks"
    out.mkdir(parents=True)
    names = sorted(p.name for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for name in names:
        cut = name.startswith("04")
        meta = {"papermill": {"end_time": None if cut else "2026-11-23T15:12:32+00:00", "exception": None}}
        (out / name).write_text(json.dumps({"cells": [], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))
    r = subprocess.run([str(repo / "run_all.sh"), str(prof_file), "--resume"], capture_output=True, text=True,
                       env={**os.environ, "LWLIB_RUNS": str(tmp_path / "runs"), "PYTHONPATH": str(REPO_ROOT)},
                       timeout=120)
    skipped = [n for n in names if f"{n}: finished earlier (--resume), skipped" in r.stdout]
    assert skipped == [n for n in names if n[:2] in ("01", "02", "03")], r.stdout + r.stderr  # stops at 04
    assert f"papermill notebooks/04_dpo.ipynb {out}/04_dpo.ipynb -p profile {prof_file}" in r.stdout
    assert r.returncode == 1 and "04_dpo.ipynb FAILED for profile nope" in r.stderr
    assert f"./run_all.sh {prof_file} --resume" in r.stderr
    bad = subprocess.run([str(repo / "run_all.sh"), "no_such_profile"], capture_output=True, text=True,
                         env={**os.environ, "LWLIB_RUNS": str(tmp_path / "runs"), "PYTHONPATH": str(REPO_ROOT)},
                         timeout=60)
    assert bad.returncode == 2 and "no profile 'no_such_profile'" in bad.stderr


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
