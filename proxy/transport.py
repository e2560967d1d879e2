"""Upstream HTTP: one pooled keep-alive session per provider, and exception mapping.

This is the only module that turns aiohttp's client exceptions into `UpstreamFailure`s,
so adapters stay pure and dispatch sees failure classes, never socket errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import aiohttp
from yarl import URL

from .config import Provider
from .errors import FailureClass, UpstreamFailure
from .providers import Adapter, UpstreamRequest
from .sse import EventTooLarge

MAX_ERROR_BODY = 64 * 1024


class Transport:
    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str, float], aiohttp.ClientSession] = {}
        self._retired: set[aiohttp.ClientSession] = set()     # replaced by a reload, closing soon
        self._closing: set[asyncio.Task[None]] = set()

    @staticmethod
    def _key(provider: Provider) -> tuple[str, str, float]:
        return (provider.name, provider.base_url, provider.timeouts.connect_s)

    def session(self, provider: Provider) -> aiohttp.ClientSession:
        key = self._key(provider)
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0, ttl_dns_cache=300,
                                             enable_cleanup_closed=False)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=provider.timeouts.connect_s),
                auto_decompress=True,
                cookie_jar=aiohttp.DummyCookieJar(),    # one session serves every client: never
                                                        # replay one caller's upstream cookies to another
                skip_auto_headers=("User-Agent",),
            )
            self._sessions[key] = session
        return session

    async def send(self, provider: Provider, request: UpstreamRequest) -> aiohttp.ClientResponse:
        """POST and wait for the response headers. The caller bounds the wait.

        Redirects are never followed: the gateway talks only to configured base URLs, and
        following one would send the provider key (aiohttp strips only `Authorization`
        across origins) and, on a 307, the prompt to whatever host the answer names.
        `classify` turns the 3xx into a failure."""
        return await self.session(provider).post(request.url, data=request.body, headers=dict(request.headers),
                                                 allow_redirects=False)

    def retire(self, providers: Iterable[Provider], grace_s: float) -> None:
        """After a reload: close, once requests in flight have had `grace_s` to finish, the
        sessions no provider of the new config uses (a changed base_url or connect timeout)."""
        keep = {self._key(p) for p in providers}
        for key in [k for k in self._sessions if k not in keep]:
            session = self._sessions.pop(key)
            self._retired.add(session)
            asyncio.get_running_loop().call_later(grace_s, self._close_retired, session)

    def _close_retired(self, session: aiohttp.ClientSession) -> None:
        if session in self._retired:
            self._retired.discard(session)
            task = asyncio.get_running_loop().create_task(session.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        sessions = [*self._sessions.values(), *self._retired]
        self._sessions, self._retired = {}, set()
        await asyncio.gather(*(s.close() for s in sessions), *self._closing, return_exceptions=True)


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Up to `limit` bytes of the body, and whether it held more (the rest is left unread:
    the caller closes the connection). Memory stays bounded whatever the upstream sends."""
    if response.content_length is not None and response.content_length > limit:
        return b"", True
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await response.content.readany()
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit], True


async def read_error_body(response: aiohttp.ClientResponse) -> bytes:
    """An error answer's body, whole up to MAX_ERROR_BODY: one that arrives in several reads
    must still parse, or a context_length_exceeded would be misread as a plain 400."""
    try:
        body, _ = await read_limited(response, MAX_ERROR_BODY)
    except (TimeoutError, aiohttp.ClientError):
        return b""
    return body


async def read_answer(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """A non-streamed answer's body; one over `limit` bytes is a protocol failure (a broken or
    hostile upstream must not make the gateway hold hundreds of megabytes)."""
    body, over = await read_limited(response, limit)
    if over:
        response.close()
        raise UpstreamFailure(FailureClass.PROTOCOL, f"upstream answer exceeded {limit} bytes")
    return body


def failure_from_exception(exc: BaseException, headers_received: bool) -> UpstreamFailure:
    """Map a transport exception; before headers a reset is a connect failure, after it a cut."""
    if isinstance(exc, UpstreamFailure):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        what = "no first content" if headers_received else "no response headers"
        return UpstreamFailure(FailureClass.TIMEOUT, f"timed out: {what}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(FailureClass.CONNECT, f"cannot connect: {exc.os_error.strerror or 'refused'}")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)):
        if headers_received:
            return UpstreamFailure(FailureClass.PROTOCOL, "upstream closed the stream")
        return UpstreamFailure(FailureClass.CONNECT, "connection reset before response headers")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure(FailureClass.PROTOCOL, "upstream response was cut")
    if isinstance(exc, aiohttp.ClientError):
        return UpstreamFailure(FailureClass.PROTOCOL, f"upstream protocol error: {type(exc).__name__}")
    raise exc


def classify(adapter: Adapter, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
    """The adapter's classification of an error answer; one it cannot read is still a failure."""
    if 300 <= status < 400:
        return redirected(status, headers)
    try:
        return adapter.classify(status, headers, body)
    except Exception:
        kind = FailureClass.SERVER if status >= 500 else FailureClass.PROTOCOL
        return UpstreamFailure(kind, f"upstream answered HTTP {status}", status)


def redirected(status: int, headers: Mapping[str, str]) -> UpstreamFailure:
    """A 3xx: a protocol failure (the breaker counts it, the next candidate serves). The
    message names where it pointed (scheme, host and path, never the query) so that a
    base_url that moved, or lacks https, is easy to fix."""
    try:
        location = URL(headers.get("Location") or "").with_query(None).with_fragment(None)
        if location.is_absolute():
            location = location.with_user(None)
    except ValueError:
        location = URL()
    where = f" to {location}" if location.path or location.host else ""
    return UpstreamFailure(FailureClass.PROTOCOL, f"upstream answered HTTP {status}, a redirect{where}; "
                           "redirects are never followed (check the provider's base_url)", status)


def unreadable(exc: Exception) -> UpstreamFailure:
    """An upstream answer the adapter could not read (valid JSON of the wrong shape, say),
    or an event larger than the parser takes."""
    if isinstance(exc, EventTooLarge):
        return UpstreamFailure(FailureClass.PROTOCOL, str(exc))
    return UpstreamFailure(FailureClass.PROTOCOL, f"unreadable upstream answer ({type(exc).__name__})")
