// The live dashboard: polls GET /stats every second, keeps ~2 minutes of snapshots, and
// derives rates (counter deltas / time delta) and windowed figures (histogram deltas over the
// last WINDOW_S seconds) the way one would with PromQL's rate() and histogram_quantile().
(function () {
  "use strict";

  const POLL_MS = 1000;
  const WINDOW_S = 10;       // "last window" of hit rate, batch size and latency quantiles
  const SPAN_S = 120;        // what the charts show
  const $ = (id) => document.getElementById(id);

  let snapshots = [];        // [{t, models}] oldest first
  const derived = {};        // model -> [{t, ...figures}] oldest first, one per poll
  let selected = null;

  // ---------- numbers from /stats ----------

  const leOf = (le) => (le === "+Inf" || le === "Inf" ? Infinity : Number(le));

  // Bucket counts of `cur` minus those of `base` (cumulative [le, count] pairs). A histogram
  // whose buckets changed (or a missing base) is taken as it is.
  function histDelta(cur, base) {
    if (!cur || !cur.buckets) return null;
    const b = base && base.buckets;
    const same = b && b.length === cur.buckets.length;
    return {
      buckets: cur.buckets.map(([le, c], i) => [leOf(le), same ? c - b[i][1] : c]),
      sum: cur.sum - (same ? base.sum : 0),
      count: cur.count - (same ? base.count : 0),
    };
  }

  // Prometheus' histogram_quantile: find the bucket holding rank q*total, interpolate linearly
  // inside it (from the previous bucket's bound, 0 for the first); a rank in the +Inf bucket
  // answers the highest finite bound. Null when nothing was observed.
  function quantile(q, h) {
    if (!h || !h.buckets.length) return null;
    const bs = h.buckets;
    const total = bs[bs.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    let i = bs.findIndex(([, c]) => c >= rank);
    if (i < 0) i = bs.length - 1;
    const [le, count] = bs[i];
    if (le === Infinity) return bs.length > 1 ? bs[bs.length - 2][0] : null;
    if (i === 0 && le <= 0) return le;
    const start = i === 0 ? 0 : bs[i - 1][0];
    const prev = i === 0 ? 0 : bs[i - 1][1];
    return count > prev ? start + (le - start) * ((rank - prev) / (count - prev)) : le;
  }

  const sumValues = (o) => Object.values(o || {}).reduce((a, v) => a + (Number(v) || 0), 0);
  const ratio = (a, b) => (b > 0 ? a / b : null);

  function figures(m, prev, base) {
    const d = (name) => (base ? m.v[name] - base.v[name] : null);
    const rate = (name) => (prev && m.t > prev.t ? (m.v[name] - prev.v[name]) / (m.t - prev.t) : null);
    const v = m.v;
    const meanDelta = (name) => { const h = base ? histDelta(v[name], base.v[name]) : null; return h ? ratio(h.sum, h.count) : null; };
    const qs = (name) => { const h = base ? histDelta(v[name], base.v[name]) : null; return [0.5, 0.95, 0.99].map((q) => quantile(q, h)); };
    const refusedWindow = {};
    for (const [reason, n] of Object.entries(v.admission_rejections_total || {})) {
      refusedWindow[reason] = base ? n - ((base.v.admission_rejections_total || {})[reason] || 0) : 0;
    }
    return {
      t: m.t,
      running: v.num_requests_running, waiting: v.num_requests_waiting,
      kv: v.kv_cache_usage_perc, blocks: v.kv_cache_blocks_cached,
      hitTotal: ratio(v.prefix_cache_hits_total, v.prefix_cache_queries_total),
      hitWindow: base ? ratio(d("prefix_cache_hits_total"), d("prefix_cache_queries_total")) : null,
      preemptions: v.num_preemptions_total, preemptionsWindow: base ? d("num_preemptions_total") : 0,
      refused: v.admission_rejections_total || {}, refusedWindow,
      batchSeqs: meanDelta("batch_size_sequences"), batchTokens: meanDelta("batch_size_tokens"),
      inTps: rate("prompt_tokens_total"), outTps: rate("generation_tokens_total"),
      ttft: qs("time_to_first_token_seconds"), itl: qs("inter_token_latency_seconds"),
      mbu: v.model_bandwidth_utilization, mfu: v.model_flops_utilization,
    };
  }

  // Counters (the *_total figures, plain or one per label) and histograms' counts only grow
  // while a server runs: ANY of them lower than before means it restarted (Prometheus' rate()
  // treats a counter reset the same way).
  function wentDown(cur, prev) {
    for (const [name, v] of Object.entries(cur || {})) {
      const p = prev[name];
      if (p == null || v == null) continue;
      if (v.buckets) {
        if (v.count < p.count || (p.buckets && v.buckets.some(([, c], i) => p.buckets[i] && c < p.buckets[i][1]))) return true;
      } else if (name.endsWith("_total")) {
        if (typeof v === "number" ? v < p : Object.entries(v).some(([k, n]) => n < (p[k] || 0))) return true;
      }
    }
    return false;
  }

  function ingest(data) {
    const t = Number(data.time) || Date.now() / 1000;
    const models = data.models || {};
    const last = snapshots[snapshots.length - 1];
    // A counter that went down means the server restarted: start the history afresh.
    const reset = last && Object.entries(models).some(([name, v]) => last.models[name] && wentDown(v, last.models[name]));
    if (reset || (last && t <= last.t)) { snapshots = []; for (const k of Object.keys(derived)) delete derived[k]; }
    snapshots.push({ t, models });
    while (snapshots.length > 2 && snapshots[0].t < t - SPAN_S - WINDOW_S - 5) snapshots.shift();

    for (const name of Object.keys(models)) {
      const withModel = snapshots.filter((s) => s.models[name]).map((s) => ({ t: s.t, v: s.models[name] }));
      const cur = withModel[withModel.length - 1];
      const prev = withModel.length > 1 ? withModel[withModel.length - 2] : null;
      // The window's baseline: the oldest snapshot at most WINDOW_S old (the previous one if
      // polling stalled for longer); none on the very first poll.
      const base = withModel.slice(0, -1).find((s) => s.t >= t - WINDOW_S - 0.5) || prev;
      const series = (derived[name] = derived[name] || []);
      series.push(figures(cur, prev, base));
      while (series.length && series[0].t < t - SPAN_S - 5) series.shift();
    }
  }

  // ---------- formatting ----------

  const dash = "–";
  const int = (v) => (v == null || Number.isNaN(v) ? dash : String(Math.round(v)));
  const pct = (v) => (v == null || Number.isNaN(v) ? dash : (v * 100).toFixed(1) + "%");
  const dec = (v) => (v == null || Number.isNaN(v) ? dash : v >= 100 ? String(Math.round(v)) : v.toFixed(1));
  function secs(v) {
    if (v == null || Number.isNaN(v)) return dash;
    if (v >= 1) return v.toFixed(2) + " s";
    const ms = v * 1000;
    return (ms >= 10 ? String(Math.round(ms)) : ms.toFixed(1)) + " ms";
  }

  function setTile(metric, text, raw) {
    const tile = document.querySelector('.tile[data-metric="' + metric + '"]');
    if (!tile) return;
    tile.querySelector(".value").textContent = text;
    if (raw == null || Number.isNaN(raw)) tile.removeAttribute("data-value");
    else tile.dataset.value = String(raw);
  }

  // ---------- the headline ----------
  // Rules, first match wins, over the latest numbers and the last WINDOW_S seconds:
  //   Overloaded: some request was refused for capacity (503) in the window
  //               ("N waiting, refusing requests (capacity, K in the last 10 s)").
  //   Loaded:     KV cache >= 90% full; or requests are waiting; or sequences were preempted in the window.
  //   Busy:       something is running ("R running, batch B", B the mean sequences per step).
  //   Idle:       nothing running or waiting.
  // Rate-limit refusals are about a client's quota, not server load: they are added as a note.
  function headline(f) {
    const waiting = f.waiting || 0, running = f.running || 0, kv = f.kv || 0;
    const rw = f.refusedWindow;
    const note = rw.rate_limit > 0 ? " · rate-limiting clients (" + rw.rate_limit + " refused)" : "";
    if (rw.capacity > 0) {
      return ["overloaded", "Overloaded: " + (waiting ? waiting + " waiting, " : running + " running, ") +
        "refusing requests (capacity, " + rw.capacity + " in the last " + WINDOW_S + " s)" + note];
    }
    if (kv >= 0.9) return ["loaded", "Loaded: KV cache " + Math.round(kv * 100) + "% full" + (waiting ? ", " + waiting + " waiting" : "") + note];
    if (waiting > 0) return ["loaded", "Loaded: " + waiting + " waiting for a slot, " + running + " running" + note];
    if (f.preemptionsWindow > 0) return ["loaded", "Loaded: " + f.preemptionsWindow + " preemptions in the last " + WINDOW_S + " s, " + running + " running" + note];
    if (running > 0) {
      const batch = f.batchSeqs != null ? ", batch " + (Math.round(f.batchSeqs * 10) / 10) : "";
      return ["busy", "Busy: " + running + " running" + batch + note];
    }
    return ["idle", "Idle" + note];
  }

  // ---------- rendering ----------

  function render() {
    const series = derived[selected] || [];
    const f = series[series.length - 1];
    if (!f) return;
    setTile("num_requests_running", int(f.running), f.running);
    setTile("num_requests_waiting", int(f.waiting), f.waiting);
    setTile("kv_cache_usage_perc", pct(f.kv), f.kv);
    setTile("kv_cache_blocks_cached", int(f.blocks), f.blocks);
    setTile("prefix_cache_hit_rate", pct(f.hitTotal), f.hitTotal);
    setTile("prefix_cache_hit_rate_window", pct(f.hitWindow), f.hitWindow);
    setTile("num_preemptions_total", int(f.preemptions), f.preemptions);
    setTile("admission_rejections_total", int(sumValues(f.refused)), sumValues(f.refused));
    const breakdown = document.querySelector('.tile[data-metric="admission_rejections_total"] .breakdown');
    // One span per reason (data-reason, its count in .count), separated by spaces.
    breakdown.replaceChildren(...Object.entries(f.refused).flatMap(([reason, n], i) => {
      const span = document.createElement("span");
      span.className = "reason";
      span.dataset.reason = reason;
      const count = document.createElement("b");
      count.className = "count";
      count.textContent = String(n);
      span.append(reason.replace(/_/g, " ") + " ", count);
      return i ? [" ", span] : [span];
    }));
    setTile("batch_size_sequences", dec(f.batchSeqs), f.batchSeqs);
    setTile("batch_size_tokens", dec(f.batchTokens), f.batchTokens);
    setTile("prompt_tokens_per_s", dec(f.inTps), f.inTps);
    setTile("generation_tokens_per_s", dec(f.outTps), f.outTps);
    ["p50", "p95", "p99"].forEach((p, i) => {
      setTile("ttft_" + p, secs(f.ttft[i]), f.ttft[i]);
      setTile("itl_" + p, secs(f.itl[i]), f.itl[i]);
    });
    setTile("model_bandwidth_utilization", pct(f.mbu), f.mbu);
    setTile("model_flops_utilization", pct(f.mfu), f.mfu);

    const [level, text] = headline(f);
    const status = $("load-status");
    status.dataset.level = level;
    status.textContent = text;
    renderTotals();
    renderCharts(series, f.t);
  }

  function renderCharts(series, tEnd) {
    const c1 = getComputedStyle(document.documentElement).getPropertyValue("--series-1").trim() || "#2f6fdd";
    const c2 = getComputedStyle(document.documentElement).getPropertyValue("--series-2").trim() || "#e0762b";
    const pts = (get) => series.map((f) => [f.t, get(f)]);
    const ms = (v) => (v == null ? null : v * 1000);
    const msFmt = (v) => (v >= 10 ? String(Math.round(v)) : v.toFixed(1)) + " ms";
    const pctFmt = (v) => (Math.round(v * 10) / 10) + "%";
    const charts = [
      ["chart-requests", [["running", c1, (f) => f.running], ["waiting", c2, (f) => f.waiting]], { minYMax: 4, format: (v) => String(Math.round(v * 10) / 10) }],
      ["chart-kv", [["KV used", c1, (f) => (f.kv == null ? null : f.kv * 100)]], { yMax: 100, format: pctFmt }],
      ["chart-batch", [["seqs/step", c1, (f) => f.batchSeqs]], { minYMax: 4, format: (v) => String(Math.round(v * 10) / 10) }],
      ["chart-tokens", [["in", c1, (f) => f.inTps], ["out", c2, (f) => f.outTps]], { minYMax: 20, format: (v) => String(v < 10 ? Math.round(v * 10) / 10 : Math.round(v)) }],
      ["chart-ttft", [["p50", c1, (f) => ms(f.ttft[0])], ["p95", c2, (f) => ms(f.ttft[1])]], { minYMax: 10, format: msFmt }],
      ["chart-itl", [["p50", c1, (f) => ms(f.itl[0])], ["p95", c2, (f) => ms(f.itl[1])]], { minYMax: 10, format: msFmt }],
      ["chart-util", [["MBU", c1, (f) => (f.mbu == null ? null : f.mbu * 100)], ["MFU", c2, (f) => (f.mfu == null ? null : f.mfu * 100)]], { minYMax: 10, format: pctFmt }],
    ];
    for (const [id, lines, opts] of charts) {
      window.drawChart($(id), Object.assign({
        tEnd, span: SPAN_S, series: lines.map(([name, color, get]) => ({ name, color, points: pts(get) })),
      }, opts));
    }
  }

  // Every counter and histogram total of the selected model, flattened, for the curious.
  function renderTotals() {
    const last = snapshots[snapshots.length - 1];
    const m = last && last.models[selected];
    if (!m) return;
    const rows = [];
    for (const [name, v] of Object.entries(m)) {
      if (typeof v === "number") rows.push([name, v]);
      else if (v && v.buckets) rows.push([name + " count", v.count], [name + " sum", v.sum]);
      else if (v && typeof v === "object") for (const [k, n] of Object.entries(v)) rows.push([name + "{" + k + "}", n]);
    }
    $("totals").replaceChildren(...rows.map(([k, n]) => {
      const tr = document.createElement("tr");
      const a = document.createElement("td"), b = document.createElement("td");
      a.textContent = k;
      b.textContent = typeof n === "number" && !Number.isInteger(n) ? n.toFixed(4) : String(n);
      tr.append(a, b);
      return tr;
    }));
  }

  function updateModelPicker(names) {
    const select = $("dash-model");
    const have = [...select.options].map((o) => o.value);
    if (have.join("\n") !== names.join("\n")) select.replaceChildren(...names.map((n) => new Option(n, n)));
    if (!names.includes(selected)) selected = names[0] || null;
    select.value = selected || "";
    select.disabled = names.length < 2;
  }

  // ---------- polling ----------

  async function poll() {
    const started = Date.now();
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 5000);
    try {
      const headers = {};
      const key = localStorage.getItem("tokenmill.apiKey");
      if (key) headers["Authorization"] = "Bearer " + key;
      const res = await fetch("/stats", { headers, signal: ctl.signal, cache: "no-store" });
      if (!res.ok) throw new Error("HTTP " + res.status + " " + (await res.text()).slice(0, 200));
      const data = await res.json();
      ingest(data);
      updateModelPicker(Object.keys(data.models || {}));
      render();
      $("last-update").textContent = "last update " + new Date().toLocaleTimeString("en-GB", { hour12: false });
      $("stats-error").hidden = true;
    } catch (e) {
      const err = $("stats-error");
      err.textContent = "Could not load /stats: " + (e.name === "AbortError" ? "timed out" : e.message || e);
      err.hidden = false;
      const status = $("load-status");
      status.dataset.level = "error";
      status.textContent = "Unknown: /stats is not answering";
    } finally {
      clearTimeout(timer);
      setTimeout(poll, Math.max(0, POLL_MS - (Date.now() - started)));
    }
  }

  $("dash-model").addEventListener("change", (e) => { selected = e.target.value; render(); });
  window.addEventListener("resize", () => render());
  poll();
})();
