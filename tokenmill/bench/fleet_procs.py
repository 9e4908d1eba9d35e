"""The processes of `tokenmill bench fleet`: replicas and a router started as a user starts them,
and what CPU they got (the bench's machine may be shared: the figures say how much of it the
fleet actually had)."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL_NAME = "fleet"
NUM_REPLICAS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    """The replicas and the router, as subprocesses started as a user would start them (logs in
    log_dir, not pipes: a full pipe would stall a server mid-run)."""

    def __init__(self, model: str, policy: str, label: str, args: argparse.Namespace, kv_bytes: int,
                 log_dir: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "tokenmill.cli"]
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        for i in range(NUM_REPLICAS):
            port = free_port()
            self.urls.append(f"http://127.0.0.1:{port}")
            # aten linears: the kernel auto-timing would run on cores the other replicas are using.
            self._spawn(cmd + ["serve", model, "--port", str(port), "--grpc-port", "0", "--dtype", "float32",
                               "--linear-backend", "aten", "--served-model-name", MODEL_NAME, "--seed", str(args.seed),
                               "--kv-cache-memory-bytes", str(kv_bytes)], env, log_dir / f"{label}-replica{i}.log")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # A generous health timeout: on 2 cores a busy replica's /health can take over the 1 s
        # default, and a replica wrongly taken out would skew the policies. A dead replica
        # refuses connections at once, so failover detection does not wait on it.
        self._spawn(cmd + ["router", "--policy", policy, "--port", str(port), "--health-timeout", "5",
                           *[a for u in self.urls for a in ("--replica", u)]], env, log_dir / f"{label}-router.log")

    def _spawn(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a fleet process exited during start-up: {[p.args[3] for p in self.procs]}")
            try:
                table = httpx.get(f"{self.url}/replicas", timeout=2, trust_env=False).json()
                if all(r["healthy"] for r in table["replicas"]):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the fleet was not healthy within {timeout:.0f} s")

    def kill(self, url: str) -> None:
        os.kill(self.procs[self.urls.index(url)].pid, signal.SIGKILL)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()




def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (0 where /proc cannot tell)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def machine_ticks() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat ((0, 0) elsewhere)."""
    try:
        ticks = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)  # idle + iowait
    return sum(ticks) - idle, sum(ticks)
