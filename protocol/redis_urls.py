"""The Redis URL forms of the KV tier, parsed without touching the network (and without redis-py).

    redis://[[user]:password@]host[:port][/db]                one server (redis-py's own URL form;
    rediss://...  unix://[[user]:password@]/path.sock[?db=N]   query options pass through to it)
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db][?sentinel_password=P]
    redis+cluster://[[user]:password@]host[:port][,host[:port]...]
    rediss+sentinel://..., rediss+cluster://...                  the same over TLS

Sentinel: the hosts are sentinels (default port 26379); `service` is the name of the monitored
master (`sentinel monitor <service> ...`); the user and password authenticate to the master
(and its replicas), `sentinel_password` to the sentinels when they have `requirepass` too.
Cluster: the hosts are startup nodes (default port 6379); any one reachable node suffices, the
client learns the others and the slot map from it. A cluster has no databases but 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, quote, unquote

SERVER_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORTS = {"server": 6379, "sentinel": 26379, "cluster": 6379}


@dataclass(frozen=True)
class RedisEndpoint:
    """What one `redis_urls` entry names: a server, a sentinel-managed master, or a cluster."""

    kind: Literal["server", "sentinel", "cluster"]
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False

    @property
    def name(self) -> str:
        return redact(self.url)


def redact(url: str) -> str:
    """The URL without credentials and query options, for logs and errors; never raises."""
    scheme, has_scheme, rest = url.partition("://")
    # Cut at the last "@" of the whole string, not of the host part: a password with an
    # unescaped "/" or "?" must still not leak.
    rest = rest.rpartition("@")[2] if has_scheme else url.rpartition("@")[2]
    hosts, _, path = rest.partition("?")[0].partition("/")
    if not has_scheme:
        return rest
    if scheme in SENTINEL_SCHEMES:  # the service name says which master: worth logging
        return f"{scheme}://{hosts}/{path.split('/')[0]}"
    if scheme == "unix":
        return f"unix://{hosts}/{path}"
    return f"{scheme}://{hosts}"


def parse_redis_url(url: str) -> RedisEndpoint:
    """The endpoint of a `redis_urls` entry; ValueError naming the (redacted) URL if malformed."""
    scheme = url.partition("://")[0] if "://" in url else ""
    try:
        if scheme in SERVER_SCHEMES:
            return _parse_server(url, scheme)
        if scheme in SENTINEL_SCHEMES:
            return _parse_sentinel(url, scheme)
        if scheme in CLUSTER_SCHEMES:
            return _parse_cluster(url, scheme)
        raise ValueError("the scheme is not one of " + ", ".join(SERVER_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES))
    except ValueError as error:
        raise ValueError(f"bad Redis URL {redact(url)!r}: {error}") from None


def _parse_server(url: str, scheme: str) -> RedisEndpoint:
    # redis-py parses these itself (query options included); check only what it would reject
    # late, at the first connection, so that a typo fails at start.
    userinfo, hosts, path, _ = _split(url)
    if scheme == "unix":
        if not path:
            raise ValueError("a unix:// URL needs a socket path")
    else:
        _endpoints(hosts, DEFAULT_PORTS["server"], single=True)
        _db(path)
    return RedisEndpoint("server", url, tls=scheme == "rediss", **_credentials(userinfo))


def _parse_sentinel(url: str, scheme: str) -> RedisEndpoint:
    userinfo, hosts, path, query = _split(url)
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("a sentinel URL needs the master's service name: redis+sentinel://host:26379/<service>")
    options = _query(query, allowed=("sentinel_password",))
    return RedisEndpoint("sentinel", url, _endpoints(hosts, DEFAULT_PORTS["sentinel"]), unquote(service), _db(db),
                         sentinel_password=options.get("sentinel_password"), tls=scheme.startswith("rediss"),
                         **_credentials(userinfo))


def _parse_cluster(url: str, scheme: str) -> RedisEndpoint:
    userinfo, hosts, path, query = _split(url)
    if path.strip("/") not in ("", "0"):
        raise ValueError("a cluster has database 0 only")
    _query(query, allowed=())
    return RedisEndpoint("cluster", url, _endpoints(hosts, DEFAULT_PORTS["cluster"]), tls=scheme.startswith("rediss"),
                         **_credentials(userinfo))


def _split(url: str) -> tuple[str, str, str, str]:
    """(userinfo, host list, path without its leading slash, query) of scheme://userinfo@hosts/path?query."""
    rest = url.partition("://")[2]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    return userinfo, hosts, path, query


def _endpoints(hosts: str, default_port: int, single: bool = False) -> tuple[tuple[str, int], ...]:
    entries = hosts.split(",")
    if single and len(entries) > 1:
        raise ValueError("one host only (several hosts: list several URLs, or use redis+cluster://)")
    return tuple(_endpoint(entry.strip(), default_port) for entry in entries)


def _endpoint(entry: str, default_port: int) -> tuple[str, int]:
    if entry.startswith("["):  # an IPv6 literal: [::1]:6379
        host, _, port = entry[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = entry.rpartition(":") if ":" in entry else (entry, "", "")
    # The messages quote nothing of the host part: with an unescaped "/" in a password, that
    # part would be the password.
    if not host:
        raise ValueError("a host is missing")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError("a port is not a number in 1..65535")
    return host, int(port) if port else default_port


def _db(path: str) -> int:
    path = path.strip("/")
    if path and not path.isdigit():
        raise ValueError("the database is not a number")
    return int(path or 0)


def _credentials(userinfo: str) -> dict[str, str | None]:
    username, has_password, password = userinfo.partition(":")
    return {"username": unquote(username) or None, "password": unquote(password) if has_password else None}


def _query(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    options = {name: values[-1] for name, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}" + (f"; known: {', '.join(allowed)}" if allowed else ""))
    return options


def with_password(url: str, password: str) -> str:
    """The URL with `password` in it, unless it already carries credentials (those win)."""
    scheme, _, rest = url.partition("://")
    if "@" in rest.partition("/")[0]:
        return url
    return f"{scheme}://:{quote(password, safe='')}@{rest}"
