"""`tokenmill roofline`: what decode can reach on a device, from the model's shape alone.

No weights are loaded: a config.json gives the shape, a table (or a probe, for "cpu") gives the
device, and a roofline gives the bound. With L layers, H query heads, KV heads, head dim d,
vocabulary V, hidden size h, N parameters and b bytes per element of the chosen dtype:

    weight_bytes        W    = N·b            (the whole model is streamed once per decode step)
    kv_bytes_per_token  K    = 2·L·KV·d·b     (one K and one V vector per layer)
    flops_per_token     F(c) = 2·N_mm + 4·L·c·H·d
        N_mm = N minus the input embedding (a lookup, not a matmul) unless it is tied to the
        lm_head; 4·L·c·H·d is QKᵀ plus PV over a context of c tokens.
    decode step, batch B at context c:
        flops = B·F(c);  bytes = W + B·c·K (KV read) + B·K (KV write)
        AI = flops / bytes;  time = max(flops / peak, bytes / bandwidth);  tokens/s ≤ B / time
    ops:bytes (ridge)   R = peak / bandwidth; decode is compute-bound once AI(B, c) ≥ R, i.e. at
        B ≥ R·W / (F(c) − R·(c+1)·K). As B grows AI tends to F(c) / ((c+1)·K) because every
        sequence brings its own KV cache; when that limit is below R (long context, many KV
        heads) no batch size is compute-bound and the answer is None.
    KV tokens that fit  T = (memory·(1 − reserve) − W) / K;  max batch at context c = ⌊T / c⌋.
W counts the whole input embedding though decode reads only B rows of it (≈2% high for
Llama-2-7B: a conservative bound), and the KV cache is taken to be in the weights' dtype.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}
DEFAULT_BATCHES = tuple(2**i for i in range(11))  # 1 .. 1024


@dataclass
class Device:
    """Peak dense FLOP/s per dtype, memory bandwidth (bytes/s) and capacity (bytes; None: unknown)."""
    name: str
    peak_flops: dict[str, float]
    bandwidth: float
    memory_bytes: Optional[float]
    source: str

    def __post_init__(self) -> None:
        if not self.peak_flops:
            raise ValueError(f"device {self.name!r}: no peak FLOP/s given")
        for dt, f in self.peak_flops.items():
            if dt not in DTYPE_BYTES:
                raise ValueError(f"device {self.name!r}: unknown dtype {dt!r} (known: {', '.join(DTYPE_BYTES)})")
            if not f > 0:
                raise ValueError(f"device {self.name!r}: peak FLOP/s for {dt} must be positive, got {f}")
        if not self.bandwidth > 0:
            raise ValueError(f"device {self.name!r}: bandwidth must be positive, got {self.bandwidth}")
        if self.memory_bytes is not None and not self.memory_bytes > 0:
            raise ValueError(f"device {self.name!r}: memory must be positive, got {self.memory_bytes}")

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"device {self.name!r} has no {dtype} peak (has: {', '.join(self.peak_flops)})")
        return self.peak_flops[dtype]

    def ops_per_byte(self, dtype: str) -> float:
        return self.peak(dtype) / self.bandwidth


# Dense (no 2:4 sparsity) tensor-core peaks, SXM parts unless named. Memory is the marketed decimal
# capacity (80e9 although the HBM holds 80 GiB): the smaller number keeps the fit conservative.
DEVICES: dict[str, Device] = {
    "A100": Device("A100", {"float32": 19.5e12, "bfloat16": 312e12, "float16": 312e12}, 2.039e12, 80e9,
                   "NVIDIA A100 datasheet (SXM 80GB, dense); float32 is non-tensor FP32 (TF32 tensor: 156e12)"),
    "H100": Device("H100", {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12, "fp8": 1.98e15},
                   3.35e12, 80e9, "NVIDIA H100 datasheet (SXM, dense)"),
    "H200": Device("H200", {"float32": 67e12, "bfloat16": 989e12, "float16": 989e12, "fp8": 1.98e15},
                   4.8e12, 141e9, "NVIDIA H200 datasheet (SXM, dense; same GH100 compute as H100)"),
    "A6000": Device("A6000", {"float32": 38.7e12, "bfloat16": 154.8e12, "float16": 154.8e12}, 768e9, 48e9,
                    "NVIDIA RTX A6000 datasheet (tensor 309.7e12 is with sparsity; dense is half)"),
    "V100": Device("V100", {"float32": 15.7e12, "float16": 125e12}, 900e9, 32e9,
                   "NVIDIA V100 datasheet (SXM2 32GB; fp16 tensor; no bf16/fp8)"),
}


def probe_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n matmul on the CPU (see bench/probe.py)."""
    import torch

    from tokenmill.bench.probe import measure_matmul_flops

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"cannot probe {dtype} matmul on the CPU")
    return measure_matmul_flops("cpu", getattr(torch, dtype), n, repeats)


def device_peaks_for(device_name: str, dtype: Any) -> Optional[tuple[float, float]]:
    """(peak FLOP/s, bandwidth) from the table for a GPU whose name contains a row's name."""
    key = str(dtype).replace("torch.", "")
    for name, dev in DEVICES.items():
        if name.lower() in device_name.lower() and key in dev.peak_flops:
            return dev.peak_flops[key], dev.bandwidth
    return None


def cpu_device(dtype: str = "float32", n: int = 2048, mib: int = 512, flops: Optional[float] = None,
               bandwidth: Optional[float] = None) -> Device:
    """This machine's CPU, measured now (what is given is not probed: each probe takes seconds)."""
    from tokenmill.bench.probe import measure_read_bandwidth

    peak = flops if flops is not None else probe_matmul_flops(dtype, n)
    bw = bandwidth if bandwidth is not None else measure_read_bandwidth("cpu", mib=mib)
    ram = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    logger.info("cpu: %s %.3g FLOP/s, %.3g B/s, %.3g B RAM", dtype, peak, bw, ram)
    return Device("cpu", {dtype: peak}, bw, ram, f"measured now: {n}^3 matmul, {mib} MiB read (unless given)")


def resolve_device(name: str, dtype: str, flops: Optional[float] = None, bandwidth: Optional[float] = None,
                   memory_gib: Optional[float] = None) -> Device:
    """A table row, the probed CPU or a custom device, with --flops/--bandwidth/--memory-gib applied."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    for flag, v in (("--flops", flops), ("--bandwidth", bandwidth), ("--memory-gib", memory_gib)):
        if v is not None and not v > 0:
            raise ValueError(f"{flag} must be positive, got {v}")
    if name == "custom":
        if flops is None or bandwidth is None:
            raise ValueError("--device custom needs --flops and --bandwidth")
        dev = Device("custom", {dtype: flops}, bandwidth, None, "given on the command line")
    elif name == "cpu":
        if dtype == "fp8":
            raise ValueError("device 'cpu' has no fp8 matmul to probe")
        dev = cpu_device(dtype, flops=flops, bandwidth=bandwidth)
    elif name in DEVICES:
        dev = DEVICES[name]
        if flops is None:
            dev.peak(dtype)  # a dtype the device lacks is an error unless its peak is given
        if flops is not None or bandwidth is not None:
            dev = dataclasses.replace(dev, peak_flops={**dev.peak_flops, **({dtype: flops} if flops else {})},
                                      bandwidth=bandwidth or dev.bandwidth, source=dev.source + " (overridden)")
    else:
        raise ValueError(f"unknown device {name!r} (known: {', '.join([*DEVICES, 'cpu', 'custom'])})")
    # A copy either way: callers may adjust it without touching the shared table.
    return dataclasses.replace(dev, memory_bytes=memory_gib * 2**30 if memory_gib is not None else dev.memory_bytes)


# Families with a two-matrix (non-gated) MLP and, in transformers, tied embeddings by default.
_GPT_STYLE = {"gpt2", "opt", "bloom"}


def _pick(cfg: Mapping[str, Any], *keys: str) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


@dataclass
class ModelShape:
    """A decoder's shape; num_params is computed for the Llama-family layout when not given."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    num_params: Optional[int] = None
    gated_mlp: bool = True  # gate+up+down (Llama); False: up+down (GPT-2/OPT/Bloom)

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) > 0):
                raise ValueError(f"model shape: {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape: {self.num_heads} heads do not split into {self.num_kv_heads} KV heads")
        if self.num_params is None:
            self.num_params = self._count_params()

    def _count_params(self) -> int:
        # Biases, learned positions and norm biases are ignored: under 2% for the families read here.
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        layer = h * q + 2 * h * kv + q * h + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embed + self.num_layers * layer + h

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelShape":
        """From a transformers PretrainedConfig or a dict read from config.json."""
        cfg = cfg if isinstance(cfg, Mapping) else cfg.to_dict()
        cfg = cfg.get("text_config") or cfg  # multimodal checkpoints nest the decoder's config
        gpt = cfg.get("model_type") in _GPT_STYLE
        hidden = _pick(cfg, "hidden_size", "n_embd", "d_model")
        heads = _pick(cfg, "num_attention_heads", "n_head")
        got = dict(num_layers=_pick(cfg, "num_hidden_layers", "n_layer", "num_layers"), hidden_size=hidden,
                   num_heads=heads, vocab_size=_pick(cfg, "vocab_size"),
                   intermediate_size=_pick(cfg, "intermediate_size", "ffn_dim", "n_inner")
                   or (4 * hidden if gpt and hidden else None))
        missing = [k for k, v in got.items() if v is None]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)} (Llama/Mistral/Qwen2 or GPT-2/OPT keys)")
        kv = _pick(cfg, "num_key_value_heads") or heads
        head_dim = _pick(cfg, "head_dim") or hidden // heads
        tie = cfg.get("tie_word_embeddings")
        return cls(**got, num_kv_heads=kv, head_dim=head_dim, gated_mlp=not gpt,
                   tie_word_embeddings=bool(gpt if tie is None else tie))

    def weight_bytes(self, dtype: str) -> int:
        return self.num_params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def flops_per_token(self, context: int) -> int:
        # The input embedding is a row lookup; when tied, the same matrix is the lm_head matmul.
        matmul_params = self.num_params - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
        return 2 * matmul_params + 4 * self.num_layers * context * self.num_heads * self.head_dim


def load_config(model: Optional[str] = None, config: Optional[str] = None) -> dict[str, Any]:
    """config.json from --config, or from the MODEL folder (a .json path is also taken as MODEL)."""
    if config is None and model is None:
        raise ValueError("give a MODEL folder or --config config.json")
    path = Path(config) if config is not None else Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"config not found: {str(path)!r}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from None


def decode_step(shape: ModelShape, device: Device, dtype: str, batch: int, context: int) -> dict[str, Any]:
    """The roofline bound of one decode step (see the module docstring)."""
    if batch < 1 or context < 0:
        raise ValueError(f"batch must be ≥ 1 and context ≥ 0, got {batch}, {context}")
    kv = shape.kv_bytes_per_token(dtype)
    flops = batch * shape.flops_per_token(context)
    nbytes = shape.weight_bytes(dtype) + batch * context * kv + batch * kv
    t_compute, t_memory = flops / device.peak(dtype), nbytes / device.bandwidth
    t = max(t_compute, t_memory)
    return dict(batch=batch, flops=flops, bytes=nbytes, arithmetic_intensity=flops / nbytes, time_s=t,
                tokens_per_s=batch / t, bound="compute" if t_compute >= t_memory else "memory")


def compute_bound_batch(shape: ModelShape, device: Device, dtype: str, context: int) -> Optional[int]:
    """Smallest batch whose decode step reaches the ridge at this context; None when none does."""
    r = device.ops_per_byte(dtype)
    f, kv, w = shape.flops_per_token(context), shape.kv_bytes_per_token(dtype), shape.weight_bytes(dtype)
    denom = f - r * (context + 1) * kv
    if denom <= 0:
        return None  # AI never exceeds F/((c+1)K) < R: KV reads grow as fast as FLOPs
    b = max(1, math.ceil(r * w / denom))
    # Float rounding can land one off either side of the exact threshold.
    while b > 1 and decode_step(shape, device, dtype, b - 1, context)["arithmetic_intensity"] >= r:
        b -= 1
    while decode_step(shape, device, dtype, b, context)["arithmetic_intensity"] < r:
        b += 1
    return b


def kv_tokens_fit(shape: ModelShape, device: Device, dtype: str, reserve: float = 0.0) -> Optional[int]:
    """KV-cache tokens that fit beside the weights (0 if the weights do not fit; None: memory unknown)."""
    if not 0 <= reserve < 1:
        raise ValueError(f"reserve must be in [0, 1), got {reserve}")
    if device.memory_bytes is None:
        return None
    free = device.memory_bytes * (1 - reserve) - shape.weight_bytes(dtype)
    return max(0, math.floor(free / shape.kv_bytes_per_token(dtype)))


def analyze(shape: ModelShape, device: Device, dtype: str, context: int, reserve: float = 0.0,
            batches: tuple[int, ...] = DEFAULT_BATCHES) -> dict[str, Any]:
    """The whole report as a JSON-ready dict."""
    if context < 1:
        raise ValueError(f"context must be ≥ 1, got {context}")
    tokens = kv_tokens_fit(shape, device, dtype, reserve)
    max_batch = None if tokens is None else tokens // context
    sizes = sorted(set(batches) | ({max_batch} if max_batch else set()))
    rows = [dict(decode_step(shape, device, dtype, b, context), fits=None if max_batch is None else b <= max_batch)
            for b in sizes]
    return dict(
        device=dict(name=device.name, source=device.source, peak_flops=device.peak(dtype),
                    bandwidth=device.bandwidth, memory_bytes=device.memory_bytes,
                    ops_per_byte=device.ops_per_byte(dtype)),
        dtype=dtype, context=context, reserve=reserve, model=dataclasses.asdict(shape),
        weight_bytes=shape.weight_bytes(dtype), kv_bytes_per_token=shape.kv_bytes_per_token(dtype),
        flops_per_token=shape.flops_per_token(context),
        compute_bound_batch=compute_bound_batch(shape, device, dtype, context),
        kv_tokens_fit=tokens, max_batch=max_batch, batches=rows)


def plot_roofline(report: dict[str, Any], path: str | Path) -> None:
    """Log-log attainable FLOP/s against arithmetic intensity, with the decode points on the roof."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend state to disturb

    dev, rows = report["device"], report["batches"]
    peak, bw, ridge = dev["peak_flops"], dev["bandwidth"], dev["ops_per_byte"]
    ais = [r["arithmetic_intensity"] for r in rows]
    x = np.logspace(math.log10(min(ais + [ridge]) / 4), math.log10(max(ais + [ridge]) * 4), 200)
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.loglog(x, np.minimum(peak, x * bw), color="black", label=f"{dev['name']} roof ({report['dtype']})")
    ax.axvline(ridge, color="gray", linestyle=":", label=f"ridge: {ridge:.0f} FLOP/B")
    last, n = 0.0, 0
    for r in rows:
        ai, y = r["arithmetic_intensity"], r["flops"] / r["time_s"]
        ax.scatter(ai, y, edgecolors="tab:blue", facecolors="none" if r["fits"] is False else "tab:blue")
        if ai > 1.15 * last:  # at long context the points bunch up under the KV limit: label only spread ones
            # Alternate below-right / above-left of the roof, or neighbouring labels overlap.
            ax.annotate(f"B={r['batch']}", (ai, y), textcoords="offset points", xytext=((4, -10), (-4, 4))[n % 2],
                        ha=("left", "right")[n % 2], fontsize=7)
            n += 1
            last = ai
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(f"decode at context {report['context']} (hollow: does not fit in memory)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)


def _si(x: Optional[float], unit: str) -> str:
    if x is None:
        return "unknown"
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model folder (its config.json is read)")
    p.add_argument("--config", default=None, metavar="PATH", help="a config.json instead of MODEL")
    p.add_argument("--device", required=True, choices=[*DEVICES, "cpu", "custom"])
    p.add_argument("--dtype", default="float16", choices=list(DTYPE_BYTES))
    p.add_argument("--memory-gib", type=float, default=None, help="device memory (overrides the table)")
    p.add_argument("--reserve", type=float, default=0.0, help="fraction of memory kept free (default 0)")
    p.add_argument("--flops", type=float, default=None, help="peak FLOP/s for --dtype (overrides the table)")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth, bytes/s")
    p.add_argument("--context", type=int, default=2048, help="context length of the table (default 2048)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the roofline chart (PNG)")


def run(args: argparse.Namespace) -> int:
    shape = ModelShape.from_hf_config(load_config(args.model, args.config))
    device = resolve_device(args.device, args.dtype, args.flops, args.bandwidth, args.memory_gib)
    rep = analyze(shape, device, args.dtype, args.context, args.reserve)
    d, c = rep["device"], rep["context"]
    print(f"device   {d['name']} ({d['source']})")
    print(f"         peak {_si(d['peak_flops'], 'FLOP/s')} {rep['dtype']}, bandwidth {_si(d['bandwidth'], 'B/s')}, "
          f"memory {_si(d['memory_bytes'], 'B')}, ops:bytes {d['ops_per_byte']:.0f}")
    print(f"model    {shape.num_params:,} params, weights {_si(rep['weight_bytes'], 'B')}, "
          f"KV {rep['kv_bytes_per_token']:,} B/token, {_si(rep['flops_per_token'], 'FLOP')}/token at context {c}")
    cb, mb = rep["compute_bound_batch"], rep["max_batch"]
    limit = rep["flops_per_token"] / ((c + 1) * rep["kv_bytes_per_token"])
    print(f"decode at context {c} turns compute-bound at batch {cb}"
          + (f" (beyond memory's max batch {mb})" if mb is not None and cb > mb else "") if cb else
          f"decode at context {c} is never compute-bound: each sequence's KV reads cap FLOP/B at {limit:.1f}, "
          f"below ops:bytes {d['ops_per_byte']:.0f}")
    if rep["kv_tokens_fit"] is not None:
        print(f"memory   {rep['kv_tokens_fit']:,} KV tokens fit beside the weights: max batch {rep['max_batch']} "
              f"at context {c}")
    print(f"{'batch':>6} {'FLOP/B':>9} {'tokens/s':>11}  {'bound':<8} fits")
    for r in rep["batches"]:
        fits = {None: "?", True: "yes", False: "no"}[r["fits"]]
        print(f"{r['batch']:>6} {r['arithmetic_intensity']:>9.1f} {r['tokens_per_s']:>11.1f}  {r['bound']:<8} {fits}")
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    if args.plot:
        plot_roofline(rep, args.plot)
        print(f"wrote {args.plot}")
    return 0
