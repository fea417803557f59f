"""torch 2.4 has no ``enable_gqa`` in SDPA: the fallback repeats key/value heads and gives equal outputs."""

import pytest
import torch

from magi1.network import attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(8, 2), (6, 1), (4, 4)])
def test_repeat_kv_fallback_equals_enable_gqa(dtype, heads):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, 37, 16, generator=gen).to(dtype)
    k = torch.randn(2, hkv, 29, 16, generator=gen).to(dtype)
    v = torch.randn(2, hkv, 29, 16, generator=gen).to(dtype)
    fallback = attention._sdpa(q, k, v, gqa=False)
    if not attention.SDPA_GQA:
        pytest.skip(f"torch {torch.__version__} has no enable_gqa to compare with (the fallback is in use)")
    assert torch.equal(fallback, attention._sdpa(q, k, v, gqa=True))


def test_attend_uses_what_this_torch_offers():
    q = torch.randn(1, 5, 4, 8)
    k = v = torch.randn(1, 7, 2, 8)
    expected = attention._sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gqa=False).transpose(1, 2)
    assert torch.equal(attention.attend(q, k, v, "sdpa"), expected)
