"""The benchmarks' own logic: ``benchmarks/sft_throughput.py``'s flex-attention BlockMask of packed sequences
equals the one torch builds from the mask function, token for token."""

import importlib.util

import pytest
import torch

from lwlib.runs import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sft_throughput", REPO_ROOT / "benchmarks" / "sft_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_document_block_mask_equals_torchs_block_mask(bench):
    from torch.nn.attention.flex_attention import create_block_mask

    rows = [[100, 28, 300, 76, 1, 1, 6], [512], [64] * 8, [129, 127, 256]]  # boundaries on and off block edges
    pos = torch.tensor([[p for n in lens for p in range(n)] for lens in rows])
    doc = (pos == 0).cumsum(-1)
    ref = create_block_mask(lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (q >= kv), 4, None, 512, 512,
                            device="cpu", BLOCK_SIZE=64)
    got = bench.document_block_mask(pos, 64)
    assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(got.full_kv_num_blocks, ref.full_kv_num_blocks)
    for name, count in (("kv_indices", got.kv_num_blocks), ("full_kv_indices", got.full_kv_num_blocks)):
        for b in range(4):
            for q in range(8):
                k = int(count[b, 0, q])
                assert set(getattr(got, name)[b, 0, q, :k].tolist()) == set(getattr(ref, name)[b, 0, q, :k].tolist())
    assert torch.equal(got.to_dense(), ref.to_dense())
    # and the per-token mask function sees sequence boundaries: a token never attends across them
    assert not bool(got.mask_mod(torch.tensor(0), None, torch.tensor(100), torch.tensor(99)))
    assert bool(got.mask_mod(torch.tensor(0), None, torch.tensor(99), torch.tensor(0)))
    with pytest.raises(ValueError, match="multiple of the block size"):
        bench.document_block_mask(pos[:, :500], 64)
