"""`tokenmill bench parallel`: one offline workload through several tensor/pipeline layouts.

The baseline is the single-process engine (TP=1, PP=1); each layout runs the same prompts in the
same run, one after the other, and is reported as a ratio to it. On a CPU the ranks share the
machine's cores (each gets cores / ranks threads), so splitting the model adds communication
without adding compute: the figures say what that costs. On several GPUs each rank brings its
own memory bandwidth, which is where tensor parallelism pays.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from tokenmill.bench.throughput import LLAMA_100M, _workload, parse_range, random_llama

logger = logging.getLogger(__name__)


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """"1x1,2x1,1x2" -> [(1, 1), (2, 1), (1, 2)] as (tensor, pipeline) sizes."""
    out = []
    for item in text.split(","):
        tp, _, pp = item.strip().partition("x")
        try:
            out.append((int(tp), int(pp or 1)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected layouts like 1x1,2x1,1x2 (TPxPP), got {text!r}") from None
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder (default: a random ~100M-parameter Llama, built once)")
    p.add_argument("--layouts", type=parse_layouts, default=[(1, 1), (2, 1), (1, 2)],
                   help="TPxPP list; the first is the baseline (default: 1x1,2x1,1x2)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=parse_range, default=(16, 256), help="N or LO-HI (uniform)")
    p.add_argument("--output-len", type=parse_range, default=(64, 64), help="N or LO-HI (uniform)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--single-stream-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenmill/bench"))
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (and a PNG beside)")


def _run_layout(model: str, tp: int, pp: int, args: argparse.Namespace, work) -> dict[str, float]:
    from tokenmill import LLM, SamplingParams

    threads_before = torch.get_num_threads()
    llm = LLM(model, dtype=args.dtype, skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs, seed=args.seed,
              tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        llm.generate([{"prompt_token_ids": work[0][0][:8]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        prompts = [{"prompt_token_ids": ids} for ids, _ in work]
        params = [SamplingParams(temperature=0, max_tokens=out, ignore_eos=True) for _, out in work]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - t0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        engine = llm.llm_engine
        engine.add_request({"prompt_token_ids": work[0][0][:16]},
                           SamplingParams(temperature=0, max_tokens=args.single_stream_tokens, ignore_eos=True))
        engine.step()  # the prefill
        t1, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        decode_tps = steps / (time.perf_counter() - t1)
        tokens = [o.outputs[0].token_ids for o in outs]
        return dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, elapsed_s=elapsed, output_tokens=n_out,
                    output_tokens_per_s=n_out / elapsed, single_stream_decode_tokens_per_s=decode_tps,
                    threads_per_rank=torch.get_num_threads(), tokens=tokens)
    finally:
        llm.shutdown()
        torch.set_num_threads(threads_before)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"TP={r['tensor_parallel_size']} PP={r['pipeline_parallel_size']}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in ((axes[0], "output_tokens_per_s", "batched output tokens/s"),
                           (axes[1], "single_stream_decode_tokens_per_s", "single-stream decode tokens/s")):
        ax.bar(labels, [r[key] for r in results], color=["#555"] + ["#2a7"] * (len(results) - 1))
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    model = args.model or random_llama(LLAMA_100M, Path(args.cache_dir) / "llama-100m")
    from transformers import AutoConfig

    work = _workload(args, AutoConfig.from_pretrained(model).vocab_size)
    results = [_run_layout(model, tp, pp, args, work) for tp, pp in args.layouts]
    base = results[0]
    same = all(r["tokens"] == base["tokens"] for r in results)
    print(f"\nmodel {model} ({args.dtype}), {args.num_prompts} prompts, input {args.input_len}, output "
          f"{args.output_len}, {os.cpu_count()} cores; baseline TP={base['tensor_parallel_size']} "
          f"PP={base['pipeline_parallel_size']}")
    print(f"{'layout':14}{'threads/rank':>13}{'output tok/s':>14}{'ratio':>8}{'1-stream tok/s':>16}{'ratio':>8}")
    for r in results:
        print(f"{'TP=%d PP=%d' % (r['tensor_parallel_size'], r['pipeline_parallel_size']):14}"
              f"{r['threads_per_rank']:>13}{r['output_tokens_per_s']:>14.2f}"
              f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:>7.2f}x"
              f"{r['single_stream_decode_tokens_per_s']:>16.2f}"
              f"{r['single_stream_decode_tokens_per_s'] / base['single_stream_decode_tokens_per_s']:>7.2f}x")
    print(f"greedy tokens identical across layouts: {same}")
    if args.json:
        for r in results:
            r.pop("tokens")
        out = dict(model=model, dtype=args.dtype, num_prompts=args.num_prompts, input_len=args.input_len,
                   output_len=args.output_len, cpu_count=os.cpu_count(), tokens_identical=same, layouts=results)
        Path(args.json).write_text(json.dumps(out, indent=2))
        _plot(results, Path(args.json).with_suffix(".png"))
    return 0 if same else 1
