"""Real servers on free loopback ports, started as a user would start them."""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Optional

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Popen from several threads at once (tests boot replicas in parallel) once failed in CI with
# OSError 14 (EFAULT) out of CPython's vfork path: one process is spawned at a time.
_SPAWN = threading.Lock()


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen, one at a time across the test process's threads."""
    with _SPAWN:
        return subprocess.Popen(cmd, **kwargs)


class Server:
    def __init__(self, *args: str, served_model_name: bool = True, cwd: Optional[str] = None,
                 env: Optional[dict[str, str]] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.proc = spawn([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(self.port),
                           "--grpc-port", str(self.grpc_port),
                           *(["--served-model-name", "demo"] if served_model_name else []), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
        # The server logs at INFO (a line per request): read its output as it comes, or a full
        # pipe would stall it.
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in 120 s")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        """Everything the server printed so far (its log)."""
        return "\n".join(self.lines)

    def wait_for_line(self, predicate, timeout: float = 10.0) -> Optional[str]:
        """The first line of the server's output (from the start) for which predicate holds,
        waiting up to `timeout` seconds for it."""
        deadline = time.time() + timeout
        seen = 0
        while True:
            lines = self.lines[:]
            for line in lines[seen:]:
                if predicate(line):
                    return line
            seen = len(lines)
            if time.time() >= deadline:
                return None
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for s in family.samples:
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                                if k != "model_name") + "}" if len(s.labels) > 1 else "")
                out[key] = s.value
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    s = Server("--enable-auto-tool-choice", "--tool-call-parser", "hermes")  # as `make serve` runs it
    yield s
    s.stop()
