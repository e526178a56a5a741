"""The webhook destination policy (pure): which URLs and addresses a webhook may reach.

Nothing here resolves a name or opens a socket; each refusal names its rule."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from agent.destinations import (
    Allowlist,
    DestinationError,
    check_addresses,
    check_url,
    parse_url,
)
from agent.errors import SpecError
from agent.models import TaskSpec

# (url, the rule that refuses it): every non-global destination in the spellings of issue 13
NON_GLOBAL = [
    ("http://127.0.0.1/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0x7f000001/", "loopback"),  # hex
    ("http://0177.0.0.1/", "loopback"),  # octal
    ("http://0x7f.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),  # short form
    ("http://127.0.1/", "loopback"),
    ("http://127.0.0.1./", "loopback"),  # trailing dot
    ("http://[::1]/", "loopback"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "ipv4_mapped"),
    ("http://[::ffff:7f00:1]/", "ipv4_mapped"),
    ("http://[::ffff:10.0.0.1]/", "ipv4_mapped"),
    ("http://localhost/", "local_name"),
    ("http://LOCALHOST./hook", "local_name"),
    ("http://api.localhost/", "local_name"),
    ("http://localhost.localdomain/", "local_name"),
    ("http://ip6-localhost/", "local_name"),
    ("http://db.internal/", "local_name"),
    ("http://printer.local/", "local_name"),
    ("http://intranet/", "local_name"),  # single label: local search domains
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://012.0.0.1/", "private"),  # octal 10.0.0.1
    ("http://169.254.169.254/latest/meta-data", "metadata"),
    ("http://2852039166/", "metadata"),  # 169.254.169.254 in decimal
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://169.254.1.1/", "link_local"),
    ("http://[fe80::1]/", "link_local"),
    ("http://100.64.0.1/", "cgnat"),
    ("http://100.127.255.254/", "cgnat"),
    ("http://224.0.0.1/", "multicast"),
    ("http://239.255.255.250/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://[fc00::1]/", "unique_local"),
    ("http://[fd12:3456::1]/", "unique_local"),
    ("http://[2002:7f00:1::]/", "embedded_ipv4"),  # 6to4 of 127.0.0.1
    ("http://[64:ff9b::a00:1]/", "embedded_ipv4"),  # NAT64 of 10.0.0.1
    ("http://240.0.0.1/", "reserved"),
    ("http://[::127.0.0.1]/", "reserved"),  # IPv4-compatible (deprecated)
]


@pytest.mark.parametrize(("url", "rule"), NON_GLOBAL)
def test_every_non_global_destination_is_refused_by_its_rule(url: str, rule: str) -> None:
    with pytest.raises(DestinationError) as e:
        check_url(url)
    assert e.value.rule == rule
    assert "public addresses only" in e.value.reason


@pytest.mark.parametrize(
    ("url", "rule", "says"),
    [
        ("http://example.com/a\r\nX-Injected: 1", "control_character", "CR"),
        ("http://example.com/a\nb", "control_character", "LF"),
        ("http://example.com/\x00", "control_character", "NUL"),
        ("http://example.com/\t", "control_character", "TAB"),
        ("http://exa mple.com/", "whitespace", "%20"),
        ("http://example.com\\@127.0.0.1/", "backslash", "backslash"),
        ("http://user:pw@example.com/", "credentials", "credentials"),
        ("http://user@example.com/", "credentials", "credentials"),
        ("http://example.com:80@127.0.0.1/", "credentials", "credentials"),
        ("ftp://example.com/", "scheme", "http://"),
        ("file:///etc/passwd", "scheme", "http://"),
        ("gopher://example.com/", "scheme", "http://"),
        ("//example.com/", "scheme", "http://"),
        ("/relative", "scheme", "http://"),
        ("http:///nohost", "malformed", "no host"),
        ("http://%31%32%37.0.0.1/", "host_syntax", "percent"),
        ("http://exämple.com/", "non_ascii", "xn--"),
        ("http://①②⑦.0.0.1/", "non_ascii", "xn--"),
        ("http://[fe80::1%25eth0]/", "zone_id", "zone"),
        ("http://[::1/", "malformed", "not a valid URL"),
        ("http://::1/", "host_syntax", "brackets"),
        ("http://example.com:0/", "port", "port"),
        ("http://example.com:65536/", "port", "port"),
        ("http://example.com:8x/", "port", "port"),
        ("http://1.2.3.4.5/", "host_syntax", "IPv4"),
        ("http://256.1.1.1/", "host_syntax", "IPv4"),
        ("http://-bad-.example.com/", "host_syntax", "host name"),
        ("http://134744072/", "ip_spelling", "8.8.8.8"),  # public, but write it plainly
    ],
)
def test_malformed_or_ambiguous_urls_are_refused_with_what_to_fix(
    url: str, rule: str, says: str
) -> None:
    with pytest.raises(DestinationError) as e:
        check_url(url)
    assert e.value.rule == rule
    assert says in e.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/actfleet",
        "http://hooks.example.com:8080/a/b?x=1&y=%20",
        "https://8.8.8.8/",
        "https://[2606:4700::1111]/",
        "https://Hooks.Example.COM./x",
    ],
)
def test_public_destinations_pass_the_literal_check(url: str) -> None:
    check_url(url)


def test_the_parsed_destination_is_what_a_delivery_sends() -> None:
    d = parse_url("HTTPS://Hooks.Example.com.:8443/p?q=1#frag")
    assert (d.scheme, d.host, d.port, d.target) == ("https", "hooks.example.com", 8443, "/p?q=1")
    assert d.authority == "hooks.example.com:8443"
    assert d.url == "https://hooks.example.com:8443/p?q=1"  # no fragment
    assert parse_url("http://[::1]:80").authority == "[::1]"
    assert parse_url("http://h.example").target == "/"


def test_the_allowlist_lets_named_hosts_and_networks_through() -> None:
    allow = Allowlist.parse("127.0.0.0/8, ::1, receiver.test")
    for url in ("http://127.0.0.1:9000/hook", "http://[::1]:9000/", "http://receiver.test/"):
        check_url(url, allow)
    check_url("http://[::ffff:127.0.0.1]/", allow)  # the same address, mapped
    for url in ("http://10.0.0.1/", "http://localhost/", "http://169.254.169.254/"):
        with pytest.raises(DestinationError):
            check_url(url, allow)
    with pytest.raises(DestinationError) as e:
        check_url("http://2130706433/", allow)  # allowlisted, but spelled ambiguously
    assert e.value.rule == "loopback"


def test_a_bad_allowlist_entry_is_named() -> None:
    with pytest.raises(ValueError, match="'not a host!'"):
        Allowlist.parse("127.0.0.1/32, not a host!")


def test_a_name_resolving_to_any_non_global_address_is_refused() -> None:
    dest = check_url("https://hooks.example.com/")
    public, private = ip_address("93.184.216.34"), ip_address("10.1.2.3")
    assert check_addresses(dest, [public]) == [public]
    with pytest.raises(DestinationError) as e:
        check_addresses(dest, [public, private])
    assert e.value.rule == "resolves_to_private" and "10.1.2.3" in e.value.reason
    with pytest.raises(DestinationError) as e:
        check_addresses(dest, [ip_address("::ffff:169.254.169.254")])
    assert e.value.rule == "resolves_to_ipv4_mapped"
    with pytest.raises(DestinationError) as e:
        check_addresses(dest, [])
    assert e.value.rule == "unresolvable"
    # an allowlisted network admits the resolved address
    assert check_addresses(dest, [private], Allowlist.parse("10.0.0.0/8")) == [private]


def test_the_task_spec_refuses_a_url_no_webhook_may_use() -> None:
    with pytest.raises(SpecError) as e:
        TaskSpec.from_dict({"prompt": "x", "webhook": {"url": "http://h.example/\r\nX: 1"}})
    assert any(
        p.startswith("webhook.url: contains a control character (CR)") for p in e.value.problems
    )
    with pytest.raises(SpecError):
        TaskSpec.from_dict({"prompt": "x", "webhook": {"url": "http://u:p@h.example/"}})
    spec = TaskSpec.from_dict({"prompt": "x", "webhook": {"url": "https://h.example/hook"}})
    assert spec.webhook is not None and spec.webhook.url == "https://h.example/hook"
