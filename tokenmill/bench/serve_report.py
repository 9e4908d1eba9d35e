"""The figures of a serving benchmark run, the block `vllm bench serve` prints, and a plot of
latency over the run."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np


def _stats(values: list[float]) -> tuple[float, float, float]:
    """(mean, median, p99) in milliseconds; zeros when there is nothing to measure."""
    if not values:
        return 0.0, 0.0, 0.0
    a = np.asarray(values) * 1000.0
    return float(a.mean()), float(np.median(a)), float(np.percentile(a, 99))


def summarize(results: list[Any], duration: float, max_concurrency: Optional[int]) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    # TPOT: each request's time after its first token over the tokens after it (vLLM's definition).
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    # Text-carrying chunks per second of the run (a token each from tokenmill and vLLM, which send
    # one token per chunk; other servers may batch several).
    per_second = Counter(int(t) for r in ok for t in r.token_times)
    # Concurrency: the most requests in flight at any request's start (failed ones included, for
    # as long as they were in flight).
    spans = [(r.start, r.start + r.e2e) for r in results]
    peak_conc = max((sum(1 for s, e in spans if s <= t0 < e) for t0, _ in spans), default=0)
    summary: dict[str, Any] = dict(
        completed=len(ok), failed=len(results) - len(ok), max_concurrency=max_concurrency, duration=duration,
        total_input_tokens=in_tokens, total_output_tokens=out_tokens,
        request_throughput=len(ok) / duration if duration else 0.0,
        output_throughput=out_tokens / duration if duration else 0.0,
        total_token_throughput=(in_tokens + out_tokens) / duration if duration else 0.0,
        max_output_tokens_per_s=float(max(per_second.values(), default=0)), max_concurrent_requests=peak_conc)
    for name, values in (("ttft", [r.ttft for r in ok]), ("tpot", tpot), ("itl", itl), ("e2el", [r.e2e for r in ok])):
        mean, median, p99 = _stats(values)
        summary.update({f"mean_{name}_ms": mean, f"median_{name}_ms": median, f"p99_{name}_ms": p99})
    return summary


def format_report(s: dict[str, Any], title: Optional[str] = None) -> str:
    def row(label: str, value: Any, digits: int = 2) -> str:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return f"{label:<40}{text:<10}"

    def section(name: str) -> str:
        return f"{name:-^50}"

    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]
    if title:
        lines.append(f"({title})")
    lines += [row("Successful requests:", s["completed"]), row("Failed requests:", s["failed"])]
    if s["max_concurrency"] is not None:
        lines.append(row("Maximum request concurrency:", s["max_concurrency"]))
    lines += [row("Benchmark duration (s):", s["duration"]), row("Total input tokens:", s["total_input_tokens"]),
              row("Total generated tokens:", s["total_output_tokens"]),
              row("Request throughput (req/s):", s["request_throughput"]),
              row("Output token throughput (tok/s):", s["output_throughput"]),
              row("Peak output token throughput (tok/s):", s["max_output_tokens_per_s"]),
              row("Peak concurrent requests:", float(s["max_concurrent_requests"])),
              row("Total Token throughput (tok/s):", s["total_token_throughput"])]
    for name, heading, short in (("ttft", "Time to First Token", "TTFT"),
                                 ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                                 ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL")):
        lines.append(section(heading))
        lines += [row(f"Mean {short} (ms):", s[f"mean_{name}_ms"]), row(f"Median {short} (ms):", s[f"median_{name}_ms"]),
                  row(f"P99 {short} (ms):", s[f"p99_{name}_ms"])]
    lines.append("=" * 50)
    return "\n".join(lines)


def plot_latency(runs: dict[str, list[Any]], path: Path) -> None:
    """TTFT and end-to-end latency of every request against when it started, per server."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for (label, results), color in zip(runs.items(), ("tab:blue", "tab:orange")):
        ok = [r for r in results if r.ok]
        starts = [r.start for r in ok]
        axes[0].scatter(starts, [1000 * r.ttft for r in ok], s=8, color=color, label=label)
        axes[1].scatter(starts, [1000 * r.e2e for r in ok], s=8, color=color, label=label)
    for ax, name in zip(axes, ("time to first token (ms)", "end-to-end latency (ms)")):
        ax.set_xlabel("request start (s)")
        ax.set_ylabel(name)
        ax.legend(loc="upper left", fontsize=7)
        if not math.isfinite(ax.get_ylim()[1]):
            ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
