"""Gemma's RMSNorm in three kernels (lwlib.decode_norm): the eager module's bits in fp32 (on CPU in Triton's
interpreter, which tests/conftest.py switches on; on CUDA compiled: tests/test_decoding_windows_gpu.py), the class
swap that the slots engine uses, and the engine's greedy tokens with its exact kernels (these and
lwlib.decode_rope's) equal to ``generate``'s."""

from __future__ import annotations

import pytest
import torch
from test_decoding_windows import END, SLOTS, prompts, reference, run, tiny_gemma3

from lwlib import decode_norm as dn
from lwlib.backends import GenParams
from lwlib.decoding import SlotConfig, SlotEngine

pytestmark = pytest.mark.skipif(not dn.available("cpu"), reason="needs Triton's interpreter (CPU machines)")


@pytest.mark.parametrize("shape", [(192, 1, 640), (192, 1, 4, 256), (3, 17, 64), (1, 1, 5)])
def test_fp32_equals_the_eager_module_bit_for_bit(shape):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(len(shape))
    scale = torch.logspace(-4, 4, shape[0]).view(-1, *[1] * (len(shape) - 1))
    x = torch.randn(*shape, generator=g) * scale
    norm = Gemma3RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5, generator=g)
        want = norm(x)
    got = dn.gemma_rms_norm(x, norm.weight.detach(), norm.eps)
    assert torch.equal(got, want)
    assert torch.equal(dn.gemma_rms_norm_reference(x, norm.weight.detach(), norm.eps), want)


def test_bf16_within_the_interpreters_truncation():
    x = torch.randn(8, 1, 64).to(torch.bfloat16)
    w = (torch.randn(64) * 0.5).to(torch.bfloat16)
    got, want = dn.gemma_rms_norm(x, w, 1e-6), dn.gemma_rms_norm_reference(x, w, 1e-6)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0)
    assert dn.self_check("cpu", torch.bfloat16, [64, 16]) is None and dn.self_check("cpu", torch.float32, [640]) is None


def test_bad_input_is_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="contiguous"):
        dn.gemma_rms_norm(x.t(), torch.zeros(4), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        dn.gemma_rms_norm(x, torch.zeros(5), 1e-6)


def test_the_swap_covers_every_norm_and_is_undone():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    model = tiny_gemma3()
    own = Gemma3RMSNorm.forward
    calls = []
    with dn.gemma_norms(model) as n:
        assert n == 4 * 6 + 1  # six per layer (input, post-attention, pre- and post-MLP, query, key), the last
        swapped = Gemma3RMSNorm.forward
        assert swapped is not own
        Gemma3RMSNorm.forward = lambda self, x: calls.append(1) or swapped(self, x)
        with torch.no_grad():
            inside = model(torch.tensor([[2, 5, 9, 11]])).logits
        Gemma3RMSNorm.forward = swapped
    assert Gemma3RMSNorm.forward is own and len(calls) == 4 * 6 + 1
    with torch.no_grad():
        assert torch.equal(inside, model(torch.tensor([[2, 5, 9, 11]])).logits)


def test_engine_with_its_exact_kernels_equals_generate():
    """``fused_kernels: exact`` on the tiny Gemma 3 (CPU: Triton's interpreter): the norm and RoPE kernels are used,
    and greedy fp32 tokens equal ``generate``'s, rings wrapping."""
    model = tiny_gemma3()
    ps, limits = prompts(5)[:2], [30, 17]
    want = reference(model, ps, limits)
    eng = SlotEngine(model, [END], 0, SlotConfig(**{**SLOTS.__dict__, "fused_kernels": "exact"}))
    assert eng.fused == "exact" and eng.exact_kernels == ("gemma_norm", "rope")
    assert eng.fused_label == "exact:gemma_norm+rope"
    assert run(eng, ps, limits, GenParams(temperature=0)) == want
    auto = SlotEngine(model, [END], 0, SLOTS)  # auto on CPU: none
    assert auto.fused == "none" and auto.fused_label == "none"


def test_exact_is_refused_for_other_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=64)
    with pytest.raises(ValueError, match="'exact' is exact for the families \\['gemma3'\\], not 'llama'"):
        SlotEngine(LlamaForCausalLM(cfg).eval(), [1], 0, SlotConfig(max_batch=2, fused_kernels="exact"))
