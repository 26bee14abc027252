"""Named decodings: every length measurement runs under the same named decodings for every model.

The paper decodes at temperature 0.5 with no penalty. A 135M model decoded that way falls into verbatim loops and
runs on to the token limit (92-96% of its outputs, whatever its SFT data), so its output length cannot follow
anything. The small-model profiles therefore measure every length (ruler probe, LongBench-Write, DPO sampling)
under two decodings, applied identically to every model, and every table and figure legend names the decoding:

* ``paper``: temperature 0.5, no penalty (the paper's);
* ``loopfree``: the same temperature plus a repetition penalty on the tokens of the model's own recent output
  (:class:`lwlib.backends.GenParams` ``repetition_penalty`` / ``repetition_window``: only generated tokens, never
  the prompt or the end-of-turn token, so the model can still stop). The profile says which values and why.

A profile lists them at the top level (the paper profile lists the paper's decoding only; no ``decodings`` field
means the paper's)::

    decodings:
      - {name: paper, temperature: 0.5}
      - {name: loopfree, temperature: 0.5, repetition_penalty: 1.2, repetition_window: 256}

Usage::

    for dec in profile_decodings(prof):
        params = dec.params(max_new_tokens=7168, seed=prof.seed)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .backends import GenParams
from .typed import from_dict


@dataclass(frozen=True)
class Decoding:
    """One named decoding.

    Fields:
        name: short label used in folder names, tables and legends (letters, digits, ``_``, ``-``).
        temperature: sampling temperature (0 = greedy; the paper: 0.5).
        top_p: nucleus mass (1.0 = off, as the paper's evaluation).
        repetition_penalty: CTRL-style penalty on tokens the model already generated (1.0 = off).
        repetition_window: only the last N generated tokens are penalized (0 = all of them).
        max_new_tokens: a token budget for this decoding below the stage's (null = the stage's): e.g. the
            paper's decoding on a small model, whose outputs loop to any limit (a looped output's effective length
            is known at any budget; one still writing at the limit is censored, and the tables say so).
        note: one line saying what the decoding is for (shown in tables).
    """

    name: str
    temperature: float = 0.5
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    repetition_window: int = 0
    max_new_tokens: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"decodings: name {self.name!r} must be letters, digits, '_' or '-'")
        if self.temperature < 0:
            raise ValueError(f"decodings.{self.name}.temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"decodings.{self.name}.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_window < 0:
            raise ValueError(f"decodings.{self.name}.repetition_window must be >= 0, got {self.repetition_window}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"decodings.{self.name}.max_new_tokens must be a positive integer or null, "
                             f"got {self.max_new_tokens!r}")

    def params(self, max_new_tokens: int, seed: int | None = 0) -> GenParams:
        """The backend settings of this decoding for one stage's token budget (lowered to the decoding's own)."""
        if self.max_new_tokens is not None:
            max_new_tokens = min(max_new_tokens, self.max_new_tokens)
        kw: dict[str, Any] = {"repetition_penalty": self.repetition_penalty}
        if self.repetition_window:
            kw["repetition_window"] = self.repetition_window
        return GenParams(max_new_tokens, self.temperature, self.top_p, seed=seed, **kw)

    def as_dict(self) -> dict[str, Any]:
        """The fields (``max_new_tokens`` only when set: stores made before it existed keep their fingerprint)."""
        d = dataclasses.asdict(self)
        if d["max_new_tokens"] is None:
            del d["max_new_tokens"]
        return d


PAPER = Decoding("paper", temperature=0.5, note="the paper's: temperature 0.5, no penalty")


def parse_decodings(raw: Any, where: str = "decodings") -> list[Decoding]:
    """Decodings from a profile's ``decodings`` list (mappings with the :class:`Decoding` fields)."""
    if raw is None:
        return [PAPER]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: must be a non-empty list of mappings with a 'name'")
    out = []
    for k, d in enumerate(raw):
        if not isinstance(d, dict) or "name" not in d:
            raise ValueError(f"{where}[{k}]: must be a mapping with a 'name'")
        out.append(from_dict(Decoding, d, where=f"{where}[{k}]"))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: names must be unique, got {names}")
    return out


def profile_decodings(prof: Any) -> list[Decoding]:
    """The profile's decodings (the paper's alone when the profile lists none)."""
    return parse_decodings(prof.data.get("decodings"), where=f"{prof.source}: decodings")


def get_decoding(prof: Any, name: str | None) -> Decoding:
    """The profile's decoding called ``name`` (None: the first one)."""
    decs = profile_decodings(prof)
    if name is None:
        return decs[0]
    for d in decs:
        if d.name == name:
            return d
    raise ValueError(f"{prof.source}: no decoding {name!r}; the profile has {[d.name for d in decs]}")


def model_label(tag: str, decoding: Decoding | str) -> str:
    """``"<tag> (<decoding>)"``: how tables and legends name a model under a decoding."""
    return f"{tag} ({decoding if isinstance(decoding, str) else decoding.name})"


def rule_decoding(prof: Any) -> str:
    """The decoding whose verdicts are the claims' (``loopfree`` where the profile has it, else its first).

    Usage: ``rule_decoding(load_profile("gpu")) == "loopfree"``
    """
    names = [d.name for d in profile_decodings(prof)]
    return "loopfree" if "loopfree" in names else names[0]
