"""Where the backend may connect, checked on the host the HTTP client really connects to, and pinned to the checked IPs.

Link-local, cloud metadata, multicast, unspecified and reserved addresses are always refused, also when an IPv6
address wraps them (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo). Loopback and private addresses are
allowed only for trusted hosts (Label Studio's own, ALLOWED_MEDIA_HOSTS). A name is resolved once per request,
every address it resolves to must pass, and the connection goes to those addresses, never to a later lookup.
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
import threading
import time
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationParseError, NewConnectionError
from urllib3.util import connection as urllib3_connection
from urllib3.util import parse_url

Resolver = Callable[[str, int], Iterable[str]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "192.0.0.192", "fd00:ec2::254"))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
DEFAULT_PORTS = {"http": 80, "https": 443}


class AddressRefused(requests.exceptions.ConnectionError):
    """The policy forbids this connection; the message names the rule."""


@dataclass(frozen=True)
class Origin:
    """Scheme, host (lowercase, no brackets) and port that the HTTP client will connect to."""

    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_origin(url: str) -> Origin:
    """The origin of an http(s) URL, refusing any URL that two parsers could read as different hosts."""
    odd = next((c for c in url if c == "\\" or c.isspace() or unicodedata.category(c) in ("Cc", "Cf")), None)
    if odd is not None:
        raise AddressRefused(f"refused URL containing {odd!r}: {url[:100]!r}")
    try:
        parts, split = parse_url(url), urlsplit(url)
        split_port = split.port
    except (LocationParseError, ValueError) as exc:
        raise AddressRefused(f"refused malformed URL {url[:100]!r}: {exc}") from exc
    scheme = (parts.scheme or "").lower()
    if scheme not in DEFAULT_PORTS:
        raise AddressRefused(f"refused {scheme or 'schemeless'} URL {url[:100]!r}: only http(s) is fetched")
    if parts.auth is not None or "@" in split.netloc:
        raise AddressRefused(f"refused URL with user info (user@host) {url[:100]!r}")
    host = (parts.host or "").lower().removeprefix("[").removesuffix("]")
    if not host or host != (split.hostname or "") or parts.port != split_port:
        raise AddressRefused(f"refused ambiguous URL {url[:100]!r}: parsers disagree on its host")
    return Origin(scheme, _valid_host(host), DEFAULT_PORTS[scheme] if parts.port is None else parts.port)


def _valid_host(host: str) -> str:
    """A DNS name or a canonical IP literal; the legacy IPv4 spellings (2852039166, 0xa9fea9fe, 0251.0376...) are refused."""
    literal = _ip(host)
    if literal is not None:
        if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id:
            raise AddressRefused(f"refused IPv6 address with a zone: {host}")
        return host
    if not host or not _HOSTNAME.fullmatch(host):
        raise AddressRefused(f"refused host {host[:100]!r}: not a host name or IP address")
    try:
        socket.inet_aton(host)
    except OSError:
        return host
    raise AddressRefused(f"refused host {host!r}: a numeric IPv4 spelling other than a.b.c.d")


def host_entry(entry: str) -> tuple[str, int | None]:
    """An ALLOWED_MEDIA_HOSTS entry ("host", "host:port", "[v6]:port") as (host, port or None)."""
    try:
        parts = parse_url(f"http://{entry.strip()}")
        host = _valid_host((parts.host or "").lower().removeprefix("[").removesuffix("]"))
    except (LocationParseError, AddressRefused) as exc:
        raise ValueError(f"not a host or host:port: {entry!r} ({exc})") from exc
    if parts.auth or parts.path or parts.query or parts.fragment:
        raise ValueError(f"not a host or host:port: {entry!r}")
    return _canonical(host), parts.port


def _canonical(host: str) -> str:
    """One spelling per host, so that an allow-list entry matches however a URL writes it."""
    literal = _ip(host)
    return str(literal) if literal is not None else host.rstrip(".")


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The IPv4 addresses that an IPv6 address stands for (mapped, compatible, NAT64, 6to4, Teredo)."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo:
        found.extend(address.teredo)
    if address in _NAT64 or 1 < int(address) < 1 << 32:  # NAT64, or IPv4-compatible ::a.b.c.d
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def refusal(address: IPAddress) -> str | None:
    """Why an address is never connected to, or None."""
    if address in _NAT64_LOCAL:
        return "local-use NAT64"
    inner = _embedded(address)
    for wrapped in inner:
        reason = refusal(wrapped)
        if reason:
            return f"a wrapper of {wrapped}, which is {reason}"
    if inner or (address.version == 6 and address.is_loopback):
        return None  # ::1 and some wrappers lie in ::/8, which ipaddress counts as reserved; judged by what they wrap
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    for name in ("link_local", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if address in _THIS_NETWORK:
        return "unspecified"
    return None


def is_public(address: IPAddress) -> bool:
    """Global unicast, and every IPv4 address it wraps is global too."""
    return address.is_global and all(inner.is_global for inner in _embedded(address))


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system's resolver gives for a TCP connection, in its order of preference."""
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


class AddressPolicy:
    """Decides which addresses a request may connect to; trusted hosts may be loopback or private."""

    def __init__(self, trusted: Iterable[str] = (), resolver: Resolver | None = None):
        self.trusted = {host_entry(entry) for entry in trusted if entry.strip()}
        self.resolver = resolver or system_resolver

    def trusts(self, origin: Origin) -> bool:
        host = _canonical(origin.host)
        return (host, None) in self.trusted or (host, origin.port) in self.trusted

    def addresses(self, origin: Origin) -> tuple[str, ...]:
        """Resolve once and check every address; the connection goes to these, in this order."""
        host = _canonical(origin.host)
        if host in METADATA_NAMES:
            raise AddressRefused(f"refused {host}: cloud metadata is never fetched")
        literal = _ip(host)
        if literal is not None:
            found = [literal]
        else:
            try:
                found = [ipaddress.ip_address(a.split("%")[0]) for a in self.resolver(host, origin.port)]
            except (OSError, UnicodeError, ValueError) as exc:
                raise AddressRefused(f"refused {host}: cannot resolve it ({exc})") from exc
            if not found:
                raise AddressRefused(f"refused {host}: it resolves to no address")
        trusted = self.trusts(origin)
        for address in found:
            reason = refusal(address)
            if reason:
                raise AddressRefused(f"refused {host}: {address} is {reason}, never fetched")
            if not trusted and not is_public(address):
                raise AddressRefused(f"refused {host}: {address} is loopback or private, allowed only for Label Studio "
                                     "and ALLOWED_MEDIA_HOSTS")
        return tuple(dict.fromkeys(str(a) for a in found))


class WallClock:
    """Bounds all this thread's HTTP connections to `seconds` in all: past it their sockets are shut down."""

    _local = threading.local()

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> WallClock:
        self._outer = getattr(self._local, "clock", None)
        self._local.clock = self
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        self._local.clock = self._outer
        with self._lock:
            self._sockets.clear()

    @classmethod
    def current(cls) -> WallClock | None:
        return getattr(cls._local, "clock", None)

    def limit(self, timeout: object) -> float:
        """A connect timeout that ends by the deadline."""
        remaining = max(0.001, self.deadline - time.monotonic())
        return min(timeout, remaining) if isinstance(timeout, (int, float)) else remaining

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if not self.expired:
                self._sockets.append(sock)
                return
        _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Wake a thread blocked reading this socket (the base method also works on TLS sockets)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Pinned:
    """A urllib3 connection that connects only to the addresses the policy checked; Host, SNI and cert use the name."""

    def __init__(self, *args, addresses: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.addresses = addresses

    def _new_conn(self) -> socket.socket:
        clock = WallClock.current()
        timeout = self.timeout
        if clock is not None:
            if clock.expired:
                raise ConnectTimeoutError(self, f"Connection to {self.host} not tried: the wall-clock limit has passed")
            timeout = clock.limit(timeout)
        error: Exception = NewConnectionError(self, f"no checked address to connect to for {self.host}")
        for address in self.addresses:
            try:
                sock = urllib3_connection.create_connection((address, self.port), timeout, source_address=self.source_address,
                                                            socket_options=self.socket_options)
            except socket.timeout:
                error = ConnectTimeoutError(self, f"Connection to {self.host} ({address}) timed out. (connect timeout={timeout})")
            except OSError as exc:
                error = NewConnectionError(self, f"Failed to establish a new connection to {self.host} ({address}): {exc}")
            else:
                if clock is not None:
                    clock.watch(sock)
                return sock
        raise error

    def request(self, *args, **kwargs):
        super().request(*args, **kwargs)
        clock = WallClock.current()
        if clock is not None:
            clock.watch(self.sock)  # a kept-alive connection is watched by this request's clock too


class _PinnedHTTPConnection(_Pinned, HTTPConnection):
    pass


class _PinnedHTTPSConnection(_Pinned, HTTPSConnection):
    pass


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTPConnection


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


def _pinned_key(key_fn, context: dict):
    """Pools are keyed by the checked addresses too, so a name that now resolves elsewhere gets a new pool."""
    context = dict(context)
    addresses = context.pop("addresses", ())
    return key_fn(context), addresses


class PinnedAdapter(HTTPAdapter):
    """Checks every request (so every redirect hop) on the host it connects to, and connects only to checked IPs."""

    def __init__(self, policy: AddressPolicy, **kwargs):
        self.policy = policy
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        manager = self.poolmanager
        manager.pool_classes_by_scheme = {"http": _PinnedHTTPPool, "https": _PinnedHTTPSPool}
        manager.key_fn_by_scheme = {s: functools.partial(_pinned_key, fn) for s, fn in manager.key_fn_by_scheme.items()}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        if select_proxy(request.url, proxies):
            raise AddressRefused("refused to use a proxy: the address policy needs direct connections")
        origin = parse_origin(request.url)
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        if (host_params["host"] or "").lower().strip("[]") != origin.host:
            raise AddressRefused(f"refused ambiguous URL {request.url[:100]!r}: parsers disagree on its host")
        pool_kwargs = {**pool_kwargs, "addresses": self.policy.addresses(origin)}
        return self.poolmanager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)
