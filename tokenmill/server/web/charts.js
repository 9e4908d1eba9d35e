// Line charts on a plain 2D canvas (no library): y axis with a few gridlines and labels,
// an x axis of the last N seconds, a legend top left and the current values top right.
(function () {
  "use strict";

  function cssVar(name, fallback) {
    const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  // A scale top of 4 "round" steps (1, 2, 2.5, 5 x 10^k each) at or above v, so that all
  // four gridlines fall on readable numbers.
  function niceCeil(v) {
    if (!(v > 0)) return 4;
    const step = v / 4, p = 10 ** Math.floor(Math.log10(step));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= step * 0.999) return 4 * m * p;
    return 40 * p;
  }

  // opts: {series: [{name, color, points: [[t, v|null], ...]}], tEnd, span (s),
  //        yMax (fixed, optional), minYMax, format(v) -> label}
  function drawChart(canvas, opts) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);

    const text = cssVar("--text", "#222"), muted = cssVar("--muted", "#777"), grid = cssVar("--grid", "#ddd");
    const fmt = opts.format || ((v) => String(Math.round(v * 10) / 10));
    const left = 48, right = 10, top = 22, bottom = 18;
    const pw = w - left - right, ph = h - top - bottom;
    const tEnd = opts.tEnd, span = opts.span, tStart = tEnd - span;

    let maxV = 0;
    for (const s of opts.series) for (const [t, v] of s.points) if (v != null && t >= tStart && v > maxV) maxV = v;
    const yMax = opts.yMax || niceCeil(Math.max(maxV, opts.minYMax || 0));
    const x = (t) => left + ((t - tStart) / span) * pw;
    const y = (v) => top + ph - (Math.min(v, yMax) / yMax) * ph;

    // Gridlines and y labels at 0, 1/4, 1/2, 3/4, 1 of the scale.
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4, yy = Math.round(y(v)) + 0.5;
      ctx.strokeStyle = grid;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + pw, yy); ctx.stroke();
      ctx.fillStyle = muted;
      ctx.fillText(fmt(v), left - 6, yy);
    }
    // Axes.
    ctx.strokeStyle = muted;
    ctx.beginPath(); ctx.moveTo(left + 0.5, top); ctx.lineTo(left + 0.5, top + ph + 0.5); ctx.lineTo(left + pw, top + ph + 0.5); ctx.stroke();
    // X labels: the start of the span, its middle, now.
    ctx.textBaseline = "top";
    ctx.fillStyle = muted;
    const ticks = [[tStart, "-" + fmtSpan(span)], [tStart + span / 2, "-" + fmtSpan(span / 2)], [tEnd, "now"]];
    ticks.forEach(([t, label], i) => {
      ctx.textAlign = i === 0 ? "left" : i === 2 ? "right" : "center";
      ctx.fillText(label, x(t), top + ph + 4);
    });

    // Lines; a null value (nothing measured then) breaks the line.
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    let any = false;
    for (const s of opts.series) {
      ctx.strokeStyle = s.color;
      ctx.beginPath();
      let pen = false;
      for (const [t, v] of s.points) {
        if (t < tStart || v == null) { pen = false; continue; }
        any = true;
        if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
        pen = true;
      }
      ctx.stroke();
    }
    if (!any) {
      ctx.fillStyle = muted;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("no data yet", left + pw / 2, top + ph / 2);
    }

    // Legend with each series' current value, in the top right corner: "■ p50 8.6 ms  ■ p95 23 ms".
    ctx.textBaseline = "middle";
    ctx.textAlign = "left";
    ctx.font = "600 12px system-ui, sans-serif";
    const items = opts.series.map((s) => {
      const last = s.points.length ? s.points[s.points.length - 1][1] : null;
      const label = s.name + " " + (last == null ? "–" : fmt(last));
      return { color: s.color, label, width: 14 + ctx.measureText(label).width };
    });
    let lx = w - right - items.reduce((a, it) => a + it.width, 0) - 12 * (items.length - 1);
    for (const it of items) {
      ctx.fillStyle = it.color;
      ctx.fillRect(lx, 7, 10, 10);
      ctx.fillStyle = text;
      ctx.fillText(it.label, lx + 14, 12);
      lx += it.width + 12;
    }
    ctx.font = "11px system-ui, sans-serif";
  }

  function fmtSpan(s) {
    return s >= 60 && s % 60 === 0 ? s / 60 + "m" : Math.round(s) + "s";
  }

  window.drawChart = drawChart;
})();
