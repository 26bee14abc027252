"""SFT on CUDA: ``sft.liger_kernel`` (Liger-Kernel's fused kernels and fused linear cross-entropy) gives the
loss and gradients of the plain path, through the trainer's own ``compute_loss``. ``./test.sh gpu``."""

import copy
import importlib.util

import pytest
import torch

from lwlib.models import load_model
from lwlib.packing import PackCollator, PackedDataset, tokenize_chat, training_template
from lwlib.sft import _trainer_cls, use_liger
from conftest import MODEL
from test_sft import CONVS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or not importlib.util.find_spec("liger_kernel"),
                                 reason="needs CUDA and liger-kernel")]


def _loss_and_grads(model, batches, mode, liger, tmp_path, autocast):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             report_to=[], bf16=autocast)
    trainer = _trainer_cls()(model=model, args=args, loss_mode=mode, liger=liger)
    got, denom = trainer.get_batch_samples(iter(batches), 2, torch.device("cuda"))
    model.zero_grad()
    total = 0.0
    for b in got:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = trainer.compute_loss(model, {k: v.cuda() for k, v in b.items()}, num_items_in_batch=denom)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_liger_loss_and_gradients_equal_the_plain_path(tmp_path, autocast):
    model, tok = load_model(MODEL, device="cuda", dtype="float32")
    template = training_template(tok)
    exs = [tokenize_chat(tok, c, template) for c in CONVS]
    ds = PackedDataset(exs, [[0, 1], [2, 3]])
    coll = PackCollator(pad_id=tok.pad_token_id)
    batches = [coll([ds[0]]), coll([ds[1]])]
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
