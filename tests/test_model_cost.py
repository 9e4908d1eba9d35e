"""One description of a model's cost (model_cost.ModelCost), against counts worked by hand, for a
float model and its GPTQ version; the engine's spill cost model and meter read the same numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill import LLM
from tokenmill.model_cost import ModelCost, ModelShape
from tokenmill.quantization.config import QuantizeConfig
from tokenmill.quantization.quantize import quantize_model

# The conftest Llama: vocab 512, hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, untied.
# Per layer: q 64·64 + k 64·32 + v 64·32 + o 64·64 + MLP 3·64·128 = 36864 linear weights.
MATMUL = 2 * 36864  # 73728
HEAD = 512 * 64  # 32768, the same count as the input embedding
NORMS = 2 * 2 * 64 + 64  # two per layer and the final one
PARAMS = HEAD + MATMUL + NORMS + HEAD  # embedding + layers + norms + lm_head = 139584
KV_F32 = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head_dim x 4 bytes = 512


def test_float_model_cost_by_hand(make_checkpoint):
    path, _ = make_checkpoint("LlamaForCausalLM")
    llm = LLM(path, skip_tokenizer_init=True)
    cost = llm.llm_engine.model_runner.cost
    assert cost == ModelCost(num_params=PARAMS, matmul_params=MATMUL, head_params=HEAD, weight_bytes=4 * PARAMS,
                             kv_bytes_per_token=KV_F32, num_layers=2, q_size=64)
    assert cost.flops_per_token(10) == 2 * (MATMUL + HEAD) + 4 * 2 * 64 * 10
    # One chunk of 3 tokens after 5 computed, one row of logits: 3 + 3·5 + 3·4/2 keys... by the formula.
    flops, nbytes = cost.step([(5, 3)], 1)
    assert flops == 2 * MATMUL * 3 + 2 * HEAD + 4 * 2 * 64 * (3 * 5 + 6)
    assert nbytes == 4 * PARAMS + 8 * KV_F32 + 3 * KV_F32
    # The roofline reads the same numbers from config.json alone.
    config = json.loads((Path(path) / "config.json").read_text())
    assert ModelShape.from_hf_config(config).cost("float32") == cost
    # The spill tier prices a recomputed token with the same FLOPs.
    assert llm.llm_engine.block_manager.cost_model.flops_per_token == cost.flops_per_token()


def test_gptq_model_cost_by_hand(make_checkpoint, tmp_path):
    path, _ = make_checkpoint("LlamaForCausalLM")
    out = tmp_path / "w4"
    quantize_model(path, str(out), QuantizeConfig(bits=4, group_size=32), method="rtn", num_samples=4, seq_len=32)
    llm = LLM(str(out), skip_tokenizer_init=True)
    cost = llm.llm_engine.model_runner.cost
    # A K x N layer at 4 bits, groups of 32: qweight K·N/2 bytes, qzeros K·N/64, fp16 scales K·N/16,
    # g_idx 4·K. K is 64 for q, k, v, o, gate and up, and 128 for down.
    packed = 2 * (36864 * 37 // 64 + 4 * (6 * 64 + 128))
    # A GPTQ checkpoint is float16, so dtype "auto" runs it in bfloat16 on CPU: the embedding,
    # lm_head and norms take 2 bytes a weight, and so does the KV cache.
    unquantized = 2 * (HEAD + HEAD + NORMS)
    assert cost.weight_bytes == packed + unquantized == 178432
    assert cost.kv_bytes_per_token == KV_F32 // 2
    # Quantized weights still multiply once per token: FLOPs and parameters are the float model's.
    assert (cost.num_params, cost.matmul_params, cost.head_params) == (PARAMS, MATMUL, HEAD)
    assert llm.llm_engine.block_manager.cost_model.flops_per_token == 2 * (MATMUL + HEAD)


@pytest.mark.parametrize("dtype,nbytes", [("float16", 2), ("fp8", 1)])
def test_shape_cost_per_dtype(dtype, nbytes):
    shape = ModelShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, vocab_size=512, tie_word_embeddings=False)
    cost = shape.cost(dtype)
    assert (cost.weight_bytes, cost.kv_bytes_per_token) == (nbytes * PARAMS, KV_F32 // 4 * nbytes)
    with pytest.raises(ValueError, match="unknown dtype"):
        shape.cost("int3")
