"""`tokenmill bench structured`: structured outputs on the demo model (which otherwise writes gibberish).

Three measures: the share of constrained outputs (JSON schemas, regexes, choices) that parse and
validate (goal 100%; an output cut by max_tokens counts as invalid); decode tokens/s at batch 8
constrained vs unconstrained, both generating exactly --decode-tokens tokens (goal: at most 10%
slower); and time to first token with a schema never seen (compiled then) vs a cached one.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

_S, _I, _N = {"type": "string"}, {"type": "integer"}, {"type": "number"}
SCHEMAS: dict[str, dict[str, Any]] = {  # every string, integer and array bounded: the model rambles
    "nested object": {"type": "object", "properties": {
        "name": _S | {"maxLength": 12}, "age": _I | {"minimum": 0, "maximum": 120},
        "address": {"type": "object", "properties": {"street": _S | {"maxLength": 16}, "city": _S | {"maxLength": 12},
                                                     "zip": _S | {"pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"]}}, "required": ["name", "age", "address"]},
    "array of objects": {"type": "object", "properties": {
        "order_id": _I | {"minimum": 1, "maximum": 99999},
        "items": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "object", "properties": {
            "sku": _S | {"pattern": "^[A-Z]{2}[0-9]{3}$"}, "qty": _I | {"minimum": 1, "maximum": 20},
            "price": _N | {"minimum": 0, "maximum": 1000}}, "required": ["sku", "qty", "price"]}}},
        "required": ["order_id", "items"]},
    "enums": {"type": "object", "properties": {
        "status": {"enum": ["active", "inactive", "banned"]}, "priority": {"enum": [1, 2, 3]},
        "color": _S | {"enum": ["red", "green", "blue"]}}, "required": ["status", "priority", "color"]},
    "number ranges": {"type": "object", "properties": {
        "lat": _N | {"minimum": -90, "maximum": 90}, "lon": _N | {"minimum": -180, "maximum": 180},
        "score": _N | {"exclusiveMinimum": 0, "exclusiveMaximum": 1}, "count": _I | {"minimum": 0, "maximum": 1000}},
        "required": ["lat", "lon", "score", "count"]},
    "string patterns": {"type": "object", "properties": {
        "code": _S | {"pattern": "^[A-Z]{3}-[0-9]{2}$"}, "phone": _S | {"pattern": r"^\+[0-9]{2} [0-9]{3}-[0-9]{4}$"},
        "slug": _S | {"pattern": "^[a-z]{2,8}(-[a-z]{2,8}){0,2}$"}}, "required": ["code", "phone", "slug"]},
    "optional fields": {"type": "object", "additionalProperties": False, "required": ["id"], "properties": {
        "id": _I | {"minimum": 1, "maximum": 100}, "nickname": _S | {"maxLength": 10}, "active": {"type": "boolean"},
        "note": _S | {"maxLength": 20}}},
    "formats": {"type": "object", "properties": {  # email is left out: its local part is unbounded
        "day": _S | {"format": "date"}, "id": _S | {"format": "uuid"}, "host": _S | {"format": "ipv4"}},
        "required": ["day", "id", "host"]},
    "mixed": {"type": "object", "properties": {
        "value": {"anyOf": [_I | {"minimum": 0, "maximum": 9}, _S | {"maxLength": 5}, {"type": "null"}]},
        "flag": {"type": "boolean"}, "kind": {"const": "event"},
        "tags": {"type": "array", "items": _S | {"maxLength": 6}, "maxItems": 3}},
        "required": ["value", "flag", "kind", "tags"]},
}
REGEXES = {"phone": r"\(\d{3}\) \d{3}-\d{4}", "ipv4": r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
           "iso date": r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
           "email-like": r"[a-z]{3,8}@[a-z]{3,6}\.(com|org|net)"}
CHOICES = {"sentiment": ["positive", "negative", "neutral"], "color": ["red", "green", "blue", "yellow"],
           "likert": ["strongly agree", "agree", "neutral", "disagree", "strongly disagree"]}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--num-prompts", type=int, default=200, help="constrained requests for the validity check")
    p.add_argument("--max-tokens", type=int, default=192, help="max_tokens of the validity requests")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the decode tokens/s runs")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens each decode run generates")
    p.add_argument("--repeats", type=int, default=7, help="decode runs per way (median kept); TTFT pairs: 5 or more")
    p.add_argument("--result-dir", default="bench_results", help="writes structured.json and structured.png here")
    p.add_argument("--seed", type=int, default=0)


def _check(kind: str, spec: Any, text: str) -> tuple[bool, bool]:
    """(valid, valid with `format` asserted too): JSON Schema 2020-12 only annotates format by default."""
    if kind == "regex":
        return (ok := re.fullmatch(spec, text) is not None), ok
    if kind == "choice":
        return (ok := text in spec), ok
    import jsonschema

    try:
        instance = json.loads(text)
    except ValueError:
        return False, False
    v = jsonschema.Draft202012Validator(spec)
    if not v.is_valid(instance):
        return False, False
    return True, v.evolve(format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).is_valid(instance)


def _validity(llm: Any, args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill import SamplingParams, StructuredOutputsParams

    cons = [(kind, n, c) for kind, group in (("json", SCHEMAS), ("regex", REGEXES), ("choice", CHOICES))
            for n, c in group.items()]
    work = [cons[i % len(cons)] for i in range(args.num_prompts)]
    prompts = [f"{name} ({kind}):" for kind, name, _ in work]
    params = [SamplingParams(temperature=1.0, seed=args.seed * 100_003 + i, max_tokens=args.max_tokens,
                             structured_outputs=StructuredOutputsParams(**{kind: spec}))
              for i, (kind, _, spec) in enumerate(work)]
    outs = [o for i in tqdm(range(0, len(work), 50), desc="structured validity", unit="batch")
            for o in llm.generate(prompts[i:i + 50], params[i:i + 50], use_tqdm=False)]
    by_kind: dict[str, Counter] = {}
    by_name: dict[str, Counter] = {}
    failures = []
    for (kind, name, spec), out in zip(work, outs):
        text, reason = out.outputs[0].text, out.outputs[0].finish_reason
        valid, strict = _check(kind, spec, text) if reason == "stop" else (False, False)
        for c in (by_kind.setdefault(kind, Counter()), by_name.setdefault(f"{kind}: {name}", Counter())):
            c.update(total=1, valid=valid, valid_with_formats=strict, length_finished=reason == "length")
        if not strict and len(failures) < 8:
            failures.append(dict(constraint=f"{kind}: {name}", finish_reason=reason, text=text[:200], valid=valid))
    total = sum(c["total"] for c in by_kind.values())
    return dict(validity=sum(c["valid"] for c in by_kind.values()) / total,
                validity_with_formats=sum(c["valid_with_formats"] for c in by_kind.values()) / total, total=total,
                by_kind={k: dict(c, share=c["valid"] / c["total"]) for k, c in by_kind.items()},
                by_constraint={n: c["valid"] / c["total"] for n, c in by_name.items()},
                failures=failures, mean_output_tokens=sum(len(o.outputs[0].token_ids) for o in outs) / total)


def _decode_ways(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill import StructuredOutputsParams

    n = args.decode_tokens  # neither grammar can complete within n tokens: both runs make exactly n
    item = {"type": "object", "properties": {"id": _I | {"minimum": 0, "maximum": 999}, "name": _S | {"maxLength": 8},
                                             "ok": {"type": "boolean"}}, "required": ["id", "name", "ok"]}
    return {"unconstrained": None,
            "json": StructuredOutputsParams(json={"type": "array", "items": item, "minItems": n}),
            "regex": StructuredOutputsParams(regex=f"[a-z ]{{{32 * n + 1}}}")}  # demo tokens: at most 32 chars


def _decode_run(llm: Any, so: Any, args: argparse.Namespace, rep: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of one batch: tokens after the first / (last finish - first first token)."""
    from tokenmill import SamplingParams

    params = [SamplingParams(temperature=1.0, seed=args.seed + 1000 * rep + i, max_tokens=args.decode_tokens,
                             ignore_eos=True, structured_outputs=so) for i in range(args.batch_size)]
    outs = llm.generate([f"Record {i}:" for i in range(args.batch_size)], params, use_tqdm=False)
    toks = [o.outputs[0].token_ids for o in outs]
    if any(len(t) != args.decode_tokens for t in toks):
        logger.warning("a decode run generated %s tokens, not %d each", [len(t) for t in toks], args.decode_tokens)
    t0 = min(o.metrics.first_token_time for o in outs)
    t1 = max(o.metrics.finished_time for o in outs)
    return sum(len(t) - 1 for t in toks) / max(t1 - t0, 1e-9), toks


def _mask_ms(llm: Any, so: Any, toks: list[list[int]]) -> float:
    """Replays a constrained run's tokens: ms per step to fill and apply the batch's token mask."""
    from tokenmill.structured.matcher import GrammarState, apply_bitmask, batch_bitmask

    grammars, vocab = llm.llm_engine.grammars, llm.llm_engine.model_runner.vocab_size
    states = [GrammarState(grammars.submit(so).result(), grammars.stop_token_ids) for _ in toks]
    logits, spent, steps = torch.zeros(len(toks), vocab), 0.0, min(len(t) for t in toks)
    for step in range(steps):
        t0 = time.perf_counter()
        apply_bitmask(logits, batch_bitmask(states, vocab))  # type: ignore[arg-type]  # every row constrained
        spent += time.perf_counter() - t0
        for state, t in zip(states, toks):
            state.accept(t[step])
    return 1000 * spent / steps


def _decode(llm: Any, args: argparse.Namespace) -> dict[str, Any]:
    ways = _decode_ways(args)
    for so in ways.values():  # warm-up, and the grammars compiled
        _decode_run(llm, so, argparse.Namespace(**{**vars(args), "decode_tokens": 4}), -1)
    runs: dict[str, list[float]] = {w: [] for w in ways}
    last: dict[str, list[list[int]]] = {}
    for rep in tqdm(range(args.repeats), desc="structured decode", unit="round"):
        for way, so in ways.items():  # alternating, so drift on a shared machine hits every way alike
            tps, last[way] = _decode_run(llm, so, args, rep)
            runs[way].append(tps)
    med = {w: statistics.median(r) for w, r in runs.items()}
    base = med["unconstrained"]
    return dict(batch_size=args.batch_size, decode_tokens=args.decode_tokens, runs=runs, tokens_per_s=med,
                ratio={w: med[w] / base for w in ways if w != "unconstrained"},
                mask_ms_per_step={w: _mask_ms(llm, ways[w], last[w]) for w in ways if w != "unconstrained"},
                step_ms={w: 1000 * args.batch_size / med[w] for w in ways})


def _ttft(llm: Any, args: argparse.Namespace, pairs: int = 5) -> dict[str, Any]:
    """TTFT of one request whose schema is new (compiled on arrival) then the same schema again."""
    from tokenmill import SamplingParams, StructuredOutputsParams

    rng, cache = random.Random(args.seed), llm.llm_engine.grammars
    hits, misses = cache.hits, cache.misses
    times: dict[str, list[float]] = {"unconstrained": [], "new schema": [], "cached schema": []}

    def one(so: Any) -> float:
        out = llm.generate(["Person:"], SamplingParams(temperature=1.0, max_tokens=1, structured_outputs=so),
                           use_tqdm=False)[0]
        return out.metrics.first_token_time - out.metrics.arrival_time

    for _ in range(max(pairs, args.repeats)):
        extra = "f_" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=12))  # a cache miss by construction
        schema = json.loads(json.dumps(SCHEMAS["nested object"]))
        schema["properties"][extra] = _I | {"minimum": 0, "maximum": 9}
        times["unconstrained"].append(one(None))
        times["new schema"].append(one(StructuredOutputsParams(json=schema)))
        times["cached schema"].append(one(StructuredOutputsParams(json=schema)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(runs=times, median_s=med, ratio_new_to_cached=med["new schema"] / med["cached schema"],
                cache_misses=cache.misses - misses, cache_hits=cache.hits - hits)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v, d = result["validity"], result["decode"]
    panels = [({k: 100 * c["share"] for k, c in v["by_kind"].items()}, f"valid outputs, % ({v['total']} requests)"),
              (d["tokens_per_s"], f"decode tok/s, batch {d['batch_size']}"),
              ({k: 1000 * t for k, t in result["ttft"]["median_s"].items()}, "median TTFT, ms")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (values, title), color in zip(axes, panels, ("#2a7", "#27a", "#72a")):
        ax.bar(list(values), list(values.values()), color=color)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print(r: dict[str, Any]) -> None:
    v, d, t = r["validity"], r["decode"], r["ttft"]
    print(f"\nmodel {r['model']}, {v['total']} constrained requests ({len(SCHEMAS)} schemas, {len(REGEXES)} regexes, "
          f"{len(CHOICES)} choice sets), temperature 1.0, {torch.get_num_threads()} threads")
    print(f"{'':40}{'baseline':>14}{'constrained':>14}{'ratio':>9}")
    for way in d["ratio"]:
        print(f"{'decode tok/s, batch %d, %s' % (d['batch_size'], way):40}{d['tokens_per_s']['unconstrained']:>14.1f}"
              f"{d['tokens_per_s'][way]:>14.1f}{d['ratio'][way]:>8.2f}x")
    m = t["median_s"]
    print(f"{'TTFT ms, cached vs new schema':40}{1000 * m['cached schema']:>14.1f}{1000 * m['new schema']:>14.1f}"
          f"{t['ratio_new_to_cached']:>8.2f}x")
    print(f"(baseline: unconstrained for decode, the cached schema for TTFT; unconstrained TTFT "
          f"{1000 * m['unconstrained']:.1f} ms; grammar cache: {t['cache_misses']} misses, {t['cache_hits']} hits)")
    print("mask fill + apply per step (batch %d): " % d["batch_size"] + ", ".join(
        f"{w} {ms:.2f} ms of a {d['step_ms'][w]:.1f} ms step" for w, ms in d["mask_ms_per_step"].items()))
    print(f"{'valid outputs':40}{'valid':>14}{'+ formats':>14}{'cut':>9}")
    for kind, k in v["by_kind"].items():
        print(f"{kind:40}{'%d/%d' % (k['valid'], k['total']):>14}{k['valid_with_formats']:>14}"
              f"{k['length_finished']:>9}")
    print(f"validity {100 * v['validity']:.1f}% (goal 100%), {100 * v['validity_with_formats']:.1f}% asserting "
          f"`format` too; decode ratio {min(d['ratio'].values()):.2f}x (goal >= 0.90x)")
    for name, share in v["by_constraint"].items():
        if share < 1:
            print(f"  below 100%: {name}: {100 * share:.0f}%")


def run(args: argparse.Namespace) -> int:
    from tokenmill import LLM
    from tokenmill.cli import DEMO_MODEL

    if min(args.num_prompts, args.batch_size, args.repeats, args.max_tokens) < 1 or args.decode_tokens < 2:
        raise ValueError("--num-prompts, --batch-size, --repeats, --max-tokens >= 1 and --decode-tokens >= 2 required")
    model = args.model or DEMO_MODEL
    llm = LLM(model, seed=args.seed, max_num_seqs=max(64, args.batch_size))
    result: dict[str, Any] = dict(model=model, num_prompts=args.num_prompts, max_tokens=args.max_tokens,
                                  threads=torch.get_num_threads())
    result["decode"] = _decode(llm, args)
    result["ttft"] = _ttft(llm, args)
    result["validity"] = _validity(llm, args)
    _print(result)
    out = Path(args.result_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "structured.png")
    print(f"wrote {out / 'structured.json'} and {out / 'structured.png'}")
    return 0
