"""Attention kernels against float64 loops; backend choice; no host syncs inside the layers."""

import pytest
import torch

import magi1
from magi1.network import attention
from magi1.network.attention import attend, attend_segments, resolve_backend


def reference_attention(q, k, v):
    """Loop over heads and queries in float64; query head i reads kv head i // (Hq // Hkv)."""
    b, sq, hq, d = q.shape
    hk = k.shape[2]
    out = torch.zeros(b, sq, hq, d, dtype=torch.float64)
    for n in range(b):
        for h in range(hq):
            kh = h // (hq // hk)
            for i in range(sq):
                scores = [float(q[n, i, h].double() @ k[n, j, kh].double()) / d ** 0.5 for j in range(k.shape[1])]
                top = max(scores)
                weights = torch.tensor([pow(2.718281828459045, s - top) for s in scores], dtype=torch.float64)
                weights = weights / weights.sum()
                out[n, i, h] = (weights[:, None] * v[n, :, kh].double()).sum(0)
    return out


@pytest.mark.parametrize("hq, hk", [(4, 4), (6, 2), (8, 1)])
def test_sdpa_grouped_query_attention_matches_loop(hq, hk):
    g = torch.Generator().manual_seed(hq * 10 + hk)
    q = torch.randn(2, 5, hq, 8, generator=g)
    k = torch.randn(2, 7, hk, 8, generator=g)
    v = torch.randn(2, 7, hk, 8, generator=g)
    out = attend(q, k, v, "sdpa")
    assert torch.allclose(out.double(), reference_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_segments_attend_only_their_own_keys():
    g = torch.Generator().manual_seed(3)
    q_lengths, k_lengths = [4, 0, 3, 5], [2, 6, 1, 3]
    q = torch.randn(sum(q_lengths), 6, 8, generator=g)
    k = torch.randn(sum(k_lengths), 3, 8, generator=g)
    v = torch.randn(sum(k_lengths), 3, 8, generator=g)
    out = attend_segments(q, k, v, q_lengths, k_lengths, "sdpa")
    qs = ks = 0
    for ql, kl in zip(q_lengths, k_lengths):
        if ql:
            expected = reference_attention(q[None, qs:qs + ql], k[None, ks:ks + kl], v[None, ks:ks + kl])[0]
            assert torch.allclose(out[qs:qs + ql].double(), expected, rtol=1e-5, atol=1e-6)
        qs, ks = qs + ql, ks + kl


def test_backend_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    assert resolve_backend("sdpa", cpu, torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_backend("xformers", cpu, torch.float32)
    with pytest.raises(ValueError, match="'flash' needs"):
        resolve_backend("flash", cpu, torch.float32)
    model = magi1.random_dit(dict(num_layers=1, hidden_size=32, ffn_hidden_size=32, num_attention_heads=2,
                                  kv_channels=16, caption_channels=8, caption_max_length=4, in_channels=16,
                                  out_channels=16))
    with pytest.raises(ValueError, match="attention backend must be one of"):
        model.set_attention_backend("fast")
    model.set_attention_backend("sdpa")
    assert model.attention_backend == "sdpa"


@pytest.mark.skipif(not (torch.cuda.is_available() and attention.flash_available()),
                    reason="needs a CUDA GPU with flash-attn installed")
def test_flash_matches_sdpa_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 64, 6, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 80, 2, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 80, 2, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q.device, q.dtype) == "flash"
    a, b = attend(q, k, v, "flash").float(), attend(q, k, v, "sdpa").float()
    assert ((a - b).norm() / b.norm()).item() < 1e-2
    segs = attend_segments(q[0], k[0], v[0], [30, 34], [50, 30], "flash").float()
    ref = attend_segments(q[0], k[0], v[0], [30, 34], [50, 30], "sdpa").float()
    assert ((segs - ref).norm() / ref.norm()).item() < 1e-2


class SyncCounter:
    """Counts the tensor methods that make the host wait for the device."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(*args, _original=original, **kwargs):
                self.count += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("sparse", [False, True])
def test_host_syncs_do_not_grow_with_the_number_of_layers(monkeypatch, sparse):
    """The layers never wait for the device: a 6-layer call syncs exactly as often as a 1-layer one."""
    counts = []
    for layers in (1, 6):
        model = magi1.random_dit(dict(num_layers=layers, hidden_size=32, ffn_hidden_size=32, num_attention_heads=4,
                                      num_query_groups=2, kv_channels=8, caption_channels=8, caption_max_length=4,
                                      in_channels=16, out_channels=16, apply_layernorm_1p=True))
        cache = magi1.KVCache.for_model(model, 3 * 12)
        g = torch.Generator().manual_seed(0)
        args = dict(x=torch.randn(1, 16, 4, 4, 6, generator=g), t=torch.tensor([[0.3, 0.1]]),
                    caption=torch.randn(1, 2, 4, 8, generator=g), caption_mask=torch.ones(1, 2, 4, dtype=torch.bool),
                    kv_range=[(0, 24), (0, 36)], slice_point=1, kv_cache=cache, kv_write_chunks=2,
                    active=[torch.arange(0, 12, 2), None] if sparse else None)
        with monkeypatch.context() as m:
            counter = SyncCounter(m)
            model(**args)
        counts.append(counter.count)
    assert counts[0] == counts[1] and counts[0] >= 1, counts  # >= 1: the caption lengths, once per call


def test_timing_script_runs_on_cpu(capsys):
    from bench.speed import dit_timing

    dit_timing.main(["--size", "tiny", "--device", "cpu", "--height", "32", "--width", "48", "--repeats", "1",
                     "--fractions", "0.5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("MAGI-1 tiny DiT, 32x48: one chunk of 36 tokens")
    dense, half = lines[2].split(), lines[3].split()
    assert dense[:2] == ["sdpa", "dense"] and half[:2] == ["sdpa", "0.50"]
    assert abs(float(half[4]) - 0.5) < 0.05  # FLOP ratio of half the tokens
