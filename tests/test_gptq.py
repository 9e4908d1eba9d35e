"""GPTQ end to end: quantize a tiny model, serve the folder, compare with transformers running the
dequantized weights; shards with hash checks; dynamic rules; the lm_head option."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import hf_greedy, random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.quantization.config import QuantizeConfig
from tokenmill.quantization.packing import dequantize_gptq
from tokenmill.quantization.quantize import quantize_model


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> str:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:200_000])
    return str(path)


def read_folder(folder: str) -> dict[str, torch.Tensor]:
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(Path(folder) / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def dequantized_reference(hf_model, folder: str):
    """transformers' model holding exactly what the quantized folder holds, dequantized to float32."""
    cfg = QuantizeConfig.from_dict(json.loads((Path(folder) / "config.json").read_text())["quantization_config"])
    tensors = read_folder(folder)
    state = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            m = name[: -len(".qweight")]
            bits = cfg.for_module(m)["bits"]
            k, n = tensors[f"{m}.g_idx"].shape[0], tensors[f"{m}.scales"].shape[1]
            w = dequantize_gptq(t, tensors[f"{m}.qzeros"], tensors[f"{m}.scales"], tensors[f"{m}.g_idx"], bits,
                                k, n, torch.float32)
            conv1d = type(hf_model.get_submodule(m)).__name__ == "Conv1D"  # GPT-2 stores (in, out)
            state[f"{m}.weight"] = w.t().contiguous() if conv1d else w
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = t.float()
    ref = type(hf_model)(hf_model.config).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    ref.tie_weights()
    return ref


@pytest.mark.parametrize("bits,group,desc_act,sym", [(4, 32, False, True), (4, 32, True, False), (3, 32, True, True),
                                                     (8, -1, False, True), (2, 64, False, False)])
def test_quantized_folder_serves_like_dequantized_transformers(make_checkpoint, calib, tmp_path, bits, group,
                                                               desc_act, sym):
    path, hf = make_checkpoint("LlamaForCausalLM", seed=3, tie_word_embeddings=False)
    out = tmp_path / "q"
    report = quantize_model(path, str(out), QuantizeConfig(bits=bits, group_size=group, desc_act=desc_act, sym=sym),
                            calibration=calib, num_samples=8, seq_len=64)
    assert len(report.modules) == 2 * 7 and all(0 <= m.rel_error < 1 for m in report.modules)
    ref = dequantized_reference(hf, str(out))
    prompts = random_prompts([5, 19, 33], seed=bits)
    llm = LLM(str(out), dtype="float32")
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(ref, p, 8) for p in prompts]


@pytest.mark.parametrize("arch,overrides,num_linear", [("BloomForCausalLM", {}, 4),
                                                       ("OPTForCausalLM", dict(ffn_dim=128), 6),
                                                       ("GPT2LMHeadModel", dict(n_inner=128), 4)])
def test_other_architectures_quantize_and_serve(make_checkpoint, calib, tmp_path, arch, overrides, num_linear):
    path, hf = make_checkpoint(arch, seed=8, **overrides)
    out = tmp_path / "q"
    report = quantize_model(path, str(out), QuantizeConfig(bits=4, group_size=32, desc_act=True), calibration=calib,
                            num_samples=8, seq_len=64)
    assert len(report.modules) == 2 * num_linear
    ref = dequantized_reference(hf, str(out))
    prompts = random_prompts([6, 21], seed=2)
    outs = LLM(str(out), dtype="float32").generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(ref, p, 6) for p in prompts]


def test_gptq_beats_rtn_and_weights_stay_small(make_checkpoint, calib, tmp_path):
    path, _ = make_checkpoint("LlamaForCausalLM", seed=4, hidden_size=256, intermediate_size=512,
                              num_attention_heads=8, num_key_value_heads=4)
    errors = {}
    for method in ("rtn", "gptq"):
        r = quantize_model(path, str(tmp_path / method), QuantizeConfig(bits=3, group_size=128), method=method,
                           calibration=calib, num_samples=16, seq_len=128)
        errors[method] = sum(m.rel_error for m in r.modules) / len(r.modules)
    assert errors["gptq"] < errors["rtn"]
    llm = LLM(str(tmp_path / "gptq"), dtype="float32")
    from tokenmill.layers.quant_linear import GPTQLinear

    q4 = quantize_model(path, str(tmp_path / "g4"), QuantizeConfig(bits=4, group_size=128), calibration=calib,
                        num_samples=4, seq_len=64)
    assert q4.modules
    model = LLM(str(tmp_path / "g4"), dtype="float32").llm_engine.model_runner.model
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    packed = sum(b.numel() * b.element_size() for m in layers for b in (m.qweight, m.qzeros, m.scales, m.g_idx))
    fp16 = sum(m.in_features * m.out_features * 2 for m in layers)
    assert packed <= 0.3 * fp16
    assert llm.generate("The", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_shard_hashes_catch_a_flipped_byte(make_checkpoint, calib, tmp_path):
    path, _ = make_checkpoint("LlamaForCausalLM", seed=5)
    out = tmp_path / "q"
    quantize_model(path, str(out), QuantizeConfig(bits=4, group_size=32), calibration=calib, num_samples=4,
                   seq_len=32, max_shard_size=40_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    LLM(str(out))  # intact: loads
    data = bytearray(shards[1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    with pytest.raises(ValueError, match=shards[1].name):
        LLM(str(out))


def test_dynamic_rules_and_lm_head(make_checkpoint, calib, tmp_path):
    cfg = QuantizeConfig(bits=4, group_size=32, dynamic={
        r"-:.*mlp\.down_proj": {}, r"+:.*self_attn\.(q|k)_proj": {"bits": 8}, r".*self_attn\..*": {"bits": 2}})
    assert cfg.for_module("model.layers.0.mlp.down_proj") is None
    assert cfg.for_module("model.layers.0.self_attn.q_proj")["bits"] == 8  # first match wins
    assert cfg.for_module("model.layers.0.self_attn.v_proj")["bits"] == 2
    assert cfg.for_module("model.layers.0.mlp.up_proj")["bits"] == 4
    with pytest.raises(ValueError, match="bits"):
        QuantizeConfig(dynamic={".*": {"bits": 5}})
    path, hf = make_checkpoint("LlamaForCausalLM", seed=6, tie_word_embeddings=False)
    cfg.lm_head = True
    out = tmp_path / "dyn"
    # q/k at 8 bits, v at 2: the fused qkv needs one setting, so these rules must be refused at load.
    quantize_model(path, str(out), cfg, calibration=calib, num_samples=4, seq_len=32)
    with pytest.raises(ValueError, match="different bits"):
        LLM(str(out))
    cfg = QuantizeConfig(bits=4, group_size=32, lm_head=True, dynamic={r"-:.*mlp\.down_proj": {},
                                                                        r".*self_attn\..*": {"bits": 8}})
    quantize_model(path, str(out), cfg, calibration=calib, num_samples=4, seq_len=32)
    tensors = read_folder(str(out))
    assert "model.layers.0.mlp.down_proj.weight" in tensors and "model.layers.0.mlp.down_proj.qweight" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape[0] == 64 * 8 // 32
    assert tensors["model.layers.0.mlp.up_proj.qweight"].shape[0] == 64 * 4 // 32
    assert "lm_head.qweight" in tensors
    ref = dequantized_reference(hf, str(out))
    p = random_prompts([12], seed=9)[0]
    got = LLM(str(out), dtype="float32").generate({"prompt_token_ids": p}, SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert got == hf_greedy(ref, p, 6)
    tied, _ = make_checkpoint("LlamaForCausalLM", seed=6, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="ties lm_head"):
        quantize_model(tied, str(tmp_path / "tied"), QuantizeConfig(lm_head=True), calibration=calib,
                       num_samples=2, seq_len=32)


@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (4, 32, True), (2, 64, True), (8, 128, False),
                                                  (3, 32, True), (4, 48, False)])
def test_quantized_linear_forward_equals_float_linear_on_dequantized_weights(bits, group, act_order):
    from tokenmill.layers.quant_linear import GPTQLinear
    from tokenmill.quantization.rtn import rtn_quantize

    torch.manual_seed(bits * 100 + group)
    K, N = 128 if group != 48 else 96, 64
    res = rtn_quantize(torch.randn(N, K), bits, group, sym=False)
    g_idx = res.g_idx
    if act_order:  # an act-order style g_idx: groups assigned through a random permutation
        perm = torch.randperm(K)
        g_idx = torch.empty(K, dtype=torch.int32)
        g_idx[perm] = (torch.arange(K) // group).to(torch.int32)
    from tokenmill.quantization.packing import pack_gptq

    packed = pack_gptq(res.intweight, res.zeros, res.scales, g_idx, bits)
    layer = GPTQLinear(K, N, bias=True, bits=bits, group_size=group)
    for name, t in packed.items():
        getattr(layer, name).copy_(t)
    layer.bias.data = torch.randn(N)
    x = torch.randn(5, K)
    w = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits, K, N,
                        torch.float32)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
