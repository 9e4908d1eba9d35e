"""Quantization core: GPTQ v1 bit packing, the RTN grid and the GPTQ algorithm."""
from __future__ import annotations

import pytest
import torch

from tokenmill.quantization.gptq import GPTQ, relative_output_error
from tokenmill.quantization.packing import (dequantize_gptq, pack_cols, pack_gptq, pack_rows, unpack_cols,
                                            unpack_gptq, unpack_rows)
from tokenmill.quantization.rtn import quant_grid, rtn_quantize

BITS = [2, 3, 4, 8]


def _u32(x: torch.Tensor) -> list[int]:
    return [int(v) & 0xFFFFFFFF for v in x.flatten()]


@pytest.mark.parametrize("bits", BITS)
def test_rows_cols_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (96, 40), generator=g, dtype=torch.int32)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_rows(packed, bits, 96), q)
    z = torch.randint(0, 2**bits, (5, 64), generator=g, dtype=torch.int64)
    pz = pack_cols(z, bits)
    assert pz.dtype == torch.int32 and pz.shape == (5, 64 * bits // 32)
    assert torch.equal(unpack_cols(pz, bits, 64), z.to(torch.int32))


def test_round_trip_4bit_non_multiple_of_32_and_sign():
    q = torch.randint(0, 16, (72, 3), dtype=torch.int32)
    q[7::8] = 15  # top nibble of every word set -> negative int32 words
    packed = pack_rows(q, 4)
    assert packed.shape == (9, 3) and bool((packed < 0).all())
    assert torch.equal(unpack_rows(packed, 4, 72), q)


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(48, 2, dtype=torch.int32), 3)  # 3-bit needs multiples of 32
    with pytest.raises(ValueError):
        pack_rows(torch.full((8, 2), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(8, 2, dtype=torch.int32), 5)


def test_3bit_layout_matches_autogptq():
    # value 10 = 0b110: bits 0-1 (=0b10) at word0 bits 30-31, bit 2 at word1 bit 0
    q = torch.zeros(32, 1, dtype=torch.int32)
    q[10] = 0b110
    assert _u32(pack_rows(q, 3)) == [0x80000000, 0x1, 0x0]
    # value 21 = 0b101: bit 0 at word1 bit 31, bits 1-2 (=0b10) at word2 bits 0-1
    q = torch.zeros(32, 1, dtype=torch.int32)
    q[21] = 0b101
    assert _u32(pack_rows(q, 3)) == [0x0, 0x80000000, 0x2]
    # the neighbours: 9 at word0 bit 27, 11 at word1 bit 1, 20 at word1 bit 28, 22 at word2 bit 2
    for j, word, shift in [(0, 0, 0), (9, 0, 27), (11, 1, 1), (20, 1, 28), (22, 2, 2), (31, 2, 29)]:
        q = torch.zeros(32, 1, dtype=torch.int32)
        q[j] = 0b111
        expect = [0, 0, 0]
        expect[word] = 0b111 << shift
        assert _u32(pack_rows(q, 3)) == expect, j
    # the same layout along N for qzeros
    z = torch.zeros(1, 32, dtype=torch.int32)
    z[0, 10] = 0b110
    assert _u32(pack_cols(z, 3)) == [0x80000000, 0x1, 0x0]


def test_qzeros_store_zero_minus_one():
    K, N = 16, 8
    out = pack_gptq(torch.zeros(N, K, dtype=torch.int32), torch.full((2, N), 8), torch.ones(2, N),
                    torch.arange(K) // 8, bits=4)
    assert out["qzeros"].shape == (2, 1) and _u32(out["qzeros"]) == [0x77777777] * 2
    assert out["scales"].dtype == torch.float16 and out["g_idx"].dtype == torch.int32
    # zero 0 wraps to all ones (-1 as int32) and decodes back to 0
    out = pack_gptq(torch.zeros(N, K, dtype=torch.int32), torch.zeros(2, N, dtype=torch.int32),
                    torch.ones(2, N), torch.arange(K) // 8, bits=4)
    assert out["qzeros"].tolist() == [[-1], [-1]]
    _, zeros, _ = unpack_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], 4, K, N)
    assert int(zeros.abs().max()) == 0


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_matches_formula(bits, sym):
    K, N, gs = 64, 32, 16
    G = K // gs
    gen = torch.Generator().manual_seed(100 + bits)
    intweight = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.int32)
    zeros = (torch.full((G, N), 2**(bits - 1), dtype=torch.int32) if sym
             else torch.randint(0, 2**bits, (G, N), generator=gen, dtype=torch.int32))
    scales = torch.rand(G, N, generator=gen) * 0.1 + 0.01
    perm = torch.randperm(K, generator=gen)  # act-order style g_idx
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // gs).to(torch.int32)
    t = pack_gptq(intweight, zeros, scales, g_idx, bits)
    w = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, K, N, torch.float32)
    assert w.shape == (N, K)
    # independent slow path straight from the packed words and the v1 formula
    qw = [[int(v) & 0xFFFFFFFF for v in row] for row in t["qweight"].tolist()]
    qz = [[int(v) & 0xFFFFFFFF for v in row] for row in t["qzeros"].tolist()]
    sc = t["scales"].float().tolist()

    def field(words, idx):  # value idx of a little-endian bit stream of `bits`-bit fields
        out = 0
        for b in range(bits):
            p = idx * bits + b
            out |= ((words(p // 32) >> (p % 32)) & 1) << b
        return out

    mask = 2**bits - 1
    for k in range(K):
        gi = int(g_idx[k])
        for n in range(N):
            q = field(lambda r: qw[r][n], k)
            z = (field(lambda c: qz[gi][c], n) + 1) & mask
            assert q == int(intweight[n, k])
            assert w[n, k].item() == pytest.approx(sc[gi][n] * (q - z), abs=1e-6)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_error_bounded(bits, sym):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    res = rtn_quantize(w, bits, group_size=32, sym=sym)
    assert res.scales.shape == (4, 64) and res.zeros.shape == (4, 64) and res.intweight.shape == (64, 128)
    err = (res.dequantize() - w).abs()
    bound = res.scales[res.g_idx.long()].t() / 2  # (N, K)
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())
    t = res.pack()
    w16 = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 128, 64, torch.float32)
    assert torch.allclose(w16, res.dequantize(), rtol=2e-3, atol=1e-6)


def test_quant_grid_sym_zero_and_flat_rows():
    w = torch.tensor([[0.0, 0.0], [-1.0, 3.0]])
    scale, zero = quant_grid(w, 4, sym=True)
    assert zero.tolist() == [8.0, 8.0]
    assert scale.tolist() == pytest.approx([2 / 15, 6 / 15])
    scale, zero = quant_grid(w, 4, sym=False)
    assert scale.tolist() == pytest.approx([2 / 15, 4 / 15]) and zero[1].item() == 4.0
    assert zero[0].item() == torch.round(1 / scale[0]).item()  # the flat row gets the [-1, 1] grid


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    K, N, n = 128, 64, 512
    A = torch.randn(K, K, generator=gen) / K**0.5
    scale = torch.linspace(0.2, 3.0, K)[torch.randperm(K, generator=gen)]  # uneven channel energy
    x = (torch.randn(n, K, generator=gen) @ A + 0.1 * torch.randn(n, K, generator=gen)) * scale
    w = torch.randn(N, K, generator=gen) * 0.05
    gptq = GPTQ(w)
    for chunk in x.split(100):  # uneven batches exercise the running average
        gptq.add_batch(chunk)
    return x, w, gptq


def test_hessian_running_average(layer):
    x, _, gptq = layer
    assert gptq.nsamples == x.shape[0]
    assert torch.allclose(gptq.H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("desc_act,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_beats_rtn(layer, bits, group_size, desc_act, static_groups):
    x, w, gptq = layer
    res = gptq.quantize(bits, group_size, sym=True, desc_act=desc_act, static_groups=static_groups,
                        block_size=64)
    G = 1 if group_size == -1 else 128 // group_size
    assert res.scales.shape == (G, 64) and res.g_idx.shape == (128,) and res.loss > 0
    # the stored codes reproduce exactly the Q that GPTQ compensated against
    assert torch.equal(res.dequantize(), gptq.Q)
    if desc_act and not static_groups and group_size != -1:
        assert not torch.equal(res.g_idx.long(), torch.arange(128) // group_size)
        assert torch.equal(res.g_idx[res.perm].long(), torch.arange(128) // group_size)
    else:
        assert torch.equal(res.g_idx.long(), torch.arange(128) // (128 if group_size == -1 else group_size))
    e_gptq = relative_output_error(x, w, res.dequantize())
    e_rtn = relative_output_error(x, w, rtn_quantize(w, bits, group_size, sym=True).dequantize())
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)
    # and the packed checkpoint decodes to the same integers
    t = res.pack()
    q, zeros, _ = unpack_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 128, 64)
    assert torch.equal(q, res.intweight) and torch.equal(zeros, res.zeros)


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_asym_and_dead_columns(sym):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=gen)
    x[:, 5] = 0  # a dead input feature
    w = torch.randn(32, 64, generator=gen)
    gptq = GPTQ(w)
    gptq.add_batch(x)
    res = gptq.quantize(4, 16, sym=sym, desc_act=True)
    wq = res.dequantize()
    assert torch.isfinite(wq).all() and wq[:, 5].abs().max() == 0
    assert torch.equal(wq, gptq.Q)
    assert relative_output_error(x, w, wq) < relative_output_error(x, w, rtn_quantize(w, 4, 16, sym).dequantize())


def test_gptq_requires_data():
    with pytest.raises(ValueError):
        GPTQ(torch.randn(4, 8)).quantize(4, -1)
