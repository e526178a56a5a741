"""One webhook POST, to an address that was checked: the adapter between the destination
policy (``agent.destinations``) and the network.

``post`` resolves the host once (``resolve``), refuses the destination if any address is
not allowed, and connects only to the addresses it checked: an httpcore connection pool
whose network backend ignores the host name it is given and dials the vetted IP, while the
request keeps the original ``Host`` header and TLS gets the host name for SNI and
certificate verification. A DNS answer that changes between the check and the connection
(rebinding) therefore changes nothing. No proxy from the environment is used, redirects
are never followed (a 3xx is just an answer), connect and read timeouts are short, and the
response body is not read.

Errors: ``DestinationError`` (refused by the policy: final), ``SendError`` (could not
resolve, connect, or get an answer in time: worth retrying).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

import httpcore

from agent.backoff import parse_retry_after
from agent.destinations import Allowlist, Destination, IPAddress, check_addresses, check_url
from agent.errors import ActfleetError


class SendError(ActfleetError):
    """No answer from the receiver (DNS, connect, TLS, timeout, protocol); retry later."""

    def __init__(self, message: str, address: str | None = None, latency_s: float = 0.0) -> None:
        super().__init__(message)
        self.address = address
        self.latency_s = latency_s


@dataclass(frozen=True, slots=True)
class Sent:
    status_code: int
    address: str  # the IP the request went to
    latency_s: float
    retry_after_s: float | None = None  # the receiver's Retry-After, when it sent one


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 3.0
    read_s: float = 10.0

    def extension(self) -> dict[str, float]:
        return {
            "connect": self.connect_s,
            "read": self.read_s,
            "write": self.read_s,
            "pool": self.connect_s,
        }


def resolve(host: str, port: int) -> list[IPAddress]:
    """The host's addresses (one DNS resolution per attempt). Tests replace this."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ip_address(str(sockaddr[0]).split("%")[0])
        if ip not in out:
            out.append(ip)
    return out


class PinnedBackend(httpcore.NetworkBackend):
    """A network backend that connects to one vetted address whatever host it is asked
    for; TLS on top of it still uses the URL's host name (httpcore passes it as
    ``server_hostname``)."""

    def __init__(self, address: IPAddress) -> None:
        self.address = address
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return self._inner.connect_tcp(
            str(self.address), port, timeout, local_address, socket_options
        )

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks do not use unix sockets")


def vet(url: str, allowlist: Allowlist) -> tuple[Destination, list[IPAddress]]:
    """The destination of ``url`` and the addresses a delivery may connect to; raises
    ``DestinationError`` when the policy refuses it, ``SendError`` when DNS fails."""
    dest = check_url(url, allowlist)
    if dest.ip is not None:
        return dest, [dest.ip]
    try:
        addresses = resolve(dest.host, dest.port)
    except (OSError, UnicodeError) as e:
        raise SendError(f"could not resolve {dest.host!r}: {e}") from e
    return dest, check_addresses(dest, addresses, allowlist)


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    allowlist: Allowlist,
    timeouts: Timeouts = Timeouts(),
    ssl_context: ssl.SSLContext | None = None,
) -> Sent:
    """POST ``body`` to ``url`` once, to an address checked against the policy."""
    dest, addresses = vet(url, allowlist)
    context = ssl_context or ssl.create_default_context()
    request_headers = [
        ("Host", dest.authority),
        *headers.items(),
        ("Content-Length", str(len(body))),
    ]
    last: SendError | None = None
    for address in addresses[:3]:  # another address only when one refuses to connect
        started = time.monotonic()
        try:
            return _post_to(dest, address, body, request_headers, timeouts, context, started)
        except httpcore.ConnectError as e:
            last = SendError(_describe(e, dest, address), str(address), time.monotonic() - started)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as e:
            raise SendError(
                _describe(e, dest, address), str(address), time.monotonic() - started
            ) from e
        except ssl.SSLError as e:
            raise SendError(f"TLS with {dest.host!r} failed: {e}", str(address)) from e
    assert last is not None
    raise last


def _post_to(
    dest: Destination,
    address: IPAddress,
    body: bytes,
    request_headers: list[tuple[str, str]],
    timeouts: Timeouts,
    context: ssl.SSLContext,
    started: float,
) -> Sent:
    target = httpcore.URL(
        scheme=dest.scheme.encode(),
        host=dest.host.encode(),
        port=dest.port,
        target=dest.target.encode(),
    )
    with (
        httpcore.ConnectionPool(
            ssl_context=context,
            max_connections=1,
            max_keepalive_connections=0,
            network_backend=PinnedBackend(address),
        ) as pool,
        pool.stream(
            "POST",
            target,
            headers=request_headers,
            content=body,
            extensions={"timeout": timeouts.extension()},
        ) as response,
    ):
        answered = {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}
        return Sent(
            response.status,
            str(address),
            time.monotonic() - started,
            parse_retry_after(answered),
        )


def _describe(e: Exception, dest: Destination, address: IPAddress) -> str:
    kind = type(e).__name__
    detail = str(e) or "no detail"
    return f"{kind} to {dest.host}:{dest.port} ({address}): {detail}"
