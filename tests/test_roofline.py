"""The roofline calculator against hand-computed numbers (no weights, no network, no GPU)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tokenmill import devices
from tokenmill.bench import roofline as rl
from tokenmill.devices import DEVICES, Device
from tokenmill.model_cost import ModelShape

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)

# Tiny shape, worked by hand: embed 32·8 = 256 (untied: ×2 = 512); per layer q 8·8 = 64, k+v 2·8·4 = 64,
# o 64, mlp 3·8·16 = 384, norms 16 → 592, ×2 layers = 1184; final norm 8 → 1704 params.
TINY = ModelShape(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16,
                  vocab_size=32, tie_word_embeddings=False)
# float16: W = 3408 B; K = 2·2·1·4·2 = 32 B/token; the layers' linears 2·(64 + 64 + 64 + 384) = 1152 and
# the head 32·8 = 256: F(16) = 2·(1152 + 256) + 4·2·16·8 = 2816 + 1024 = 3840.
W, K, F16 = 3408, 32, 3840


def device(flops: float = 4e9, bandwidth: float = 1e9, memory: float | None = None) -> Device:
    return Device("test", {"float16": flops}, bandwidth, memory, "test")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    rl.add_args(p)
    return p.parse_args(list(argv))


def test_h100_fp8_ops_per_byte() -> None:
    assert DEVICES["H100"].ops_per_byte("fp8") == pytest.approx(591, abs=1)
    assert DEVICES["H100"].ops_per_byte("float16") == pytest.approx(295, abs=1)


def test_llama2_7b_shape() -> None:
    shape = ModelShape.from_hf_config(LLAMA2_7B)
    assert shape.num_params == 6_738_415_616
    assert shape.cost("float16").weight_bytes == pytest.approx(13.48e9, rel=1e-3)
    assert shape.cost("float16").kv_bytes_per_token == 524_288
    assert shape.head_dim == 128 and shape.num_kv_heads == 32


def test_from_transformers_config_matches_dict() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in LLAMA2_7B.items() if k != "model_type"})
    assert ModelShape.from_hf_config(cfg).num_params == 6_738_415_616


def test_tiny_shape_by_hand() -> None:
    assert TINY.num_params == 1704
    cost = TINY.cost("float16")
    assert cost.weight_bytes == W and cost.kv_bytes_per_token == K
    assert cost.flops_per_token(16) == F16
    tied = ModelShape(2, 8, 2, 1, 4, 16, 32, tie_word_embeddings=True)
    assert tied.num_params == 1704 - 256
    assert tied.cost("float16").flops_per_token(0) == 2 * (1152 + 256)  # the tied matrix is the lm_head matmul


def test_arithmetic_intensity_by_hand() -> None:
    one = rl.decode_step(TINY, device(), "float16", 1, 16)
    # bytes = W + 1·16·K (read) + 1·K (write) = 3408 + 512 + 32 = 3952
    assert one["flops"] == 3840 and one["bytes"] == 3952
    assert one["arithmetic_intensity"] == pytest.approx(3840 / 3952)
    assert one["bound"] == "memory"
    assert one["tokens_per_s"] == pytest.approx(1 / (3952 / 1e9))
    b64 = rl.decode_step(TINY, device(), "float16", 64, 16)
    # flops = 64·3840 = 245760; bytes = 3408 + 64·17·32 = 38224
    assert (b64["flops"], b64["bytes"]) == (245_760, 38_224)
    assert b64["arithmetic_intensity"] == pytest.approx(245_760 / 38_224)
    assert b64["bound"] == "compute"
    assert b64["tokens_per_s"] == pytest.approx(64 / (245_760 / 4e9))


def test_compute_bound_batch_by_hand() -> None:
    # ops:bytes 4: B·(3840 − 4·17·32) ≥ 4·3408 → B ≥ 13632 / 1664 = 8.2 → 9.
    assert rl.compute_bound_batch(TINY, device(), "float16", 16) == 9
    assert rl.decode_step(TINY, device(), "float16", 8, 16)["arithmetic_intensity"] < 4
    # ops:bytes 8 is above the limit 3840 / (17·32) = 7.1 that AI approaches: never compute-bound.
    assert rl.compute_bound_batch(TINY, device(flops=8e9), "float16", 16) is None
    # Llama-2-7B (32 KV heads) on an H100 at 2048 context: KV reads cap AI near 13 FLOP/B.
    llama = ModelShape.from_hf_config(LLAMA2_7B)
    assert rl.compute_bound_batch(llama, DEVICES["H100"], "float16", 2048) is None


def test_kv_tokens_fit() -> None:
    assert rl.kv_tokens_fit(TINY, device(memory=10_000), "float16") == (10_000 - W) // K == 206
    assert rl.kv_tokens_fit(TINY, device(memory=10_000), "float16", reserve=0.1) == 174  # (9000 − 3408) // 32
    assert rl.kv_tokens_fit(TINY, device(memory=1_000), "float16") == 0  # the weights alone do not fit
    assert rl.kv_tokens_fit(TINY, device(), "float16") is None
    rep = rl.analyze(TINY, device(memory=10_000), "float16", context=16, batches=(1, 8, 16))
    assert rep["max_batch"] == 12  # 206 // 16
    assert [(r["batch"], r["fits"]) for r in rep["batches"]] == [(1, True), (8, True), (12, True), (16, False)]


def test_plot_is_png(tmp_path: Path) -> None:
    rep = rl.analyze(ModelShape.from_hf_config(LLAMA2_7B), DEVICES["H100"], "float16", 2048)
    out = tmp_path / "roof.png"
    rl.plot_roofline(rep, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MODEL"):
        rl.load_config(None, None)
    with pytest.raises(ValueError, match="not found"):
        rl.load_config(str(tmp_path))
    with pytest.raises(ValueError, match="fp8"):
        devices.resolve_device("V100", "fp8")
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelShape.from_hf_config({k: v for k, v in LLAMA2_7B.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="--flops must be positive"):
        devices.resolve_device("custom", "float16", flops=-1, bandwidth=1e9)
    with pytest.raises(ValueError, match="needs --flops"):
        devices.resolve_device("custom", "float16", bandwidth=1e9)
    with pytest.raises(ValueError, match="bandwidth"):
        Device("x", {"float16": 1.0}, 0, None, "")
    with pytest.raises(ValueError, match="positive integer"):
        ModelShape(0, 8, 2, 1, 4, 16, 32, False)


def test_device_overrides() -> None:
    dev = devices.resolve_device("custom", "fp8", flops=2e15, bandwidth=4e12, memory_gib=10)
    assert dev.ops_per_byte("fp8") == 500 and dev.memory_bytes == 10 * 2**30
    a100 = devices.resolve_device("A100", "bfloat16", memory_gib=40)
    assert a100.memory_bytes == 40 * 2**30 and DEVICES["A100"].memory_bytes == 80e9  # the table is untouched


def test_cpu_device_probe_is_quick() -> None:
    dev = devices.cpu_device("float32", n=128, mib=8)
    assert dev.peak("float32") > 0 and dev.bandwidth > 0 and dev.memory_bytes > 2**28


def test_run_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA2_7B))
    out, png = tmp_path / "report.json", tmp_path / "roof.png"
    assert rl.run(parse("--config", str(cfg), "--device", "H100", "--context", "128",
                        "--json", str(out), "--plot", str(png))) == 0
    rep = json.loads(out.read_text())
    assert set(rep) == {"device", "dtype", "context", "reserve", "model", "weight_bytes", "kv_bytes_per_token",
                        "flops_per_token", "compute_bound_batch", "kv_tokens_fit", "max_batch", "batches"}
    assert set(rep["device"]) == {"name", "source", "peak_flops", "bandwidth", "memory_bytes", "ops_per_byte"}
    assert set(rep["batches"][0]) == {"batch", "flops", "bytes", "arithmetic_intensity", "time_s",
                                      "tokens_per_s", "bound", "fits"}
    assert rep["model"]["num_params"] == 6_738_415_616 and rep["kv_bytes_per_token"] == 524_288
    assert png.is_file() and "compute-bound" in capsys.readouterr().out
    # the MODEL folder form reads the same config.json
    assert rl.run(parse(str(tmp_path), "--device", "custom", "--flops", "1e12", "--bandwidth", "1e11")) == 0
    with pytest.raises(ValueError):
        rl.run(parse("--device", "H100"))


def test_gpt2_style_keys() -> None:
    gpt2 = dict(model_type="gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_inner=None)
    shape = ModelShape.from_hf_config(gpt2)
    assert (shape.intermediate_size, shape.tie_word_embeddings, shape.gated_mlp) == (3072, True, False)
    # 124.4M with biases and learned positions, which the count leaves out (under 1% here)
    assert shape.num_params == 123_551_232


def test_device_names_in_any_case_and_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert devices.resolve_device("h100", "float16").name == "H100"
    assert devices.resolve_device(" a100 ", "bfloat16").bandwidth == DEVICES["A100"].bandwidth
    with pytest.raises(ValueError, match="any letter case"):
        devices.resolve_device("h900", "float16")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA2_7B))
    assert rl.run(parse("--config", str(cfg), "--device", "h100", "--json", "-")) == 0
    rep = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    assert rep["device"]["name"] == "H100" and rep["model"]["num_params"] == 6_738_415_616
