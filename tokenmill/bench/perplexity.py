"""`tokenmill eval ppl`: perplexity as the GPTQ paper measures it.

The text is tokenized whole and cut into non-overlapping windows of seq_len tokens; each window is
scored on its own (the first token of a window is context only), and perplexity is
exp(mean negative log-likelihood over every scored token). The engine computes the log-probs
(prompt_logprobs), so float and quantized checkpoints are measured by the same code.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm


def perplexity(llm: Any, text: str, seq_len: int, batch_size: int = 8, limit: Optional[int] = None) -> dict[str, Any]:
    from tokenmill import SamplingParams

    engine = llm.llm_engine
    max_len = engine.scheduler_config.max_model_len
    if seq_len < 2 or seq_len >= max_len:
        raise ValueError(f"seq_len must be in [2, {max_len - 1}] for this model (max_model_len {max_len})")
    ids = llm.get_tokenizer()(text, verbose=False).input_ids
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if limit:
        windows = windows[:limit]
    if not windows:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with tqdm(total=len(windows), desc="perplexity", unit="window") as bar:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            for window, out in zip(chunk, llm.generate([{"prompt_token_ids": w} for w in chunk], params,
                                                       use_tqdm=False)):
                for tid, entry in zip(window[1:], out.prompt_logprobs[1:]):
                    nll -= entry[tid].logprob
                    count += 1
            bar.update(len(chunk))
    return dict(perplexity=math.exp(nll / count), tokens=count, windows=len(windows), seq_len=seq_len,
                seconds=time.perf_counter() - t0)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder (float or GPTQ)")
    p.add_argument("--data", required=True, help="a text file")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="score at most this many windows")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, metavar="PATH")


def run(args: argparse.Namespace) -> int:
    from tokenmill import LLM

    path = Path(args.data)
    if not path.is_file():
        raise ValueError(f"data file not found: {args.data!r}")
    llm = LLM(args.model, dtype=args.dtype, enable_prefix_caching=False)
    seq_len = min(args.seq_len, llm.llm_engine.scheduler_config.max_model_len - 1)
    result = perplexity(llm, path.read_text(encoding="utf-8"), seq_len, args.batch_size, args.limit)
    result["model"] = args.model
    print(f"perplexity {result['perplexity']:.3f} over {result['tokens']} tokens "
          f"({result['windows']} windows of {result['seq_len']}) in {result['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
