"""`tokenmill bench serve` against the live test server: the vllm-style block, its counts and the
JSON, over the OpenAI and KServe backends, with a baseline."""
from __future__ import annotations

import json
import re
import subprocess
import sys


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "serve", *args],
                          capture_output=True, text=True, timeout=300)


def test_bench_serve_openai_with_baseline(server, tmp_path):
    proc = bench("--base-url", server.url, "--baseline-url", server.url, "--num-prompts", "6", "--max-concurrency",
                 "3", "--random-input-len", "12", "--random-output-len", "6", "--ignore-eos", "--save-result",
                 "--result-dir", str(tmp_path), "--result-filename", "serve.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("============ Serving Benchmark Result ============") == 2
    for label in ("Successful requests:", "Median TTFT (ms):", "P99 TPOT (ms):", "Mean ITL (ms):",
                  "Median E2EL (ms):", "Peak concurrent requests:"):
        assert label in out
    assert "the baseline's" in out
    data = json.loads((tmp_path / "serve.json").read_text())
    for name in ("tokenmill", "baseline"):
        r = data["results"][name]
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (6, 0, 36)  # 6 tokens each (ignore_eos)
        assert r["total_input_tokens"] > 0 and r["max_concurrent_requests"] <= 3 and r["median_ttft_ms"] > 0
        assert len(r["requests"]) == 6
    assert (tmp_path / "serve.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_serve_kserve_and_chat_backends(server):
    for backend in ("kserve", "openai-chat"):
        proc = bench("--base-url", server.url, "--backend", backend, "--model", "demo", "--num-prompts", "3",
                     "--random-input-len", "8", "--random-output-len", "4", "--request-rate", "50")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert re.search(r"Successful requests:\s+3\s", proc.stdout) and re.search(r"Failed requests:\s+0\s", proc.stdout)
    bad = bench("--base-url", server.url, "--num-prompts", "0")
    assert bad.returncode == 2 and "--num-prompts" in bad.stderr


def test_bench_serve_sharegpt_dataset(server, tmp_path):
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "What is a list?"}, {"from": "gpt", "value": "A sequence."}]},
        {"conversations": [{"from": "human", "value": "And a tuple?"}]},
    ]))
    proc = bench("--base-url", server.url, "--dataset", "sharegpt", str(data), "--num-prompts", "4",
                 "--random-output-len", "4", "--save-result", "--result-dir", str(tmp_path), "--result-filename", "s.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "s.json").read_text())["results"]["tokenmill"]
    assert result["completed"] == 4 and result["total_input_tokens"] > 0
    missing = bench("--base-url", server.url, "--dataset", "sharegpt", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "not found" in missing.stderr
