"""Generation stages timed end to end at the sizes of issue 17's targets, through the stages' own code.

- ``agentwrite``: notebook 02's :func:`lwlib.agentwrite.build_dataset` (plan, then paragraph by paragraph,
  every round one backend call) for ``--aw-instructions`` generated instructions of ``--aw-words`` words
  (target: 400 instructions of 2,000-6,000 words in at most 5 minutes on one H200).
- ``probe``: notebook 01's :func:`lwlib.probe.probe_decodings` of the base model, the 48 LongWrite-Ruler prompts x
  ``--probe-samples`` samples of up to ``--probe-tokens`` tokens under the paper's decoding (target: 192 outputs
  of up to 7,168 tokens in at most 2 minutes).

Each stage runs in a fresh run folder (nothing resumed) with the profile's backend (``--profile``, default
``gpu``: the slots engine) and ``--set`` overrides; the row records wall seconds (model loading excluded, CUDA-graph
capture and Triton compilation included), outputs, tokens, the share that hit the token limit, and the slots
engine's counters (decoding steps, ms per step, prefill and capture seconds, batch occupancy).

Usage::

    python benchmarks/stages.py                       # GPU: both stages at the target sizes
    python benchmarks/stages.py --tiny                # CPU smoke test (smoke profile, tiny sizes)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lwlib.backends import make_backend, release
from lwlib.config import load_profile, parse_sets
from lwlib.runs import atomic_write_json, git_sha, library_versions

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_S = {"agentwrite": 300.0, "probe": 120.0}  # issue 17, one H200


def _engine_counters(be, before: dict | None) -> dict:
    eng = getattr(be, "slot_engine", None)
    if eng is None:
        return {}
    after = eng.stats.as_dict()
    d = {k: after[k] - (before or {}).get(k, 0) for k in after if isinstance(after[k], (int, float))}
    steps = max(d["steps"], 1)
    return {"attention": eng.attention, "fused": eng.fused_label, "steps": d["steps"], "ms_per_step": round(1000 * d["decode_s"] / steps, 3),
            "decode_s": round(d["decode_s"], 2), "prefill_s": round(d["prefill_s"], 2),
            "capture_s": round(d["capture_s"], 2), "captures": d["captures"],
            "occupancy": round(d["active_steps"] / max(d["slot_steps"], 1), 3)}


def run_agentwrite(args, root: Path) -> dict:
    from lwlib.agentwrite import AgentWriteConfig, build_dataset, load_agentwrite_instructions

    lo, hi = args.aw_words
    prof = load_profile(args.profile, {"agentwrite.n_instructions": args.aw_instructions, "agentwrite.min_words": lo,
                                       "agentwrite.max_words": hi, "agentwrite.heldout": 0, **args.overrides}, root)
    cfg = prof.section("agentwrite", AgentWriteConfig)
    insts = load_agentwrite_instructions(prof, cfg)
    be = make_backend(cfg.backend, prof.model, prof.device, prof.dtype)
    t0 = time.perf_counter()
    res = build_dataset(prof, cfg, backend=be, instructions=insts)
    wall = time.perf_counter() - t0
    steps = [s for it in res.items for s in it.get("steps") or []]
    row = {"stage": "agentwrite", "instructions": len(insts), "words": [lo, hi], "seconds": round(wall, 1),
           "kept": sum(it["split"] != "dropped" for it in res.items), "paragraphs": len(steps),
           "tokens_out": sum(int(it.get("tokens_out") or 0) for it in res.items),
           "hit_limit": round(sum(bool(s.get("hit_limit")) for s in steps) / max(len(steps), 1), 3),
           **_engine_counters(be, None)}
    release(be)
    return row


def run_probe(args, root: Path) -> dict:
    from lwlib.decodings import profile_decodings
    from lwlib.probe import ProbeConfig, probe_decodings

    prof = load_profile(args.profile, {"probe.samples_per_prompt": args.probe_samples,
                                       "probe.max_new_tokens": args.probe_tokens, **args.overrides}, root)
    cfg = prof.section("probe", ProbeConfig)
    dec = profile_decodings(prof)[0]  # the paper's
    be = make_backend(cfg.backend, prof.model, prof.device, prof.dtype)
    t0 = time.perf_counter()
    df = probe_decodings(prof, prof.model, "base", [dec], cfg, be)[dec.name]
    wall = time.perf_counter() - t0
    row = {"stage": "probe", "decoding": dec.name, "outputs": len(df), "max_new_tokens": args.probe_tokens,
           "seconds": round(wall, 1), "tokens_out": int(df["tokens"].sum()),
           "hit_limit": round(float(df["hit_limit"].mean()), 3), **_engine_counters(be, None)}
    release(be)
    return row


RUNNERS = {"agentwrite": run_agentwrite, "probe": run_probe}
TINY = {"profile": "smoke", "aw_instructions": 2, "aw_words": (300, 600), "probe_samples": 1, "probe_tokens": 8}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", default=list(RUNNERS), help=f"of {list(RUNNERS)} (default: all)")
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="profile override (YAML value), e.g. --set agentwrite.backend.attention=sdpa")
    ap.add_argument("--aw-instructions", type=int, default=400)
    ap.add_argument("--aw-words", type=int, nargs=2, default=(2000, 6000))
    ap.add_argument("--probe-samples", type=int, default=4)
    ap.add_argument("--probe-tokens", type=int, default=7168)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the smoke profile at tiny sizes")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/stages_<device>.json)")
    args = ap.parse_args(argv)
    if set(args.stages) - set(RUNNERS):
        ap.error(f"unknown stages {sorted(set(args.stages) - set(RUNNERS))}: choose from {list(RUNNERS)}")
    if args.tiny:
        defaults = {a.dest: a.default for a in ap._actions}
        for k, v in TINY.items():
            if getattr(args, k) == defaults[k] or (isinstance(v, tuple) and tuple(getattr(args, k)) == tuple(defaults[k])):
                setattr(args, k, v)
    args.overrides = parse_sets(args.sets)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = []
    for stage in args.stages:
        with tempfile.TemporaryDirectory(prefix=f"lwbench-{stage}-") as root:
            row = RUNNERS[stage](args, Path(root))
        row["target_s"] = TARGET_S[stage]
        row["met"] = None if args.tiny else row["seconds"] <= TARGET_S[stage]
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"device": device, "profile": args.profile, "overrides": args.overrides, "tiny": args.tiny,
           "versions": library_versions(), "git_sha": git_sha(), "rows": rows}
    out = Path(args.out) if args.out else RESULTS / (
        "stages_" + ("tiny" if args.tiny else device.split()[-1].lower()) + ".json")
    atomic_write_json(out, res)
    print(f"[{device}; written to {out}]")
    return res


if __name__ == "__main__":
    main()
