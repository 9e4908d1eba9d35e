"""Where the replicas are: a fixed list, a file the router re-reads, and DNS names that resolve to
one address per replica (a Kubernetes headless Service), looked up again every few seconds.

A source that cannot be read this round (a file mid-edit, a DNS server timing out) keeps what it
last gave: the replicas it named are health-checked anyway, so a dead one is ejected either way,
while dropping the whole list on one bad read would empty the fleet.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

from tokenmill.router.replicas import Replica, read_replicas_file, split_spec

logger = logging.getLogger(__name__)


@dataclass
class DnsTarget:
    """`HOST:PORT[,region=R][,weight=W]`: every address HOST resolves to is a replica on PORT."""

    host: str
    port: int
    region: Optional[str] = None
    weight: float = 1.0
    scheme: str = "http"

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("a --replicas-dns name needs a host")
        if not 0 < self.port < 65536:
            raise ValueError(f"a --replicas-dns port must be in 1..65535; got {self.port}")

    @classmethod
    def parse(cls, spec: str) -> "DnsTarget":
        address, fields = split_spec(spec)
        scheme = "http"
        if "://" in address:
            scheme, address = address.split("://", 1)
            if scheme not in ("http", "https"):
                raise ValueError(f"--replicas-dns scheme must be http or https; got {scheme!r} in {spec!r}")
        host, sep, port = address.rstrip("/").rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--replicas-dns wants HOST:PORT (the replicas' port); got {spec!r}")
        return cls(host.strip("[]"), int(port), scheme=scheme, **fields)  # type: ignore[arg-type]

    def url(self, address: str) -> str:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        return f"{self.scheme}://{host}:{self.port}"

    async def resolve(self) -> list[Replica]:
        """One replica per address, in a stable order (sorted), so a re-resolution that returns
        the same set in another order changes nothing."""
        infos = await asyncio.get_running_loop().getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses = sorted({str(info[4][0]) for info in infos})
        return [Replica(self.url(a), self.region, self.weight) for a in addresses]


class Discovery:
    """The replicas the router should have right now, from every source it was given."""

    def __init__(self, replicas: list[Replica], replicas_file: Optional[str] = None,
                 dns: Optional[list[DnsTarget]] = None) -> None:
        self.static = replicas
        self.replicas_file = replicas_file
        self.dns = dns or []
        self._file_mtime: Optional[float] = None
        self._from_file: list[Replica] = []
        self._from_dns: dict[int, list[Replica]] = {}

    @property
    def dynamic(self) -> bool:
        """Whether the list can change, so it is worth looking again."""
        return self.replicas_file is not None or bool(self.dns)

    def _read_file(self) -> list[Replica]:
        assert self.replicas_file is not None
        try:
            mtime = os.stat(self.replicas_file).st_mtime_ns
        except OSError as e:
            logger.warning("cannot stat --replicas-file %s (keeping its last %d replicas): %s",
                           self.replicas_file, len(self._from_file), e)
            return self._from_file
        if mtime != self._file_mtime:
            try:
                self._from_file = read_replicas_file(self.replicas_file)
                self._file_mtime = mtime
                logger.info("read %d replicas from %s", len(self._from_file), self.replicas_file)
            except ValueError as e:
                logger.warning("bad --replicas-file (keeping its last %d replicas): %s", len(self._from_file), e)
        return self._from_file

    async def _lookup(self, i: int, target: DnsTarget) -> list[Replica]:
        try:
            self._from_dns[i] = await target.resolve()
        except (OSError, ValueError) as e:  # socket.gaierror is an OSError
            logger.warning("cannot resolve %s (keeping its last %d replicas): %s", target.host,
                           len(self._from_dns.get(i, [])), e)
        return self._from_dns.get(i, [])

    async def current(self) -> list[Replica]:
        """The replicas every source names now; a URL named twice is kept once (the first)."""
        found = list(self.static)
        if self.replicas_file is not None:
            found += self._read_file()
        for group in await asyncio.gather(*(self._lookup(i, t) for i, t in enumerate(self.dns))):
            found += group
        unique: dict[str, Replica] = {}
        for r in found:
            unique.setdefault(r.url, r)
        return list(unique.values())
