"""Packed SFT of a sliding-window model (Gemma 3's hybrid attention) on CPU: packed loss and gradients equal each
example trained alone for every packed path (the flattened-pack kernels' CPU reference, and transformers' own masks
for sdpa, eager and flex_attention on packs with restarting position ids); the window is really applied; what a
kernel cannot apply is refused; the chunked loss equals the full-logits loss on Gemma 3 (tied embeddings, softcap);
the loss kernel a run picks for a 262k vocabulary at 32k packs; the Liger kernels chosen for Gemma 3."""

import copy
import itertools

import pytest
import torch

import lwlib.attention as attention
from lwlib.attention import FA4_ATTENTION, VARLEN_ATTENTION, check_packed_attention, layer_attention
from lwlib.losses import forward_loss
from lwlib.packing import IGNORE, PackCollator, PackedDataset, TokenizedExample, split_batch
from lwlib.training import auto_chunk_size, liger_kernels_for, pick_loss

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
LENS = [5, 23, 17, 30]  # two shorter than the window, two longer; 75 tokens in one pack


def tiny_gemma3(seed: int = 0, attn: str = "eager", **overrides):
    """A tiny random Gemma 3 text model (``Gemma3ForCausalLM``, fp32): 4 layers mixing sliding (window 8) and full
    attention, 2 query heads on 1 key/value head of 32, QK-norm, local and global RoPE bases, GeGLU, tied
    embeddings over a 96-token vocabulary. ``overrides`` change the config."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    attention.register_varlen_attention()
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
              layer_types=LAYER_TYPES, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
    model.set_attn_implementation(attn)
    return model.float().train()


def examples(lens=LENS, vocab: int = 96, seed: int = 0) -> list[TokenizedExample]:
    """Random examples of ``lens`` tokens: the first three positions are the prompt (no targets), then every
    token is the next one's target (pre-shifted labels, the last position none)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lens:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [IGNORE] * 3 + ids[4:] + [IGNORE] if n > 4 else [IGNORE] * n))
    return out


def _alone(model, exs) -> tuple[float, dict]:
    """Each example on its own (no packing, transformers' masks), loss = all token losses / all targets."""
    model.zero_grad()
    total = sum(e.n_targets for e in exs)
    loss = 0.0
    for e in exs:
        part, _ = forward_loss(model, {"input_ids": torch.tensor([e.input_ids])}, torch.tensor([e.labels]), total)
        part.backward()
        loss += float(part.detach())
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def _packed(model, exs, flatten: bool, chunk: int = 0) -> tuple[float, dict]:
    batch = PackCollator(pad_id=0, flatten=flatten)([PackedDataset(exs, [list(range(len(exs)))])[0]])
    inputs, loss_inputs = split_batch(batch)
    model.zero_grad()
    loss, _ = forward_loss(model, inputs, loss_inputs["labels"], loss_inputs["num_targets"], chunk_size=chunk)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(got, want, what, tol=1e-5):
    (loss, grads), (want_loss, want_grads) = got, want
    assert abs(loss - want_loss) <= tol * abs(want_loss), (what, loss, want_loss)
    for name, g in want_grads.items():
        err = (grads[name] - g).abs().max().item()
        assert err <= tol * max(g.abs().max().item(), 1e-3), (what, name, err)


@pytest.fixture(scope="module")
def gemma():
    return tiny_gemma3()


@pytest.fixture(scope="module")
def alone(gemma):
    return _alone(gemma, examples())


def test_tiny_gemma3_has_the_hybrid_layout(gemma):
    assert layer_attention(gemma.config) == [("sliding_attention", 8), ("full_attention", None),
                                             ("sliding_attention", 8), ("sliding_attention", 8)]
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight  # tied: the head is the embedding
    assert max(LENS) > 3 * WINDOW  # the window bites inside the packed sequences


@pytest.mark.parametrize("attn", [VARLEN_ATTENTION, FA4_ATTENTION])
def test_flattened_pack_loss_and_gradients_equal_each_example_alone(gemma, alone, attn):
    """One flattened pack (``PackCollator(flatten=True)``) through the flattened-pack attention (on CPU its
    per-sequence reference, the kernels' stand-in): loss and every parameter's gradient equal those of the four
    examples run alone with transformers' eager attention (its sliding-window mask), fp32, relative 1e-5."""
    model = copy.deepcopy(gemma)
    model.set_attn_implementation(attn)
    check_packed_attention(model.config, attn)
    _assert_same(_packed(model, examples(), flatten=True), alone, attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unflattened_pack_with_position_resets_equals_each_example_alone(gemma, alone, attn):
    """Packs as one row per pack with position ids restarting per example and no attention mask (the sdpa and
    eager path): transformers builds the sliding-window mask from the config with positions remapped per sequence;
    loss and gradients equal the examples alone."""
    model = copy.deepcopy(gemma)
    model.set_attn_implementation(attn)
    _assert_same(_packed(model, examples(), flatten=False), alone, attn)


def test_flex_attention_pack_logits_equal_each_example_alone(gemma):
    """flex_attention on a pack with restarting position ids (transformers' sliding-window ``BlockMask``): each
    example's logits equal its logits alone (forward only: flex_attention has no backward on CPU; the GPU step is
    in tests/test_sft_gpu.py)."""
    model = copy.deepcopy(gemma).eval()
    model.set_attn_implementation("flex_attention")
    exs = examples()
    batch = PackCollator(pad_id=0)([PackedDataset(exs, [list(range(len(exs)))])[0]])
    with torch.no_grad():
        packed = model(**split_batch(batch)[0], use_cache=False).logits[0]
        for s, e in zip([0, *itertools.accumulate(LENS)], exs):
            alone = gemma(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            assert (packed[s:s + len(e)] - alone).abs().max().item() < 1e-5


def test_the_window_is_applied(gemma):
    """The same weights with every layer attending over the whole sequence give the same logits at positions
    before the window (nothing lies beyond it yet) and different ones from the window on: the window is applied
    per packed sequence, from each sequence's own start."""
    full = copy.deepcopy(gemma)
    full.config.sliding_window = 10_000  # every sliding layer sees the whole sequence
    for layer in full.model.layers:
        layer.self_attn.sliding_window = 10_000
    exs = examples()
    batch = PackCollator(pad_id=0, flatten=True)([PackedDataset(exs, [list(range(len(exs)))])[0]])
    inputs, _ = split_batch(batch)
    logits = {}
    for name, m in (("window", gemma), ("full", full)):
        m = copy.deepcopy(m)
        m.set_attn_implementation(VARLEN_ATTENTION)
        with torch.no_grad():
            logits[name] = m(**inputs, use_cache=False).logits[0]
    starts = [0, *itertools.accumulate(LENS)]
    for s, n in zip(starts, LENS):
        near, far = slice(s, s + min(n, WINDOW)), slice(s + WINDOW, s + n)
        assert (logits["window"][near] - logits["full"][near]).abs().max().item() < 1e-5
        if n > WINDOW:
            assert (logits["window"][far] - logits["full"][far]).abs().max().item() > 1e-3, n


def test_what_a_kernel_cannot_apply_is_refused(monkeypatch, gemma):
    """PyTorch's varlen kernel without ``window_size`` (PyTorch 2.10) refuses Gemma 3's sliding layers, before
    training and on the call, naming the model, the layer and its type and the kernel; a model without windows
    still runs on it. Attention softcapping, bidirectional attention and other layer types are refused by both
    flattened-pack kernels; sdpa and the rest are left to transformers."""
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", frozenset({"scale", "is_causal"}))
    with pytest.raises(ValueError, match=r"'torch_varlen' cannot train .*gemma3_text .*layer 0 \(sliding_attention\)"
                                         r" needs a sliding window of 8 tokens.*window_size"):
        check_packed_attention(gemma.config, VARLEN_ATTENTION)
    check_packed_attention(gemma.config, FA4_ATTENTION)  # FlashAttention-4 applies windows
    check_packed_attention(gemma.config, "sdpa")
    no_window = tiny_gemma3(layer_types=["full_attention"] * 4)
    check_packed_attention(no_window.config, VARLEN_ATTENTION)
    model = copy.deepcopy(gemma)
    model.set_attn_implementation(VARLEN_ATTENTION)
    batch = PackCollator(pad_id=0, flatten=True)([PackedDataset(examples(), [[0, 1, 2, 3]])[0]])
    with pytest.raises(ValueError, match=r"cannot train .*gemma3_text .*layer 0 \(sliding_attention\)"):
        model(**split_batch(batch)[0], use_cache=False)
    with pytest.raises(ValueError, match="no window_size"):  # the kernel call itself never drops a window
        attention._varlen_cuda(*[torch.zeros(4, 2, 8)] * 3, None, None, 4, 4, 1.0, 1, left=7)

    for cfg_change, match in (({"attn_logit_softcapping": 50.0}, "softcapping"),
                              ({"use_bidirectional_attention": True}, "bidirectional"),
                              ({"layer_types": ["chunked_attention"] + LAYER_TYPES[1:]}, "'chunked_attention'")):
        cfg = copy.deepcopy(gemma.config)
        for k, v in cfg_change.items():
            setattr(cfg, k, v)
        for kernel in (VARLEN_ATTENTION, FA4_ATTENTION):
            with pytest.raises(ValueError, match=match):
                check_packed_attention(cfg, kernel)
    with pytest.raises(ValueError, match=r"fa4_varlen.*softcapping"):  # and on the call (Gemma 2 passes softcap)
        attention.fa4_attention_forward(None, *[torch.zeros(1, 2, 4, 8)] * 3, None, softcap=50.0,
                                        cu_seq_lens_q=torch.tensor([0, 4]), max_length_q=4)


def test_chunked_loss_equals_the_full_logits_loss_on_gemma3(gemma):
    """``sft.loss_chunk_size`` on Gemma 3 (``logits_to_keep``, the head tied to the embedding, whose gradient then
    sums both uses): loss and gradients equal the full-logits loss, with and without final logit softcapping."""
    for softcap in (None, 0.1):  # random logits are ~0.2: a cap of 0.1 changes them
        model = copy.deepcopy(gemma)
        model.config.final_logit_softcapping = softcap
        model.set_attn_implementation(VARLEN_ATTENTION)
        want = _packed(model, examples(), flatten=True)
        for chunk in (16, 7):
            _assert_same(_packed(model, examples(), flatten=True, chunk=chunk), want, (softcap, chunk))
        if softcap:  # the cap changes the loss: the test would see a chunked loss that ignored it
            model.config.final_logit_softcapping = None
            assert abs(_packed(model, examples(), flatten=True, chunk=16)[0] - want[0]) > 1e-3


def test_the_loss_kernel_never_holds_the_logits_of_a_large_vocabulary(tmp_path):
    """``sft.liger_kernel: auto``: Liger's fused loss where Liger is on; where it is off (torch_compile) and one
    micro-batch's fp32 logits would exceed 16 GiB (Gemma 3: 262,144 x 32,768 tokens = 34 GB), the fused loss
    alone where it can run, else the chunked loss (1 GiB chunks); SmolLM2's 8 x 8k packs keep the full logits."""
    gemma, smollm2 = (262_144, 32_768, 1), (49_152, 8_192, 8)
    has_liger = attention.importlib.util.find_spec("liger_kernel") is not None
    assert pick_loss("auto", True, 0, *gemma, cuda=True) == (True, 0)
    assert pick_loss("auto", False, 0, *gemma, cuda=False) == (False, 1024) == (False, auto_chunk_size(262_144))
    assert pick_loss("auto", False, 0, *gemma, cuda=True) == ((True, 0) if has_liger else (False, 1024))
    zero3 = tmp_path / "ds.json"
    zero3.write_text('{"zero_optimization": {"stage": 3}}')
    assert pick_loss("auto", False, 0, *gemma, cuda=True, ds_cfg=str(zero3)) == (False, 1024)
    assert pick_loss("auto", False, 2048, *gemma, cuda=False) == (False, 2048)  # a set chunk size is kept
    assert pick_loss(False, False, 0, *gemma, cuda=False) == (False, 0)  # asked for: full logits
    assert pick_loss("auto", False, 0, *smollm2, cuda=False) == (False, 0)
    assert auto_chunk_size(49_152) == 4096 and auto_chunk_size(10**7) == 256


def test_liger_kernels_for_gemma3_and_llama():
    """Gemma 3: Liger's Gemma RMSNorm (offset 1, gemma casting: Liger's gemma3_text function) and GeGLU, which
    computes GELU's tanh form only (another activation is refused); Llama: Liger's defaults; never RoPE or a
    loss inside the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    off = {"rope": False, "fused_linear_cross_entropy": False, "cross_entropy": False}
    assert liger_kernels_for(tiny_gemma3()) == {**off, "rms_norm": True, "geglu": True}
    with pytest.raises(ValueError, match="gelu_pytorch_tanh.*'gelu'"):
        liger_kernels_for(tiny_gemma3(hidden_activation="gelu"))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert liger_kernels_for(llama) == off
