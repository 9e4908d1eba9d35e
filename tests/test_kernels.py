"""tokenmill's CPU kernels against the reference paths, the backend picker, and forced backends."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import hf_greedy, random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.kernels import cpu_ops
from tokenmill.kernels.linear import BUCKETS, BackendPicker, assign_linear_kernels
from tokenmill.layers.quant_linear import GPTQLinear
from tokenmill.quantization.packing import pack_cols, pack_rows

needs_kernels = pytest.mark.skipif(not cpu_ops.load(), reason="no C++ toolchain for tokenmill's CPU kernels")


@needs_kernels
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(5, 37), (33, 100), (129, 16), (70, 768), (256, 250)])
def test_dense_kernel_matches_aten(n, k, wdtype):
    torch.manual_seed(n * k)
    w = torch.randn(n, k).to(wdtype)
    for m in (1, 2, 3, 5, 8, 9, 17):  # every register-tile count, and more rows than one tile
        x = torch.randn(m, k)
        got = torch.ops.tokenmill_cpu.dense_gemv(x, w)
        torch.testing.assert_close(got, F.linear(x, w.float()), atol=1e-4 * k ** 0.5, rtol=1e-4)


def _random_gptq(k: int, n: int, bits: int, group: int, act_order: bool, seed: int) -> GPTQLinear:
    g = torch.Generator().manual_seed(seed)
    layer = GPTQLinear(k, n, bias=True, bits=bits, group_size=group, act_order=act_order)
    groups = layer.qzeros.shape[0]
    q = torch.randint(0, 2 ** bits, (k, n), generator=g, dtype=torch.int32)
    layer.qweight.copy_(pack_rows(q, bits))
    layer.qzeros.copy_(pack_cols(torch.randint(0, 2 ** bits - 1, (groups, n), generator=g, dtype=torch.int32), bits))
    layer.scales.copy_((torch.rand(groups, n, generator=g) * 0.02 + 0.001).half())
    g_idx = torch.arange(k, dtype=torch.int32) // layer.group_size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    layer.g_idx.copy_(g_idx)
    layer.bias.data.normal_(generator=g)
    return layer


@needs_kernels
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group,act_order", [(32, False), (64, True), (-1, False)])
def test_gptq_kernel_matches_dequantized_reference(bits, group, act_order):
    k, n = 192, 80  # N a multiple of 16 but not of the kernel's 64-column strip
    layer = _random_gptq(k, n, bits, group, act_order, seed=bits + group)
    ref_w = layer.dequantized_weight(torch.float32)
    for m in (1, 3, 4, 7, 16):
        x = torch.randn(m, k)
        got = layer(x)
        assert "kernel_qweight" in layer._fast, "the packed kernel should serve this layer"
        torch.testing.assert_close(got, F.linear(x, ref_w, layer.bias), atol=2e-4, rtol=1e-4)
    x = torch.randn(40, k)  # several row tiles
    torch.testing.assert_close(layer(x), F.linear(x, ref_w, layer.bias), atol=2e-4, rtol=1e-4)
    del layer._fast["kernel_qweight"]  # the torch path (CUDA, or no compiler): same answer
    torch.testing.assert_close(layer(x), F.linear(x, ref_w, layer.bias), atol=2e-4, rtol=1e-4)


def test_picker_never_picks_a_slow_backend_and_caches(tmp_path):
    def slow(x, w):
        time.sleep(0.002)
        return F.linear(x, w)

    calls = []

    def timer(fn, weights, rows, repeats):
        calls.append(rows)
        t0 = time.perf_counter()
        for w in weights[:2]:
            fn(torch.randn(rows, w.shape[1]), w)
        return time.perf_counter() - t0

    cache = tmp_path / "plan.json"
    picker = BackendPicker({"slow": slow, "aten": lambda x, w: F.linear(x, w)}, cache, timer=timer)
    plan = picker.plan(24, 40, torch.float32)
    assert set(plan.names) == set(BUCKETS) and set(plan.names.values()) == {"aten"}
    picker.save()
    assert json.loads(cache.read_text())["timings"]
    timed = len(calls)
    again = BackendPicker({"slow": slow, "aten": lambda x, w: F.linear(x, w)}, cache, timer=timer)
    assert again.plan(24, 40, torch.float32).names == plan.names
    assert len(calls) == timed, "a cached shape is not timed again"
    x = torch.randn(3, 5, 40)  # leading dims are flattened and restored
    w = torch.randn(24, 40)
    torch.testing.assert_close(plan(x, w), F.linear(x, w))


def test_unknown_or_unavailable_backend_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="linear_backend must be one of"):
        assign_linear_kernels(model, "mkl", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="not available"):
        assign_linear_kernels(model, "tokenmill", torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("backend", ["aten", "onednn", "tokenmill"])
def test_forced_backend_is_token_exact(make_checkpoint, backend):
    if backend == "tokenmill" and not cpu_ops.load():
        pytest.skip("no C++ toolchain")
    path, hf = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, hidden_size=72, intermediate_size=100)
    prompts = random_prompts([1, 5, 19, 40], seed=7)
    llm = LLM(path, dtype="float32", linear_backend=backend, block_size=7)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, 8)
    assert set(v for names in llm.llm_engine.model_runner.linear_backends.values() for v in names.values()) == {backend}
    with pytest.raises(ValueError, match="linear_backend"):
        LLM(path, linear_backend="fastest")


def test_prompt_list_is_scheduled_in_one_step(make_checkpoint):
    """What the server does with `prompt: [...]`: one submission, one first step for all."""
    from tokenmill.engine.async_engine import AsyncLLMEngine

    path, _ = make_checkpoint("LlamaForCausalLM")
    llm = LLM(path, dtype="float32")
    batches: list[int] = []
    engine = AsyncLLMEngine(llm.llm_engine, on_step=lambda e, stepped: stepped and batches.append(
        e.get_stats().batch_num_seqs))

    async def main() -> list[int]:
        prompts = random_prompts([4, 9, 13, 30, 2, 17, 8, 21], seed=1)
        streams = engine.generate_batch([(f"r{i}", p, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), 0)
                                         for i, p in enumerate(prompts)])
        counts = []
        for s in streams:
            last = None
            async for out in s:
                last = out
            counts.append(len(last.outputs[0].token_ids))
        return counts

    try:
        assert asyncio.run(main()) == [3] * 8
    finally:
        engine.shutdown()
    assert batches[0] == 8, f"the first step ran {batches[0]} of the 8 prompts"
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_blocks


@needs_kernels
@pytest.mark.parametrize("heads,kv_heads,hd,window,alibi", [(4, 2, 16, None, False), (6, 1, 20, 5, False),
                                                           (3, 3, 32, None, True), (8, 4, 64, 9, True)])
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_one_call_step_attention_matches_gather_path(heads, kv_heads, hd, window, alibi, block_size):
    """Decodes and prefill chunks (fresh, and continuing earlier chunks) in one kernel call per
    layer, reading the pool in place, against the per-group / per-chunk SDPA path."""
    from tokenmill.layers.attention import AttentionContext, PagedAttention, set_attention_context

    torch.manual_seed(heads * hd + block_size)
    slopes = [0.5 ** (i + 1) for i in range(heads)] if alibi else None
    # Three decodes, then a fresh 19-token prompt and a 21-token chunk after 2 * block_size + 3 tokens.
    computed = [0, 2, block_size + 1, 0, 2 * block_size + 3]
    query_lens = [1, 1, 1, 19, 21]
    context = [c + n for c, n in zip(computed, query_lens)]
    width = max(-(-c // block_size) for c in context)
    num_blocks = width * len(context) + 7
    tables = torch.randperm(num_blocks)[:width * len(context)].view(len(context), width)  # scattered, disjoint
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(computed, query_lens)])
    seq_of = torch.repeat_interleave(torch.arange(len(context)), torch.tensor(query_lens))
    slots = tables[seq_of, positions // block_size] * block_size + positions % block_size
    T = len(positions)
    q, k, v = torch.randn(T, heads * hd), torch.randn(T, kv_heads * hd), torch.randn(T, kv_heads * hd)
    outs, pool = [], (torch.randn(num_blocks, block_size, kv_heads, hd), torch.randn(num_blocks, block_size, kv_heads, hd))
    for in_place in (True, False):
        attn = PagedAttention(heads, kv_heads, hd, hd ** -0.5, sliding_window=window, alibi_slopes=slopes)
        attn.k_cache, attn.v_cache = pool[0].clone(), pool[1].clone()  # earlier chunks' K/V: random
        attn._in_place_flag = in_place
        ctx = AttentionContext(slots, tables, torch.tensor(context), query_lens, 3, [(0, 3)])
        set_attention_context(ctx)
        try:
            outs.append(attn(q, k, v))
        finally:
            set_attention_context(None)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("hidden,heads,hd", [(37, 3, 6), (256, 12, 32), (768, 5, 128)])
def test_fused_layer_ops_match_reference(hidden, heads, hd):
    from tokenmill.layers.norm import RMSNorm
    from tokenmill.layers.rotary import RotaryEmbedding

    torch.manual_seed(hidden)
    x = torch.randn(9, hidden) * 3
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data.normal_()
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), ref, atol=1e-5, rtol=1e-5)

    gate_up = torch.randn(9, 2 * hidden)
    gate, up = gate_up.split(hidden, dim=-1)
    torch.testing.assert_close(torch.ops.tokenmill_cpu.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)

    rope = RotaryEmbedding(hd, 64, 10000.0, None, torch.float32)
    positions = torch.tensor([0, 5, 63, 17, 2, 2, 40, 1, 9])
    rows = torch.randn(9, (heads + 2) * hd)  # heads rotated, then two heads left alone (like v)
    expected = rope(positions, rows[:, :heads * hd].reshape(9, heads, hd)).reshape(9, -1)
    untouched = rows[:, heads * hd:].clone()
    assert rope.rotate_(positions, rows, heads)
    torch.testing.assert_close(rows[:, :heads * hd], expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(rows[:, heads * hd:], untouched)


@needs_kernels
@pytest.mark.parametrize("shared_order", [True, False])
def test_merged_gptq_pieces_share_one_kernel_call_when_they_can(shared_order):
    from tokenmill.layers.quant_linear import GPTQMergedLinear

    k, sizes = 128, {"q": 64, "k": 32, "v": 32}
    merged = GPTQMergedLinear(k, sizes, bias=True, bits=4, group_size=32)
    pieces = {name: _random_gptq(k, n, 4, 32, act_order=True, seed=1 if shared_order else i)
              for i, (name, n) in enumerate(sizes.items())}
    if shared_order:  # q/k/v quantized against one input share the act-order permutation
        for p in pieces.values():
            p.g_idx.copy_(pieces["q"].g_idx)
    for name, p in pieces.items():
        for leaf in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            getattr(merged.shards[name], leaf).data.copy_(getattr(p, leaf).data)
    x = torch.randn(3, k)
    ref = torch.cat([F.linear(x, p.dequantized_weight(torch.float32), p.bias) for p in pieces.values()], dim=-1)
    torch.testing.assert_close(merged(x), ref, atol=2e-4, rtol=1e-4)
    assert (merged._merged_kernel() is not None) == shared_order
    assert not any("kernel" in n for n in merged.state_dict())  # no second copy in the state dict
