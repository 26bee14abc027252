"""How far the first optimizer step of the CPU bf16 comparison moves SmolLM2's weights: the plain run (bf16 autocast)
against ZeRO-1 in DeepSpeed's bf16 mode, each one step of the comparison's SFT run (2 packs of 256 tokens, lr 1e-4,
tests/test_zero3.py's ``SFT_RUNS``), both saved; then, per kind of parameter, the share of bf16 values the step
changed (both models rounded to bf16: DeepSpeed saves its bf16 weights) and the summed |change|, against the base
model rounded to bf16. About 5 min per run on 2 cores.

    python results/paper_rehearsal/ds_first_step_smollm2.py OUT_DIR > ds_first_step_smollm2.json
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_sft import CONVS  # noqa: E402
from test_zero3 import SFT_RUNS, _profile  # noqa: E402

from lwlib.models import resolve_model  # noqa: E402
from lwlib.sft import train_sft  # noqa: E402


def kind(name: str) -> str:
    return "norm" if "norm" in name else "embedding" if "embed" in name else "linear"


def main(out: Path) -> dict:
    z3 = json.loads((Path(__file__).resolve().parents[2] / "env" / "ds_zero3.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "zero1.json").write_text(json.dumps({**z3, "zero_optimization": {"stage": 1}}))
    prof = _profile(out)
    for name, ds in (("plain", None), ("zero1", str(out / "zero1.json"))):
        if not (out / name / "model" / "model.safetensors").exists():
            train_sft(prof, dataclasses.replace(SFT_RUNS, bf16=True, max_steps=1, deepspeed=ds), data=CONVS * 3,
                      out_dir=out / name / "model")
    base = load_file(str(Path(resolve_model("smollm2-135m-instruct")) / "model.safetensors"))
    w = {n: load_file(str(out / n / "model" / "model.safetensors")) for n in ("plain", "zero1")}
    agg: dict[str, dict[str, float]] = {}
    for k, b in base.items():
        b16 = b.bfloat16().float()
        a = agg.setdefault(kind(k), {"n": 0})
        a["n"] += b.numel()
        for n in w:
            d = w[n][k].bfloat16().float() - b16
            a[f"changed_{n}"] = a.get(f"changed_{n}", 0) + (d != 0).sum().item()
            a[f"sum_abs_{n}"] = a.get(f"sum_abs_{n}", 0.0) + d.abs().sum().item()
    return {c: {"share_changed_plain": round(a["changed_plain"] / a["n"], 4),
                "share_changed_zero1": round(a["changed_zero1"] / a["n"], 4),
                "sum_abs_change_zero1_over_plain": round(a["sum_abs_zero1"] / a["sum_abs_plain"], 3)}
            for c, a in agg.items()}


if __name__ == "__main__":
    torch.manual_seed(0)
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
