"""SFT on CUDA, through the trainer's own ``compute_loss``: ``sft.liger_kernel`` (Liger-Kernel's fused kernels and
fused linear cross-entropy), ``attn_implementation: torch_varlen`` (PyTorch's FlashAttention varlen kernel on
flattened packs) and ``fa4_varlen`` (FlashAttention-4's kernels, flash-attn-4 on Hopper/Blackwell) give the loss
and gradients of the plain path; the compiled loss equals the eager one. Gemma 3's sliding windows (issue 28): the
kernels apply them, a packed train step equals the examples alone, Liger's Gemma kernels equal the plain path, and
a 32k pack of Gemma-3-270M's shape trains without its logits. ``./test.sh gpu``."""

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
from lwlib.packing import IGNORE, PackCollator, PackedDataset, split_batch, tokenize_chat, training_template
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


def _assert_same_gradients(out, ref, inputs, ref_inputs, g):
    """One random output gradient through the kernel's bf16 ``out`` and the fp32 reference ``ref``: the gradients of
    the inputs (q, k, v) point the same way, cosine > 0.999."""
    grad = torch.randn(out.shape, device="cuda", generator=g)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for x, r in zip(inputs, ref_inputs):
        cos = torch.nn.functional.cosine_similarity(x.grad.flatten().double(), r.grad.flatten().double(), dim=0)
        assert cos > 0.999, float(cos)


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
    _assert_same_gradients(out, ref, (q, k, v), ref_in, g)


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


# ------------------------------------------------------------------ sliding windows (Gemma 3), issue 28

@pytest.mark.parametrize("attn", FLAT_ATTN)
def test_varlen_kernel_applies_the_sliding_window(attn):
    """Gemma-3-270M's attention shape (4 query heads on 1 key/value head of 256, scale 1/16) with a window of 128:
    the CUDA kernel of ``torch_varlen`` / ``fa4_varlen`` (bf16) against the fp32 per-sequence reference with the
    same window (a query sees itself and the 127 tokens before it, inside its own sequence), sequences shorter and
    longer than the window, boundaries on and off block edges: outputs within bf16 rounding, gradients of q, k, v
    cosine > 0.999; and far from the full-causal result, so a dropped window fails."""
    g = torch.Generator(device="cuda").manual_seed(0)
    lens, window = [1, 127, 128, 129, 300, 1000, 7, 465, 191], 128
    t, cu = sum(lens), torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(1, h, t, 256, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
               for h in (4, 1, 1))
    out, _ = FORWARD[attn](None, q, k, v, None, scaling=1 / 16, sliding_window=window, cu_seq_lens_q=cu,
                           max_length_q=max(lens))
    assert out.shape == (1, t, 4, 256) and out.dtype == torch.bfloat16
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    flat = [x[0].transpose(0, 1) for x in ref_in]
    ref = _varlen_reference(*flat, cu.cpu(), 1 / 16, 4, window).unsqueeze(0)
    with torch.no_grad():
        full = _varlen_reference(*flat, cu.cpu(), 1 / 16, 4).unsqueeze(0)
    assert (out.float() - ref).abs().max().item() < 2e-2
    assert (out.float() - full).abs().max().item() > 0.1  # the window changes the result: it is applied
    _assert_same_gradients(out, ref, (q, k, v), ref_in, g)


def _gemma3_cuda(**kw):
    """A small random Gemma 3 on CUDA with the real attention shape (4 query heads on 1 key/value head of 256,
    QK-norm, window 64), 4 layers (sliding, full, sliding, sliding), fp32 weights, norm weights randomised so
    Gemma's (1 + weight) matters."""
    from test_packed_window import tiny_gemma3

    model = tiny_gemma3(hidden_size=128, intermediate_size=256, num_attention_heads=4, head_dim=256,
                        query_pre_attn_scalar=256, vocab_size=512, sliding_window=64, max_position_embeddings=4096,
                        attn="sdpa", **kw).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


def _gemma3_batches(flatten: bool, lens=(50, 300, 17, 700, 129)):
    from test_packed_window import examples

    exs = examples(list(lens), vocab=512)
    ds = PackedDataset(exs, [list(range(len(exs)))])
    return exs, PackCollator(pad_id=0, flatten=flatten)([ds[0]])


def _step_loss_grads(model, batch, autocast: bool, liger: bool = False, chunk: int = 0):
    from lwlib.losses import forward_loss

    inputs, loss_inputs = split_batch(_cuda(batch))
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = forward_loss(model, inputs, loss_inputs["labels"], loss_inputs["num_targets"], liger=liger,
                               chunk_size=chunk)
    loss.backward()
    params = getattr(model, "_orig_mod", model).named_parameters()  # a compiled model's own names
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in params}


def _alone_loss_grads(model, exs):
    """Each example alone (sdpa with transformers' sliding-window mask), fp32: the reference."""
    from lwlib.losses import forward_loss

    model.zero_grad()
    total, loss = sum(e.n_targets for e in exs), 0.0
    for e in exs:
        part, _ = forward_loss(model, {"input_ids": torch.tensor([e.input_ids], device="cuda")},
                               torch.tensor([e.labels], device="cuda"), total)
        part.backward()
        loss += float(part.detach())
    return loss, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _close(got, want, loss_tol, cos_min, what):
    (loss, grads), (want_loss, want_grads) = got, want
    assert abs(loss - want_loss) <= loss_tol * abs(want_loss), (what, loss, want_loss)
    flat = lambda gs: torch.cat([gs[n].flatten().double() for n in sorted(want_grads)])  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(flat(grads), flat(want_grads), dim=0)
    assert cos > cos_min, (what, float(cos))


@pytest.mark.parametrize("attn", FLAT_ATTN + ["flex_attention", "sdpa"])
def test_packed_gemma3_train_step_equals_unpacked(attn):
    """A small Gemma 3 (window 64, sequences up to 700 tokens) trained on one pack under bf16 autocast, flattened
    through ``torch_varlen`` / ``fa4_varlen``, or one row with restarting position ids through flex_attention and
    sdpa (transformers' sliding-window masks), against the same examples alone in fp32 sdpa: loss within 1%, all
    gradients together cosine > 0.99; then one AdamW step on each, and the losses after it agree too (the step
    trained the same model)."""
    from lwlib.attention import flat_packs

    ref = _gemma3_cuda()
    model = copy.deepcopy(ref)
    model.set_attn_implementation(attn)
    exs, batch = _gemma3_batches(flatten=flat_packs(attn))
    _close(_step_loss_grads(model, batch, autocast=True), _alone_loss_grads(ref, exs), 1e-2, 0.99, attn)
    for m in (model, ref):
        torch.optim.AdamW(m.parameters(), lr=1e-3).step()
    _close(_step_loss_grads(model, batch, autocast=True), _alone_loss_grads(ref, exs), 1e-2, 0.99, (attn, "step 2"))


@pytest.mark.parametrize("attn", FLAT_ATTN)
def test_compiled_gemma3_varlen_forward_equals_eager(attn):
    """torch.compile keeps the windowed flattened-pack kernels (the custom operators' fake functions with the
    window argument, dynamic shapes over two pack lengths): compiled logits equal eager ones."""
    model = _gemma3_cuda()
    model.set_attn_implementation(attn)
    compiled = torch.compile(model, dynamic=None)
    for lens in ((50, 300, 17, 700), (129, 90, 400)):
        b = _cuda(split_batch(_gemma3_batches(flatten=True, lens=lens)[1])[0])
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            want = model(**b, use_cache=False).logits.float()
            got = compiled(**b, use_cache=False).logits.float()
        assert (got - want).abs().max().item() < 0.05 * want.abs().max().item(), lens


@pytest.mark.skipif(not importlib.util.find_spec("liger_kernel"), reason="needs liger-kernel")
def test_gemma3_liger_kernels_and_fused_loss_equal_the_plain_path():
    """``use_liger`` on Gemma 3 patches Liger's Gemma RMSNorm (offset 1, gemma casting; norm weights random, so a
    wrong offset fails) into every norm, QK-norm included, and GeGLU into the MLPs, of this instance only; with the
    fused loss (the head tied to the embedding) loss and gradients equal the plain path in fp32. The fused loss
    alone on the compiled model (``sft.liger_kernel: auto`` under ``torch_compile`` for a large vocabulary) equals
    it under bf16 autocast."""
    ref = _gemma3_cuda()
    _, batch = _gemma3_batches(flatten=False)
    want = _step_loss_grads(ref, batch, autocast=False)
    fused = copy.deepcopy(ref)
    use_liger(fused)
    layer = fused.model.layers[0]
    assert layer.mlp._get_name() == "LigerGEGLUMLP"
    assert {m._get_name() for m in (layer.input_layernorm, layer.pre_feedforward_layernorm, layer.self_attn.q_norm,
                                    layer.self_attn.k_norm, fused.model.norm)} == {"LigerRMSNorm"}
    assert layer.input_layernorm.offset == 1.0 and layer.input_layernorm.casting_mode == "gemma"
    assert ref.model.layers[0].mlp._get_name() == "Gemma3MLP"  # only the patched instance changed
    _close(_step_loss_grads(fused, batch, autocast=False, liger=True), want, 1e-4, 0.9999, "liger fp32")

    model = copy.deepcopy(ref)
    model.set_attn_implementation(VARLEN_ATTENTION if varlen_available() else "sdpa")
    _, flat = _gemma3_batches(flatten=model.config._attn_implementation == VARLEN_ATTENTION)
    compiled = torch.compile(model, dynamic=None)
    _close(_step_loss_grads(compiled, flat, autocast=True, liger=True), want, 2e-2, 0.99, "compiled + fused loss")


@pytest.mark.skipif(not (fa4_available() or varlen_available()), reason="needs a flattened-pack kernel")
def test_gemma3_270m_32k_pack_trains_without_its_logits():
    """Gemma-3-270M's shape (random weights, benchmarks/sft_throughput.py's config) on one flattened 32,768-token
    pack, activation checkpointing, bf16 autocast: ``sft.liger_kernel: auto`` resolves to a loss that never holds
    the pack's logits (34 GB in fp32, 17 GB in bf16); the step's peak memory stays under 16 GiB with the fused loss
    and with the chunked one, whose losses agree (and are near ln 262,144 for random weights)."""
    from transformers import AutoModelForCausalLM

    from lwlib.attention import register_varlen_attention
    from lwlib.runs import REPO_ROOT
    from lwlib.training import auto_chunk_size, pick_liger, pick_loss

    register_varlen_attention()

    spec = importlib.util.spec_from_file_location("sft_throughput", REPO_ROOT / "benchmarks" / "sft_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    attn = FA4_ATTENTION if fa4_available() else VARLEN_ATTENTION
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(bench.model_config("gemma3-270m"), dtype=torch.float32,
                                                 attn_implementation=attn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    liger = pick_liger("auto", True, None)
    fused, chunk = pick_loss("auto", liger, 0, 262_144, 32_768, 1, True)
    assert fused or chunk == auto_chunk_size(262_144)  # never the full logits
    _, batch = _gemma3_batches(flatten=True, lens=(20_000, 8_000, 4_768))
    assert batch["input_ids"].shape == (1, 32_768)
    batch["input_ids"] = torch.randint(3, 262_144, (1, 32_768))
    batch["labels"] = torch.where(batch["labels"] == IGNORE, IGNORE, torch.randint(3, 262_144, (1, 32_768)))
    losses = {}
    kinds = ([("fused", True, 0)] if importlib.util.find_spec("liger_kernel") else []) + [("chunked", False, 1024)]
    for name, use_fused, size in kinds:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        losses[name] = _step_loss_grads(model, batch, autocast=True, liger=use_fused, chunk=size)[0]
        peak = torch.cuda.max_memory_allocated() / 2**30
        assert peak < 16, (name, peak)
    for loss in losses.values():
        assert abs(loss - losses["chunked"]) < 1e-2 * losses["chunked"] and abs(loss - 12.48) < 1.0, losses
