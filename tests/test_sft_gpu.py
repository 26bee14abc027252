"""SFT on CUDA, through the trainer's own ``compute_loss``: ``sft.liger_kernel`` (Liger-Kernel's fused kernels and
fused linear cross-entropy), ``attn_implementation: torch_varlen`` (PyTorch's FlashAttention varlen kernel on
flattened packs) and ``fa4_varlen`` (FlashAttention-4's kernels, flash-attn-4 on Hopper/Blackwell) give the loss
and gradients of the plain path; the compiled loss equals the eager one. ``./test.sh gpu``."""

import copy
import importlib.util
import itertools
import json

import pytest
import torch

from lwlib.attention import (FA4_ATTENTION, VARLEN_ATTENTION, _varlen_reference, fa4_attention_forward, fa4_available,
                             varlen_attention_forward, varlen_available)
from lwlib.config import load_profile
from lwlib.losses import compiled_sft_loss, sft_loss, trainer_class
from lwlib.models import load_model
from lwlib.packing import PackCollator, PackedDataset, split_batch, tokenize_chat, training_template
from lwlib.sft import SFTConfig, load_train_log, train_sft
from lwlib.training import use_liger
from conftest import MODEL
from test_sft import CONVS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# the flattened-pack attention implementations, each skipped where its kernel cannot run
FLAT_ATTN = [
    pytest.param(VARLEN_ATTENTION, marks=pytest.mark.skipif(not varlen_available(),
                                                            reason="needs torch.nn.attention.varlen (PyTorch 2.10+)")),
    pytest.param(FA4_ATTENTION, marks=pytest.mark.skipif(not fa4_available(),
                                                         reason="needs flash-attn-4 and a Hopper/Blackwell GPU")),
]
FORWARD = {VARLEN_ATTENTION: varlen_attention_forward, FA4_ATTENTION: fa4_attention_forward}


def _cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def _batches(tok, packs: list[list[int]], flatten: bool = False) -> list[dict]:
    """One collated batch per pack of the ``CONVS`` conversations (indices into ``CONVS``)."""
    template = training_template(tok)
    ds = PackedDataset([tokenize_chat(tok, c, template) for c in CONVS], packs)
    coll = PackCollator(pad_id=tok.pad_token_id, flatten=flatten)
    return [coll([ds[k]]) for k in range(len(packs))]


def _loss_and_grads(model, batches, mode, liger, tmp_path, autocast):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             report_to=[], bf16=autocast)
    trainer = trainer_class()(model=model, args=args, loss_mode=mode, liger=liger)
    got, denom = trainer.get_batch_samples(iter(batches), 2, torch.device("cuda"))
    model.zero_grad()
    total = 0.0
    for b in got:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = trainer.compute_loss(model, _cuda(b), num_items_in_batch=denom)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.skipif(not importlib.util.find_spec("liger_kernel"), reason="needs liger-kernel")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_liger_loss_and_gradients_equal_the_plain_path(tmp_path, autocast):
    model, tok = load_model(MODEL, device="cuda", dtype="float32")
    batches = _batches(tok, [[0, 1], [2, 3]])
    plain = {m: _loss_and_grads(model, batches, m, False, tmp_path, autocast) for m in ("token", "sequence")}
    fused = copy.deepcopy(model)
    use_liger(fused)
    assert fused.model.layers[0].mlp._get_name() == "LigerSwiGLUMLP"  # the kernels are really in use
    assert model.model.layers[0].mlp._get_name() == "LlamaMLP"  # only the patched instance changed
    assert load_model(MODEL, device="cpu", dtype="float32")[0].model.layers[0].mlp._get_name() == "LlamaMLP"
    for mode in ("token", "sequence"):
        loss, grads = _loss_and_grads(fused, batches, mode, True, tmp_path, autocast)
        want, want_g = plain[mode]
        tol = 2e-2 if autocast else 1e-4
        assert abs(loss - want) <= tol * abs(want), (mode, loss, want)
        for name, g in want_g.items():
            cos = torch.nn.functional.cosine_similarity(g.flatten().double(), grads[name].flatten().double(), dim=0)
            assert cos > (0.99 if autocast else 0.9999), (mode, name, float(cos))


@pytest.mark.parametrize("attn", FLAT_ATTN)
def test_varlen_kernel_equals_per_sequence_attention(attn):
    """The CUDA kernel path of ``torch_varlen`` / ``fa4_varlen`` (bf16) against per-sequence causal attention in
    fp32 on the same inputs, with GQA (9 query heads, 3 key/value heads, as SmolLM2) and boundaries on and off
    block edges: outputs within bf16 rounding, gradients of query, key and value with cosine > 0.999. A sequence
    boundary crossed, a lost causal mask or a wrong head order gives errors of order 1."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [1, 127, 128, 300, 1000, 7, 465, 191]
    t, cu = sum(lens), torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, h, t, 64, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
               for h in (9, 3, 3))
    out, _ = FORWARD[attn](None, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=max(lens))
    assert out.shape == (1, t, 9, 64) and out.dtype == torch.bfloat16
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = _varlen_reference(*(x[0].transpose(0, 1) for x in ref_in), cu.cpu(), 0.125, 3).unsqueeze(0)
    assert (out.float() - ref).abs().max().item() < 2e-2
    grad = torch.randn(out.shape, device="cuda", generator=g)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for x, r in zip((q, k, v), ref_in):
        cos = torch.nn.functional.cosine_similarity(x.grad.flatten().double(), r.grad.flatten().double(), dim=0)
        assert cos > 0.999, float(cos)


@pytest.mark.parametrize("attn", FLAT_ATTN)
def test_varlen_training_loss_and_gradients_equal_sdpa(tmp_path, attn):
    """Through the trainer's ``compute_loss`` on flattened packs, bf16 autocast as the trainer runs on CUDA:
    ``torch_varlen`` / ``fa4_varlen`` give the loss and gradients of sdpa with transformers' block-diagonal mask
    (bf16 noise differs between the kernels: loss within 1%, all gradients together cosine > 0.99)."""
    model, tok = load_model(MODEL, device="cuda", dtype="float32")
    batches = _batches(tok, [[0, 1], [2, 3]], flatten=True)
    want, want_g = _loss_and_grads(model, batches, "token", False, tmp_path, True)
    varlen = copy.deepcopy(model)
    varlen.set_attn_implementation(attn)
    got, got_g = _loss_and_grads(varlen, batches, "token", False, tmp_path, True)
    assert abs(got - want) <= 1e-2 * abs(want), (got, want)
    flat = lambda gs: torch.cat([gs[n].flatten().double() for n in sorted(want_g)])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(want_g), flat(got_g), dim=0) > 0.99


@pytest.mark.skipif(not varlen_available(), reason="needs torch.nn.attention.varlen (PyTorch 2.10+)")
def test_compiled_varlen_training_lowers_loss(tmp_path):
    """``sft.torch_compile`` on CUDA: ``attn_implementation: auto`` resolves to a flattened-pack kernel
    (``fa4_varlen`` where flash-attn-4 runs, else ``torch_varlen``), the compiled model and loss train on
    flattened packs (all data in one pack: the loss must fall) and the manifest says so."""
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = SFTConfig(packing_length=1024, batch_size=1, per_device_batch_size=1, learning_rate=1e-4, max_steps=4,
                    warmup_ratio=0.0, gradient_checkpointing=False, general_data="none", torch_compile=True,
                    liger_kernel=False)
    out = train_sft(prof, cfg, data=CONVS * 2)
    log = load_train_log(out)
    assert len(log) == 4 and log["loss"].iloc[-1] < log["loss"].iloc[0]
    manifest = json.loads((out.parent / "manifest.json").read_text())["config"]
    want = FA4_ATTENTION if fa4_available() else VARLEN_ATTENTION
    assert manifest["attn_implementation"] == want and manifest["sft"]["torch_compile"]


@pytest.mark.parametrize("attn", FLAT_ATTN)
def test_compiled_varlen_forward_equals_eager(attn):
    """torch.compile keeps the flattened-pack kernels' semantics (causal, per sequence): the compiled model's
    logits on flattened packs equal the eager model's, for two packs of different lengths (dynamic shapes)."""
    model, tok = load_model(MODEL, device="cuda", dtype="float32")
    model.set_attn_implementation(attn)
    compiled = torch.compile(model, dynamic=None)
    for k, batch in enumerate(_batches(tok, [[0, 1, 2], [3, 1]], flatten=True)):
        b = _cuda(split_batch(batch)[0])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            want = model(**b, use_cache=False).logits.float()
            got = compiled(**b, use_cache=False).logits.float()
        assert (got - want).abs().max().item() < 0.05 * want.abs().max().item(), k


def test_compiled_loss_equals_eager_loss():
    """``compiled_sft_loss`` (the loss under ``sft.torch_compile``) equals :func:`sft_loss` on bf16 logits, value
    and gradient, in both loss modes, for rows of three lengths (one compilation with dynamic shapes) with
    ignored targets among them."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (300, 1000, 777):
        logits = (3 * torch.randn(1, n, 49152, device="cuda", generator=g)).to(torch.bfloat16)
        labels = torch.randint(0, 49152, (1, n), device="cuda", generator=g)
        labels[:, ::7] = -100
        weights = torch.rand(1, n, device="cuda", generator=g)
        denom = (labels != -100).sum()
        for mode in ("token", "sequence"):
            a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            want = sft_loss(a, labels, denom, weights, mode)
            got = compiled_sft_loss()(b, labels, denom, weights, mode)
            want.backward()
            got.backward()
            assert torch.allclose(got, want, rtol=1e-4), (n, mode, float(got), float(want))
            assert (a.grad.float() - b.grad.float()).abs().max() <= 1e-2 * a.grad.float().abs().max(), (n, mode)
