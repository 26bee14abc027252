"""Generation throughput of the local backend: plain ``generate`` vs static KV cache + torch.compile.

Every stage that generates (probe, AgentWrite, DPO sampling, LongBench-Write) goes through
``lwlib.backends.LocalBackend``; this measures its tokens/s at several batch sizes, each output forced
to exactly ``--new-tokens`` tokens (``ignore_eos``), after one untimed warm-up call per setting (which
also pays for compilation). It also checks that the fast path decodes the same tokens as plain
``generate`` under greedy decoding.

Usage (GPU)::

    python benchmarks/generation.py --batch-sizes 1 8 64 256 --new-tokens 512 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lwlib.backends import GenParams, LocalBackend
from lwlib.data import load_ruler
from lwlib.models import load_model


def run(args: argparse.Namespace) -> dict:
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = [it.prompt for it in load_ruler()]
    modes = {
        "plain": dict(),
        "static+compile": dict(cache_implementation="static", compile=True),
    }
    modes = {k: v for k, v in modes.items() if k in args.modes}
    rows, texts = [], {}
    check_model = model if args.check_dtype == args.dtype else load_model(args.model, args.device, args.check_dtype)[0]
    for mode, kw in modes.items():
        # greedy agreement check on real prompts (outputs may stop early at the end token)
        if args.check_tokens:
            chk = LocalBackend(check_model, tok, name=args.model, batch_size=8, **kw)
            g = chk.generate(prompts[:8], GenParams(max_new_tokens=args.check_tokens, temperature=0))
            texts[mode] = [x.text for x in g]
        be = LocalBackend(model, tok, name=args.model, **kw)
        for b in args.batch_sizes:
            be.batch_size = b
            batch = [prompts[i % len(prompts)] for i in range(b)]
            p = GenParams(max_new_tokens=args.new_tokens, temperature=0.5, ignore_eos=True, seed=0)
            be.generate(batch, p)  # warm-up / compile
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = be.generate(batch, p)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            ntok = sum(x.completion_tokens for x in out)
            rows.append({"mode": mode, "batch": b, "new_tokens": args.new_tokens, "tokens": ntok,
                         "seconds": round(dt, 3), "tokens_per_s": round(ntok / dt, 1),
                         "ms_per_step": round(1000 * dt / args.new_tokens, 2)})
            print(json.dumps(rows[-1]), flush=True)
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["mode"] == "plain"}
    for r in rows:
        r["speedup_vs_plain"] = round(r["tokens_per_s"] / base[r["batch"]], 2) if r["batch"] in base else None
    same = None
    if "plain" in texts and "static+compile" in texts:
        same = sum(a == b for a, b in zip(texts["plain"], texts["static+compile"]))
    return {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "model": args.model, "dtype": str(model.dtype), "rows": rows,
            "greedy_identical": f"{same}/8" if same is not None else None, "check_dtype": args.check_dtype,
            "check_tokens": args.check_tokens,
            "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--check-tokens", type=int, default=128, help="greedy agreement check length (0 = skip)")
    ap.add_argument("--check-dtype", default="float32", help="dtype of the greedy agreement check")
    ap.add_argument("--modes", nargs="+", default=["plain", "static+compile"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = run(args)
    print(f"\n{'mode':<16}{'batch':>6}{'tokens/s':>12}{'ms/step':>10}{'speedup':>9}")
    for r in res["rows"]:
        print(f"{r['mode']:<16}{r['batch']:>6}{r['tokens_per_s']:>12.1f}{r['ms_per_step']:>10.2f}{r['speedup_vs_plain'] or 0:>9.2f}")
    print(f"greedy outputs identical (plain vs static+compile, {res['check_dtype']}, {res['check_tokens']} tokens): "
          f"{res['greedy_identical']}  [{res['device']}, timing dtype {res['dtype']}]")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
