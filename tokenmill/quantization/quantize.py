"""`tokenmill quantize`: GPTQ (or RTN) a Hugging Face checkpoint, layer by layer, into the GPTQ v1
checkpoint format.

As in the paper: calibration samples run through the model once to capture the first decoder
layer's inputs; then, layer by layer, each group of linears that read the same input (q/k/v,
then o, then gate/up, then down: `true_sequential`) accumulates H = 2XXᵀ/n from inputs that
already went through the quantized modules before it, is quantized, and has its weights replaced
by the dequantized ones; the layer's outputs under quantization become the next layer's inputs.
The reference model is transformers' own implementation, so any architecture it runs can be
calibrated the same way.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from tokenmill.quantization.checkpoint import save_quantized
from tokenmill.quantization.config import QuantizeConfig
from tokenmill.quantization.gptq import GPTQ
from tokenmill.quantization.packing import dequantize_gptq, pack_gptq
from tokenmill.quantization.rtn import rtn_quantize
from tokenmill.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = Path(__file__).resolve().parents[2] / "data" / "demo_train.txt"


@dataclass
class ModuleReport:
    name: str
    bits: int
    group_size: int
    rel_error: float  # ||XW - XŴ|| / ||XW|| on the calibration inputs


@dataclass
class QuantizeReport:
    modules: list[ModuleReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Stop(Exception):
    """Raised by the capture hook once the first layer's inputs are recorded."""


def load_calibration_text(path: Optional[str]) -> str:
    p = Path(path) if path else DEFAULT_CALIBRATION
    if not p.is_file():
        raise ValueError(f"calibration file not found: {str(p)!r}")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{p}:{i + 1}: expected a JSON object with a 'text' field") from None
        return "\n\n".join(texts)
    return p.read_text(encoding="utf-8")


def calibration_samples(tokenizer: Any, text: str, num_samples: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """Random windows of seq_len tokens from the text, as the GPTQ paper samples C4."""
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    if len(ids) <= seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens; need more than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - seq_len) for _ in range(num_samples)]
    return [ids[s:s + seq_len][None] for s in starts]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "transformer.layers"):
        obj: Any = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _sequential_groups(layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor,
                       kwargs: dict[str, Any], true_sequential: bool) -> list[list[str]]:
    """Linears in the order the layer calls them, grouped by the input tensor they share."""
    if not true_sequential:
        return [list(linears)]
    calls: list[tuple[str, int]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: calls.append((n, id(inp[0]))))
             for name, m in linears.items()]
    try:
        _run_layer(layer, hidden, kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last_input = None
    for name, inp in calls:
        if groups and inp == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    return groups


def _relative_error(h: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    # ||X(W-Ŵ)ᵀ||² = tr(ΔW XᵀX ΔWᵀ) and H ∝ XᵀX, so the ratio needs only H.
    d = (w - w_hat).float()
    num = torch.einsum("nk,kl,nl->", d, h, d)
    den = torch.einsum("nk,kl,nl->", w.float(), h, w.float())
    return math.sqrt(max(num.item(), 0.0) / den.item()) if den.item() > 0 else 0.0


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in Linear layout (out, in), whatever the module stores."""
    return module.weight.data.t() if _is_conv1d(module) else module.weight.data


def _quantize_module(name: str, module: nn.Module, gptq: GPTQ, settings: dict[str, Any], method: str,
                     packed_out: dict[str, dict[str, torch.Tensor]], report: QuantizeReport) -> None:
    w = _linear_weight(module).float()
    h = gptq.H.clone()
    if method == "rtn":
        res = rtn_quantize(w, settings["bits"], settings["group_size"], settings["sym"])
    else:
        res = gptq.quantize(bits=settings["bits"], group_size=settings["group_size"], sym=settings["sym"],
                            desc_act=settings["desc_act"], static_groups=settings["static_groups"],
                            damp_percent=settings["damp_percent"])
    packed = pack_gptq(res.intweight, res.zeros, res.scales, res.g_idx, settings["bits"])
    w_hat = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"],
                            settings["bits"], w.shape[1], w.shape[0], torch.float32)
    report.modules.append(ModuleReport(name, settings["bits"], settings["group_size"], _relative_error(h, w, w_hat)))
    # Later layers calibrate on what will be served.
    module.weight.data = (w_hat.t() if _is_conv1d(module) else w_hat).contiguous().to(module.weight.dtype)
    packed_out[name] = packed


@torch.inference_mode()
def quantize_model(model_dir: str, out_dir: str, qcfg: QuantizeConfig, method: str = "gptq",
                   calibration: Optional[str] = None, num_samples: int = 128, seq_len: int = 2048,
                   seed: int = 0, max_shard_size: int = 2 << 30) -> QuantizeReport:
    from transformers import AutoModelForCausalLM

    if method not in ("gptq", "rtn"):
        raise ValueError(f"method must be gptq or rtn, got {method!r}")
    if num_samples < 1 or seq_len < 2:
        raise ValueError("num_samples must be >= 1 and seq_len >= 2")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tok = load_tokenizer(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if qcfg.lm_head and hf.config.tie_word_embeddings:
        raise ValueError("--lm-head: this model ties lm_head to the input embeddings; quantizing it would "
                         "quantize the embeddings too, so it is refused")
    limit = getattr(hf.config, "max_position_embeddings", seq_len)
    if seq_len > limit:
        logger.warning("seq_len %d exceeds the model's %d positions; using %d", seq_len, limit, limit)
        seq_len = limit
    samples = calibration_samples(tok, load_calibration_text(calibration), num_samples, seq_len, seed)
    layers = _decoder_layers(hf)
    layer_prefix = next(n for n, m in hf.named_modules() if m is layers)

    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def capture(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured.append((args[0] if args else kwargs.pop("hidden_states"), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    for s in tqdm(samples, desc="calibration inputs", unit="sample", leave=False):
        try:
            hf(s, use_cache=False)
        except _Stop:
            pass
    handle.remove()
    inputs = [h for h, _ in captured]
    kwargs = [kw for _, kw in captured]

    report = QuantizeReport()
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for i, layer in enumerate(tqdm(layers, desc=f"{method} {qcfg.bits}-bit", unit="layer")):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
        for group in _sequential_groups(layer, linears, inputs[0], kwargs[0], qcfg.true_sequential):
            todo = {}
            for n in group:
                full = f"{layer_prefix}.{i}.{n}"
                settings = qcfg.for_module(full)
                if settings is None:
                    report.skipped.append(full)
                else:
                    todo[n] = (full, settings, GPTQ(_linear_weight(linears[n])))
            hooks = [linears[n].register_forward_hook(
                lambda mod, inp, out, g=g: g.add_batch(inp[0].reshape(-1, inp[0].shape[-1])))
                for n, (_, _, g) in todo.items()]
            for h, kw in zip(inputs, kwargs):
                _run_layer(layer, h, kw)
            for hk in hooks:
                hk.remove()
            for n, (full, settings, g) in todo.items():
                _quantize_module(full, linears[n], g, settings, method, packed, report)
        inputs = [_run_layer(layer, h, kw) for h, kw in zip(inputs, kwargs)]
    if qcfg.lm_head:
        settings = qcfg.for_module("lm_head")
        if settings is not None:
            g = GPTQ(hf.lm_head.weight.data)
            norm = hf.get_decoder().norm
            for h in inputs:
                g.add_batch(norm(h).reshape(-1, h.shape[-1]))
            _quantize_module("lm_head", hf.lm_head, g, settings, method, packed, report)
    report.seconds = time.perf_counter() - t0
    save_quantized(hf, tok, model_dir, out_dir, qcfg, packed, max_shard_size)
    return report


def format_report(report: QuantizeReport) -> str:
    lines = [f"{'module':52} {'bits':>4} {'group':>6} {'rel. output error':>18}"]
    for m in report.modules:
        lines.append(f"{m.name:52} {m.bits:>4} {m.group_size:>6} {m.rel_error:>18.4f}")
    if report.skipped:
        lines.append(f"left unquantized by dynamic rules: {len(report.skipped)} module(s), e.g. {report.skipped[0]}")
    lines.append(f"quantized {len(report.modules)} modules in {report.seconds:.1f} s")
    return "\n".join(lines)
