"""Where a webhook may be sent: a pure policy over URLs and IP addresses (no I/O).

The API applies it at submission and every worker again before each delivery attempt, so
a tenant cannot make the fleet call addresses inside the operator's network:

* ``parse_url`` checks the URL's syntax: ``http``/``https`` only, no credentials, no
  control characters, whitespace, backslashes or non-ASCII, a well-formed host and port.
  The parsed ``Destination`` (not the raw string) is what a delivery connects and sends to,
  so no second parser can read the URL differently.
* ``check_url`` refuses a host that is itself a non-global destination: an IP literal in
  any spelling (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, ``[::ffff:
  127.0.0.1]``, a trailing dot), or a local-only name (``localhost``, ``*.internal``, ...).
* ``check_addresses`` refuses a host name whose resolved addresses include a non-global
  one. The caller resolves once and connects only to the addresses this returned.

``Allowlist`` (``ACTFLEET_WEBHOOK_ALLOWLIST``: host names or CIDRs, comma-separated) lets
chosen destinations through, e.g. a loopback receiver for development and tests.

Every refusal is a ``DestinationError`` whose ``rule`` names the rule that refused it and
whose ``reason`` says so in words (the API's 422 shows it).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from agent.errors import ActfleetError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}

# Names that never lead to a public host: RFC 6761 / 2606 special-use and reserved names,
# mDNS, and the usual private suffixes.
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_LOCAL_SUFFIXES = (
    ".localhost",
    ".local",
    ".localdomain",
    ".internal",
    ".intranet",
    ".lan",
    ".home",
    ".corp",
    ".home.arpa",
    ".arpa",
    ".invalid",
    ".test",
    ".example",
)
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ULA = ipaddress.ip_network("fc00::/7")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class DestinationError(ActfleetError):
    """A webhook destination is refused. ``rule``: which rule (e.g. ``loopback``,
    ``credentials``); ``reason``: what is wrong and what to do, in one phrase."""

    def __init__(self, rule: str, reason: str) -> None:
        self.rule = rule
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Destination:
    """A parsed webhook URL: what a delivery connects to and sends."""

    scheme: str  # "http" or "https"
    host: str  # lower case, no trailing dot, IPv6 without brackets
    port: int
    target: str  # path and query sent in the request line ("/" when empty)
    ip: IPAddress | None = None  # set when the host is an IP literal
    spelled: str = ""  # the host as the URL spelled it (lower case)

    @property
    def authority(self) -> str:
        """The Host header: host, with the port when it is not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The canonical URL (no fragment): how deliveries and disabled endpoints name it."""
        return f"{self.scheme}://{self.authority}{self.target}"


@dataclass(frozen=True, slots=True)
class Allowlist:
    """Destinations let through although they are not global."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def parse(cls, text: str | None) -> Allowlist:
        """``"127.0.0.1/32, ::1, receiver.local"``; raises ``ValueError`` naming a bad entry."""
        hosts: set[str] = set()
        nets: list[IPNetwork] = []
        for raw in (text or "").split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                nets.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.removesuffix(".")
            if not _valid_name(name):
                raise ValueError(
                    f"webhook allowlist entry {raw.strip()!r} is neither a CIDR nor a host name"
                )
            hosts.add(name)
        return cls(frozenset(hosts), tuple(nets))

    def allows_host(self, host: str) -> bool:
        return host in self.hosts

    def allows_address(self, ip: IPAddress) -> bool:
        ip = _unmapped(ip)
        return any(ip.version == n.version and ip in n for n in self.networks)


def parse_url(url: str) -> Destination:
    """The destination of ``url``, or ``DestinationError`` for a URL no webhook may use."""
    if len(url) > MAX_URL_CHARS:
        raise DestinationError("too_long", f"is longer than {MAX_URL_CHARS} characters")
    for i, ch in enumerate(url):
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise DestinationError(
                "control_character",
                f"contains a control character ({_char_name(ch)}) at position {i}: remove it",
            )
        if ch == " ":
            raise DestinationError(
                "whitespace", f"contains a space at position {i}: percent-encode it as %20"
            )
        if ch == "\\":
            raise DestinationError(
                "backslash", f"contains a backslash at position {i}: use '/' (or %5C)"
            )
        if ord(ch) > 0x7E:
            raise DestinationError(
                "non_ascii",
                f"contains the non-ASCII character {ch!r} at position {i}: percent-encode it, "
                "or write a host name in its xn-- (punycode) form",
            )
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise DestinationError("malformed", f"is not a valid URL ({e})") from e
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        got = f" (got {parts.scheme + ':'!r})" if parts.scheme else ""
        raise DestinationError("scheme", f"must be an absolute http:// or https:// URL{got}")
    netloc = parts.netloc
    if "@" in netloc:
        raise DestinationError(
            "credentials",
            "must not carry credentials (user:password@): receivers verify the signature instead",
        )
    if not netloc:
        raise DestinationError("malformed", "has no host: write it as http(s)://HOST/PATH")
    host, port_text = _split_host_port(netloc)
    port = DEFAULT_PORTS[scheme]
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise DestinationError("port", f"has an invalid port {port_text!r} (use 1-65535)")
        port = int(port_text)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if not target.startswith("/"):
        raise DestinationError("malformed", "has a path that does not start with '/'")
    spelled = host.lower()
    name, ip = _parse_host(spelled)
    return Destination(scheme, name, port, target, ip, spelled)


def check_url(url: str, allowlist: Allowlist = Allowlist()) -> Destination:
    """``parse_url``, then refuse a host that is itself a non-global destination (an IP
    literal in any spelling, a local-only name) unless the allowlist lets it through.
    A host name that passes must still have its addresses checked (``check_addresses``)."""
    dest = parse_url(url)
    if dest.ip is not None:
        ip = dest.ip
        if ip.version == 4 and dest.spelled != str(ip):
            rule = address_rule(ip)
            if rule is None:
                raise DestinationError(
                    "ip_spelling", f"host {dest.spelled!r} is {ip} spelled another way: write {ip}"
                )
            raise DestinationError(
                rule,
                f"host {dest.spelled!r} is {ip} spelled another way, and {_describe(ip, rule)}: "
                f"{_PUBLIC_ONLY}",
            )
        if allowlist.allows_address(ip):
            return dest
        rule = address_rule(ip)
        if rule is not None:
            raise DestinationError(rule, f"{_describe(ip, rule)}: {_PUBLIC_ONLY}")
        return dest
    if allowlist.allows_host(dest.host):
        return dest
    if dest.host in _LOCAL_NAMES or dest.host.endswith(_LOCAL_SUFFIXES):
        raise DestinationError(
            "local_name",
            f"host {dest.host!r} is a local-only or reserved name, not a public host: "
            f"{_PUBLIC_ONLY}",
        )
    if "." not in dest.host:
        raise DestinationError(
            "local_name",
            f"host {dest.host!r} has no dot: a single-label name resolves through local "
            f"search domains; use a fully qualified public name ({_PUBLIC_ONLY})",
        )
    return dest


def check_addresses(
    dest: Destination,
    addresses: list[IPAddress],
    allowlist: Allowlist = Allowlist(),
) -> list[IPAddress]:
    """The addresses of ``dest`` that a delivery may connect to: all of them, or a
    ``DestinationError`` when any one is refused (a name that resolves to a private
    address is refused even if it also resolves to a public one)."""
    if dest.ip is not None:
        return [dest.ip]
    if not addresses:
        raise DestinationError("unresolvable", f"host {dest.host!r} has no address")
    if allowlist.allows_host(dest.host):
        return addresses
    for ip in addresses:
        if allowlist.allows_address(ip):
            continue
        rule = address_rule(ip)
        if rule is not None:
            raise DestinationError(
                "resolves_to_" + rule,
                f"host {dest.host!r} resolves to {ip}, and {_describe(ip, rule)}: {_PUBLIC_ONLY}",
            )
    return addresses


def address_rule(ip: IPAddress) -> str | None:
    """The rule that makes ``ip`` a non-global destination, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = (
            ip.ipv4_mapped
            or ip.sixtofour
            or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        )
        if ip.ipv4_mapped is not None:
            return "ipv4_mapped"
        if embedded is not None and address_rule(embedded) is not None:
            return "embedded_ipv4"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip in _METADATA:
        return "metadata"
    if ip.is_link_local:
        return "link_local"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "cgnat"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _ULA:
        return "unique_local"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site_local"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


_PUBLIC_ONLY = "webhooks go to public addresses only"

_RULE_WORDS = {
    "unspecified": "the unspecified address",
    "loopback": "a loopback address",
    "metadata": "the cloud metadata service (link-local)",
    "link_local": "a link-local address",
    "cgnat": "a shared (CGNAT, 100.64.0.0/10) address",
    "multicast": "a multicast address",
    "unique_local": "an IPv6 unique-local (fc00::/7) address",
    "site_local": "an IPv6 site-local address",
    "private": "a private address",
    "reserved": "a reserved, non-global address",
}


def _describe(ip: IPAddress, rule: str | None) -> str:
    if rule == "ipv4_mapped" and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        inner = ip.ipv4_mapped
        inner_rule = address_rule(inner)
        tail = f", {_RULE_WORDS[inner_rule]}" if inner_rule else ""
        return f"{ip} is an IPv4-mapped IPv6 address of {inner}{tail}"
    if rule == "embedded_ipv4" and isinstance(ip, ipaddress.IPv6Address):
        inner = ip.sixtofour or ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        inner_rule = address_rule(inner)
        words = _RULE_WORDS.get(inner_rule or "", "not public")
        return f"{ip} is an IPv6 address that embeds {inner} ({words})"
    return f"{ip} is {_RULE_WORDS.get(rule or '', 'not public')}" if rule else str(ip)


def _split_host_port(netloc: str) -> tuple[str, str | None]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise DestinationError("host_syntax", "has an unclosed '[' in its host")
        rest = netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise DestinationError("host_syntax", "has characters after ']' in its host")
        return netloc[: end + 1], (rest[1:] if rest else None)
    if netloc.count(":") > 1:
        raise DestinationError(
            "host_syntax", "has an IPv6 address without brackets: write it as [ADDRESS]"
        )
    host, sep, port = netloc.partition(":")
    return host, (port if sep else None)


def _parse_host(spelled: str) -> tuple[str, IPAddress | None]:
    """(normalised host, its IP when it is an IP literal in any spelling)."""
    if spelled.startswith("["):
        inner = spelled[1:-1]
        if "%" in inner:
            raise DestinationError(
                "zone_id", "has an IPv6 zone identifier (%...): webhooks go to public addresses"
            )
        try:
            ip6 = ipaddress.IPv6Address(inner)
        except ValueError as e:
            raise DestinationError("host_syntax", f"has an invalid IPv6 address [{inner}]") from e
        return str(ip6), ip6
    if not spelled:
        raise DestinationError("malformed", "has no host: write it as http(s)://HOST/PATH")
    if "%" in spelled:
        raise DestinationError("host_syntax", "has a percent-encoded host: write it plainly")
    name = spelled.removesuffix(".")
    labels = name.split(".")
    if labels and _NUMERIC_PART.match(labels[-1]):
        # The last label is a number: resolvers read the host as an IPv4 address (inet_aton
        # accepts 1-4 parts in decimal, octal or hex), so it is judged as one.
        ip4 = _inet_aton(labels)
        if ip4 is None:
            raise DestinationError(
                "host_syntax", f"host {spelled!r} looks like an IPv4 address but is not one"
            )
        return str(ip4), ip4
    if not _valid_name(name):
        raise DestinationError(
            "host_syntax",
            f"host {spelled!r} is not a valid host name (letters, digits, '-' and '.')",
        )
    return name, None


def _inet_aton(parts: list[str]) -> ipaddress.IPv4Address | None:
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for p in parts:
        if not _NUMERIC_PART.match(p):
            return None
        if p.startswith("0x"):
            if len(p) == 2:
                return None
            values.append(int(p[2:], 16))
        elif len(p) > 1 and p.startswith("0"):
            if any(c not in "01234567" for c in p):
                return None
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    n = 0
    for v in head:
        n = n * 256 + v
    n = n * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(n)


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _char_name(ch: str) -> str:
    return {"\r": "CR", "\n": "LF", "\t": "TAB", "\x00": "NUL"}.get(ch, f"U+{ord(ch):04X}")
