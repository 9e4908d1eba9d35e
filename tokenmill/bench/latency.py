"""`tokenmill bench latency`: one request at a time, tokenmill and transformers on the same model.

Batch-1 prefill tokens/s (the prompt's forward, to the first token) and decode tokens/s (the
steps after it), side by side in one run, with the decode bound set by the probed memory
bandwidth: every weight is read once per decoded token, so no engine decodes faster than
bandwidth / weight bytes. `--quantized` adds rows for GPTQ checkpoints of the same model (made
with `tokenmill quantize`), whose bound is their own, smaller weight bytes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.bench.throughput import random_llama

logger = logging.getLogger(__name__)

# The shape the issue tracker measures llama.cpp on: 82M parameters, 327 MB of float32 weights.
LLAMA_82M = dict(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                 tie_word_embeddings=False)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder (default: a random 82M-parameter Llama, built once)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="runs per engine; the best is kept")
    p.add_argument("--quantized", action="append", default=[], metavar="FOLDER",
                   help="a GPTQ checkpoint of the same model to time as well (repeatable)")
    p.add_argument("--linear-backend", default="auto", choices=["auto", "aten", "onednn", "tokenmill"])
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenmill/bench"))
    p.add_argument("--json", default=None, metavar="PATH", help="write JSON here, and a PNG beside it")


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def _tokenmill(model: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model, dtype=args.dtype, skip_tokenizer_init=True, enable_prefix_caching=False, max_num_seqs=8,
              linear_backend=args.linear_backend)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    best_prefill = best_decode = 0.0
    for r in range(args.repeats + 1):  # the first run warms up
        engine.add_request({"prompt_token_ids": _prompt(vocab, args.input_len, args.seed + r)}, params)
        t0 = time.perf_counter()
        first = False
        while not first:  # the prompt's forward (chunked if it exceeds the step budget), to token 1
            first = any(o.outputs[0].token_ids for o in engine.step())
        t1 = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        t2 = time.perf_counter()
        if r:
            best_prefill = max(best_prefill, args.input_len / (t1 - t0))
            best_decode = max(best_decode, steps / (t2 - t1))
    return dict(prefill_tokens_per_s=best_prefill, decode_tokens_per_s=best_decode,
                weight_bytes=engine.model_runner.weight_bytes,
                linear_backends={f"{n}x{k}": v for (n, k), v in engine.model_runner.linear_backends.items()})


def _transformers(model: str, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, args.dtype)).eval()
    kw = dict(do_sample=False, pad_token_id=0)
    best_prefill = best_decode = 0.0
    with torch.inference_mode():
        for r in range(args.repeats + 1):
            ids = torch.tensor([_prompt(vocab, args.input_len, args.seed + r)])
            t0 = time.perf_counter()
            hf.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, **kw)
            t_prefill = time.perf_counter() - t0
            n = args.output_len
            t0 = time.perf_counter()
            hf.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, **kw)
            t_decode = time.perf_counter() - t0 - t_prefill
            if r:
                best_prefill = max(best_prefill, args.input_len / t_prefill)
                best_decode = max(best_decode, (n - 1) / max(t_decode, 1e-9))
    return dict(prefill_tokens_per_s=best_prefill, decode_tokens_per_s=best_decode)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].bar(labels, [r["decode_tokens_per_s"] for r in rows], color="#2a7")
    axes[0].scatter(labels, [r["decode_bound_tokens_per_s"] for r in rows], color="#c33", marker="_", s=900,
                    label="bandwidth bound", zorder=3)
    axes[0].set_title("batch-1 decode tokens/s")
    axes[0].legend()
    axes[1].bar(labels, [r["prefill_tokens_per_s"] for r in rows], color="#27a")
    axes[1].set_title(f"prefill tokens/s ({result['input_len']}-token prompt)")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from tokenmill.devices import measure_read_bandwidth

    if args.input_len < 1 or args.output_len < 2 or args.repeats < 1:
        raise ValueError("--input-len >= 1, --output-len >= 2 and --repeats >= 1 are required")
    model = args.model or random_llama(LLAMA_82M, Path(args.cache_dir) / "llama-82m")
    vocab = AutoConfig.from_pretrained(model).vocab_size
    bandwidth = measure_read_bandwidth()
    rows: list[dict[str, Any]] = []
    if not args.skip_transformers:
        hf = _transformers(model, args, vocab)
        rows.append(dict(name="transformers", **hf))
    for name, folder in [("tokenmill", model)] + [(f"tokenmill {Path(q).name}", q) for q in args.quantized]:
        rows.append(dict(name=name, model=folder, **_tokenmill(folder, args, vocab)))
    float_bytes = next(r["weight_bytes"] for r in rows if r["name"] == "tokenmill")
    for r in rows:
        r.setdefault("weight_bytes", float_bytes)  # transformers reads the same float weights
        r["decode_bound_tokens_per_s"] = bandwidth / r["weight_bytes"]
        r["fraction_of_bound"] = r["decode_tokens_per_s"] / r["decode_bound_tokens_per_s"]
    result = dict(model=model, dtype=args.dtype, input_len=args.input_len, output_len=args.output_len,
                  threads=torch.get_num_threads(), read_bandwidth_gb_s=bandwidth / 1e9, rows=rows)
    base = rows[0]
    print(f"\nmodel {model} ({args.dtype}), prompt {args.input_len}, {args.output_len} decoded, "
          f"{torch.get_num_threads()} threads, probed bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'':24}{'weights MB':>11}{'prefill tok/s':>15}{'decode tok/s':>14}{'bound':>8}{'of bound':>10}"
          f"{'decode vs ' + base['name']:>24}")
    for r in rows:
        print(f"{r['name']:24}{r['weight_bytes'] / 1e6:>11.0f}{r['prefill_tokens_per_s']:>15.0f}"
              f"{r['decode_tokens_per_s']:>14.1f}{r['decode_bound_tokens_per_s']:>8.0f}"
              f"{100 * r['fraction_of_bound']:>9.0f}%{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>23.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        _plot(result, Path(args.json).with_suffix(".png"))
    return 0
