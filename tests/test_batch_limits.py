"""Default max_num_seqs / max_num_batched_tokens from the roofline (engine/batch_limits.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tokenmill.config import CacheConfig, ModelConfig, SchedulerConfig
from tokenmill.devices import DEVICES
from tokenmill.engine.batch_limits import choose_limits, resolve_scheduler_limits
from tokenmill.model_cost import ModelShape

DEMO = str(Path(__file__).resolve().parents[1] / "tokenmill" / "demo_model")

# Llama-3-8B's shape (GQA 32:8, untied 128k vocabulary), fp16 on an H100.
LLAMA_8B = ModelShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
# bench throughput's default model (~100M, fp32) on a CPU: ~2 cores' matmul, dual-channel DRAM.
LLAMA_100M = ModelShape(num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=4, head_dim=64,
                        intermediate_size=2048, vocab_size=32000, tie_word_embeddings=True)
H100 = DEVICES["H100"]


def _first_chunk_reaching(cost, intensity, n):
    """n is the fewest prompt tokens whose prefill step reaches this FLOP/byte."""
    flops, nbytes = cost.step([(0, n)], 1)
    below, below_bytes = cost.step([(0, n - 1)], 1)
    return flops / nbytes >= intensity > below / below_bytes


def test_h100_8b_model_batches_in_the_hundreds_capped_by_kv():
    cost = LLAMA_8B.cost("float16")
    free = choose_limits(cost, H100.peak("float16"), H100.bandwidth, kv_pool_tokens=None,
                         typical_context=2048, max_model_len=4096)
    assert free.ridge == pytest.approx(989e12 / 3.35e12)
    # Batch B does B * 2 * (matmul + head) FLOPs over the weight bytes, read once: the crossing.
    expected = free.ridge * cost.weight_bytes / (2 * (cost.matmul_params + cost.head_params))
    assert free.compute_bound_batch == pytest.approx(expected)
    assert 300 < expected < 330
    # 90% of the rate, B / (B + B_c) = 0.9, with a step's memory side twice the weight read: B_c = 2 B*.
    assert free.efficient_batch == pytest.approx(2 * 9 * expected)
    assert free.max_num_seqs == 1024  # the cap
    # An 80 GB H100 holds ~55 GB of KV beside the 16 GB of weights: 420k tokens of 128 KiB.
    lim = choose_limits(cost, H100.peak("float16"), H100.bandwidth, kv_pool_tokens=420_000,
                        typical_context=2048, max_model_len=4096)
    assert lim.kv_cap == 205 and lim.max_num_seqs == 205
    # The budget: every running decode plus the first prefill chunk at 18x the ridge.
    assert _first_chunk_reaching(cost, 18 * lim.ridge, lim.prefill_chunk)
    assert 5500 < lim.prefill_chunk < 6500
    assert lim.max_num_batched_tokens == 205 + lim.prefill_chunk
    assert free.max_num_batched_tokens == 1024 + lim.prefill_chunk


def test_compute_poor_cpu_batches_small():
    cost = LLAMA_100M.cost("float32")
    lim = choose_limits(cost, 60e9, 30e9, kv_pool_tokens=200_000, typical_context=1024, max_model_len=2048)
    assert lim.ridge == pytest.approx(2.0)
    assert lim.compute_bound_batch == pytest.approx(2.0 * cost.weight_bytes / cost.flops_per_token(0))
    assert 3.9 < lim.compute_bound_batch < 4.1  # fp32: 4 bytes per 2 FLOPs, times the ridge of 2
    assert lim.efficient_batch == pytest.approx(18 * lim.compute_bound_batch)
    assert lim.max_num_seqs == 80  # 72.01, rounded up to a multiple of 8
    assert _first_chunk_reaching(cost, 36.0, lim.prefill_chunk)
    assert lim.max_num_batched_tokens == 512  # the floor: 80 decodes + a ~96-token chunk is less
    # The same machine in bfloat16 (faster matmul, half the bytes) crosses later.
    bf16 = choose_limits(LLAMA_100M.cost("bfloat16"), 270e9, 30e9, None, 1024, 2048)
    assert bf16.max_num_seqs == 168 and bf16.kv_cap is None


def test_the_kv_pool_caps_the_batch():
    cost = LLAMA_8B.cost("float16")
    lim = choose_limits(cost, H100.peak("float16"), H100.bandwidth, kv_pool_tokens=40 * 2048 + 100,
                        typical_context=2048, max_model_len=4096)
    assert lim.kv_cap == 40 and lim.max_num_seqs == 40
    assert lim.max_num_batched_tokens == 40 + lim.prefill_chunk
    # A pool too small for one sequence of typical length still runs one.
    assert choose_limits(cost, H100.peak("float16"), H100.bandwidth, 100, 2048, 4096).max_num_seqs == 1
    # The typical context is at most max_model_len.
    assert choose_limits(cost, H100.peak("float16"), H100.bandwidth, 10 * 512, 4096, 512).kv_cap == 10


def test_given_values_win():
    cost = LLAMA_8B.cost("float16")
    peak, bw = H100.peak("float16"), H100.bandwidth
    lim = choose_limits(cost, peak, bw, 450_000, 1024, 8192, max_num_seqs=64, max_num_batched_tokens=100)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (64, 100)
    lim = choose_limits(cost, peak, bw, 450_000, 1024, 8192, max_num_seqs=2000)
    assert lim.max_num_seqs == 2000 and lim.max_num_batched_tokens == 2000 + lim.prefill_chunk
    # A given budget bounds the chosen batch: each running decode takes a token of it.
    lim = choose_limits(cost, peak, bw, 450_000, 1024, 8192, max_num_batched_tokens=100)
    assert (lim.max_num_seqs, lim.max_num_batched_tokens) == (100, 100)


def _fake_peaks(monkeypatch, flops=60e9, bandwidth=30e9):
    calls = []

    def peaks(device, dtype):
        calls.append((device, dtype))
        return flops, bandwidth
    monkeypatch.setattr("tokenmill.devices.peaks", peaks)
    return calls


def test_resolve_fills_the_config_and_logs_the_numbers(monkeypatch, caplog):
    calls = _fake_peaks(monkeypatch)
    mc = ModelConfig(DEMO, dtype="float32", device="cpu")  # reads config.json only
    sc = SchedulerConfig(max_model_len=mc.max_model_len)
    assert sc.max_num_seqs is None and sc.max_num_batched_tokens is None
    per_token = 2 * 6 * 4 * 32 * 4  # K and V, 6 layers, 4 KV heads of 32, fp32
    cache = CacheConfig(kv_cache_memory_bytes=3 * 512 * per_token)  # 3 sequences of half max_model_len
    with caplog.at_level(logging.INFO, logger="tokenmill.engine.batch_limits"):
        lim = resolve_scheduler_limits(sc, mc, cache)
    assert len(calls) == 1
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (3, 512) == (lim.max_num_seqs, lim.max_num_batched_tokens)
    assert lim.kv_pool_tokens == 3 * 512 and lim.typical_context == 512
    msg = caplog.records[-1].getMessage()
    assert 3 < lim.compute_bound_batch < 5 and lim.efficient_batch > 30  # so the pool is what binds
    for part in ("max_num_seqs=3", f"compute-bound at batch {lim.compute_bound_batch:.1f}", "ridge 2.0 FLOP/byte",
                 "60 GFLOP/s", "30 GB/s", f"90% of its compute-bound tokens/s at batch {lim.efficient_batch:.1f}",
                 "step time = 2 x weight read + compute",
                 "holds 3 sequences of 512 tokens", "max_num_batched_tokens=512",
                 f"3 decodes + a {lim.prefill_chunk}-token prefill chunk"):
        assert part in msg, (part, msg)
    # Resolved once: a second call (the engine's, say) changes nothing and probes nothing.
    assert resolve_scheduler_limits(sc, mc, cache) is None and len(calls) == 1
    # A draft model whose KV per token equals the target's halves the pool's tokens.
    from tokenmill.model_cost import ModelShape

    draft = ModelShape.from_hf_config(mc.hf_config).cost("float32")
    sc = SchedulerConfig(max_model_len=mc.max_model_len)
    assert resolve_scheduler_limits(sc, mc, cache, companion=draft).kv_pool_tokens == 3 * 512 // 2


def test_resolve_keeps_given_flags_without_probing(monkeypatch):
    calls = _fake_peaks(monkeypatch)
    mc = ModelConfig(DEMO, dtype="float32", device="cpu")
    sc = SchedulerConfig(max_num_seqs=5, max_num_batched_tokens=77, max_model_len=mc.max_model_len)
    assert resolve_scheduler_limits(sc, mc, CacheConfig()) is None
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (5, 77) and not calls
    sc = SchedulerConfig(max_num_seqs=5, max_model_len=mc.max_model_len)
    resolve_scheduler_limits(sc, mc, CacheConfig(num_gpu_blocks_override=10))
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (5, 512)


def test_gptq_weights_stream_fewer_bytes(monkeypatch):
    _fake_peaks(monkeypatch, 60e9, 30e9)
    mc = ModelConfig(DEMO, dtype="float32", device="cpu")
    shape = ModelShape.from_hf_config(mc.hf_config)
    full = shape.cost("float32")
    mc.hf_config.quantization_config = {"quant_method": "gptq", "bits": 4}
    lim = resolve_scheduler_limits(SchedulerConfig(max_model_len=mc.max_model_len), mc,
                                   CacheConfig(num_gpu_blocks_override=10_000))
    w = (shape.num_params - full.matmul_params) * 4 + full.matmul_params // 2
    assert lim.compute_bound_batch == pytest.approx(2.0 * w / full.flops_per_token(0), rel=1e-6)
    assert lim.compute_bound_batch < 0.5 * 2.0 * full.weight_bytes / full.flops_per_token(0)


def test_scheduler_config_validates():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=-1)


def test_llm_builds_with_roofline_limits(monkeypatch):
    """The engine gets the chosen limits, and the CPU pool is sized from them."""
    from tokenmill import LLM

    _fake_peaks(monkeypatch, 60e9, 30e9)
    llm = LLM(DEMO, dtype="float32", device="cpu", skip_tokenizer_init=True, linear_backend="aten")
    sc = llm.llm_engine.scheduler_config
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (80, 512)
    assert llm.llm_engine.scheduler.config.max_num_seqs == 80
    runner = llm.llm_engine.model_runner
    assert runner.num_blocks == 80 * (1024 // 16)  # capped at max_num_seqs full-length sequences
    llm = LLM(DEMO, dtype="float32", device="cpu", skip_tokenizer_init=True, linear_backend="aten",
              max_num_seqs=3, max_num_batched_tokens=64)
    sc = llm.llm_engine.scheduler_config
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (3, 64)



def test_cuda_pool_is_sized_before_the_weights_load(monkeypatch):
    """On CUDA the pool is free memory less the weights (not loaded yet) and the reserve."""
    import torch
    from types import SimpleNamespace

    _fake_peaks(monkeypatch, H100.peak("float16"), H100.bandwidth)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79e9, 80e9))
    cfg = dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
               tie_word_embeddings=False)
    mc = SimpleNamespace(model="llama-8b", hf_config=cfg, torch_dtype=torch.float16,
                         torch_device=torch.device("cuda"))
    sc = SchedulerConfig(max_model_len=8192)
    lim = resolve_scheduler_limits(sc, mc, CacheConfig())
    weights = LLAMA_8B.cost("float16").weight_bytes
    assert lim.kv_pool_tokens == (int(0.9 * 80e9) - 2**30 - weights) // 131072
    assert lim.kv_cap == lim.kv_pool_tokens // 4096 == sc.max_num_seqs  # ~104 sequences of 4k tokens
    # Tensor parallel over 2: each rank holds half of the weights and of every token's KV.
    from tokenmill.config import ParallelConfig

    lim2 = resolve_scheduler_limits(SchedulerConfig(max_model_len=8192), mc, CacheConfig(),
                                    ParallelConfig(tensor_parallel_size=2))
    assert lim2.kv_pool_tokens == (int(0.9 * 80e9) - 2**30 - weights // 2) // 65536


def test_unreadable_config_falls_back_to_fixed_limits(monkeypatch, caplog):
    import torch
    from types import SimpleNamespace

    calls = _fake_peaks(monkeypatch)
    mc = SimpleNamespace(model="odd", hf_config={"model_type": "odd"}, torch_dtype=torch.float32,
                         torch_device=torch.device("cpu"))
    sc = SchedulerConfig(max_model_len=4096)
    with caplog.at_level(logging.WARNING, logger="tokenmill.engine.batch_limits"):
        assert resolve_scheduler_limits(sc, mc, CacheConfig()) is None
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (64, 4096) and not calls
    assert "no roofline for odd" in caplog.text


def test_bench_throughput_compares_the_chosen_limits_with_the_fixed_ones(monkeypatch):
    """Alternating runs (roofline, fixed, roofline, ...) on the same workload; the ratio is the
    median of the pairs' ratios, and the fixed run uses the old 64 / max(2048, max_model_len)."""
    import argparse

    from tokenmill.bench import throughput

    calls = []
    speeds = iter([100.0, 50.0, 90.0, 100.0, 120.0])  # fixed, roofline, fixed, roofline, fixed

    def fake_run(model, args, work, bandwidth):
        calls.append((args.max_num_seqs, args.max_num_batched_tokens))
        return dict(output_tokens_per_s=next(speeds), max_num_seqs=args.max_num_seqs or 152,
                    max_num_batched_tokens=args.max_num_batched_tokens or 512, max_model_len=4096)

    monkeypatch.setattr(throughput, "_run_tokenmill", fake_run)
    args = argparse.Namespace(max_num_seqs=None, max_num_batched_tokens=None, limits_repeats=3)
    first = dict(output_tokens_per_s=110.0, max_num_seqs=152, max_num_batched_tokens=512, max_model_len=4096)
    out = throughput._compare_limits("m", args, [], 1.0, first)
    assert calls == [(64, 4096), (None, None), (64, 4096), (None, None), (64, 4096)]
    assert [r["output_tokens_per_s"] for r in out["roofline"]] == [110.0, 50.0, 100.0]
    assert out["ratio"] == pytest.approx(100.0 / 120.0)  # pairs 1.1, 0.556, 0.833
    assert out["median_output_tokens_per_s"] == {"roofline": 100.0, "fixed": 100.0}
