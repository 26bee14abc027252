"""The RoPE of queries and keys in one kernel each (lwlib.decode_rope): transformers' ``apply_rotary_pos_emb`` bit
for bit in fp32 (on CPU in Triton's interpreter; on CUDA compiled: tests/test_decoding_windows_gpu.py), on the
transposed views the attention layers pass, and the module swap the slots engine uses."""

from __future__ import annotations

import pytest
import torch
from test_decoding_windows import tiny_gemma3

from lwlib import decode_rope as dr

pytestmark = pytest.mark.skipif(not dr.available("cpu"), reason="needs Triton's interpreter (CPU machines)")


def _inputs(b, t, heads, kv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, t, heads, d, generator=g) * 4).to(dtype).transpose(1, 2)  # as Gemma3Attention passes them
    k = (torch.randn(b, t, kv, d, generator=g) * 4).to(dtype).transpose(1, 2)
    ang = torch.rand(b, t, d // 2, generator=g) * 3e4
    return q, k, torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)


@pytest.mark.parametrize("shape", [(192, 1, 4, 1, 256), (2, 37, 4, 1, 16), (1, 5, 2, 2, 64)])
def test_fp32_equals_transformers_bit_for_bit(shape):
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    q, k, cos, sin = _inputs(*shape)
    got, want = dr.apply_rotary(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
    def layout(x):  # strides of the dimensions that have more than one element
        return [st for st, n in zip(x.stride(), x.shape) if n > 1]

    for x, y in zip(got, want):
        assert torch.equal(x, y) and layout(x) == layout(y)  # the eager result's values and layout
    assert all(torch.equal(x, y) for x, y in zip(dr.apply_rotary_reference(q, k, cos, sin), want))


def test_half_precision_within_the_interpreters_truncation():
    q, k, cos, sin = _inputs(3, 4, 4, 1, 32, torch.bfloat16)
    for x, y in zip(dr.apply_rotary(q, k, cos, sin), dr.apply_rotary_reference(q, k, cos, sin)):
        assert x.dtype == torch.bfloat16 and (x.float() - y.float()).abs().max() <= 0.05 * y.float().abs().max()
    assert dr.self_check("cpu", torch.float32, 4, 1, 256) is None and dr.self_check("cpu", torch.bfloat16, 4, 1, 64) is None


def test_bad_input_is_refused():
    q, k, cos, sin = _inputs(2, 3, 4, 1, 16)
    with pytest.raises(ValueError, match="do not fit"):
        dr.apply_rotary(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="do not fit"):
        dr.apply_rotary(q[..., :12], k[..., :12], cos[..., :12], sin[..., :12])  # not a power of two


def test_the_swap_is_used_and_undone():
    import transformers.models.gemma3.modeling_gemma3 as mg

    model = tiny_gemma3()
    own, calls = mg.apply_rotary_pos_emb, []
    ids = torch.tensor([[2, 5, 9, 11, 7]])
    with torch.no_grad():
        want = model(ids).logits
        with dr.rope_swapped(model):
            swapped = mg.apply_rotary_pos_emb
            assert swapped is not own
            mg.apply_rotary_pos_emb = lambda *a, **kw: calls.append(1) or swapped(*a, **kw)
            got = model(ids).logits
            mg.apply_rotary_pos_emb = swapped
    assert mg.apply_rotary_pos_emb is own and len(calls) == 4  # one call per layer
    assert torch.equal(got, want)
