"""The Grafana dashboard and Prometheus config in deploy/ cannot drift from the server's metrics:
every panel's PromQL names only series that `ServerMetrics` exports, with labels those series
carry, counters under rate(), percentiles over `_bucket` series by `le`; the panels cover the
live dashboard's list; prometheus.yml scrapes /metrics. No server is started."""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest

from tokenmill.server.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "tokenmill-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
README = ROOT / "deploy" / "README.md"

METRIC = re.compile(r"tokenmill:[a-zA-Z0-9_:]+")
SELECTOR = re.compile(r"(tokenmill:[a-zA-Z0-9_:]+)\s*\{([^}]*)\}")
_VALUE = r'\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*'
MATCHER = re.compile(rf"\s*([a-zA-Z_][a-zA-Z0-9_]*){_VALUE}")  # a label matcher of a {...} selector
MATCHERS = re.compile(rf"\s*[a-zA-Z_][a-zA-Z0-9_]*{_VALUE}(?:,\s*[a-zA-Z_][a-zA-Z0-9_]*{_VALUE})*,?\s*")
AGGREGATION = re.compile(r"\b(sum|avg|min|max|count|stddev|stdvar|topk|bottomk|quantile|group)\s*"
                         r"(?:(by|without)\s*\(([^)]*)\)\s*)?\(")
LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}")
RANGE_FUNCS = {"rate", "irate", "increase"}
MODEL_FILTER = 'model_name=~"$model_name"'
DS_UID = "${DS_PROMETHEUS}"


# --- what the server exports -------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    return exported_series()


def _registry_samples() -> Iterator[tuple[str, str, dict[str, str]]]:
    """(family type, sample name, labels) of every sample a server with one model exports.
    Labelled families have samples only once a child exists: `model()` pre-creates a model's."""
    m = ServerMetrics()
    m.model("demo")
    for fam in m.registry.collect():
        for s in fam.samples:
            yield fam.type, s.name, s.labels


def exported_series() -> dict[str, set[str]]:
    """Sample name -> its label names, e.g. `tokenmill:generation_tokens_total` -> {model_name},
    `tokenmill:time_to_first_token_seconds_bucket` -> {model_name, le}."""
    series: dict[str, set[str]] = {}
    for _, name, labels in _registry_samples():
        series.setdefault(name, set()).update(labels)
    return series


@functools.cache
def _kinds() -> dict[str, str]:
    return {name: kind for kind, name, _ in _registry_samples()}


def series_kind(name: str) -> str:
    """counter, histogram or gauge: the type of the family the sample belongs to."""
    return _kinds()[name]


# --- PromQL checks, each a list of problems (empty: fine) --------------------------------------

def _matching_paren(expr: str, open_idx: int) -> int:
    depth = 0
    for i in range(open_idx, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {expr!r}")


def _enclosing_call(expr: str, pos: int) -> str | None:
    """Name of the innermost function call whose parentheses enclose `pos` (None at top level)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        c = expr[i]
        if c == ")":
            depth += 1
        elif c == "(":
            if depth == 0:
                m = re.search(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*$", expr[:i])
                return m.group(1) if m else None
            depth -= 1
    return None


def syntax_problems(expr: str) -> list[str]:
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for c in re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr):
        if c in "([{":
            stack.append(c)
        elif c in pairs and (not stack or stack.pop() != pairs[c]):
            return [f"unbalanced {c!r} in {expr!r}"]
    return [f"unclosed {stack[-1]!r} in {expr!r}"] if stack else []


def unknown_metrics(expr: str, exported: dict[str, set[str]]) -> list[str]:
    return [f"{name} is not exported by the server" for name in METRIC.findall(expr) if name not in exported]


def histogram_problems(expr: str) -> list[str]:
    problems = []
    for m in re.finditer(r"histogram_quantile\s*\(", expr):
        body = expr[m.end():_matching_paren(expr, m.end() - 1)]
        q = re.match(r"\s*([0-9.]+)\s*,", body)
        if not q or not 0 < float(q.group(1)) < 1:
            problems.append(f"histogram_quantile needs a quantile in (0, 1): {expr!r}")
        names = METRIC.findall(body)
        if not names or any(not n.endswith("_bucket") for n in names):
            problems.append(f"histogram_quantile must be over _bucket series, got {names}: {expr!r}")
        aggs = list(AGGREGATION.finditer(body))
        for a in aggs:
            if a.group(2) != "by" or "le" not in [x.strip() for x in a.group(3).split(",")]:
                problems.append(f"histogram_quantile's {a.group(1)} must keep le in its by (...): {expr!r}")
        if not aggs and "rate(" not in body:
            problems.append(f"histogram_quantile over raw buckets, not their rate: {expr!r}")
    return problems


def label_problems(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Labels in {...} selectors and in by (...) must be labels of the metrics concerned."""
    problems = []
    for m in SELECTOR.finditer(expr):
        name, body = m.group(1), m.group(2)
        if not body.strip():
            continue
        if not MATCHERS.fullmatch(body):
            problems.append(f"unparsable selector {{{body}}}: {expr!r}")
        for label in MATCHER.findall(body):
            if label not in exported.get(name, set()):
                problems.append(f"{name} has no label {label!r}: {expr!r}")
    for a in AGGREGATION.finditer(expr):
        if not a.group(3):
            continue
        body = expr[a.end():_matching_paren(expr, a.end() - 1)]
        for label in (x.strip() for x in a.group(3).split(",") if x.strip()):
            for name in METRIC.findall(body):
                if label not in exported.get(name, set()):
                    problems.append(f"{a.group(1)} {a.group(2)} ({label}) over {name}, which has no {label!r}")
    return problems


def rate_problems(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Counters and histogram series are plotted as rates over a range; gauges never are."""
    problems = []
    for m in re.finditer(r"(tokenmill:[a-zA-Z0-9_:]+)(\s*\{[^}]*\})?(\s*\[[^\]]+\])?", expr):
        name, ranged = m.group(1), bool(m.group(3))
        if name not in exported:
            continue
        call = _enclosing_call(expr, m.start())
        if series_kind(name) == "gauge":
            if call in RANGE_FUNCS or ranged:
                problems.append(f"gauge {name} under {call}(): {expr!r}")
        elif call not in RANGE_FUNCS or not ranged:
            problems.append(f"{series_kind(name)} series {name} must be under rate(...[range]): {expr!r}")
    return problems


def model_filter_problems(expr: str) -> list[str]:
    """Each series is filtered by the dashboard's model variable."""
    problems = []
    for m in re.finditer(r"(tokenmill:[a-zA-Z0-9_:]+)(\s*\{([^}]*)\})?", expr):
        if MODEL_FILTER not in (m.group(3) or "").replace(" ", ""):
            problems.append(f"{m.group(1)} is not filtered by {MODEL_FILTER}: {expr!r}")
    return problems


def legend_problems(expr: str, legend: str, exported: dict[str, set[str]]) -> list[str]:
    """A {{label}} in legendFormat must survive the query: kept by every aggregation's by (...),
    or, without aggregation, a label of the series."""
    problems = []
    aggs = list(AGGREGATION.finditer(expr))
    for label in LEGEND_LABEL.findall(legend):
        if aggs:
            kept = all(a.group(2) == "by" and label in [x.strip() for x in a.group(3).split(",")] for a in aggs)
        else:
            kept = all(label in exported.get(n, set()) for n in METRIC.findall(expr))
        if not kept or "histogram_quantile" in expr and label == "le":
            problems.append(f"legend {{{{{label}}}}} is not a label of the result of {expr!r}")
    return problems


def expr_problems(expr: str, exported: dict[str, set[str]], legend: str = "") -> list[str]:
    problems = syntax_problems(expr)
    if problems:
        return problems
    if not METRIC.search(expr):
        return [f"names no tokenmill metric: {expr!r}"]
    return (unknown_metrics(expr, exported) + histogram_problems(expr) + label_problems(expr, exported)
            + rate_problems(expr, exported) + model_filter_problems(expr) + legend_problems(expr, legend, exported))


# --- the dashboard -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included; rows themselves too."""
    for p in dash.get("panels", []):
        yield p
        yield from p.get("panels", []) if p.get("type") == "row" else []


def query_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dash) if p.get("type") != "row"]


def dashboard_problems(dash: dict[str, Any], exported: dict[str, set[str]]) -> list[str]:
    problems = []
    panels = query_panels(dash)
    if not panels:
        problems.append("the dashboard has no panels")
    for p in panels:
        where = f"panel {p.get('title')!r}"
        if p.get("type") not in ("timeseries", "stat"):
            problems.append(f"{where}: type {p.get('type')!r}, not timeseries or stat")
        if p.get("datasource") != {"type": "prometheus", "uid": DS_UID}:
            problems.append(f"{where}: datasource {p.get('datasource')!r}")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        if len({t.get("refId") for t in targets}) != len(targets):
            problems.append(f"{where}: repeated refId")
        for t in targets:
            if t.get("datasource", p.get("datasource")) != {"type": "prometheus", "uid": DS_UID}:
                problems.append(f"{where}: target datasource {t.get('datasource')!r}")
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append(f"{where}: target {t.get('refId')} has no expr")
                continue
            problems += [f"{where}: {x}" for x in expr_problems(expr, exported, t.get("legendFormat", ""))]
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q or "")
        for name, label in re.findall(r"label_values\(\s*(tokenmill:[a-zA-Z0-9_:]+)\s*,\s*(\w+)\s*\)", text):
            if name not in exported or label not in exported[name]:
                problems.append(f"variable {var.get('name')!r}: {name} has no label {label!r}")
        problems += [f"variable {var.get('name')!r}: {x}" for x in unknown_metrics(text, exported)]
    return problems


def test_every_query_names_exported_series_with_their_labels(dashboard, exported):
    assert dashboard_problems(dashboard, exported) == []
    used = {n for p in query_panels(dashboard) for t in p["targets"] for n in METRIC.findall(t["expr"])}
    assert "tokenmill:kv_cache_blocks_cached" in used and len(used) >= 20, sorted(used)


def test_the_exported_set_is_the_servers(exported):
    """The reference the checks use is real: counters with _total, histograms per child."""
    assert exported["tokenmill:generation_tokens_total"] == {"model_name"}
    assert exported["tokenmill:admission_rejections_total"] == {"model_name", "reason"}
    assert exported["tokenmill:request_success_total"] == {"model_name", "finished_reason"}
    assert exported["tokenmill:time_to_first_token_seconds_bucket"] == {"model_name", "le"}
    assert "tokenmill:time_to_first_token_seconds_sum" in exported
    assert "tokenmill:generation_tokens" not in exported
    assert series_kind("tokenmill:prompt_tokens_total") == "counter"
    assert series_kind("tokenmill:batch_size_tokens_count") == "histogram"
    assert series_kind("tokenmill:kv_cache_usage_perc") == "gauge"


F = MODEL_FILTER


@pytest.mark.parametrize("expr,legend,complaint", [
    (f"rate(tokenmill:generation_tokens{{{F}}}[1m])", "", "not exported"),  # counter without _total
    (f"tokenmill:kv_cache_usage_percent{{{F}}}", "", "not exported"),
    (f"tokenmill:kv_cache_blocks_cache{{{F}}}", "", "not exported"),
    (f"histogram_quantile(0.95, sum by (model_name) (rate(tokenmill:time_to_first_token_seconds_bucket{{{F}}}[1m])))",
     "", "keep le"),
    (f"histogram_quantile(0.95, sum(rate(tokenmill:time_to_first_token_seconds_bucket{{{F}}}[1m])))", "", "keep le"),
    (f"histogram_quantile(0.95, sum by (le) (rate(tokenmill:time_to_first_token_seconds_sum{{{F}}}[1m])))",
     "", "_bucket"),
    (f"histogram_quantile(95, sum by (le) (rate(tokenmill:time_to_first_token_seconds_bucket{{{F}}}[1m])))",
     "", "quantile"),
    (f'rate(tokenmill:request_success_total{{{F}, reason="stop"}}[1m])', "", "no label 'reason'"),
    (f"sum by (finished_reason) (rate(tokenmill:admission_rejections_total{{{F}}}[1m]))", "",
     "no 'finished_reason'"),
    (f'tokenmill:num_requests_running{{{F}, le="1"}}', "", "no label 'le'"),
    (f"tokenmill:generation_tokens_total{{{F}}}", "", "under rate"),
    (f"sum(tokenmill:batch_size_tokens_sum{{{F}}})", "", "under rate"),
    (f"rate(tokenmill:num_requests_running{{{F}}}[1m])", "", "gauge"),
    ("sum(tokenmill:num_requests_running)", "", "not filtered"),
    (f"sum(rate(tokenmill:admission_rejections_total{{{F}}}[1m]))", "{{reason}}", "legend"),
    (f"sum by (model_name) (tokenmill:num_requests_running{{{F}}}", "", "unclosed"),
    ("vector(1)", "", "no tokenmill metric"),
    (f'tokenmill:num_requests_running{{{F}, reason}}', "", "unparsable selector"),
])
def test_a_wrong_query_is_caught(exported, expr, legend, complaint):
    problems = expr_problems(expr, exported, legend)
    assert any(complaint in p for p in problems), problems


def test_a_wrong_name_in_a_nested_panel_is_caught(dashboard, exported):
    """The same check over the whole dashboard sees panels inside collapsed rows."""
    dash = copy.deepcopy(dashboard)
    victim = next(p for p in dash["panels"] if p["type"] == "timeseries")
    victim = copy.deepcopy(victim)
    victim["targets"][0]["expr"] = victim["targets"][0]["expr"].replace("tokenmill:", "tokenmill:no_such_", 1)
    dash["panels"].append({"id": 999, "type": "row", "title": "Collapsed", "collapsed": True,
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": 1000}, "panels": [victim]})
    assert any("tokenmill:no_such_" in p and "not exported" in p for p in dashboard_problems(dash, exported))
    empty = copy.deepcopy(dashboard)
    empty["panels"].append({"id": 998, "type": "row", "collapsed": True, "gridPos": {"h": 1, "w": 24, "x": 0, "y": 999},
                            "panels": [{"id": 997, "type": "stat", "title": "No query", "targets": [],
                                        "datasource": {"type": "prometheus", "uid": DS_UID}}]})
    assert any("no targets" in p for p in dashboard_problems(empty, exported))


# Panel title (any of these words) -> series its queries must use (all of them).
REQUIRED_PANELS = [
    (("running",), ["tokenmill:num_requests_running"]),
    (("waiting",), ["tokenmill:num_requests_waiting"]),
    (("batch size",), ["tokenmill:batch_size_sequences_sum", "tokenmill:batch_size_sequences_count",
                       "tokenmill:batch_size_tokens_sum", "tokenmill:batch_size_tokens_count"]),
    (("kv cache",), ["tokenmill:kv_cache_usage_perc", "tokenmill:kv_cache_blocks_cached"]),
    (("prefix",), ["tokenmill:prefix_cache_hits_total", "tokenmill:prefix_cache_queries_total"]),
    (("preemption",), ["tokenmill:num_preemptions_total"]),
    (("refusal",), ["tokenmill:admission_rejections_total"]),
    (("ttft", "time to first token"), ["tokenmill:time_to_first_token_seconds_bucket"]),
    (("inter-token", "itl"), ["tokenmill:inter_token_latency_seconds_bucket"]),
    (("e2e", "end-to-end"), ["tokenmill:e2e_request_latency_seconds_bucket"]),
    (("tokens/s",), ["tokenmill:prompt_tokens_total", "tokenmill:generation_tokens_total"]),
    (("finished",), ["tokenmill:request_success_total"]),
    (("mbu",), ["tokenmill:model_bandwidth_utilization", "tokenmill:model_flops_utilization"]),
]


def _exprs(p: dict[str, Any]) -> str:
    return "\n".join(t["expr"] for t in p["targets"])


def _find(panels: list[dict[str, Any]], words: tuple[str, ...], series: list[str]) -> list[dict[str, Any]]:
    return [p for p in panels if any(w in p["title"].lower() for w in words)
            and set(series) <= set(METRIC.findall(_exprs(p)))]


@pytest.mark.parametrize("words,series", REQUIRED_PANELS, ids=[w[0] for w, _ in REQUIRED_PANELS])
def test_the_live_dashboards_panels_are_there(dashboard, words, series):
    """Each panel of the list is a time series over the right series (the stats row is extra)."""
    found = _find([p for p in query_panels(dashboard) if p["type"] == "timeseries"], words, series)
    assert found, f"no timeseries panel titled {words} over {series}"


def test_the_panels_compute_what_their_titles_say(dashboard):
    panels = [p for p in query_panels(dashboard) if p["type"] == "timeseries"]

    def one(words: tuple[str, ...], series: list[str]) -> str:
        return _exprs(_find(panels, words, series)[0]).replace(" ", "")

    for words, metric, quantiles in [(("time to first token",), "time_to_first_token_seconds", {"0.5", "0.95", "0.99"}),
                                     (("inter-token",), "inter_token_latency_seconds", {"0.5", "0.95", "0.99"}),
                                     (("end-to-end",), "e2e_request_latency_seconds", {"0.5", "0.95"})]:
        text = one(words, [f"tokenmill:{metric}_bucket"])
        assert set(re.findall(r"histogram_quantile\(([0-9.]+),", text)) == quantiles, text
    batch = one(("batch size",), ["tokenmill:batch_size_sequences_sum"])
    for kind in ("sequences", "tokens"):  # mean per step: rate(_sum) / rate(_count)
        assert re.search(rf"rate\(tokenmill:batch_size_{kind}_sum{{[^}}]*}}\[1m\]\)\)/"
                         rf"sum(by\(model_name\))?\(rate\(tokenmill:batch_size_{kind}_count", batch), batch
    prefix = one(("prefix",), ["tokenmill:prefix_cache_hits_total"])
    assert prefix.index("prefix_cache_hits_total") < prefix.index("/") < prefix.index("prefix_cache_queries_total")
    assert "by(reason)" in one(("refusal",), ["tokenmill:admission_rejections_total"])
    assert "by(finished_reason)" in one(("finished",), ["tokenmill:request_success_total"])
    for words, series in [(("kv cache",), ["tokenmill:kv_cache_usage_perc"]),
                          (("mbu",), ["tokenmill:model_flops_utilization"]),
                          (("prefix",), ["tokenmill:prefix_cache_hits_total"])]:
        p = _find(panels, words, series)[0]
        assert p["fieldConfig"]["defaults"]["unit"] == "percentunit", p["title"]  # 0-1 shown as %


def test_the_dashboard_is_a_current_grafana_model(dashboard):
    d = dashboard
    assert d["schemaVersion"] >= 36 and d["refresh"] == "5s" and d["time"] == {"from": "now-15m", "to": "now"}
    assert d["title"] and d["uid"] and isinstance(d["panels"], list)
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    model = variables["model_name"]
    assert model["type"] == "query" and model["datasource"] == {"type": "prometheus", "uid": DS_UID}
    q = model["query"]["query"] if isinstance(model["query"], dict) else model["query"]
    assert q == "label_values(tokenmill:num_requests_running, model_name)"
    assert model.get("definition", q) == q and model["includeAll"] and model["allValue"] == ".*"

    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:  # on-screen panels: inside 24 columns, no two overlap
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    for p in all_panels(d):
        if p["type"] == "row":
            assert not p["collapsed"] or p["panels"], p["title"]
            continue
        assert p["title"].strip() and p.get("description", "").strip(), p["id"]


def test_the_readme_explains_every_panel_and_the_setup(dashboard):
    text = README.read_text(encoding="utf-8")
    for p in query_panels(dashboard):
        if p["type"] == "timeseries":
            assert f"**{p['title']}**" in text, p["title"]
    for needle in ("prometheus.yml", "tokenmill-dashboard.json", "Import", "--metrics-port", "/metrics"):
        assert needle in text, needle


def test_prometheus_config_scrapes_metrics():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    cfg = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["tokenmill"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", cfg.get("global", {}).get("scrape_interval")) == "5s"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert "127.0.0.1:8000" in targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets), targets
    assert "--metrics-port" in PROMETHEUS.read_text(encoding="utf-8")
