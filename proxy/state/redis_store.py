"""`RedisState`: buckets, breakers, 429 holds and memos in Redis, shared by every instance.

Each admission is one atomic script call (`lua/admit.lua`) on the Redis server's clock:
the key's bucket and every bucket of the chosen deployment are reserved together or not
at all, and a half-open probe slot is taken in the same call, so probes are bounded
cluster-wide. Settles, memo writes and deletes never wait: they queue in an outbox that
is sent as one pipeline every few milliseconds, off the client's byte path.

Every call is bounded by `timeout_s` (the wait for one of the pool's connections
included); a failure or a timeout raises `StateUnavailable` (the failover wrapper in
`failover` then serves from local shares). Nothing here retries a failed call, with two
exceptions: a script that Redis forgot (NOSCRIPT: restarted, or SCRIPT FLUSH) is loaded and
sent once more, and an admission whose idle connection Redis had closed is sent once more
on a new one (`DirectLane`).
An admission whose caller stopped waiting (past the bound, or the client left) still
runs on the server: its answer is awaited by itself and what it granted handed back.
A probe slot whose settle never comes (its instance died) frees after its lease; a
reservation that is never settled simply stays spent until the bucket refills (at most
one minute for a full bucket; longer only for one reservation larger than the bucket),
so a dead instance cannot hold capacity for longer.

Imports breaker and the state package only; `redis` is imported here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..breaker import BreakerPolicy
from .store import (
    Admission,
    BreakerView,
    BucketView,
    Grant,
    Outcome,
    Refusal,
    StateHealth,
    StateView,
)

log = logging.getLogger("proxy.state")

SCRIPTS = ("admit", "settle", "view", "charge")
MAX_CONNECTIONS = 64
OUTBOX_GATHER_S = 0.002
LATE_S = 1.0            # how long an admission its caller stopped waiting for may still come back
_NO_WAIT = contextlib.nullcontext()


class StateUnavailable(Exception):
    """Redis did not answer within the bound (`timed_out`), or the call failed."""

    def __init__(self, reason: str, timed_out: bool) -> None:
        super().__init__(reason)
        self.timed_out = timed_out


def load_script(name: str) -> str:
    folder = resources.files(__package__) / "lua"
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def connect(url: str, password: str | None, timeout_s: float) -> Redis:
    """A client on its own pool, with no retries and no socket timeouts of its own (each would
    wrap every read in another timer): the caller bounds every call and degrades. A plain
    pool, which fails a call that finds every connection busy: `RedisState` never lets more
    than `MAX_CONNECTIONS` calls out at once, so that cannot happen."""
    pool = ConnectionPool.from_url(url, password=password, max_connections=MAX_CONNECTIONS,
                                   socket_connect_timeout=max(1.0, timeout_s * 4), retry=Retry(NoBackoff(), 0))
    return Redis(connection_pool=pool)


class DirectLane:
    """Connections the admission borrows without going through the client's pool.

    The admission is the one Redis call on every request's path, and the client's lending
    around a call (the pool's lock, its observability hooks, the retry wrapper) cost about
    0.13 ms of a 0.35 ms call measured at 200 calls/s on a 2-vCPU VM (a raw round trip took
    0.14 ms). The connections are still redis-py's own (AUTH, TLS, unix sockets, the hiredis
    reply parser); only the lending is here. `RedisState` lets at most MAX_CONNECTIONS calls
    out at once, so at most that many are ever open here.

    An idle connection Redis has closed (a restart, its `timeout` setting) fails on its next
    use; that call is sent once more on a new connection. Redis closes a connection between
    commands (a restart, `timeout`, CLIENT KILL), so the script did not run. Only a link cut
    after Redis ran it and before its answer arrived (a proxy in between resetting it) runs
    it twice: one request's reservation is then spent twice until the bucket refills, and a
    probe slot it took waits for its lease. Not retrying would be worse: one stale
    connection would send the whole process to local limits.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._idle: list[AbstractConnection] = []
        self._closed = False

    async def call(self, *words: Any) -> Any:
        if not self._idle:
            return await self._exchange(self._pool.make_connection(), words)
        try:
            return await self._exchange(self._idle.pop(), words)
        except RedisConnectionError:
            return await self._exchange(self._pool.make_connection(), words)

    async def _exchange(self, connection: AbstractConnection, words: tuple[Any, ...]) -> Any:
        try:
            await connection.connect()
            await connection.send_command(*words)
            answer = await connection.read_response()
        except ResponseError:
            await self._put_back(connection)    # an error reply, read whole: the connection is clean
            raise
        except BaseException:                   # anything else may leave a reply unread: never reuse it
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        await self._put_back(connection)
        return answer

    async def _put_back(self, connection: AbstractConnection) -> None:
        if self._closed:                        # a call that was in flight at close: nothing will lend it again
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
        else:
            self._idle.append(connection)

    async def close(self) -> None:
        self._closed = True
        await self.drop_idle()

    async def drop_idle(self) -> None:
        """Disconnect the idle connections (after an outage they may lead to a Redis that is gone)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)


@dataclass(slots=True)
class _Queued:
    script: str | None          # a script name, or None for a plain command
    args: tuple[Any, ...]       # (keys, argv) for a script, the command's words otherwise
    failed: Any                 # the future's result when the write did not make it
    future: asyncio.Future[Any] | None = None


class RedisState:
    """The Redis backend proper: raises StateUnavailable rather than degrading by itself."""

    def __init__(self, client: Redis, *, prefix: str = "llm-proxy", policy: BreakerPolicy | None = None,
                 timeout_s: float = 0.05, clock: Callable[[], float] | None = None,
                 health: StateHealth | None = None,
                 on_failure: Callable[[StateUnavailable], None] | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.policy = policy or BreakerPolicy()
        self._schedule = self.policy.schedule()
        self.timeout_s = timeout_s
        self.clock = clock                  # None: the Redis server's clock (tests pin one)
        self.health = health or StateHealth("redis", "shared", time.time())
        self.on_failure = on_failure or (lambda exc: None)
        self.failing_since: float | None = None     # monotonic: the first timeout since a call answered
        self._sources = {name: load_script(name) for name in SCRIPTS}
        self._shas: dict[str, str] = {}
        self._outbox: list[_Queued] = []
        self._flushing: asyncio.Task[None] | None = None
        # A burst of more calls than pooled connections is load, not an outage: the rest wait
        # for a connection within their bound (the pool itself would fail them at once).
        self._connections = asyncio.Semaphore(MAX_CONNECTIONS)
        self._lane = DirectLane(client.connection_pool)

    # ------------------------------------------------------------------ plumbing

    def _now(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    async def start(self) -> None:
        """Load the scripts (again, after a Redis restart); nothing waits on this but the start."""
        await self._bounded("start", self._load_scripts, max(self.timeout_s, 2.0))

    async def _load_scripts(self) -> None:
        for name, source in self._sources.items():
            self._shas[name] = await self.client.script_load(source)

    async def close(self) -> None:
        if self._outbox or self._flushing is not None:
            try:
                async with asyncio.timeout(max(0.5, self.timeout_s * 10)):
                    while self._outbox or self._flushing is not None:
                        await (self._flushing or self._start_flush())
            except (TimeoutError, StateUnavailable):
                pass
        await self._lane.close()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()

    def set_breaker_policy(self, policy: BreakerPolicy) -> None:
        self.policy = policy
        self._schedule = policy.schedule()

    async def _bounded(self, operation: str, call: Callable[[], Awaitable[Any]], bound_s: float | None = None,
                       *, pooled: bool = True) -> Any:
        """Make a Redis call within `timeout_s` (waiting for a free connection included, unless
        the call takes one itself: `pooled=False`); count it; StateUnavailable past the bound."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(bound_s or self.timeout_s), (self._connections if pooled else _NO_WAIT):
                result = await call()
        except (TimeoutError, RedisError, OSError) as exc:
            health = self.health
            health.errors[operation] = health.errors.get(operation, 0) + 1
            timed_out = isinstance(exc, TimeoutError)
            if timed_out and self.failing_since is None:
                self.failing_since = time.monotonic()
            reason = "timed out" if timed_out else f"{type(exc).__name__}: {exc}"
            raise StateUnavailable(f"redis {operation}: {reason}", timed_out) from None
        self.failing_since = None
        self.health.observe((time.perf_counter() - started) * 1000)
        return result

    async def _script(self, name: str, keys: list[str], args: list[Any], *, direct: bool = False) -> Any:
        """Run a script by its digest; `direct`: on the admission's own connections (`DirectLane`)."""
        if name not in self._shas:
            await self._load_scripts()
        send = self._lane.call if direct else self.client.execute_command
        try:
            return await send("EVALSHA", self._shas[name], len(keys), *keys, *args)
        except NoScriptError:               # Redis restarted and forgot the scripts
            await self._load_scripts()
            return await send("EVALSHA", self._shas[name], len(keys), *keys, *args)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    # ------------------------------------------------------------------ admission

    async def admit(self, admission: Admission) -> Grant | Refusal:
        keys: list[str] = []
        key = admission.key
        if key is not None:
            keys.append(self._key("bucket", key.name))
        options = []
        for option in admission.options:
            keys.append(self._key("breaker", option.deployment_id))
            keys += [self._key("bucket", spec.name) for spec in option.buckets]
            options.append([(spec.per_minute, spec.amount) for spec in option.buckets])
        request: dict[str, Any] = {"now": self._now(), "force": 1 if admission.force else 0,
                                   "probes": self.policy.probes, "lease": admission.probe_lease_s, "options": options}
        if key is not None:
            request["key"] = (key.per_minute, key.amount)
        args = [orjson.dumps(request)]
        # The script runs as a call of its own: past the bound, or when the request goes away,
        # it may still run on the server, so it goes on and hands back what it reserved rather
        # than leave a probe slot taken until its lease ends (the request's whole time budget).
        call = asyncio.ensure_future(self._pooled(lambda: self._script("admit", keys, args, direct=True)))
        try:
            answer = await self._bounded("admit", lambda: asyncio.shield(call), pooled=False)
        except BaseException:
            call.add_done_callback(functools.partial(self._give_back, admission))
            asyncio.get_running_loop().call_later(LATE_S, call.cancel)     # bounded all the same
            raise
        return _answer(admission, answer)

    async def _pooled(self, call: Callable[[], Awaitable[Any]]) -> Any:
        async with self._connections:
            return await call()

    def _give_back(self, admission: Admission, call: asyncio.Future[Any]) -> None:
        """An admission whose caller stopped waiting came back: release what it granted (its
        probe slot, its tokens; a request bucket stays spent until it refills)."""
        if call.cancelled() or call.exception() is not None:
            return
        answer = _answer(admission, call.result())
        if isinstance(answer, Grant) and answer.index >= 0:
            self.settle(answer, Outcome(0))

    def settle(self, grant: Grant, outcome: Outcome) -> asyncio.Future[str]:
        policy = self.policy
        keys = [self._key("breaker", grant.deployment_id), self._key("recent", grant.deployment_id)]
        args: list[Any] = [
            self._now(), "" if outcome.used_tokens is None else outcome.used_tokens, outcome.verdict or "",
            _opt(outcome.open_for), _opt(outcome.trip_for), _opt(outcome.hold_for), 1 if grant.probe else 0,
            grant.epoch, policy.consecutive, policy.ratio, policy.min_calls, policy.window_s, policy.max_open_s,
            outcome.cost_s, policy.cost_factor, len(grant.token_buckets)]
        for spec in grant.token_buckets:
            keys.append(self._key("bucket", spec.name))
            args += (spec.per_minute, spec.amount)
        args.append(len(self._schedule))
        args += self._schedule
        return self._queue(_Queued("settle", (keys, args), ""))

    async def charge(self, amounts: Mapping[str, tuple[int, float]]) -> None:
        """Take `{bucket name: (limit, amount)}` from the shared buckets (the failover's hand-back)."""
        if amounts:
            keys, args = self._charge_call(amounts)
            await self._bounded("charge", lambda: self._script("charge", keys, args))

    def charge_later(self, amounts: Mapping[str, tuple[int, float]]) -> asyncio.Future[Any]:
        """`charge`, sent in the background: what this process admitted on its own while shared."""
        return self._queue(_Queued("charge", self._charge_call(amounts), 0))

    def _charge_call(self, amounts: Mapping[str, tuple[int, float]]) -> tuple[list[str], list[Any]]:
        keys = [self._key("bucket", name) for name in amounts]
        args: list[Any] = [self._now()]
        for per_minute, amount in amounts.values():
            args += (per_minute, amount)
        return keys, args

    async def ping(self) -> None:
        await self._bounded("ping", self.client.ping)

    async def reconnect(self) -> None:
        """Drop every pooled connection: after an outage they may lead to a Redis that is gone,
        and each would fail once more on its first use."""
        await self.client.connection_pool.disconnect()
        await self._lane.drop_idle()

    # ------------------------------------------------------------------ view

    async def view(self, breakers: Iterable[str], buckets: Mapping[str, int]) -> StateView:
        ids = list(breakers)
        names = list(buckets)
        keys = [self._key("breaker", d) for d in ids] + [self._key("bucket", n) for n in names]
        args: list[Any] = [self._now(), len(ids), *buckets.values()]
        out = await self._bounded("view", lambda: self._script("view", keys, args))
        words = [w.decode() if isinstance(w, bytes) else str(w) for w in out]
        now = float(words[0])
        breaker_views = {}
        for i, deployment_id in enumerate(ids):
            state, opened_at, open_until, held_until = words[1 + 4 * i: 5 + 4 * i]
            closed = state == "closed"
            breaker_views[deployment_id] = BreakerView(
                state, None if closed else float(opened_at), None if closed else float(open_until),
                float(held_until) if float(held_until) > now else None)
        base = 1 + 4 * len(ids)
        bucket_views = {name: BucketView(float(buckets[name]), float(words[base + j])) for j, name in enumerate(names)}
        return StateView(breaker_views, bucket_views, "shared")

    # ------------------------------------------------------------------ memos

    def remember(self, scope: str, key: str, value: bytes, ttl_s: float) -> asyncio.Future[bool]:
        ttl_ms = max(1, int(ttl_s * 1000))
        return self._queue(_Queued(None, ("SET", self._key("memo", f"{scope}:{key}"), value, "PX", ttl_ms), False))

    async def recall(self, scope: str, key: str) -> bytes | None:
        value = await self._bounded("recall", lambda: self.client.get(self._key("memo", f"{scope}:{key}")))
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    def forget(self, scope: str, key: str) -> asyncio.Future[bool]:
        """Resolves to whether a live memo was there (an expired one is already gone in Redis);
        a caller that answers on it waits one bounded round trip."""
        return asyncio.ensure_future(self._forget(scope, key))

    async def _forget(self, scope: str, key: str) -> bool:
        try:
            return bool(await self._bounded("forget", lambda: self.client.delete(self._key("memo", f"{scope}:{key}"))))
        except StateUnavailable as exc:
            self.on_failure(exc)
            return False

    # ------------------------------------------------------------------ the outbox

    def _queue(self, item: _Queued) -> asyncio.Future[Any]:
        """Queue a write; its future resolves to the reply (a script's, or True for a command)
        once the pipeline it went in has come back, or to `item.failed`."""
        item.future = asyncio.get_running_loop().create_future()
        self._outbox.append(item)
        if self._flushing is None:
            self._start_flush()
        return item.future

    def _start_flush(self) -> asyncio.Task[None]:
        self._flushing = asyncio.get_running_loop().create_task(self._flush())
        return self._flushing

    async def _flush(self) -> None:
        """Send everything queued as one pipeline until the outbox is empty. Writes gather for
        `OUTBOX_GATHER_S` first: a request's settle and its feedback record, and those of
        requests around it, then share one round trip."""
        try:
            await asyncio.sleep(OUTBOX_GATHER_S)
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    results = await self._bounded("write", functools.partial(self._send, batch))
                except StateUnavailable as exc:
                    results = [item.failed for item in batch]
                    self.on_failure(exc)
                for item, result in zip(batch, results):
                    if item.future is not None and not item.future.done():
                        item.future.set_result(result)
        finally:
            self._flushing = None

    async def _send(self, batch: list[_Queued]) -> list[Any]:
        if any(item.script is not None and item.script not in self._shas for item in batch):
            await self._load_scripts()
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for item in batch:
                if item.script is None:
                    pipe.execute_command(*item.args)
                else:
                    keys, args = item.args
                    pipe.evalsha(self._shas[item.script], len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                await self._load_scripts()          # Redis restarted: send the batch again
                continue
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                raise errors[0]
            return [r.decode() if isinstance(r, bytes) else bool(r) for r in results]
        raise AssertionError("unreachable")


def _answer(admission: Admission, answer: list[Any]) -> Grant | Refusal:
    """admit.lua's reply to `admission`."""
    if int(answer[0]) == 1:
        index = int(answer[1]) - 1
        if index < 0:                       # the key alone
            return Grant(-1, "", False, ())
        option = admission.options[index]
        return Grant(index, option.deployment_id, bool(int(answer[2])),
                     tuple(s for s in option.buckets if s.tokens), epoch=int(answer[3]))
    reason = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
    longest = int(answer[3])
    return Refusal(reason, retry_after=float(answer[2]), longest_open=longest - 1 if longest else None,
                   open_for=float(answer[4]), open_wait=float(answer[5]))


def _opt(value: float | None) -> Any:
    return "" if value is None else value
