"""schemathesis against the server's own /openapi.json: several hundred generated requests,
valid and invalid, with the served model name taken from the schema. No response may be a 5xx,
and every response must match what the schema documents (status code, content type, headers,
body schema), including 405s for methods a route does not take."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,unsupported_method")


def test_generated_requests_get_documented_answers_and_no_5xx(server, tmp_path):
    cli = Path(sys.executable).with_name("schemathesis")
    r = subprocess.run([str(cli), "run", f"{server.url}/openapi.json", "--checks", CHECKS, "--max-examples", "25",
                        "--mode", "all", "--seed", "1", "--report", "junit", "--report-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays out of the checkout
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    counts = re.findall(r"(\d+) generated", out)
    assert counts and int(counts[-1]) >= 200, out[-3000:]  # a few hundred requests ran
