"""Live utilisation: the FLOPs and bytes the engine counts per step, against a hand count."""
from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams


def test_step_cost_matches_hand_count(make_checkpoint):
    path, _ = make_checkpoint("LlamaForCausalLM", seed=30, tie_word_embeddings=False)
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True)
    runner = llm.llm_engine.model_runner
    # hidden 64, intermediate 128, 2 layers, 4 heads / 2 KV heads of 16, vocab 512, untied.
    linear = 2 * (64 * (64 + 32 + 32) + 64 * 64 + 64 * 2 * 128 + 128 * 64)
    head = 512 * 64
    weights = 4 * (512 * 64 + head + linear + 2 * 2 * 64 + 64)
    kv_per_token = 2 * 2 * 2 * 16 * 4
    assert (runner.cost.matmul_params, runner.cost.head_params) == (linear, head)
    assert (runner.weight_bytes, runner.kv_bytes_per_token) == (weights, kv_per_token)
    llm.generate({"prompt_token_ids": list(range(5, 15))}, SamplingParams(max_tokens=2, ignore_eos=True),
                 use_tqdm=False)
    # Step 1: a 10-token prefill, one logit row; step 2: one decode token at position 10.
    flops = (2 * linear * 10 + 2 * head + 4 * 2 * 64 * 55) + (2 * linear + 2 * head + 4 * 2 * 64 * 11)
    nbytes = (weights + 10 * kv_per_token * 2) + (weights + 11 * kv_per_token + kv_per_token)
    meter = runner.meter
    assert meter.total_flops == flops and meter.total_bytes == nbytes
    meter.set_peaks(1e9, 2e9)
    assert meter.mfu() == pytest.approx(flops / meter.total_seconds / 1e9)
    assert meter.mbu() == pytest.approx(nbytes / meter.total_seconds / 2e9)
    util = llm.llm_engine.utilization()
    assert util["flops"] == flops and util["mbu"] == pytest.approx(meter.mbu())
