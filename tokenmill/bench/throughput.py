"""`tokenmill bench throughput`: one offline workload through tokenmill and through transformers.

Both run in the same process on the same model, dtype and machine, so the ratio holds even on a
noisy shared machine. transformers is batched as a user would batch it: left-padded batches of
16 through `generate`. Also printed: single-stream decode tokens/s against the bound set by
reading every weight once per token at the probed memory bandwidth.

When the batch limits are left to the roofline (no --max-num-seqs / --max-num-batched-tokens),
tokenmill also runs with the fixed limits it used before (64 sequences, max(2048, max_model_len)
tokens), the two alternating --limits-repeats times, so the chosen limits are measured against
the old defaults in the same run (tokenmill's row is then the median roofline run).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.engine.utilization import UtilizationMeter

logger = logging.getLogger(__name__)

# The headline model: Llama-shaped, ~100M parameters (GQA 12:4, tied 32k vocabulary).
LLAMA_100M = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=True)


# The batch limits before they were chosen from the roofline (max_num_batched_tokens was at least max_model_len).
FIXED_MAX_NUM_SEQS, FIXED_MAX_BATCHED_TOKENS = 64, 2048


def random_llama(spec: dict[str, Any], folder: Path, seed: int = 0) -> str:
    """A random-weight Llama checkpoint (built once, then reused from `folder`)."""
    if (folder / "config.json").is_file():
        return str(folder)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(architectures=["LlamaForCausalLM"], **spec))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    logger.info("wrote random checkpoint (%.1fM params) to %s", model.num_parameters() / 1e6, folder)
    return str(folder)


def parse_range(text: str) -> tuple[int, int]:
    """"128" -> (128, 128); "16-512" -> (16, 512)."""
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI, got {text!r}") from None
    if lo_i < 1 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint folder (default: a random ~100M-parameter Llama, built once)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=parse_range, default=(16, 512), help="N or LO-HI (uniform)")
    p.add_argument("--output-len", type=parse_range, default=(128, 128), help="N or LO-HI (uniform)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="default: chosen from the roofline (before: 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: chosen from the roofline (before: max(2048, max_model_len))")
    p.add_argument("--limits-repeats", type=int, default=3,
                   help="with roofline-chosen limits: runs of each (roofline, fixed 64 / 2048), alternating; "
                        "the ratio is the median of the pairs'. 0: no comparison")
    p.add_argument("--single-stream-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenmill/bench"))
    p.add_argument("--quantized", action="append", default=[], metavar="FOLDER",
                   help="a GPTQ checkpoint of the same model (tokenmill quantize) to run as another row (repeatable)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)
    work = []
    for _ in range(args.num_prompts):
        n = rng.randint(*args.input_len)
        work.append(([rng.randrange(3, vocab) for _ in range(n)], rng.randint(*args.output_len)))
    return work


def _run_tokenmill(model: str, args: argparse.Namespace, work, bandwidth: float) -> dict[str, float]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model, dtype=args.dtype, skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    llm.generate([{"prompt_token_ids": work[0][0][:8]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(temperature=0, max_tokens=out, ignore_eos=True) for _, out in work]
    llm.llm_engine.init_utilization_peaks()
    runner = llm.llm_engine.model_runner
    peaks = (runner.meter.peak_flops, bandwidth)  # the same probe as the bound printed below
    runner.meter = UtilizationMeter()  # count the timed run only
    runner.meter.set_peaks(*peaks)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    util = llm.llm_engine.utilization()
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    # Single stream: one short prompt, time the decode steps only (the first step is the prefill).
    engine = llm.llm_engine
    engine.add_request({"prompt_token_ids": work[0][0][:16]},
                       SamplingParams(temperature=0, max_tokens=args.single_stream_tokens, ignore_eos=True))
    engine.step()
    t1, steps = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    decode_tps = steps / (time.perf_counter() - t1)
    sched = engine.scheduler_config
    return dict(elapsed_s=elapsed, output_tokens=n_out, output_tokens_per_s=n_out / elapsed,
                max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
                max_model_len=sched.max_model_len,
                single_stream_decode_tokens_per_s=decode_tps, weight_bytes=engine.model_runner.weight_bytes,
                mbu=util["mbu"], mfu=util["mfu"], peak_flops=util["peak_flops"],
                peak_bandwidth=util["peak_bandwidth"])


def _compare_limits(model: str, args: argparse.Namespace, work, bandwidth: float,
                    first: dict[str, float]) -> dict[str, Any]:
    """Roofline-chosen limits against the fixed defaults they replaced, in alternating runs; the
    ratio is the median over the pairs (a roofline run, then a fixed one), which cancels the
    machine's slower drifts."""
    fixed_args = argparse.Namespace(**{**vars(args), "max_num_seqs": FIXED_MAX_NUM_SEQS,
                                       "max_num_batched_tokens": max(FIXED_MAX_BATCHED_TOKENS, first["max_model_len"])})
    runs: dict[str, list[dict[str, float]]] = {"roofline": [first], "fixed": []}
    for i in range(args.limits_repeats):
        runs["fixed"].append(_run_tokenmill(model, fixed_args, work, bandwidth))
        if i + 1 < args.limits_repeats:
            runs["roofline"].append(_run_tokenmill(model, args, work, bandwidth))
    median = {k: statistics.median(r["output_tokens_per_s"] for r in v) for k, v in runs.items()}
    pairs = [r["output_tokens_per_s"] / f["output_tokens_per_s"] for r, f in zip(runs["roofline"], runs["fixed"])]
    return {**runs, "median_output_tokens_per_s": median, "ratio": statistics.median(pairs)}


def _run_transformers(model: str, args: argparse.Namespace, work) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
    pad = 0
    gen_kw = dict(do_sample=False, pad_token_id=pad)

    def run_batch(batch) -> int:
        width = max(len(ids) for ids, _ in batch)
        out_len = max(o for _, o in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in batch])
        with torch.inference_mode():
            out = hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=out_len,
                              min_new_tokens=out_len, **gen_kw)
        return sum(min(o, out.shape[1] - width) for _, o in batch)

    run_batch([(work[0][0][:8], 4)])  # warm-up
    bs = args.hf_batch_size
    t0 = time.perf_counter()
    n_out = 0
    for i in tqdm(range(0, len(work), bs), desc="transformers", unit="batch"):
        n_out += run_batch(work[i:i + bs])
    elapsed = time.perf_counter() - t0
    ids = work[0][0][:16]
    with torch.inference_mode():
        t1 = time.perf_counter()
        hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=1, min_new_tokens=1, **gen_kw)
        t_prefill = time.perf_counter() - t1
        t1 = time.perf_counter()
        n = args.single_stream_tokens
        hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, **gen_kw)
        decode_tps = (n - 1) / max(1e-9, time.perf_counter() - t1 - t_prefill)
    return dict(elapsed_s=elapsed, output_tokens=n_out, output_tokens_per_s=n_out / elapsed,
                single_stream_decode_tokens_per_s=decode_tps)


def run(args: argparse.Namespace) -> int:
    from tokenmill.devices import measure_read_bandwidth

    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.limits_repeats < 0:
        raise ValueError("--limits-repeats must be >= 0")
    model = args.model or random_llama(LLAMA_100M, Path(args.cache_dir) / "llama-100m")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model).vocab_size
    work = _workload(args, vocab)
    bandwidth = measure_read_bandwidth()
    tm = _run_tokenmill(model, args, work, bandwidth)
    limits = None
    if args.max_num_seqs is None and args.max_num_batched_tokens is None and args.limits_repeats > 0:
        limits = _compare_limits(model, args, work, bandwidth, tm)
        tm = sorted(limits["roofline"], key=lambda r: r["output_tokens_per_s"])[len(limits["roofline"]) // 2]
    quantized = {Path(q).name: _run_tokenmill(q, args, work, bandwidth) for q in args.quantized}
    hf = _run_transformers(model, args, work)
    bound = bandwidth / tm["weight_bytes"]
    result = dict(model=model, dtype=args.dtype, num_prompts=args.num_prompts, input_len=args.input_len,
                  output_len=args.output_len, threads=torch.get_num_threads(), tokenmill=tm, transformers=hf,
                  throughput_ratio=tm["output_tokens_per_s"] / hf["output_tokens_per_s"],
                  read_bandwidth_gb_s=bandwidth / 1e9, decode_bound_tokens_per_s=bound,
                  single_stream_fraction_of_bound=tm["single_stream_decode_tokens_per_s"] / bound,
                  quantized=quantized, limits=limits)
    print(f"\nmodel {model} ({tm['weight_bytes'] / 1e6:.0f} MB of weights, {args.dtype}), "
          f"{args.num_prompts} prompts, input {args.input_len}, output {args.output_len}, "
          f"{torch.get_num_threads()} threads; tokenmill max_num_seqs={tm['max_num_seqs']}, "
          f"max_num_batched_tokens={tm['max_num_batched_tokens']}")
    print(f"{'':44}{'transformers':>14}{'tokenmill':>14}{'ratio':>9}")
    for key, label in (("output_tokens_per_s", "output tokens/s"), ("elapsed_s", "elapsed s"),
                       ("single_stream_decode_tokens_per_s", "single-stream decode tok/s")):
        ratio = tm[key] / hf[key] if key != "elapsed_s" else hf[key] / tm[key]
        print(f"{label:44}{hf[key]:>14.2f}{tm[key]:>14.2f}{ratio:>8.2f}x")
    for name, q in quantized.items():  # the same workload on a GPTQ checkpoint of the same model
        for key, label in (("output_tokens_per_s", "output tokens/s"),
                           ("single_stream_decode_tokens_per_s", "single-stream decode tok/s")):
            print(f"{(name + ' ' + label)[:43]:44}{hf[key]:>14.2f}{q[key]:>14.2f}{q[key] / hf[key]:>8.2f}x")
    if limits is not None:  # the same workload, tokenmill against itself with the old fixed limits
        med, f = limits["median_output_tokens_per_s"], limits["fixed"][0]
        old, new = (f"fixed {f['max_num_seqs']} / {f['max_num_batched_tokens']}",
                    f"roofline {tm['max_num_seqs']} / {tm['max_num_batched_tokens']}")
        print(f"{'tokenmill batch limits (seqs / tokens)':44}{old:>20}{new:>20}{'ratio':>9}")
        print(f"{'output tokens/s, median of ' + str(args.limits_repeats) + ' alternating runs':44}"
              f"{med['fixed']:>20.2f}{med['roofline']:>20.2f}{limits['ratio']:>8.2f}x  (median of the pairs' ratios)")
    print(f"memory read bandwidth (probe): {bandwidth / 1e9:.1f} GB/s -> decode bound {bound:.1f} tok/s; "
          f"tokenmill single stream at {100 * result['single_stream_fraction_of_bound']:.0f}% of it")
    print(f"tokenmill during the run: MBU {100 * tm['mbu']:.0f}% of {tm['peak_bandwidth'] / 1e9:.1f} GB/s, "
          f"MFU {100 * tm['mfu']:.0f}% of {tm['peak_flops'] / 1e9:.0f} GFLOP/s (probed peaks, busy time)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
