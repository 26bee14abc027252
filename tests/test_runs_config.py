"""Run folders (resumable JSONL, atomic files, manifests) and profiles."""

import json
import os
import re
import subprocess
from dataclasses import dataclass, field

import pytest
import yaml

from lwlib import config
from lwlib.config import ConfigError, coerce, from_dict, load_profile, validate_profile
from lwlib.decodings import profile_decodings
from lwlib.probe import ProbeConfig
from lwlib.runs import (REPO_ROOT, JsonlStore, StaleRunError, atomic_write_json, read_jsonl, read_log_history,
                        read_records, training_finished, write_manifest)
from nbutil import write_executed


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
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    m = json.loads(write_manifest(tmp_path, {"lr": 1e-5}).read_text())
    assert m["config"] == {"lr": 1e-5}
    assert m["versions"]["torch"] and m["versions"]["transformers"] and "git_sha" in m


def test_atomic_writes_of_bytes_and_jsonl_replace_whole_files(tmp_path):
    """The helpers every whole-file write of lwlib goes through: the new content or the old, no temporary left."""
    from lwlib.runs import atomic_write_bytes, atomic_write_jsonl

    p = atomic_write_jsonl(tmp_path / "sub" / "pairs.jsonl", [{"a": "ü"}, [1, 2]])
    assert p.read_text(encoding="utf-8") == '{"a": "ü"}\n[1, 2]\n' and read_jsonl(p) == [{"a": "ü"}, [1, 2]]
    atomic_write_jsonl(p, [])
    assert p.read_bytes() == b""
    b = atomic_write_bytes(tmp_path / "x.bin", b"\x00\x01")
    assert b.read_bytes() == b"\x00\x01" and not list(tmp_path.rglob(".*tmp"))

    class Boom:
        def __iter__(self):
            yield {"a": 1}
            raise RuntimeError("mid-write")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(p, Boom())  # a failure while the content is made leaves the old file
    assert p.read_bytes() == b"" and not list(tmp_path.rglob(".*tmp"))


@pytest.mark.parametrize("name", ["smoke", "gpu", "gpu_smollm2", "gpu_short", "paper", "paper_rehearsal"])
def test_builtin_profiles_load_every_section(name):
    prof = load_profile(name)
    assert prof.name == name and prof.model
    cfg = prof.section("probe", ProbeConfig)
    assert cfg.max_new_tokens > 0 and set(cfg.languages) <= {"en", "zh"}
    paper = {d.name: d for d in profile_decodings(prof)}["paper"]  # every profile measures the paper's decoding
    assert paper.temperature == 0.5 and paper.repetition_penalty == 1.0
    decs = profile_decodings(prof)
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


def test_resume_runs_again_what_is_cut_failed_differently_set_or_left_waiting(tmp_path):
    """lwlib.nbrun.rerun_reason, run_all.sh --resume's test: an executed copy is done only when it ended without
    error, with the same --set values, and left no runs waiting for a later sitting (sitting.json)."""
    from lwlib.nbrun import rerun_reason
    from lwlib.runs import Sitting, waiting_units

    nb, params = tmp_path / "notebooks" / "03_sft.ipynb", {"profile": "smoke", "overrides": {"sft.runs": ["main"]}}
    nb.parent.mkdir()
    assert rerun_reason(nb, tmp_path, params) == "no readable executed copy"
    write_executed(nb, seconds=None)
    assert rerun_reason(nb, tmp_path, params) == "cut off before its end"
    write_executed(nb, failed=True)
    assert rerun_reason(nb, tmp_path, params) == "failed"
    write_executed(nb, overrides={"sft.runs": ["arm"]})
    assert "other --set values ({'sft.runs': ['arm']})" in rerun_reason(nb, tmp_path, params)
    write_executed(nb, overrides={"sft.runs": ["main"]})
    assert rerun_reason(nb, tmp_path, params) is None
    Sitting.record_waiting(tmp_path, "03_sft.ipynb", ["sft-s1", "sft-s2"])
    Sitting.record_waiting(tmp_path, "04_dpo.ipynb", ["dpo"])
    assert rerun_reason(nb, tmp_path, params) == ("finished earlier with runs waiting for a later sitting "
                                                  "(sft-s1, sft-s2)")
    Sitting.record_waiting(tmp_path, "03_sft.ipynb", [])  # a later pass did them
    assert rerun_reason(nb, tmp_path, params) is None and waiting_units(tmp_path) == {"04_dpo.ipynb": ["dpo"]}
    (tmp_path / "sitting.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="sitting.json: not a sitting record"):
        rerun_reason(nb, tmp_path, params)


def test_run_all_resume_skips_finished_notebooks_and_runs_the_rest(tmp_path):
    """./run_all.sh --resume skips a notebook whose executed copy papermill finished without error and runs
    one that a sitting's limit left with runs waiting: here notebook 04, which fails at once (no SFT checkpoint
    in this run folder)."""
    out = tmp_path / "smoke" / "notebooks"
    out.mkdir(parents=True)
    names = sorted(p.name for p in (REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for name in names:
        write_executed(out / name)
    from lwlib.runs import Sitting

    Sitting.record_waiting(tmp_path / "smoke", "04_dpo.ipynb", ["dpo"])
    r = subprocess.run(["./run_all.sh", "smoke", "--resume"], cwd=REPO_ROOT, capture_output=True, text=True,
                       env={**os.environ, "LWLIB_RUNS": str(tmp_path)}, timeout=300)
    skipped = [n for n in names if f"{n}: finished earlier (--resume), skipped" in r.stdout]
    assert skipped == [n for n in names if n[:2] in ("01", "02", "03")], r.stdout  # stops at the failure in 04
    assert "04_dpo.ipynb: finished earlier with runs waiting for a later sitting (dpo): run again" in r.stdout
    assert r.returncode == 1 and "04_dpo.ipynb FAILED for profile smoke" in r.stderr
    assert "./run_all.sh smoke --resume" in r.stderr
    assert (tmp_path / "smoke" / "report" / "index.html").exists()  # the report of what ran, after the failure
    # the failed pass is on record before a later pass replaces its executed copy
    passes = json.loads((tmp_path / "smoke" / "timing_passes.json").read_text())["passes"]
    assert [p["failed"] for p in passes if p["notebook"] == "04_dpo.ipynb"] == [True]


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


# ------------------------------------------------------------------------------------------ typed profiles


def _profile(tmp_path, text, name="x.yaml", **kw):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return load_profile(p, run_root=tmp_path / "runs", **kw)


def test_coerce_rules():
    assert coerce("1e-4", float) == 1e-4 and coerce(3, float) == 3.0 and isinstance(coerce(3, float), float)
    assert coerce(5.0, int) == 5 and coerce("1e3", int) == 1000 and coerce("-7", int) == -7
    for bad, tp in [("ten", int), (5.5, int), (True, int), ("abc", float), (True, float), ("yes", bool),
                    (1, bool), (7, str), ("x", list[int]), ([1, "x"], list[int]), (None, int), ("nan", float)]:
        with pytest.raises(ConfigError, match="expected"):
            coerce(bad, tp, "f")
    assert coerce(True, bool | str) is True and coerce("auto", bool | str) == "auto"
    assert coerce(None, int | None) is None and coerce("12", int | None) == 12
    assert coerce(None, str | None) is None and coerce([1, 2.0], list[int] | None) == [1, 2]
    assert coerce({"m": ["1.5", 2]}, dict[str, list[float]]) == {"m": [1.5, 2.0]}
    with pytest.raises(ConfigError, match=r"^f\[1\]: expected int, got 'x'$"):
        coerce([1, "x"], list[int], "f")


def test_profile_values_are_typed_with_file_and_field_in_errors(tmp_path):
    from lwlib.dpo import DPOStageConfig
    from lwlib.sft import SFTConfig

    prof = _profile(tmp_path, "model: m\nsft:\n  learning_rate: 1e-4\n  max_steps: 1e3\n  liger_kernel: false\n")
    cfg = prof.section("sft", SFTConfig)
    assert cfg.learning_rate == 1e-4 and cfg.max_steps == 1000 and cfg.liger_kernel is False
    assert prof.section("sft") == cfg  # the registered class
    f = tmp_path / "x.yaml"
    cases = [("sft:\n  learning_rate: abc\n", r"sft\.learning_rate: expected float, got 'abc'"),
             ("dpo:\n  steps: ten\n", r"dpo\.steps: expected int, got 'ten'"),
             ("sft:\n  caps: [500, x]\n", r"sft\.caps\[1\]: expected int, got 'x'"),
             ("sft:\n  gradient_checkpointing: 1\n", r"sft\.gradient_checkpointing: expected bool"),
             ("probe:\n  backend: {kind: opneai}\n", r"probe\.backend\.kind: expected one of 'local', 'openai', 'server', got 'opneai'"),
             ("bench:\n  judge: {kind: gpt}\n", r"bench\.judge\.kind: expected one of 'local', 'openai', 'none'"),
             ("dpo:\n  judge: {kind: none, max_tokens: lots}\n", r"dpo\.judge\.max_tokens: expected int"),
             ("sft:\n  loss: mean\n", r"sft: sft\.loss must be 'token' or 'sequence'")]
    for text, msg in cases:
        prof = _profile(tmp_path, "model: m\n" + text)
        errors = validate_profile(prof)
        assert len(errors) == 1 and re.fullmatch(re.escape(str(f)) + ": " + msg + ".*", errors[0]), errors
    with pytest.raises(ConfigError, match=re.escape(str(f)) + r": dpo\.steps: expected int"):
        _profile(tmp_path, "model: m\ndpo:\n  steps: ten\n").section("dpo", DPOStageConfig)


def test_profile_sections_and_top_level_are_checked_at_load(tmp_path):
    f = re.escape(str(tmp_path / "x.yaml"))
    with pytest.raises(ConfigError, match=f + r": probee: unknown section \(did you mean 'probe'\?\); known sections: "
                       r"\['agentwrite', 'bench', 'corpus', 'dpo', 'nll', 'probe', 'sft'"):
        _profile(tmp_path, "model: m\nprobee:\n  lengths: [1000]\n")
    with pytest.raises(ConfigError, match=f + r": seed: expected int, got 'x'"):
        _profile(tmp_path, "model: m\nseed: x\n")
    with pytest.raises(ConfigError, match=f + r": device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        _profile(tmp_path, "model: m\ndevice: gpu\n")
    with pytest.raises(ConfigError, match=f + r": dtype: expected one of"):
        _profile(tmp_path, "model: m\ndtype: bf16\n")
    with pytest.raises(ConfigError, match=f + r": missing field 'model'"):
        _profile(tmp_path, "seed: 1\n")
    with pytest.raises(ConfigError, match=f + r": sft: a section must be a mapping"):
        _profile(tmp_path, "model: m\nsft: 5\n")


def test_override_errors_name_the_override_not_the_file(tmp_path):
    labels = {"sft.max_stepz": "--set sft.max_stepz=10"}
    prof = _profile(tmp_path, "model: m\n", overrides={"sft.max_stepz": 10}, override_labels=labels)
    [err] = validate_profile(prof)
    assert err.startswith("--set sft.max_stepz=10: sft: unknown field(s) ['max_stepz'] (did you mean 'max_steps'")
    [err] = validate_profile(_profile(tmp_path, "model: m\n", overrides={"probe.backend": {"kind": "opneai"}}))
    assert err.startswith('override probe.backend={"kind": "opneai"}: probe.backend.kind: expected one of')
    with pytest.raises(ConfigError, match=r"^override probee\.x=1: probee: unknown section"):
        _profile(tmp_path, "model: m\n", overrides={"probee.x": 1})
    with pytest.raises(ConfigError, match=r"^override seed=\"x\": seed: expected int"):
        _profile(tmp_path, "model: m\n", overrides={"seed": "x"})
    # a file's own mistake is still the file's, even with overrides elsewhere
    [err] = validate_profile(_profile(tmp_path, "model: m\ndpo:\n  steps: ten\n", overrides={"sft.max_steps": 3}))
    assert err.startswith(str(tmp_path / "x.yaml") + ": dpo.steps")
    # a check in __post_init__ that names its field blames the override of that field ...
    [err] = validate_profile(_profile(tmp_path, "model: m\n", overrides={"sft.loss": "mean"}))
    assert err.startswith('override sft.loss="mean": sft: sft.loss must be')
    # ... and one about another field of a section an override changed names both
    [err] = validate_profile(_profile(tmp_path, "model: m\nsft:\n  batch_size: 8\n",
                                      overrides={"sft.per_device_batch_size": 3}))
    assert err.startswith(str(tmp_path / "x.yaml") + " with override sft.per_device_batch_size=3: sft: sft.batch_size")
    # a top-level field's own check (the run folder's name) blames the --set, not the file (issue 29)
    with pytest.raises(ConfigError, match=r"^--set name=\.\./x: name must be letters, digits and \._-"):
        _profile(tmp_path, "name: fine\nmodel: m\n", overrides={"name": "../x"},
                 override_labels={"name": "--set name=../x"})
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "x.yaml")) + r": name must be letters"):
        _profile(tmp_path, "name: ../x\nmodel: m\n", overrides={"seed": 3})


def test_section_registry_is_one_place_and_tolerates_broken_modules(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from lwlib.sft import SFTConfig

    assert config.section_class("sft") is SFTConfig and set(config.SECTIONS) >= {"probe", "sft", "dpo", "bench"}

    @dataclass
    class CorpusConfig:
        books: int = 3

    monkeypatch.setitem(config.SECTIONS, "corpus", CorpusConfig)
    prof = _profile(tmp_path, "model: m\ncorpus:\n  books: '7'\n")
    assert prof.section("corpus") == CorpusConfig(7) and validate_profile(prof) == []
    monkeypatch.setitem(config.SECTIONS, "corpus", "lwlib.no_such_module:CorpusConfig")
    [err] = validate_profile(prof)
    assert "corpus: section registered as 'lwlib.no_such_module:CorpusConfig'" in err and "does not import" in err
    with pytest.raises(ValueError, match="module:Class"):
        config.register_section("x", "nocolon")


def test_profile_paths_resolve_from_the_callers_directory(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.yaml").write_text("model: m\n")
    monkeypatch.chdir(REPO_ROOT / "notebooks")  # where papermill runs the notebooks
    prof = load_profile("sub/p.yaml", base_dir=tmp_path)
    assert prof.source == tmp_path / "sub" / "p.yaml" and prof.name == "p"
    assert prof.resolved()["source"] == str(tmp_path / "sub" / "p.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_profile("sub/p.yaml").source.is_absolute()
    with pytest.raises(FileNotFoundError, match="no profile file " + re.escape(str(tmp_path / "nope.yaml"))):
        load_profile("nope.yaml")
    assert load_profile("smoke").source == config.PROFILE_DIR / "smoke.yaml"


def test_include_merges_the_file_over_the_included_profile(tmp_path):
    """``include``: mappings merge key by key; lists, scalars and null replace; name/description are the file's."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.yaml").write_text(
        "name: b\ndescription: the base\nmodel: m\nseed: 3\n"
        "sft:\n  learning_rate: 1.0e-4\n  caps: [500, 1000]\n  deepspeed: env/x.json\n  max_steps: 7\n"
        "probe:\n  backend: {kind: server, concurrency: 256}\n  lengths: [1000, 2000]\n")
    (tmp_path / "top.yaml").write_text(
        "include: base/b.yaml\nseed: 5\n"
        "sft:\n  caps: [50]\n  deepspeed: null\nprobe:\n  backend: {concurrency: 8}\n")
    prof = load_profile(tmp_path / "top.yaml", run_root=tmp_path)
    assert prof.name == "top" and "description" not in prof.data and prof.seed == 5 and prof.model == "m"
    assert prof.data["sft"] == {"learning_rate": 1e-4, "caps": [50], "deepspeed": None, "max_steps": 7}
    assert prof.data["probe"] == {"backend": {"kind": "server", "concurrency": 8}, "lengths": [1000, 2000]}
    assert prof.includes == [tmp_path / "base" / "b.yaml"] and validate_profile(prof) == []
    res = prof.resolved()
    assert res["includes"] == [str(tmp_path / "base" / "b.yaml")] and "include" not in res
    assert res["sft"]["caps"] == [50] and res["probe"]["backend"]["kind"] == "server"
    assert "includes" not in load_profile("smoke").resolved()
    # a chain: the nearest file wins, a built-in name resolves to the built-in profile
    (tmp_path / "chain.yaml").write_text("include: top.yaml\nname: chained\nsft:\n  max_steps: 1\n")
    chained = load_profile(tmp_path / "chain.yaml", overrides={"sft.caps": [9]})
    assert chained.name == "chained" and chained.includes == [tmp_path / "top.yaml", tmp_path / "base" / "b.yaml"]
    assert chained.data["sft"] == {"learning_rate": 1e-4, "caps": [9], "deepspeed": None, "max_steps": 1}
    (tmp_path / "p.yaml").write_text("include: paper\nsft:\n  max_steps: 2\n")
    p = load_profile(tmp_path / "p.yaml")
    assert p.includes == [config.PROFILE_DIR / "paper.yaml"] and p.model == load_profile("paper").model
    assert p.data["sft"]["max_steps"] == 2 and p.data["sft"]["packing_length"] == 32768 and p.name == "p"


def test_include_errors_name_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\nmodel: m\n")
    (tmp_path / "b.yaml").write_text("include: ./a.yaml\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{b}: include: include cycle: {a} -> {b} -> {a}")):
        load_profile(a)
    (tmp_path / "self.yaml").write_text("include: self.yaml\nmodel: m\n")
    with pytest.raises(ConfigError, match=r"include cycle: (\S+self\.yaml) -> \1$"):
        load_profile(tmp_path / "self.yaml")
    (tmp_path / "c.yaml").write_text("include: nope.yaml\nmodel: m\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'c.yaml'}: include: no profile file")):
        load_profile(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: [a.yaml]\nmodel: m\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: include: expected a profile name or path"):
        load_profile(tmp_path / "d.yaml")
    # a mistake in the included file names that file (and the one including it); the including file's own, itself
    (tmp_path / "base.yaml").write_text("model: m\nsft:\n  max_stepz: 3\n  learning_rate: 1e-4\n"
                                        "dpo:\n  steps: 2\nprobee:\n  x: 1\n")
    (tmp_path / "top.yaml").write_text("include: base.yaml\nsft:\n  learning_rate: abc\ndpo:\n  steps: ten\n")
    base, top = tmp_path / "base.yaml", tmp_path / "top.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{base} (included by {top}): probee: unknown section")):
        load_profile(top)
    base.write_text("model: m\nsft:\n  max_stepz: 3\n  learning_rate: 1e-4\ndpo:\n  steps: 2\n")
    errors = validate_profile(load_profile(top))
    assert any(e.startswith(f"{base} (included by {top}): sft: unknown field(s) ['max_stepz']") for e in errors), errors
    assert any(e.startswith(f"{top}: dpo.steps: expected int, got 'ten'") for e in errors), errors
    top.write_text("include: base.yaml\n")
    errors = validate_profile(load_profile(top, overrides={"sft.max_stepz": 4}))
    assert len(errors) == 1 and errors[0].startswith(  # an override of the field is blamed first, as without include
        "override sft.max_stepz=4: sft: unknown field(s) ['max_stepz']"), errors


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


# Every value of paper_rehearsal that differs from paper's, by reason (lwlib/profiles/paper_rehearsal.yaml comments
# each; results/paper_rehearsal/README.md tabulates them). Anything else that changes fails the test below.
REHEARSAL_DIFFERS = {
    # names and flags
    "name", "description", "too_small_for_verdicts",
    # substitutions: the model (and what follows from its 8,192-token context and its own chat template)
    "model", "sft.chat_template", "sft.packing_length", "dpo.max_length", "nll.max_tokens",
    "agentwrite.max_prompt_tokens",
    # substitutions: lwlib.serve in place of vllm serve (one request at a time: fewer in flight)
    "probe.backend.server_command", "probe.backend.concurrency", "dpo.backend.server_command",
    "dpo.backend.concurrency", "bench.backend.server_command", "bench.backend.concurrency",
    # substitutions: lwlib.serve on port 8000 in place of GPT-4o (judge and AgentWrite writer)
    "bench.judge.model", "bench.judge.base_url", "dpo.judge.model", "dpo.judge.base_url",
    "agentwrite.backend.model", "agentwrite.backend.base_url",
    # substitutions: data (the human-written stand-in for LongWriter-6k, a committed JSONL for UltraChat)
    "sft.data_path", "sft.general_data", "nll.data_path", "corpus.max_passages", "corpus.nll_max_passages",
    # sizes
    "probe.lengths", "probe.templates", "probe.max_new_tokens",
    "agentwrite.n_instructions", "agentwrite.heldout", "agentwrite.plan_max_new_tokens",
    "agentwrite.write_max_new_tokens", "agentwrite.max_paragraphs",
    "sft.max_steps", "sft.save_steps", "sft.caps",
    "dpo.instructions", "dpo.min_words", "dpo.max_words", "dpo.max_new_tokens", "dpo.steps", "dpo.bench_items",
    "dpo.judge.max_tokens", "dpo.judge.max_tries",
    "nll.max_samples", "bench.max_items", "bench.max_new_tokens", "bench.judge.max_tokens", "bench.judge.max_tries",
}


def test_paper_rehearsal_differs_from_paper_only_where_it_says():
    """The rehearsal is the paper profile but for the listed substitutions and sizes: the resolved profiles, flattened
    to dotted keys, differ in exactly REHEARSAL_DIFFERS; both validate."""
    from lwlib.models import BUNDLED
    from lwlib.served import LWLIB_SERVE_COMMAND

    paper, rehearsal = load_profile("paper"), load_profile("paper_rehearsal")
    assert validate_profile(paper) == [] and validate_profile(rehearsal) == []
    assert rehearsal.includes == [config.PROFILE_DIR / "paper.yaml"] and rehearsal.name == "paper_rehearsal"
    bookkeeping = ("profile", "source", "includes")
    a, b = ({k: v for k, v in _flat(p.resolved()).items() if k not in bookkeeping} for p in (paper, rehearsal))
    differ = {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}
    assert differ - REHEARSAL_DIFFERS == set(), "paper_rehearsal changes values it does not list"
    assert REHEARSAL_DIFFERS - differ == set(), "listed as changed, but the same as paper's"
    # what stays the paper's, named: ZeRO-3 (+ offload for SFT), the token-mean loss, checkpointing, server backends
    sft, dpo = rehearsal.section("sft"), rehearsal.section("dpo")
    assert (sft.deepspeed, dpo.deepspeed) == ("env/ds_zero3_offload.json", "env/ds_zero3.json")
    assert sft.loss == "token" and sft.gradient_checkpointing and dpo.gradient_checkpointing
    assert (sft.batch_size, sft.per_device_batch_size, sft.learning_rate) == (8, 1, 1.0e-5)
    for section in ("probe", "bench", "dpo"):
        be = rehearsal.section(section).backend
        assert be.kind == "server" and be.server_command[:len(LWLIB_SERVE_COMMAND)] == LWLIB_SERVE_COMMAND
    for judge in (rehearsal.section("bench").judge, dpo.judge):
        assert judge.kind == "openai" and judge.base_url == "http://127.0.0.1:8000/v1"  # lwlib.serve's default port
    # the model is the bundled one, packed at its full context; the general data is a file of the repository
    from transformers import AutoConfig

    from lwlib.models import resolve_model

    context = AutoConfig.from_pretrained(resolve_model(rehearsal.model)).max_position_embeddings
    assert rehearsal.model in BUNDLED and sft.packing_length == context == dpo.max_length == 8192
    assert (REPO_ROOT / sft.general_data).is_file()
    assert config.main(["check", "paper_rehearsal"]) == 0


def test_config_check_cli(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text("name: mine\nmodel: m\ndevice: cpu\nsft:\n  max_steps: 3\n")
    assert config.main(["check", "p.yaml", "--base-dir", str(tmp_path), "--papermill-params",
                        "--set", "sft.learning_rate=1e-4", "--set", "probe.lengths=[1000, 2000]"]) == 0
    name, params = capsys.readouterr().out.splitlines()
    assert name == "mine" and yaml.safe_load(params) == {
        "profile": str(tmp_path / "p.yaml"), "overrides": {"sft.learning_rate": "1e-4", "probe.lengths": [1000, 2000]}}
    assert config.main(["check", "smoke", "--papermill-params"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.splitlines()[1]) == {"profile": "smoke", "overrides": {}}
    assert config.main(["check", "smoke", "--set", "sft.max_steps=ten"]) == 2
    assert "error: --set sft.max_steps=ten: sft.max_steps: expected int, got 'ten'" in capsys.readouterr().err
    assert config.main(["check", "smoke", "--set", "sft.max_steps"]) == 2
    assert "--set sft.max_steps: needs KEY=VALUE" in capsys.readouterr().err


def test_gpu_profile_without_gpu_warns(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU is visible" in config.gpu_warning(load_profile("gpu"))
    assert config.gpu_warning(load_profile("smoke")) is None
    assert config.gpu_warning(load_profile("gpu", {"device": "cpu"})) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config.gpu_warning(load_profile("gpu")) is None


def test_run_all_rejects_bad_input_before_any_notebook_and_creates_nothing(tmp_path):
    """Mistakes fail in seconds with the real error, exit non-zero, and leave no run folder (no papermill)."""
    run_all = str(REPO_ROOT / "run_all.sh")
    (tmp_path / "bad.yaml").write_text("model: m\nsft:\n  learning_rate: abc\n")
    r = subprocess.run([run_all, "bad.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LWLIB_RUNS": "runs"})  # relative to the caller too
    assert r.returncode == 2 and f"{tmp_path / 'bad.yaml'}: sft.learning_rate: expected float, got 'abc'" in r.stderr
    r = subprocess.run([run_all, "smoke", "--set", "sft.max_stepz=10", "--set", "probe.lengths=[1000]"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "LWLIB_RUNS": "runs"})
    assert r.returncode == 2 and "--set sft.max_stepz=10: sft: unknown field(s) ['max_stepz']" in r.stderr
    for args, msg in [(["nope"], "no profile 'nope'; built-in profiles"),
                      (["smoke", "--only", "1"], "--only 1: no such notebook"),
                      (["smoke", "--from", "07"], "--from 07: no such notebook"),
                      (["smoke", "--set"], "--set needs a value")]:
        r = subprocess.run([run_all, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "LWLIB_RUNS": "runs"})
        assert r.returncode == 2 and msg in r.stderr and "Executing" not in r.stderr, (args, r.stderr)
        if "no such notebook" in msg:
            assert "01_output_length_probe.ipynb" in r.stderr and "06_longbench_write.ipynb" in r.stderr
    assert not (tmp_path / "runs").exists()
    assert not (REPO_ROOT / "runs" / "bad").exists()
    r = subprocess.run([run_all, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("Run every notebook headlessly")  # the usage header, no code
    assert "./run_all.sh [PROFILE] [--from NN]" in r.stdout and "pipefail" not in r.stdout and "=" * 3 not in r.stdout


def test_sitting_starts_only_what_ends_in_time(monkeypatch):
    """$LWLIB_SITTING_END stops a loop before a unit longer than the time left (by the longest timed so far)."""
    import time

    from lwlib.runs import Sitting

    monkeypatch.delenv("LWLIB_SITTING_END", raising=False)
    monkeypatch.delenv("LWLIB_SITTING_RUN_S", raising=False)
    free = Sitting.from_env()
    assert free.left() is None and free.room()
    monkeypatch.setenv("LWLIB_SITTING_END", str(time.time() + 100))
    monkeypatch.setenv("LWLIB_SITTING_RUN_S", "150")
    assert not Sitting.from_env().room()  # the estimate alone does not fit
    monkeypatch.setenv("LWLIB_SITTING_RUN_S", "50")
    s = Sitting.from_env()
    assert s.room() and 99 < s.left() <= 100
    with s.timed():
        time.sleep(0.05)
    assert s.longest == 50  # a shorter unit keeps the estimate
    s.end = time.time() + 0.01
    with s.timed():
        time.sleep(0.05)
    assert s.longest == 50 and not s.room()
    monkeypatch.setenv("LWLIB_SITTING_END", "soon")
    with pytest.raises(ValueError, match="LWLIB_SITTING_END"):
        Sitting.from_env()
