"""`tokenmill bench serve` against the test server, with itself as the baseline."""
from __future__ import annotations

import json
import subprocess
import sys


def test_bench_serve_reports_both_servers(server, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--url", server.url,
                           "--baseline-url", server.url, "--num-streams", "3", "--prompt-words", "5-20",
                           "--output-len", "6", "--rounds", "1", "--ignore-eos", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio" in proc.stdout
    data = json.loads(out.read_text())
    for name in ("tokenmill", "baseline"):
        assert data["summary"][name]["output_tokens_per_s"] > 0
        assert data["summary"][name]["median_time_per_output_token_ms"] > 0
    assert out.with_suffix(".png").is_file()
    bad = subprocess.run([sys.executable, "-m", "tokenmill.cli", "bench", "serve", "--url", server.url,
                          "--num-streams", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--num-streams" in bad.stderr
