"""The slots engine on Gemma 3 on CUDA: CUDA-graph steps over ring buffers give the tokens of transformers'
``generate`` (fp32, greedy, the Triton decoding kernel and sdpa) on the tiny random Gemma 3 of
``test_decoding_windows`` (windows of 8 tokens) and on the real Gemma-3-270M (window 512; 8 ruler prompts x 700
tokens, so every ring wraps), with rows of both decodings in one batch; bf16 graphs equal eager steps; the engine's
exact kernels (Gemma's norms, lwlib.decode_norm; the RoPE, lwlib.decode_rope) equal transformers' bit for bit in
fp32 and bf16.
``./test.sh gpu`` (the real model where its weights are converted or ``LWLIB_GGUF_GEMMA3_270M`` is set)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from test_decoding_windows import CASES, END, SLOTS, prompts, reference, run, tiny_gemma3

from lwlib.backends import GenParams, LocalBackend
from lwlib.decoding import SlotConfig, SlotEngine
from lwlib.sampling import GenerationPenalty

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _quiet(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    bad = [str(w.message) for w in seen if "capture failed" in str(w.message) or "is off" in str(w.message)]
    assert not bad, bad
    return out


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_tiny_gemma3_graphs_equal_generate_fp32(attention):
    model = tiny_gemma3().cuda()
    ps, limits = prompts(), [m for _, m in CASES]
    want = reference(model, ps, limits)
    eng = SlotEngine(model, [END], 0, SlotConfig(**{**SLOTS.__dict__, "attention": attention}))
    assert _quiet(lambda: run(eng, ps, limits, GenParams(temperature=0))) == want
    assert eng.attention == attention and eng.stats.captures >= 2 and eng.stats.compactions >= 1
    assert eng.fused == "exact" and eng.exact_kernels == ("gemma_norm", "rope")  # auto on CUDA: bit-exact kernels
    pen = GenParams(temperature=0, repetition_penalty=1.5, repetition_window=6)
    mixed = _quiet(lambda: run(eng, ps + ps, limits + limits, [GenParams(temperature=0)] * 6 + [pen] * 6))
    assert mixed == want + reference(model, ps, limits, GenerationPenalty(1.5, 6, end_ids=[END]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norm_kernels_equal_the_eager_module_bit_for_bit(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from lwlib import decode_norm

    g = torch.Generator().manual_seed(0)
    for shape in [(192, 1, 640), (192, 1, 4, 256), (2, 3000, 640), (5, 1, 1, 256)]:
        x = (torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[0]).view(-1, *[1] * (len(shape) - 1)))
        norm = Gemma3RMSNorm(shape[-1], eps=1e-6)
        with torch.no_grad():
            norm.weight.normal_(0, 0.5, generator=g)
        x, norm = x.cuda().to(dtype), norm.cuda().to(dtype)
        with torch.no_grad():
            assert torch.equal(decode_norm.gemma_rms_norm(x, norm.weight, norm.eps), norm(x)), shape
    assert decode_norm.self_check("cuda", dtype, [640, 256]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_equals_transformers_bit_for_bit(dtype):
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    from lwlib import decode_rope

    g = torch.Generator().manual_seed(0)
    for b, t, heads, kv, d in [(192, 1, 4, 1, 256), (2, 3000, 4, 1, 256), (3, 17, 8, 2, 64)]:
        q = (torch.randn(b, t, heads, d, generator=g) * 4).to("cuda", dtype).transpose(1, 2)
        k = (torch.randn(b, t, kv, d, generator=g) * 4).to("cuda", dtype).transpose(1, 2)
        ang = torch.rand(b, t, d // 2, generator=g) * 3e4
        cos, sin = (f(torch.cat((ang, ang), -1)).to("cuda", dtype) for f in (torch.cos, torch.sin))
        for x, y in zip(decode_rope.apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
            assert torch.equal(x, y), (b, t, heads, kv, d)
    assert decode_rope.self_check("cuda", dtype, 4, 1, 256) is None


def _real_gemma_available() -> bool:
    from lwlib.models import BUNDLED, _package_file, cache_dir

    return bool(os.environ.get("LWLIB_GGUF_GEMMA3_270M")) or (cache_dir() / "models" / "gemma3-270m" /
                                                               "config.json").exists() or \
        all(_package_file(d, f) is not None for d, f in BUNDLED["gemma3-270m"].chunks)


@pytest.mark.skipif(not _real_gemma_available(), reason="gemma3-270m not installed or converted")
def test_real_gemma3_slots_equal_generate_past_the_window():
    from lwlib.data import load_ruler
    from lwlib.models import load_model

    model, tok = load_model("gemma3-270m", device="cuda", dtype="float32")
    ruler = [it.prompt for it in load_ruler()][:8]
    p = GenParams(max_new_tokens=700, temperature=0, ignore_eos=True)  # 700 > 512: every ring wraps
    want = LocalBackend(model, tok, batch_size=8, name="g").generate(ruler, p)
    be = LocalBackend(model, tok, name="g", engine="slots", max_batch=8, segment_tokens=64)
    got = _quiet(lambda: be.generate(ruler, p))
    same = sum(a.text == b.text for a, b in zip(got, want))
    assert be.slot_engine.attention == "triton" and be.slot_engine.windows[:6] == [512] * 5 + [None]
    assert be.slot_engine.fused == "exact" and be.slot_engine.exact_kernels == ("gemma_norm", "rope")
    assert same >= 7, [next((k for k, (x, y) in enumerate(zip(a.text, b.text)) if x != y), None)
                       for a, b in zip(got, want)]  # fp32 kernels may differ in the last bit
    # bf16: graphs equal eager steps, rows of both decodings in one batch
    model = model.to(torch.bfloat16)
    dec = [GenParams(temperature=0), GenParams(temperature=0, repetition_penalty=1.15, repetition_window=512)] * 4
    kw = {"name": "g", "engine": "slots", "max_batch": 8, "segment_tokens": 64}
    graphs = _quiet(lambda: LocalBackend(model, tok, **kw).generate(ruler, dec, max_new_tokens=[600] * len(ruler)))
    eager = LocalBackend(model, tok, cuda_graphs=False, **kw).generate(ruler, dec, max_new_tokens=[600] * len(ruler))
    assert [g.text for g in graphs] == [g.text for g in eager]
