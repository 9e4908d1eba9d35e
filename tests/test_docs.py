"""The docs cannot drift from the code: every block fenced as ```bash runnable``` or
```python runnable``` in README.md and docs/*.md runs here, on the demo model, and must succeed.

Blocks marked `runnable-with-server` run while `make serve`'s server is up (`tokenmill serve
--served-model-name demo --enable-auto-tool-choice --tool-call-parser hermes`);
it listens on free ports, so their `127.0.0.1:8000` and `127.0.0.1:8001` (HTTP and gRPC, the
defaults `make serve` uses) are pointed at it. Blocks run in a scratch folder where `tokenmill/` and `data/` are the repository's, so the
relative paths the docs use resolve and what the blocks write stays out of the checkout.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(bash|python) (runnable|runnable-with-server)\n(.*?)^```", re.M | re.S)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks() -> list[tuple[str, str, str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text[:m.start()].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", m.group(1), m.group(2), m.group(3)))
    return found


BLOCKS = _blocks()


def test_the_docs_have_runnable_blocks():
    pages = {b[0].split(":")[0] for b in BLOCKS}
    assert "README.md" in pages and len(pages) >= 5 and len(BLOCKS) >= 10, [b[0] for b in BLOCKS]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    for name in ("tokenmill", "data"):
        (d / name).symlink_to(ROOT / name)
    return d


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # tokenmill, python
    return env


@pytest.fixture(scope="module")
def server(scratch):
    from tests.e2e.conftest import Server

    s = Server("--enable-auto-tool-choice", "--tool-call-parser", "hermes", cwd=str(scratch), env=_env())
    yield s.port, s.grpc_port
    s.stop()


def _run(lang: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where,lang,kind,code", [b for b in BLOCKS if b[2] == "runnable"], ids=lambda v: str(v)[:40])
def test_runnable_block(scratch, where, lang, kind, code):
    r = _run(lang, code, scratch)
    assert r.returncode == 0, f"{where} failed:\n{code}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"{where} printed nothing"


@pytest.mark.parametrize("where,lang,kind,code", [b for b in BLOCKS if b[2] == "runnable-with-server"],
                         ids=lambda v: str(v)[:40])
def test_runnable_block_against_the_server(scratch, server, where, lang, kind, code):
    port, grpc_port = server
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace("127.0.0.1:8001", f"127.0.0.1:{grpc_port}")
    r = _run(lang, code, scratch)
    assert r.returncode == 0, f"{where} failed:\n{code}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert r.stdout.strip(), f"{where} printed nothing"
