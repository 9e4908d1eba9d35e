"""`tokenmill router`: its flags, and starting it. Imports stay light until run() (the whole
command line is built on every `tokenmill` call)."""
from __future__ import annotations

import argparse
import logging

from typing import TYPE_CHECKING

from tokenmill.router.config import POLICIES, RouterConfig

if TYPE_CHECKING:
    from tokenmill.router.discovery import Discovery
    from tokenmill.router.replicas import Replica

logger = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    d = RouterConfig()
    p.add_argument("--replica", action="append", default=[], metavar="URL[,region=R][,weight=W]",
                   help="a `tokenmill serve` replica (repeatable)")
    p.add_argument("--replicas-file", default=None, metavar="FILE",
                   help="more replicas, one URL[,region=R][,weight=W] a line (# comments); re-read when it changes")
    p.add_argument("--replicas-dns", action="append", default=[], metavar="HOST:PORT[,region=R][,weight=W]",
                   help="a DNS name with one address per replica (a Kubernetes headless Service), "
                        "resolved again every --discovery-interval (repeatable)")
    p.add_argument("--discovery-interval", type=float, default=d.discovery_interval_s,
                   help="seconds between re-reads of --replicas-file and lookups of --replicas-dns")
    p.add_argument("--policy", default=d.policy, choices=POLICIES)
    p.add_argument("--region", default=None,
                   help="this router's region: preferred for requests without an x-tokenmill-region header")
    p.add_argument("--cache-threshold", type=float, default=d.cache_threshold,
                   help="cache-aware: least matched fraction of the prompt that routes by cache")
    p.add_argument("--balance-abs-threshold", type=float, default=d.balance_abs_threshold,
                   help="cache-aware: route by load when the max-min load gap is above this ...")
    p.add_argument("--balance-rel-threshold", type=float, default=d.balance_rel_threshold,
                   help="... and the max load is above this times the min")
    p.add_argument("--health-interval", type=float, default=d.health_interval_s, help="seconds between health checks")
    p.add_argument("--health-timeout", type=float, default=d.health_timeout_s,
                   help="seconds a health check may take before the replica counts as down")
    p.add_argument("--upstream-timeout", type=float, default=d.upstream_timeout_s,
                   help="seconds to wait for any read from a replica (bounds a non-streamed generation)")
    p.add_argument("--kv-full-threshold", type=float, default=d.kv_full_threshold,
                   help="a replica with waiting requests and this fraction of its KV cache held is tried last")
    p.add_argument("--api-key", default=None,
                   help="refuse requests without this key (as `tokenmill serve --api-key`); forwarded to the replicas")
    p.add_argument("--api-keys-file", default=None,
                   help="the replicas' keys file: requests with a key it lacks are refused at the router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(policy=args.policy, region=args.region, cache_threshold=args.cache_threshold,
                        balance_abs_threshold=args.balance_abs_threshold,
                        balance_rel_threshold=args.balance_rel_threshold, health_interval_s=args.health_interval,
                        health_timeout_s=args.health_timeout, upstream_timeout_s=args.upstream_timeout,
                        discovery_interval_s=args.discovery_interval, kv_full_threshold=args.kv_full_threshold,
                        api_key=args.api_key, api_keys_file=args.api_keys_file)


def discovery_from_args(args: argparse.Namespace) -> "tuple[list[Replica], Discovery]":
    """The replicas to start with, and the sources looked at again while the router runs. The
    file is read here too, so a bad one stops the router at start rather than later."""
    from tokenmill.router.discovery import Discovery, DnsTarget
    from tokenmill.router.replicas import Replica, read_replicas_file

    static = [Replica.parse(spec) for spec in args.replica]
    from_file = read_replicas_file(args.replicas_file) if args.replicas_file else []
    dns = [DnsTarget.parse(spec) for spec in args.replicas_dns]
    return static + from_file, Discovery(static, args.replicas_file, dns)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenmill.router.proxy import build_app

    config = config_from_args(args)
    app = build_app(config, *discovery_from_args(args))
    logger.info("router on http://%s:%d", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", log_config=None)  # tokenmill's format
    return 0
