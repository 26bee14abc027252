"""Trial of Liger-Kernel's fused kernels for Gemma 3 in the slots engine (issue 28), which the engine does not use:
``lwlib.families`` marks only the llama family as exact under Liger. This script marks Gemma 3 so for one process
and patches the kernels named by ``--kernels`` (Liger's Gemma RMSNorm, GeGLU; the engine's RoPE swap comes with
either), then either times the decoding step (``decode``: ``benchmarks/generation.py`` with the arguments after
``--``) or checks greedy fp32 identity with transformers' ``generate`` on the tiny random Gemma 3 of
``tests/test_decoding_windows.py`` (``check``: rows equal, and where each row first differs). CUDA only.

Usage::

    python benchmarks/gemma3_liger_trial.py check --kernels rms_norm geglu
    python benchmarks/gemma3_liger_trial.py decode --kernels geglu -- --model gemma3-270m --random-init \\
        --tokenizer TOKENIZER_FOLDER --workloads decode --decode-batches 192 --decode-context 16384 \\
        --decode-tokens 64 --max-batch 192 --generate-tokens 0 --check-prompts 0 --fused-kernels liger --breakdown
"""

from __future__ import annotations

import argparse
import dataclasses
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("rms_norm", "geglu")


def mark_gemma3(kernels: list[str]) -> None:
    """Mark the Gemma 3 family as exact under Liger for this process, with only ``kernels`` patched."""
    import lwlib.families as families
    import lwlib.training as training

    families.FAMILIES = tuple(dataclasses.replace(f, liger=True) if f.name == "gemma3" else f
                              for f in families.FAMILIES)
    chosen = training.liger_kernels_for
    training.liger_kernels_for = lambda model: {**chosen(model), **{k: k in kernels for k in KERNELS}}


def check() -> list[dict]:
    """Greedy fp32 rows of the engine with the marked kernels against ``generate`` on the tiny random Gemma 3."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_decoding_windows import CASES, END, SLOTS, prompts, reference, run, tiny_gemma3

    from lwlib.backends import GenParams
    from lwlib.decoding import SlotConfig, SlotEngine

    model = tiny_gemma3().cuda()
    ps, limits = prompts(), [m for _, m in CASES]
    want = reference(model, ps, limits)  # (before the engine patches the model)
    eng = SlotEngine(model, [END], 0, SlotConfig(**{**SLOTS.__dict__, "attention": "triton",
                                                     "fused_kernels": "liger"}))
    got = run(eng, ps, limits, GenParams(temperature=0))
    return [{"equal": a == b, "first_difference": next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)}
            for a, b in zip(got, want)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["check", "decode"])
    ap.add_argument("--kernels", nargs="*", choices=KERNELS, default=list(KERNELS))
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    mark_gemma3(args.kernels)
    if args.what == "check":
        rows = check()
        print(f"kernels {args.kernels}: {sum(r['equal'] for r in rows)} of {len(rows)} rows equal; first differences "
              f"{[r['first_difference'] for r in rows]}")
    else:
        sys.argv = ["generation.py", *rest]
        runpy.run_path(str(ROOT / "benchmarks" / "generation.py"), run_name="__main__")


if __name__ == "__main__":
    main()
