"""Acknowledge a tracking server's responses at once, for the duration of a sync to it.

`mlflow server --workers N` with N > 1 (MLflow's default is 4) serves through uvicorn's
multi-process supervisor, whose connections lose TCP_NODELAY (uvicorn issue #3149). The
server writes a response's headers and its body apart, and Nagle's algorithm holds the body
until the client acknowledges the headers. The client's kernel delays that acknowledgement
(40 ms on Linux), because a connection that sends a request right after reading a response
is in its interactive mode. Every request after a connection's first then waits about 44 ms:
measured on loopback against MLflow 3.17 (uvicorn 0.54), 44-52 ms a request where the same
server with `--workers 1` answers in 2-10 ms. That is a sixth of a 1000-point log_batch to a
PostgreSQL-backed server.

Setting TCP_QUICKACK on the socket after the request is sent, before its response is read,
makes the kernel acknowledge the headers at once: the same requests then took 9-11 ms. It is
set again for each response, because the kernel leaves quick-ack mode on its own.

urllib3's connection pools (which requests, and so MLflow's client, use) get, once per
process, connection classes that do it; but only a connection to a server a sync writes to,
and only while that sync runs (`acknowledge_at_once` / `release`), does anything different:
one setsockopt per response. Through a proxy the connection is the proxy's, and nothing
changes. Nothing is done on systems without TCP_QUICKACK or with ITWINAI_SYNC_QUICKACK=0
(which also lets a benchmark measure the sync without it)."""

from __future__ import annotations

import os
import socket
import threading
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Set to 0 to read responses as MLflow's client does.
ENV = "ITWINAI_SYNC_QUICKACK"

#: (host, port) of each server a sync writes to now, with how many syncs do.
_servers: Counter[tuple[str, int]] = Counter()
_guard = threading.Lock()


def _address(uri: str) -> tuple[str, int] | None:
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return _host(parts.hostname), parts.port or _DEFAULT_PORTS[scheme]


def _host(name: str) -> str:
    """A host name as both urlsplit and urllib3 may spell it: no brackets, no final dot."""
    return name.strip("[]").rstrip(".").lower()


class _AcksAtOnce:
    """Mixed into urllib3's HTTP(S)Connection: quick-ack before a response is read."""

    sock: socket.socket | None
    host: str
    port: int

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        sock = self.sock
        if sock is not None and (_host(self.host), self.port) in _servers:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:  # a socket the kernel has closed meanwhile: the read will say so
                pass
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


def _install() -> None:
    """Give urllib3's connection pools the quick-acking connection classes (once)."""
    from urllib3 import connectionpool

    for pool in (connectionpool.HTTPConnectionPool, connectionpool.HTTPSConnectionPool):
        base = pool.ConnectionCls
        if not issubclass(base, _AcksAtOnce):
            pool.ConnectionCls = type(base.__name__, (_AcksAtOnce, base),  # type: ignore
                                      {"__module__": __name__, "__doc__": base.__doc__})


def acknowledge_at_once(uri: str) -> bool:
    """Quick-ack the responses of the HTTP(S) server at `uri` until `release(uri)`; whether
    this applies (an http or https URI, on a system with TCP_QUICKACK, not turned off)."""
    address = _address(uri)
    off = os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")
    if address is None or _QUICKACK is None or off:
        return False
    with _guard:
        _install()
        _servers[address] += 1
    return True


def release(uri: str) -> None:
    """End one `acknowledge_at_once(uri)` that returned True."""
    address = _address(uri)
    with _guard:
        if address is not None and _servers[address] > 0:
            _servers[address] -= 1
            if not _servers[address]:
                del _servers[address]
