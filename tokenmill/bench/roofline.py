"""`tokenmill roofline`: what decode can reach on a device, from the model's shape alone.

No weights are loaded: a config.json gives the shape (tokenmill/model_cost.py, the same cost
description the engine uses), the device table or a probe gives the device (tokenmill/devices.py),
and a roofline gives the bound. With L layers, H query heads, KV heads, head dim d, vocabulary V,
hidden size h, N parameters and b bytes per element of the chosen dtype:

    weight_bytes        W    = N·b            (the whole model is streamed once per decode step)
    kv_bytes_per_token  K    = 2·L·KV·d·b     (one K and one V vector per layer)
    flops_per_token     F(c) = 2·(M + V·h) + 4·L·c·H·d
        M = the layers' linear weights, V·h the lm_head (the input embedding is a lookup, not a
        matmul); 4·L·c·H·d is QKᵀ plus PV over a context of c tokens.
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
import sys
from pathlib import Path
from typing import Any, Optional

from tokenmill.devices import DEVICE_CHOICES, DTYPE_BYTES, Device, resolve_device
from tokenmill.model_cost import ModelShape

logger = logging.getLogger(__name__)

DEFAULT_BATCHES = tuple(2**i for i in range(11))  # 1 .. 1024


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
    cost = shape.cost(dtype)
    kv = cost.kv_bytes_per_token
    flops = batch * cost.flops_per_token(context)
    nbytes = cost.weight_bytes + batch * context * kv + batch * kv
    t_compute, t_memory = flops / device.peak(dtype), nbytes / device.bandwidth
    t = max(t_compute, t_memory)
    return dict(batch=batch, flops=flops, bytes=nbytes, arithmetic_intensity=flops / nbytes, time_s=t,
                tokens_per_s=batch / t, bound="compute" if t_compute >= t_memory else "memory")


def compute_bound_batch(shape: ModelShape, device: Device, dtype: str, context: int) -> Optional[int]:
    """Smallest batch whose decode step reaches the ridge at this context; None when none does."""
    r, cost = device.ops_per_byte(dtype), shape.cost(dtype)
    f, kv, w = cost.flops_per_token(context), cost.kv_bytes_per_token, cost.weight_bytes
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
    cost = shape.cost(dtype)
    free = device.memory_bytes * (1 - reserve) - cost.weight_bytes
    return max(0, math.floor(free / cost.kv_bytes_per_token))


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
    cost = shape.cost(dtype)
    return dict(
        device=dict(name=device.name, source=device.source, peak_flops=device.peak(dtype),
                    bandwidth=device.bandwidth, memory_bytes=device.memory_bytes,
                    ops_per_byte=device.ops_per_byte(dtype)),
        dtype=dtype, context=context, reserve=reserve, model=dataclasses.asdict(shape),
        weight_bytes=cost.weight_bytes, kv_bytes_per_token=cost.kv_bytes_per_token,
        flops_per_token=cost.flops_per_token(context),
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
    p.add_argument("--device", required=True, type=str.lower, choices=[c.lower() for c in DEVICE_CHOICES],
                   help=f"one of {', '.join(DEVICE_CHOICES)} (any letter case)")
    p.add_argument("--dtype", default="float16", choices=list(DTYPE_BYTES))
    p.add_argument("--memory-gib", type=float, default=None, help="device memory (overrides the table)")
    p.add_argument("--reserve", type=float, default=0.0, help="fraction of memory kept free (default 0)")
    p.add_argument("--flops", type=float, default=None, help="peak FLOP/s for --dtype (overrides the table)")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth, bytes/s")
    p.add_argument("--context", type=int, default=2048, help="context length of the table (default 2048)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON ('-': to stdout)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the roofline chart (PNG)")


def run(args: argparse.Namespace) -> int:
    shape = ModelShape.from_hf_config(load_config(args.model, args.config))
    device = resolve_device(args.device, args.dtype, args.flops, args.bandwidth, args.memory_gib)
    rep = analyze(shape, device, args.dtype, args.context, args.reserve)
    if args.json == "-":  # the JSON alone on stdout, for a pipe
        json.dump(rep, sys.stdout, indent=2)
        sys.stdout.write("\n")
        if args.plot:
            plot_roofline(rep, args.plot)
        return 0
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
