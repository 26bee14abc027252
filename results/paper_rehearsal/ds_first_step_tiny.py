"""DeepSpeed's own first optimizer step, without transformers: a two-layer linear model, one step of AdamW (lr 1e-3,
betas 0.9/0.95, clipping at 1) through ``deepspeed.initialize`` in a world of one on the CPU (gloo), in fp32 or bf16,
ZeRO stage 1 or 3, with 1 or 2 micro-steps. Prints, per parameter, the mean |change of the fp32 master weight| / lr
(Adam's first step moves each entry by about lr, so about 1.0 is a correct step) and the optimizer's step count.

    python results/paper_rehearsal/ds_first_step_tiny.py STAGE fp32|bf16 [MICRO_STEPS]
"""

import json
import os
import sys

import torch

from lwlib.training import launcher_env

launcher_env("ds")  # a world of one, as in a notebook
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import deepspeed  # noqa: E402  (after the launcher variables)
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

torch.manual_seed(0)
stage, bf16 = int(sys.argv[1]), sys.argv[2] == "bf16"
gas = int(sys.argv[3]) if len(sys.argv) > 3 else 1
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1))
w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": 1.0,
       "bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}}}
eng, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
x, y = torch.randn(4 * gas, 64), torch.randn(4 * gas, 1)
dtype = torch.bfloat16 if bf16 else torch.float32
for i in range(gas):
    loss = ((eng(x[4 * i:4 * i + 4].to(dtype)) - y[4 * i:4 * i + 4].to(dtype)) ** 2).mean()
    eng.backward(loss)
    eng.step()
master = {k: safe_get_full_fp32_param(p).float() for k, p in eng.module.named_parameters()}
inner = getattr(opt, "optimizer", opt)
print(json.dumps({"stage": stage, "bf16": bf16, "micro_steps": gas, "optimizer": type(opt).__name__,
                  "inner": type(inner).__name__, "optimizer_step_count": [int(v["step"]) for v in inner.state.values()][:1],
                  "mean_abs_change_over_lr": {k: round(((master[k] - w0[k]).abs().mean() / 1e-3).item(), 4)
                                              for k in master}}))
