"""`tokenmill bench prefix`: a multi-turn chat workload with the prefix cache off, on, and under
memory pressure with and without the spill tier.

Each turn resends the whole conversation (as chat clients do) plus ~200 new tokens; all
conversations' turn k are submitted together (interleaved), and the reply of turn k becomes part
of turn k+1. Reported per way: median time to first token (TTFT) per turn, total time, prefix
cache hit rate, and the tokens recomputed because their cached KV was gone.
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

from tqdm import tqdm

from tokenmill.bench.throughput import random_llama
from tokenmill.model_cost import ModelShape

logger = logging.getLogger(__name__)

# Wide and shallow (~39M parameters) so a 2-core CPU runs the workload in a couple of minutes
# while, as in real chat models, the weight matmuls outweigh attention at these context lengths:
# per token at 1.4k context they are ~5x the attention FLOPs here (~19x in Llama-3-8B); a
# narrow model of the same size would be attention-bound and understate what caching saves.
LLAMA_CHAT = dict(vocab_size=8000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                  tie_word_embeddings=True)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder (default: a random ~39M Llama)")
    p.add_argument("--num-conversations", type=int, default=16)
    p.add_argument("--num-turns", type=int, default=6)
    p.add_argument("--turn-len", type=int, default=200, help="new user tokens per turn")
    p.add_argument("--reply-len", type=int, default=32, help="generated tokens per turn")
    p.add_argument("--small-pool-fraction", type=float, default=0.35,
                   help="the pressured pool, as a fraction of the whole workload's final KV")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget per step, the same for every way (a latency-minded server setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenmill/bench"))
    p.add_argument("--out", default="bench_results/prefix", help="writes OUT.json and OUT.png")


def _run_way(model: str, args: argparse.Namespace, turns: list[list[list[int]]], **llm_kw: Any) -> dict[str, Any]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(model, dtype="float32", skip_tokenizer_init=True, block_size=args.block_size, seed=args.seed,
              max_num_seqs=args.num_conversations, max_num_batched_tokens=args.max_num_batched_tokens, **llm_kw)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=args.reply_len, ignore_eos=True)
    history: list[list[int]] = [[] for _ in turns[0]]
    ttft: list[float] = []
    t0 = time.perf_counter()
    for k in range(len(turns)):
        ids = [engine.add_request({"prompt_token_ids": history[c] + turns[k][c]}, params)
               for c in range(len(history))]
        start, first, done = time.perf_counter(), {}, {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.outputs[0].token_ids and o.request_id not in first:
                    first[o.request_id] = time.perf_counter() - start
                if o.finished:
                    done[o.request_id] = o
        for c, rid in enumerate(ids):
            history[c] = history[c] + turns[k][c] + done[rid].outputs[0].token_ids
        ttft.append(statistics.median(first[r] for r in ids))
    stats = engine.get_stats()
    return dict(ttft_median_per_turn=ttft, total_s=time.perf_counter() - t0, hit_rate=stats.prefix_cache_hit_rate,
                recomputed_tokens=stats.recomputed_tokens, swaps_in=stats.swaps_in, swaps_out=stats.swaps_out,
                evictions=stats.evictions, kv_blocks_total=stats.kv_blocks_total,
                spill_blocks_total=stats.spill_blocks_total)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in result["ways"].items():
        turns = range(1, len(r["ttft_median_per_turn"]) + 1)
        ax.plot(turns, [1000 * t for t in r["ttft_median_per_turn"]], marker="o", label=name)
    ax.set_xticks(list(turns))
    ax.set_xlabel("turn")
    ax.set_ylabel("median time to first token (ms)")
    ax.set_yscale("log")
    ax.set_title(f"{result['num_conversations']} conversations x {result['num_turns']} turns, interleaved")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.num_conversations < 1 or args.num_turns < 2 or args.turn_len < 1 or args.reply_len < 1:
        raise ValueError("need >= 1 conversation, >= 2 turns, and positive turn and reply lengths")
    if not 0 < args.small_pool_fraction < 1:
        raise ValueError("--small-pool-fraction must be in (0, 1)")
    model = args.model or random_llama(LLAMA_CHAT, Path(args.cache_dir) / "llama-chat-39m")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    final_len = args.num_turns * (args.turn_len + args.reply_len)
    if final_len > cfg.max_position_embeddings:
        raise ValueError(f"the last turn would need {final_len} positions; the model has {cfg.max_position_embeddings}")
    rng = random.Random(args.seed)
    turns = [[[rng.randrange(3, cfg.vocab_size) for _ in range(args.turn_len)]
              for _ in range(args.num_conversations)] for _ in range(args.num_turns)]
    blocks_all = args.num_conversations * (-(-final_len // args.block_size) + 1)
    small = max(1, int(blocks_all * args.small_pool_fraction))
    kv_block = ModelShape.from_hf_config(cfg).cost("float32").kv_bytes_per_token * args.block_size  # float32 runs
    ways = {
        "caching off": dict(enable_prefix_caching=False, num_gpu_blocks_override=blocks_all),
        "caching on": dict(num_gpu_blocks_override=blocks_all),
        "on, small pool": dict(num_gpu_blocks_override=small),
        # Enough spill for everything that does not fit the small pool.
        "on, small pool + spill": dict(num_gpu_blocks_override=small,
                                       swap_space=(blocks_all - small) * kv_block / 2**30),
    }
    result: dict[str, Any] = dict(model=model, num_conversations=args.num_conversations, num_turns=args.num_turns,
                                  turn_len=args.turn_len, reply_len=args.reply_len,
                                  max_num_batched_tokens=args.max_num_batched_tokens, ways={})
    for name, kw in tqdm(ways.items(), desc="bench prefix", unit="way"):
        result["ways"][name] = _run_way(model, args, turns, **kw)
    off, on = result["ways"]["caching off"], result["ways"]["caching on"]
    later = slice(1, None)
    result["ttft_speedup_turns_2plus"] = (statistics.median(off["ttft_median_per_turn"][later])
                                          / statistics.median(on["ttft_median_per_turn"][later]))
    small_r, spill_r = result["ways"]["on, small pool"], result["ways"]["on, small pool + spill"]
    result["spill_recompute_reduction"] = (1 - spill_r["recomputed_tokens"] / small_r["recomputed_tokens"]
                                           if small_r["recomputed_tokens"] else 0.0)
    _print(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    _plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


def _print(result: dict[str, Any]) -> None:
    ways = result["ways"]
    names = list(ways)
    print(f"\n{result['num_conversations']} conversations x {result['num_turns']} turns "
          f"({result['turn_len']} new + {result['reply_len']} reply tokens a turn), interleaved, "
          f"{result['max_num_batched_tokens']} tokens per step")
    print("median TTFT per turn (ms)")
    print(f"{'turn':>6}" + "".join(f"{n:>24}" for n in names))
    for k in range(result["num_turns"]):
        print(f"{k + 1:>6}" + "".join(f"{1000 * ways[n]['ttft_median_per_turn'][k]:>24.1f}" for n in names))
    for label, key, fmt in (("total s", "total_s", "{:.1f}"), ("hit rate", "hit_rate", "{:.1%}"),
                            ("recomputed tokens", "recomputed_tokens", "{}"), ("swaps in", "swaps_in", "{}"),
                            ("KV blocks (device)", "kv_blocks_total", "{}"),
                            ("KV blocks (spill)", "spill_blocks_total", "{}")):
        print(f"{label:>6}" + "".join(f"{fmt.format(ways[n][key]):>24}" for n in names))
    print(f"median TTFT of turns 2+: {result['ttft_speedup_turns_2plus']:.1f}x lower with caching on")
    print(f"spill tier under pressure: {100 * result['spill_recompute_reduction']:.0f}% fewer recomputed tokens")
