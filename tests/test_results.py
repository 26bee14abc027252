"""lwlib.results: the per-notebook timings of a run made over several sittings keep every pass."""

import json

import pytest

from lwlib.results import export_results, notebook_timing
from nbutil import write_executed


def test_timing_keeps_every_pass_of_a_notebook_run_over_sittings(tmp_path):
    run = tmp_path / "gpu"
    (run / "notebooks").mkdir(parents=True)
    write_executed(run / "notebooks" / "01_probe.ipynb", "2026-12-06T16:24:09", 167.5)
    write_executed(run / "notebooks" / "03_sft.ipynb", "2026-12-06T16:36:48", None)  # cut by the first sitting's limit
    first = notebook_timing(run)
    assert first["total_seconds"] == 167.5 and [p["notebook"] for p in first["passes"]] == ["01_probe.ipynb",
                                                                                            "03_sft.ipynb"]
    write_executed(run / "notebooks" / "03_sft.ipynb", "2026-12-06T22:52:00", 280.0)  # the next sitting's pass
    assert notebook_timing(run)["total_seconds"] == 447.5
    write_executed(run / "notebooks" / "03_sft.ipynb", "2026-12-06T23:02:42", 270.1)
    got = notebook_timing(run)
    assert notebook_timing(run) == got  # reading again adds nothing
    assert got["notebooks"]["03_sft.ipynb"]["seconds"] == 270.1 and got["total_seconds"] == 717.6
    assert [(p["notebook"], p["seconds"]) for p in got["passes"]] == [
        ("01_probe.ipynb", 167.5), ("03_sft.ipynb", None), ("03_sft.ipynb", 280.0), ("03_sft.ipynb", 270.1)]
    dest = export_results(run, tmp_path / "results" / "gpu")
    assert json.loads((dest / "timing.json").read_text()) == got
    (run / "timing_passes.json").write_text("{}")
    with pytest.raises(ValueError, match="timing_passes.json: not a list of notebook passes"):
        notebook_timing(run)


def test_environment_comes_from_the_manifest_written_last_by_its_own_time_at_any_depth(tmp_path):
    """A corpus built on a CPU and unpacked on the GPU machine after the runs had their files copied: its file is
    the newest, its time_utc the oldest; environment.json names the GPU sitting's probe (two folders deep)."""
    import os

    from lwlib.results import newest_manifest

    run = tmp_path / "gpu"
    probe = {"versions": {"gpu": "NVIDIA H100 80GB HBM3"}, "git_sha": "f623743", "host": "vm",
             "time_utc": "2026-12-07T08:41:29Z", "config": {"profile": {"name": "gpu"}}}
    corpus = {"versions": {"gpu": None}, "git_sha": "cfabefa", "host": "cpu", "time_utc": "2026-12-07T05:53:00Z"}
    for rel, m in (("probe/cap4000/paper/manifest.json", probe), ("corpus/manifest.json", corpus)):
        (run / rel).parent.mkdir(parents=True)
        (run / rel).write_text(json.dumps(m))
    os.utime(run / "probe/cap4000/paper/manifest.json", (1, 1))  # copied: the file times say nothing
    (run / "sft").mkdir()
    (run / "sft" / "manifest.json").write_text("not json")  # skipped, not fatal
    assert newest_manifest(run)["git_sha"] == "f623743"
    env = json.loads((export_results(run, tmp_path / "out") / "environment.json").read_text())
    assert env == {"versions": {"gpu": "NVIDIA H100 80GB HBM3"}, "git_sha": "f623743", "host": "vm",
                   "time_utc": "2026-12-07T08:41:29Z", "profile": {"name": "gpu"}}
    assert newest_manifest(tmp_path / "nothing") is None


def test_a_rebuilt_run_keeps_its_first_training_log(tmp_path):
    """A run trained again in a later sitting: results keep the first training's log as train_log.json (what the
    rebuild's model fingerprint hashes), the rebuild's own log beside it."""
    from lwlib.runs import model_fingerprint

    run = tmp_path / "gpu"
    model = run / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (run / "sft" / "train_log.json").write_text('{"log_history": [{"loss": 3.05}]}')  # the rebuild's
    (run / "sft" / "train_log.recorded.json").write_text('{"log_history": [{"loss": 3.04}]}')  # the first's
    (run / "sft" / "rebuild.json").write_text('{"within_tol": true}')
    dest = export_results(run, tmp_path / "results" / "gpu")
    assert json.loads((dest / "sft" / "train_log.json").read_text())["log_history"][0]["loss"] == 3.04
    assert json.loads((dest / "sft" / "train_log.rebuilt.json").read_text())["log_history"][0]["loss"] == 3.05
    assert json.loads((dest / "sft" / "rebuild.json").read_text())["within_tol"] is True
    # the next sitting starts from these results and rebuilds again: the same model to the stores
    before = model_fingerprint(model)
    nxt = tmp_path / "next" / "gpu" / "sft"
    (nxt / "model").mkdir(parents=True)
    (nxt / "model" / "config.json").write_text("{}")
    (nxt / "train_log.recorded.json").write_bytes((dest / "sft" / "train_log.json").read_bytes())
    (nxt / "rebuild.json").write_text('{"within_tol": true}')
    assert "@rebuilt-" in before and model_fingerprint(nxt / "model").split("@")[1] == before.split("@")[1]
