"""The printed table and the figure of `tokenmill bench fleet`, and its verdicts on the goals."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    """Each goal's measured figure and PASS/MISS (None where the run to judge it was skipped)."""
    g, pol = result["goals"], result["policies"]
    out: dict[str, Any] = {}
    if "round-robin" in pol and "cache-aware" in pol:
        ratio = pol["round-robin"]["p99_ttft_ms"] / max(pol["cache-aware"]["p99_ttft_ms"], 1e-9)
        out["p99_ratio"] = (ratio, ratio >= g["p99_ratio"])
    if "cache-aware" in pol:
        rate = pol["cache-aware"]["hit_rate"]
        out["hit_rate"] = (rate, rate > g["hit_rate"])
    f = (result.get("failover") or {}).get("failover")
    if f is not None:
        out["no_other_failures"] = (f["failed_other"], f["failed_other"] == 0)
        last = f["last_attempt_after_kill_s"] or 0.0  # None: not one attempt after the kill
        out["stops_sending"] = (last, last <= g["stop_sending_s"])
        out["conversations_continue"] = (f"{f['victim_conversations_continued']}/{f['victim_conversations_open']}",
                                         f["victim_conversations_continued"] == f["victim_conversations_open"])
    return out


def _mark(ok: Optional[bool]) -> str:
    return "PASS" if ok else "MISS"


def print_report(result: dict[str, Any]) -> None:
    r = result
    print(f"\n{r['replicas']} replicas x {r['threads_per_replica']} torch thread(s) on {r['cpus']} CPUs; "
          f"{r['num_conversations']} conversations x {r['num_turns']} turns ({r['system_tokens']}-token shared system "
          f"prompt, ~{r['new_tokens_per_turn']} new user tokens + {r['max_tokens']}-token reply a turn), "
          f"at most {r['concurrency']} in flight, conversations started {r['stagger_s']} s apart, "
          f"each turn sent {r['think_time_s']:g} s (mean) after the last reply")
    print(f"{'policy':<14}{'TTFT median ms':>16}{'TTFT P99 ms':>13}{'hit rate':>10}{'output tok/s':>14}"
          f"{'failed':>8}{'wall s':>8}{'1-replica convs':>17}")
    rows = dict(r["policies"])
    if "failover" in r:
        rows["failover (ca)"] = r["failover"]
    for name, p in rows.items():
        print(f"{name:<14}{p['median_ttft_ms']:>16.0f}{p['p99_ttft_ms']:>13.0f}{100 * p['hit_rate']:>9.1f}%"
              f"{p['output_tok_s']:>14.1f}{p['failed']:>8}{p['duration_s']:>8.1f}"
              f"{'%d/%d' % (p['conversations_on_one_replica'], r['num_conversations']):>17}")
    print(f"(hit rate: {r['hit_rate_unit']}, summed over the replicas, deltas over the run)")
    print("CPU cores the fleet used / other processes used meanwhile: " + ", ".join(
        f"{n} {p['fleet_cores_used']:.2f}/{p['other_cores_used']:.2f}" for n, p in rows.items()))
    busy = {n: p["other_cores_used"] for n, p in rows.items() if p["other_cores_used"] > 0.25 * r["cpus"]}
    if busy:  # the runs are sequential: a policy run while others loaded the machine ran on less
        print("WARNING: other processes used " + ", ".join(f"{c:.1f} cores during {n}" for n, c in busy.items())
              + f" of {r['cpus']}: figures of runs that had different CPU are not comparable")
    v, g = verdicts(r), r["goals"]
    if "p99_ratio" in v:
        ratio = v["p99_ratio"][0]  # 3 decimals where 2 would print the goal itself for a miss or pass
        shown = f"{ratio:.2f}" if round(ratio, 2) != g["p99_ratio"] else f"{ratio:.3f}"
        print(f"P99 TTFT round-robin / cache-aware: {shown}x (goal >= {g['p99_ratio']:.0f}x): "
              f"{_mark(v['p99_ratio'][1])}")
    if "hit_rate" in v:
        print(f"cache-aware hit rate: {100 * v['hit_rate'][0]:.1f}% (goal > {100 * g['hit_rate']:.0f}%): "
              f"{_mark(v['hit_rate'][1])}")
    f = (r.get("failover") or {}).get("failover")
    if f is None:
        return
    last = f["last_attempt_after_kill_s"]
    down = f["marked_down_after_s"]
    print(f"failover: killed {f['victim']} (SIGKILL) at {f['kill_at_s']:.1f} s")
    print(f"  failed requests: {f['failed_streaming_on_victim']} were streaming from it (allowed), "
          f"{f['failed_other']} others (goal 0): {_mark(v['no_other_failures'][1])}")
    print("  router's attempts at it after the kill: " + ("none" if last is None else f"the last {last:.2f} s after")
          + f" (goal: none after {g['stop_sending_s']:.0f} s): {_mark(v['stops_sending'][1])}; its /replicas showed it "
          + ("up to the end" if down is None else f"down {down:.2f} s after the kill") + " (polled every 50 ms)")
    print(f"  its unfinished conversations that went on elsewhere: {v['conversations_continue'][0]} "
          f"({f['victim_conversations_finished']} finished every turn): {_mark(v['conversations_continue'][1])}")


def plot(result: dict[str, Any], path: Path) -> None:
    """TTFT distribution per policy, median TTFT per turn, and the failover run's TTFT over time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fo = result.get("failover")
    fo = fo if fo and fo.get("failover") else None  # None too when the run ended before the kill
    fig = Figure(figsize=(15 if fo else 10, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if fo else 2)
    for name, p in result["policies"].items():
        ttft = sorted(1000 * q["ttft"] for q in p["requests"] if q["ok"])
        label = f"{name} (P99 {p['p99_ttft_ms']:.0f}; fleet had {p['fleet_cores_used']:.2f} cores)"
        axes[0].plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=label)
        turns = range(1, len(p["median_ttft_ms_per_turn"]) + 1)
        axes[1].plot(turns, p["median_ttft_ms_per_turn"], marker="o", label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("time to first token (ms)")
    axes[0].set_ylabel("fraction of requests")
    axes[0].set_title("TTFT distribution")
    axes[1].set_xlabel("turn")
    axes[1].set_ylabel("median TTFT (ms)")
    axes[1].set_yscale("log")
    axes[1].set_title("median TTFT per turn")
    if fo:
        f = fo["failover"]
        urls = sorted({q["replica"] for q in fo["requests"] if q["replica"]})
        for i, url in enumerate(urls):
            qs = [q for q in fo["requests"] if q["replica"] == url and q["ok"]]
            axes[2].scatter([q["start"] for q in qs], [1000 * max(q["ttft"], 1e-3) for q in qs], s=10,
                            label=("killed " if url == f["victim"] else "") + url.rsplit(":", 1)[1],
                            marker="x" if url == f["victim"] else "o")
        bad = [q for q in fo["requests"] if not q["ok"]]
        axes[2].scatter([q["start"] for q in bad], [1000 * max(q["e2e"], 1e-3) for q in bad], s=30, facecolors="none",
                        edgecolors="red", label="failed (ms to the error)")
        axes[2].axvline(f["kill_at_s"], color="red", linestyle="--", label="kill -9")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("request sent (s)")
        axes[2].set_ylabel("TTFT (ms)")
        axes[2].set_title("failover (cache-aware), by replica")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        for axis in (ax.xaxis, ax.yaxis):  # log axes: plain numbers, and no crowded minor labels
            if axis.get_scale() == "log":
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['replicas']} replicas, {result['num_conversations']} conversations x "
                 f"{result['num_turns']} turns through tokenmill router")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
