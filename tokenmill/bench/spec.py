"""`tokenmill bench spec`: decode tokens/s with and without speculative decoding, in one run.

Models: the demo model, and a random-weight 42M Llama (bandwidth-bound at batch 1 on a CPU).
Neither has a smaller sibling, so each one's draft is itself cut to its first --draft-layers
layers (same embeddings, head and vocabulary), saved to a temp dir. Workloads: "repetitive" (the
demo model is asked to repeat or fix a passage of data/demo_heldout.txt given in the prompt; the
random model gets one segment repeated) and "free" (plain openings; random tokens). Every way's
LLM is built up front and the ways take turns within each repeat, so drift hits all alike.

Decode tok/s counts the tokens generated after every request of a batch has its first token,
over the time from then to the last finish (prefill excluded). Batch-1 runs go through 2 prompts
one at a time. Greedy outputs are compared with no speculation at the same batch size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from tokenmill.bench.throughput import random_llama

# "none-again" is the `none` engine measured a second time, at another turn: the noise floor.
# none-again is the none engine at another turn. It is not next to none in the (cyclic) order:
# an engine that runs right after itself finds its weights still in cache, which the demo
# model's 22 MB lets it, and would look faster than the others for that alone.
WAYS = ("none", "ngram", "draft", "none-again", "auto-ngram", "auto-draft")
WORKLOADS = ("repetitive", "free")
MIN_PROMPTS = 2  # prompts per run at batch sizes below this (one batch after another)
# 42M parameters, 166 MB of float32: far past the caches, so its batch-1 decode is bandwidth-bound.
LLAMA_42M = dict(vocab_size=4096, hidden_size=640, intermediate_size=1728, num_hidden_layers=8,
                 num_attention_heads=10, num_key_value_heads=5, max_position_embeddings=2048,
                 tie_word_embeddings=False)
NGRAM_GOAL, AUTO_FLOOR = 1.8, 0.95


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="demo,random", help="comma list of demo, random")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (ignore_eos, greedy)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--prompt-lookup-min", type=int, default=2)
    p.add_argument("--prompt-lookup-max", type=int, default=4)
    p.add_argument("--draft-layers", type=int, default=2, help="layers the truncated draft keeps")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=5, help="runs per configuration (median kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default). 1 by default: on a "
                   "shared 2-core machine, 2 threads stall in OpenMP barriers (5x slower decode, and noisy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/tokenmill/bench"))
    p.add_argument("--output-json", default="bench_results/spec.json", help="and a PNG beside it")


def passages(text: str, count: int, lo: int = 300, hi: int = 700) -> list[str]:
    """The first `count` paragraphs of lo..hi characters, no two opening alike."""
    found: dict[str, str] = {}
    for p in (q.strip() for q in text.split("\n\n")):
        if lo <= len(p) <= hi:
            found.setdefault(opening(p), p)
    return list(found.values())[:count]


def opening(text: str, words: int = 5) -> str:
    """The text up to the end of its `words`-th word, its whitespace kept."""
    m = re.match(r"\s*(\S+\s+){%d}\S+" % (words - 1), text)
    return m.group(0) if m else text


def with_typos(passage: str, every: int = 7) -> str:
    """Every `every`-th word of 4+ letters gets its 2nd and 3rd letters swapped."""
    words = passage.split(" ")
    for i, w in enumerate(words):
        if i % every == every - 1 and len(w) >= 4 and w[1:3].isalpha() and w[1] != w[2]:
            words[i] = w[0] + w[2] + w[1] + w[3:]
    return " ".join(words)


def text_workloads(text: str, n: int) -> dict[str, list[str]]:
    """Repetitive: repeat / fix-the-typos prompts holding a passage, the answer's first words
    given; free: each passage's first five words."""
    ps = passages(text, n)
    if len(ps) < n:
        raise ValueError(f"only {len(ps)} passages of 300-700 characters in the text; need {n}")
    rep = [(f"Fix the spelling in this passage:\n\n{with_typos(p)}\n\nThe passage, corrected:\n\n" if i % 2 else
            f"Repeat this passage word for word:\n\n{p}\n\nThe passage, repeated:\n\n") + opening(p, 4)
           for i, p in enumerate(ps)]
    return {"repetitive": rep, "free": [opening(p) for p in ps]}


def token_workloads(vocab: int, n: int, seed: int = 0, segment: int = 32, times: int = 4) -> dict[str, list[list[int]]]:
    """Repetitive: a random segment repeated `times` times; free: as many random tokens."""
    rng = random.Random(seed)
    rep = [[rng.randrange(3, vocab) for _ in range(segment)] * times for _ in range(n)]
    free = [[rng.randrange(3, vocab) for _ in range(segment * times)] for _ in range(n)]
    return {"repetitive": rep, "free": free}


def batches(prompts: list[Any], b: int) -> list[list[Any]]:
    """One run at batch b: b prompts at once, or at least MIN_PROMPTS in batches of b."""
    take = prompts[:max(b, MIN_PROMPTS)]
    if len(take) < b:
        raise ValueError(f"batch {b} needs {b} prompts; the workload has {len(prompts)}")
    return [take[i:i + b] for i in range(0, len(take), b)]


def spec_config(way: str, args: argparse.Namespace, draft: Optional[str]) -> Optional[dict[str, Any]]:
    k = args.num_speculative_tokens
    lookup = dict(prompt_lookup_min=args.prompt_lookup_min, prompt_lookup_max=args.prompt_lookup_max)
    return {"none": None, "none-again": None, "ngram": dict(method="ngram", num_speculative_tokens=k, **lookup),
            "draft": dict(model=draft, num_speculative_tokens=k),
            "auto-ngram": dict(method="auto", num_speculative_tokens=k, **lookup),
            "auto-draft": dict(method="auto", model=draft, num_speculative_tokens=k)}[way]


def truncated_draft(model: str, layers: int, folder: Path) -> tuple[str, int, int]:
    """`model` with only its first `layers` decoder layers (embeddings and head kept); returns
    (folder, parameters of the model, of the draft)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    full = m.num_parameters()
    if not 1 <= layers < m.config.num_hidden_layers:
        raise ValueError(f"--draft-layers must be in 1..{m.config.num_hidden_layers - 1}; got {layers}")
    m.model.layers = m.model.layers[:layers]
    m.config.num_hidden_layers = layers
    m.save_pretrained(folder)
    return str(folder), full, m.num_parameters()


def first_mismatch(a: list[int], b: list[int]) -> Optional[int]:
    """The first position where two outputs differ (a length difference counts); None if equal."""
    tail = None if len(a) == len(b) else min(len(a), len(b))
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), tail)


def copied_share(prompt: list[int], output: list[int], n: int = 4) -> float:
    """The share of the output's n-grams that occur in the prompt (how much of it is copied)."""
    grams = {tuple(prompt[i:i + n]) for i in range(len(prompt) - n + 1)}
    windows = [tuple(output[i:i + n]) for i in range(len(output) - n + 1)]
    return sum(w in grams for w in windows) / len(windows) if windows else 0.0


def acceptance(counts: tuple[int, ...]) -> dict[str, float]:
    """From counts of (drafts, draft tokens, accepted tokens, steps proposed, steps not)."""
    drafts, tokens, accepted, with_, without = counts
    return dict(num_drafts=drafts, acceptance_rate=accepted / tokens if tokens else 0.0,
                mean_accepted_length=1 + accepted / drafts if drafts else 0.0,
                steps_with_proposals=with_, steps_without=without)


def summarize(rows: list[dict[str, Any]]) -> None:
    """Each row's median tok/s of its runs (by the clock, and by this process's CPU time), and its
    ratio to the `none` row of its cell: the median of the repeats' ratios, each run against
    `none`'s run in the same repeat (seconds apart), which cancels the machine's slower drifts."""
    for key, runs, ratio in (("tokens_per_s", "runs", "ratio"), ("cpu_tokens_per_s", "cpu_runs", "cpu_ratio")):
        for r in rows:
            r[key] = statistics.median(r[runs])
        base = {(r["model"], r["workload"], r["batch"]): r[runs] for r in rows if r["way"] == "none"}
        for r in rows:
            paired = [x / y for x, y in zip(r[runs], base[(r["model"], r["workload"], r["batch"])])]
            r[ratio] = statistics.median(paired)


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ngram >= 1.8x at batch 1 on the repetitive workload with identical output (per model);
    every auto way >= 0.95x everywhere measured."""
    out = [dict(goal=f"{r['model']}: ngram batch-1 repetitive >= {NGRAM_GOAL}x, identical output", value=r["ratio"],
                cpu_value=r["cpu_ratio"], target=NGRAM_GOAL, passed=r["ratio"] >= NGRAM_GOAL and not r["mismatches"])
           for r in rows if (r["way"], r["workload"], r["batch"]) == ("ngram", "repetitive", 1)]
    autos = [r for r in rows if r["way"].startswith("auto")]
    if autos:
        worst = min(autos, key=lambda r: r["ratio"])
        cell = (worst["model"], worst["workload"], worst["batch"])
        again = next((r["ratio"] for r in rows
                      if (r["model"], r["workload"], r["batch"], r["way"]) == (*cell, "none-again")), 1.0)
        out.append(dict(goal=f"auto >= {AUTO_FLOOR}x of none everywhere (worst: {worst['model']} {worst['way']} "
                             f"{worst['workload']} batch {worst['batch']}; none-again there: {again:.2f}x)",
                        value=worst["ratio"], cpu_value=min(r["cpu_ratio"] for r in autos), target=AUTO_FLOOR,
                        passed=worst["ratio"] >= AUTO_FLOOR))
    for g in out:
        g["gap"] = max(0.0, g["target"] - g["value"])
    return out


def _run(engine: Any, prompts: list[Any], b: int, max_tokens: int) -> tuple[int, float, float, int, list, list]:
    """One run at batch b: (decode tokens, seconds, CPU seconds, steps, outputs, copied shares)."""
    from tokenmill import SamplingParams
    from tokenmill.sampling_params import RequestOutputKind

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    n, secs, cpu, steps, outs, copied = 0, 0.0, 0.0, 0, [], []
    for group in batches(prompts, b):
        ids = [engine.add_request(p if isinstance(p, str) else {"prompt_token_ids": p}, sp) for p in group]
        toks: dict[str, list[int]] = {i: [] for i in ids}
        prompt_ids, t1 = {}, None
        while engine.has_unfinished_requests():
            for o in engine.step():
                toks[o.request_id] += o.outputs[0].token_ids
                prompt_ids[o.request_id] = o.prompt_token_ids
            if t1 is not None:
                steps += 1
            elif all(toks.values()):  # every request has its first token: decoding from here
                t1, c1, n = time.perf_counter(), time.process_time(), n - sum(map(len, toks.values()))
        secs, cpu = secs + time.perf_counter() - t1, cpu + time.process_time() - c1
        n += sum(map(len, toks.values()))
        outs += [toks[i] for i in ids]
        copied += [copied_share(prompt_ids[i], toks[i]) for i in ids]
    return n, secs, cpu, steps, outs, copied


def _bench_model(name: str, model: str, draft: str, work: dict[str, list[Any]], args: argparse.Namespace,
                 sizes: list[int], bar: tqdm) -> list[dict[str, Any]]:
    from tokenmill import LLM

    def counters(engine: Any) -> tuple[int, ...]:
        s = engine.get_stats().spec_decode
        return (0,) * 5 if s is None else (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens,
                                           s.steps_with_proposals, s.steps_without)

    llms = {}
    for way in (w for w in WAYS if w != "none-again"):  # all built first, then they take turns
        llms[way] = LLM(model, seed=args.seed, max_num_seqs=max(sizes), kv_cache_memory_bytes=256 << 20,
                        skip_tokenizer_init=name != "demo", speculative_config=spec_config(way, args, draft))
        for b in sorted(set(sizes)):  # warm-up: first calls time kernels and fill caches
            _run(llms[way].llm_engine, work["free"], b, 8)
    llms["none-again"] = llms["none"]
    rows = {(wl, b, way): dict(model=name, workload=wl, batch=b, way=way, runs=[], cpu_runs=[], ms_per_step=[],
                               tokens_per_step=[], mismatches=[], _counts=(0,) * 5)
            for wl in WORKLOADS for b in sizes for way in WAYS}
    for rep in range(args.repeats):
        for wl in WORKLOADS:
            for b in sizes:
                outs = {}
                for way in WAYS[rep % len(WAYS):] + WAYS[:rep % len(WAYS)]:  # each repeat starts elsewhere
                    engine, r = llms[way].llm_engine, rows[(wl, b, way)]
                    before = counters(engine)
                    n, secs, cpu, steps, outs[way], copied = _run(engine, work[wl], b, args.max_tokens)
                    r["copied"] = statistics.mean(copied)
                    for key, v in (("runs", n / secs), ("cpu_runs", n / cpu), ("ms_per_step", 1000 * secs / steps),
                                   ("tokens_per_step", n / steps)):
                        r[key].append(v)
                    if way.startswith("auto"):  # the roofline's last verdict in this cell
                        r["last_decision"] = dict(engine.get_stats().spec_decode.decision)
                    r["_counts"] = tuple(c + y - x for c, x, y in zip(r["_counts"], before, counters(engine)))
                    bar.update(1)
                for way in WAYS:
                    r = rows[(wl, b, way)]
                    for i, (x, y) in enumerate(zip(outs["none"], outs[way])):
                        m = first_mismatch(x, y)
                        if m is not None and i not in {d["prompt"] for d in r["mismatches"]}:
                            r["mismatches"].append(dict(prompt=i, position=m, repeat=rep))
    for r in rows.values():
        r.update(acceptance(r.pop("_counts")))
        r["ms_per_step"], r["tokens_per_step"] = map(statistics.median, (r["ms_per_step"], r["tokens_per_step"]))
    return list(rows.values())


def _print(result: dict[str, Any]) -> None:
    print(f"\n{result['threads']} threads, max_tokens {result['max_tokens']}, k={result['num_speculative_tokens']}, "
          f"ngram lookup {result['prompt_lookup']}, median of {result['repeats']}, decode tok/s (prefill excluded)")
    for m in result["models"]:
        print(f"  {m['name']}: {m['model']} ({m['params'] / 1e6:.1f}M params); draft: first {m['draft_layers']} of "
              f"its {m['layers']} layers ({m['draft_params'] / 1e6:.1f}M params, not trained as a draft)")
    print(f"{'model':8}{'workload':12}{'batch':>6}{'way':>12}{'tok/s':>9}{'vs none':>9}{'(cpu)':>7}{'copied':>7}"
          f"{'ms/step':>9}{'tok/step':>9}{'accept':>8}{'mean len':>9}  output")
    for r in result["rows"]:
        acc = f"{100 * r['acceptance_rate']:>7.0f}%{r['mean_accepted_length']:>9.2f}"
        acc = "" if r["way"].startswith("none") else acc
        out = "" if r["way"] == "none" else ("identical" if not r["mismatches"] else
                                             f"MISMATCH ({len(r['mismatches'])} prompts, first at token "
                                             f"{min(x['position'] for x in r['mismatches'])})")
        auto = (f" ({r['steps_with_proposals']} steps proposed, {r['steps_without']} not)"
                if r["way"].startswith("auto") else "")
        print(f"{r['model']:8}{r['workload']:12}{r['batch']:>6}{r['way']:>12}{r['tokens_per_s']:>9.1f}"
              f"{r['ratio']:>8.2f}x{r['cpu_ratio']:>6.2f}x{100 * r['copied']:>6.0f}%{r['ms_per_step']:>9.2f}"
              f"{r['tokens_per_step']:>9.2f}{acc:17}  {out}{auto}".rstrip())
    for g in result["goals"]:
        print(f"{'PASS' if g['passed'] else 'MISS'}  {g['goal']}: {g['value']:.2f}x"
              + ("" if g["passed"] else f" (gap {g['gap']:.2f}x)") + f"; by CPU time {g['cpu_value']:.2f}x")


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["name"] for m in result["models"]]
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 3.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        rows = [r for r in result["rows"] if r["model"] == name]
        cells = list(dict.fromkeys((r["workload"], r["batch"]) for r in rows))
        width = 0.8 / len(WAYS)
        for j, way in enumerate(WAYS):
            vals = [next(r["tokens_per_s"] for r in rows if (r["workload"], r["batch"], r["way"]) == (*c, way))
                    for c in cells]
            ax.bar([i + (j - (len(WAYS) - 1) / 2) * width for i in range(len(cells))], vals, width, label=way)
        ax.set_xticks(range(len(cells)), [f"{w}, batch {b}" for w, b in cells])
        ax.set_ylabel("decode tok/s")
        ax.set_title(f"{name}: decode tok/s by proposer")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from tokenmill.cli import DEMO_MODEL

    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    names = [x for x in args.models.split(",") if x]
    if not sizes or min(sizes) < 1 or args.repeats < 1 or args.max_tokens < 2 or set(names) - {"demo", "random"}:
        raise ValueError("--batch-sizes >= 1, --repeats >= 1, --max-tokens >= 2, --models from demo,random")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = max(max(sizes), MIN_PROMPTS)
    text = (Path(DEMO_MODEL).parents[1] / "data" / "demo_heldout.txt").read_text(encoding="utf-8")
    rows, models = [], []
    bar = tqdm(total=len(names) * args.repeats * len(WORKLOADS) * len(sizes) * len(WAYS), desc="spec", unit="run")
    with tempfile.TemporaryDirectory(prefix="tokenmill-draft-") as tmp:
        for name in names:
            model = DEMO_MODEL if name == "demo" else random_llama(LLAMA_42M, Path(args.cache_dir) / "llama-42m")
            cfg = AutoConfig.from_pretrained(model)
            draft, params, draft_params = truncated_draft(model, args.draft_layers, Path(tmp) / name)
            work = text_workloads(text, n) if name == "demo" else token_workloads(cfg.vocab_size, n, args.seed)
            models.append(dict(name=name, model=model, layers=cfg.num_hidden_layers, draft_layers=args.draft_layers,
                               params=params, draft_params=draft_params))
            rows += _bench_model(name, model, draft, work, args, sizes, bar)
    bar.close()
    summarize(rows)
    result = dict(models=models, rows=rows, goals=goals(rows), threads=torch.get_num_threads(),
                  max_tokens=args.max_tokens, num_speculative_tokens=args.num_speculative_tokens,
                  prompt_lookup=[args.prompt_lookup_min, args.prompt_lookup_max], repeats=args.repeats,
                  load_average=os.getloadavg())
    _print(result)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    _plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0
