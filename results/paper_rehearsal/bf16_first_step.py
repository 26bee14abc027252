"""Why DeepSpeed's bf16 mode trains less in its first step (results/paper_rehearsal/README.md, "On the CPU in bf16").

One AdamW step (lr 1e-4, no weight decay, gradients clipped to norm 1: the comparison's) from the same fp32 weights
on one batch of real text (2 x 256 tokens of an English book), taken two ways:
- ``plain``: as the plain run trains, fp32 weights under bf16 autocast (the gradients of fp32 weights);
- ``deepspeed_bf16``: as DeepSpeed's bf16 mode trains, the gradients of the model cast to bf16 (every operation in
  bf16: norms, residual stream, softmax, loss), applied to fp32 master weights made from the bf16 model (on the bf16
  grid), which are then rounded to bf16 for the forward;
- ``deepspeed_bf16_master_from_fp32``: the same with the master made from the fp32 weights (not what DeepSpeed does);
- ``plain_from_bf16_weights``: the plain run from the fp32 weights rounded to bf16 first (as a checkpoint stored in
  bf16, Llama-3.1-8B's, starts).
Then the loss of each on the trained batch (the comparison's data repeat) and on a second batch; the cosine
similarity of the two gradients and the share of entries whose signs agree (Adam's first step is about lr * sign),
overall and by kind of parameter; the share of bf16 values each step changed. No DeepSpeed needed: this is the
arithmetic each mode does, not the engines.

    python results/paper_rehearsal/bf16_first_step.py smollm2-135m-instruct [gemma3-270m] > bf16_first_step.jsonl
"""

import copy
import json
import sys

import torch

from lwlib.corpus import load_manifest, read_book, strip_gutenberg
from lwlib.models import load_model


def batches(tok, n_tokens=256, rows=2):
    book = next(b for b in load_manifest() if b.language == "en")
    text = strip_gutenberg(read_book(book))[20_000:60_000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    chunks = ids[: 2 * rows * n_tokens].view(2, rows, n_tokens)
    return chunks[0], chunks[1]


def loss(model, ids, bf16_weights: bool) -> float:
    with torch.no_grad():
        if bf16_weights:  # a rounded copy: the fp32 weights stay as they are
            return copy.deepcopy(model).to(torch.bfloat16)(input_ids=ids, labels=ids).loss.float().item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids).loss.float().item()


def grads(model, ids, pure_bf16: bool) -> dict[str, torch.Tensor]:
    m = copy.deepcopy(model)
    if pure_bf16:
        m.to(torch.bfloat16)
    m.train()
    if pure_bf16:
        m(input_ids=ids, labels=ids).loss.backward()
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(input_ids=ids, labels=ids).loss.backward()
    return {k: p.grad.float() for k, p in m.named_parameters() if p.grad is not None}


def step(model, g: dict[str, torch.Tensor], lr: float):
    """One AdamW step of ``model``'s fp32 weights (a copy) with the gradients ``g``, clipped to norm 1."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    for k, p in params.items():
        p.grad = g[k].clone() if k in g else None
    torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], 1.0)
    torch.optim.AdamW([p for p in params.values() if p.grad is not None], lr=lr, weight_decay=0.0).step()
    return m


def kind(name: str) -> str:
    return "norm" if "norm" in name else "embedding" if "embed" in name else "linear"


def main(name: str, lr: float = 1e-4) -> dict:
    torch.manual_seed(0)
    model, tok = load_model(name, device="cpu", dtype="float32")
    a, b = batches(tok)
    rec = {"model": name, "lr": lr, "batch": list(a.shape),
           "untrained": {"trained_batch": loss(model, a, False), "other_batch": loss(model, b, False)}}
    g_plain, g_bf16 = grads(model, a, False), grads(model, a, True)
    plain, ds = step(model, g_plain, lr), step(model, g_bf16, lr)
    rec["plain"] = {"trained_batch": loss(plain, a, False), "other_batch": loss(plain, b, False)}
    rec["deepspeed_bf16_master_from_fp32"] = {"trained_batch": loss(ds, a, True), "other_batch": loss(ds, b, True)}
    # DeepSpeed casts the model to bf16 before it builds its fp32 master copy: the master starts ON the bf16 grid,
    # so a step smaller than half a bf16 step of a weight leaves its bf16 value (the forward's) where it was; the
    # plain run's fp32 weights (here dequantized from a GGUF: off the grid) move their rounded value by the step on
    # average. The same start for the plain run: its fp32 weights rounded to bf16 first.
    grid = copy.deepcopy(model).to(torch.bfloat16).to(torch.float32)
    g_grid = grads(grid, a, True)
    ds_grid, plain_grid = step(grid, g_grid, lr), step(grid, grads(grid, a, False), lr)
    rec["deepspeed_bf16"] = {"trained_batch": loss(ds_grid, a, True), "other_batch": loss(ds_grid, b, True)}
    rec["plain_from_bf16_weights"] = {"trained_batch": loss(plain_grid, a, False),
                                      "other_batch": loss(plain_grid, b, False)}
    # which part matters: bf16 gradients with fp32 weights for the forward; fp32-weight gradients rounded to bf16
    rec["bf16_gradients_fp32_forward"] = {"trained_batch": loss(ds, a, False)}
    rec["plain_gradients_bf16_forward"] = {"trained_batch": loss(plain, a, True)}
    by = {}
    for k in g_plain:
        c = kind(k)
        x, y = g_plain[k].flatten(), g_bf16[k].flatten()
        d = by.setdefault(c, {"dot": 0.0, "xx": 0.0, "yy": 0.0, "agree": 0, "n": 0})
        d["dot"] += (x * y).sum().item()
        d["xx"] += (x * x).sum().item()
        d["yy"] += (y * y).sum().item()
        d["agree"] += (torch.sign(x) == torch.sign(y)).sum().item()
        d["n"] += x.numel()
    tot = {f: sum(d[f] for d in by.values()) for f in ("dot", "xx", "yy", "agree", "n")}
    rec["gradients"] = {c: {"cosine": round(d["dot"] / (d["xx"] * d["yy"]) ** 0.5, 4),
                            "sign_agreement": round(d["agree"] / d["n"], 4),
                            "norm_plain": round(d["xx"] ** 0.5, 4), "norm_bf16": round(d["yy"] ** 0.5, 4)}
                        for c, d in {**by, "all": tot}.items()}
    w0 = dict(model.named_parameters())
    moved = {}
    for tag, m in (("plain", plain), ("deepspeed_bf16", ds_grid)):
        ch = {}
        for k, p in m.named_parameters():
            c = kind(k)
            n, t = ch.get(c, (0, 0))
            ch[c] = (n + (p.detach().bfloat16() != w0[k].detach().bfloat16()).sum().item(), t + p.numel())
        moved[tag] = {c: round(n / t, 4) for c, (n, t) in ch.items()}
    rec["share_of_bf16_values_changed"] = moved
    return rec


if __name__ == "__main__":
    for n in sys.argv[1:]:
        print(json.dumps(main(n)), flush=True)
