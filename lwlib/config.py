"""Profiles: one YAML file per profile (``smoke``, ``gpu``, ``paper``) choosing model, sizes and settings.

A profile file has a few top-level fields (below) and one section per stage (``probe``, ``agentwrite``,
``sft``, ``dpo``, ``nll``, ``bench``, ...). Each stage module owns a dataclass config for its section
and reads it with :meth:`Profile.section`, which rejects unknown fields naming the file and the field.
The same code path runs in every profile; only these values change.

Usage::

    profile = load_profile("smoke", overrides={"probe.max_new_tokens": 32})
    cfg = profile.section("probe", ProbeConfig)
    out = profile.stage_dir("probe")        # runs/smoke/probe/

Top-level fields:
    name: the profile's name (default: the file's stem); its run folder is ``<run_root>/<name>``, for the
        notebooks and ``run_all.sh`` alike. A copied profile that keeps ``name: smoke`` shares ``runs/smoke``
        (its stores then refuse records made with other settings: lwlib.runs.StaleRunError).
    description: one line shown in notebooks.
    model: the base model: a built-in name (``smollm2-135m-instruct``), a Hugging Face id or a folder.
    seed: global seed for sampling and data construction.
    device: ``auto`` (CUDA if present, else CPU), ``cpu`` or ``cuda``.
    dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
    decodings: the named decodings every length measurement runs under (:mod:`lwlib.decodings`; default: the
        paper's alone).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .runs import REPO_ROOT

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
TOP_LEVEL = {"name", "description", "model", "seed", "device", "dtype", "decodings"}
T = TypeVar("T")


def default_run_root() -> Path:
    """``$LWLIB_RUNS`` if set, else ``runs/`` in the repository."""
    return Path(os.environ.get("LWLIB_RUNS", REPO_ROOT / "runs"))


def default_figures_root() -> Path:
    """``$LWLIB_FIGURES`` if set, else ``figures/`` in the repository."""
    return Path(os.environ.get("LWLIB_FIGURES", REPO_ROOT / "figures"))


@dataclass
class Profile:
    """A loaded profile. ``data`` is the resolved YAML (overrides applied)."""

    name: str
    source: Path
    data: dict[str, Any]
    run_root: Path = field(default_factory=default_run_root)

    @property
    def model(self) -> str:
        return self.data["model"]

    @property
    def seed(self) -> int:
        return int(self.data.get("seed", 0))

    @property
    def device(self) -> str:
        return self.data.get("device", "auto")

    @property
    def dtype(self) -> str:
        return self.data.get("dtype", "auto")

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    def stage_dir(self, stage: str) -> Path:
        """``<run_root>/<profile>/<stage>``, created."""
        p = self.run_dir / stage
        p.mkdir(parents=True, exist_ok=True)
        return p

    def figures_dir(self, root: str | Path | None = None) -> Path:
        """``<figures_root>/<profile>``, created (figures of each profile kept apart)."""
        p = Path(root or default_figures_root()) / self.name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def section(self, key: str, cls: type[T]) -> T:
        """Build the dataclass ``cls`` from the profile's ``key`` section (missing section: defaults)."""
        raw = self.data.get(key) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{self.source}: section {key!r} must be a mapping, got {type(raw).__name__}")
        return from_dict(cls, raw, where=f"{self.source}: {key}")

    def resolved(self) -> dict[str, Any]:
        """The full resolved profile, for manifests."""
        return {"profile": self.name, "source": str(self.source), **copy.deepcopy(self.data)}


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "") -> T:
    """Construct dataclass ``cls`` from ``raw``; unknown fields raise an error naming ``where.field``.

    Nested dataclass fields are built recursively from nested mappings.
    """
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; {cls.__name__} has {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in raw.items():
        t = hints.get(k)
        if is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v, where=f"{where}.{k}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {dotted!r}: {k!r} is not a section")
    d[keys[-1]] = value


def load_profile(
    name_or_path: str | Path,
    overrides: dict[str, Any] | None = None,
    run_root: str | Path | None = None,
) -> Profile:
    """Load a built-in profile by name (``smoke``/``gpu``/``paper``) or a YAML file by path.

    ``overrides`` maps dotted keys to values (``{"probe.lengths": [1000]}``), applied after loading,
    so notebooks and tests can shrink a profile without a new file.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        source = p
    else:
        source = PROFILE_DIR / f"{name_or_path}.yaml"
        if not source.exists():
            avail = sorted(x.stem for x in PROFILE_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"no profile {name_or_path!r}; built-in profiles: {avail}")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a profile must be a mapping")
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    for k, v in data.items():
        if k not in TOP_LEVEL and not isinstance(v, dict):
            raise ValueError(f"{source}: {k!r} is neither a top-level field {sorted(TOP_LEVEL)} nor a section")
    if "model" not in data:
        raise ValueError(f"{source}: missing field 'model'")
    name = data.setdefault("name", source.stem)  # the run folder is <run_root>/<name> (README, "Run folder")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{source}: field 'name' must be a plain folder name (the run folder), got {name!r}")
    return Profile(name=name, source=source, data=data, run_root=Path(run_root) if run_root else default_run_root())


def asdict(cfg: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` that also accepts plain dicts (for manifests)."""
    return dataclasses.asdict(cfg) if is_dataclass(cfg) else dict(cfg)
