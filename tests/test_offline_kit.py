"""env/offline_kit.sh and env/offline_unpack.sh: a kit of the gpu profile's records (and a wheel folder) in parts
of 1 MB, joined there as the parts arrive: a group waits for its last part, a damaged part is named, the files
come out as they went in, and a run folder's own files are kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("kit")
    wheels = root / "wheels"
    wheels.mkdir()
    (wheels / "a-1.0-py3-none-any.whl").write_bytes(os.urandom(2_500_000))  # three parts of 1 MB
    (wheels / "b-1.0-py3-none-any.whl").write_bytes(b"b")
    done = _run(["bash", "env/offline_kit.sh", str(root / "kit"), "--wheels-from", str(wheels), "--no-model",
                 "--part-mb", "1"], REPO)
    assert done.returncode == 0, done.stderr
    return root, json.loads((root / "kit" / "kit.json").read_text())


def test_kit_parts_and_manifest(kit):
    root, manifest = kit
    assert list(manifest["groups"]) == ["wheels", "state"] and manifest["profile"] == "gpu"  # --no-model
    assert manifest["groups"]["wheels"]["parts"] == ["wheels.tar.000", "wheels.tar.001", "wheels.tar.002"]
    folders = sorted(p.name for p in (root / "kit").iterdir() if p.is_dir())
    assert folders == [f"{k:03d}" for k in range(len(manifest["parts"]))]  # one folder per transfer, in order
    for p in manifest["parts"]:
        assert p["bytes"] <= 1_000_000 and (root / "kit" / p["folder"] / p["file"]).exists()
        assert (root / "kit" / p["folder"] / "kit.json").exists()  # each transfer brings the manifest along
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["bash", "env/offline_kit.sh", str(root / "kit"), "--wheels-from", str(root / "wheels")],
                       cwd=REPO, check=True, capture_output=True)  # not over a kit made before


def test_unpack_as_parts_arrive(kit, tmp_path):
    root, manifest = kit
    repo, parts = tmp_path / "repo", tmp_path / "parts"
    (repo / "env").mkdir(parents=True)
    parts.mkdir()
    shutil.copy(REPO / "env" / "offline_unpack.sh", repo / "env")
    (repo / "runs" / "gpu" / "sft").mkdir(parents=True)
    (repo / "runs" / "gpu" / "sft" / "arms.json").write_text("this sitting's")  # kept
    unpack = lambda *groups: _run(["bash", "env/offline_unpack.sh", str(parts), *groups, "--no-install"], repo)  # noqa: E731

    def arrive(folder: str) -> None:
        for f in (root / "kit" / folder).iterdir():
            shutil.copy(f, parts / f.name)

    arrive("000")
    done = unpack("wheels")
    assert done.returncode == 1 and "part wheels.tar.001 of wheels (folder 001) is not in" in done.stderr
    arrive("001")
    arrive("002")
    assert unpack("wheels").returncode == 0
    for name in ("a-1.0-py3-none-any.whl", "b-1.0-py3-none-any.whl"):
        assert (parts / "wheels" / name).read_bytes() == (root / "wheels" / name).read_bytes()
    state = [p for p in manifest["parts"] if p["group"] == "state"]
    for p in state:
        arrive(p["folder"])
    broken = parts / state[-1]["file"]
    good = broken.read_bytes()
    broken.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    done = unpack("state")
    assert done.returncode == 1 and f"{broken} has sha256" in done.stderr and "send it again" in done.stderr
    broken.write_bytes(good)
    assert unpack("state").returncode == 0
    assert sorted(p.name for p in (parts / "data").iterdir()) == [
        "longbench_write.jsonl", "longbench_write_en.jsonl", "longwrite_ruler.jsonl"]
    run = repo / "runs" / "gpu"
    assert (run / "sft" / "arms.json").read_text() == "this sitting's"
    assert (run / "sft" / "cap500" / "train_log.json").read_bytes() == (
        REPO / "results" / "gpu" / "sft" / "cap500" / "train_log.json").read_bytes()
    tars = sorted((REPO / "results" / "gpu").glob("*_records.tar.xz"))  # the probes', DPO's: as recorded
    assert "probe_records.tar.xz" in [t.name for t in tars]
    for path in tars:
        with tarfile.open(path) as t:
            names = [m.name for m in t.getmembers() if m.isfile()]
            assert names and all((repo / n).read_bytes() == t.extractfile(n).read() for n in names), path
    assert "no group 'model'" in unpack("model").stderr


def test_background_job_outlives_its_call_and_is_followed(tmp_path):
    """env/background.sh: a job started in one call is followed in later ones: its new log lines, still running
    (exit 3) before it ends, then its own exit code; a second start of a running job is refused."""
    env = {**os.environ, "LWLIB_BG_DIR": str(tmp_path)}
    bg = lambda *a: subprocess.run(["bash", "env/background.sh", *a], cwd=REPO, capture_output=True, text=True,  # noqa: E731
                                   env=env)
    mark = tmp_path / "go"
    started = bg("start", "job", "bash", "-c", f"echo first; while [ ! -e {mark} ]; do sleep 0.2; done; echo second; "
                                               "exit 4")
    assert started.returncode == 0 and "job started" in started.stdout
    assert bg("start", "job", "true").returncode == 1  # running already
    import time

    now = int(time.time())
    first = bg("wait", "job", str(now))
    assert first.returncode == 3 and "first" in first.stdout and "still running" in first.stdout
    assert bg("status", "job").stdout.strip() == "running"
    mark.touch()
    last = bg("wait", "job", str(now + 60))
    assert last.returncode == 4 and "second" in last.stdout and "first" not in last.stdout  # only the new lines
    assert bg("status", "job").stdout.strip() == "ended 4"
