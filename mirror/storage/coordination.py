"""State shared by every instance of a deployment (stateless instances over one S3 bucket), kept in Redis.

``Coordination`` holds claims (one fetch of a key at a time across the instances, taken over when its holder
dies), marks (keys remembered for a while: upstream misses, tag freshness) and exclusive work (eviction, gc:
one instance at a time); ``SharedAccessIndex`` is the least-recently-used index of pull-through blobs. Every
key lives under ``<namespace>:``.

Redis is never required for correctness: every call goes through ``Coordination._call``, which turns a Redis
error into a fallback answer, so nothing here raises one. While Redis cannot be reached (and for
``RETRY_AFTER`` seconds after each failure, so that calls do not each wait for a timeout) the instance works
alone: claims and marks fall back to this process's own, exclusive work runs, and the access index neither
changes nor evicts. Two instances may then fetch the same blob twice; none ever serves wrong bytes. Once
Redis answers again the module works again, without a restart.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from mirror.digest import Digest
from mirror.storage.access import TOUCH_INTERVAL

log = logging.getLogger("mirror.coordination")
T = TypeVar("T")

RETRY_AFTER = 1.0  # seconds Redis is left alone after a failed call
HEALTH_CHECK = 30.0  # seconds a pooled connection may idle before it is checked with a PING
LOCAL_MARKS = 10_000  # local marks, beyond which expired ones are forgotten

# take the claim key if it is free or ours, publish the info and (re)start its expiry; 0 if another holder has it
HOLD = """
local token = redis.call('HGET', KEYS[1], 'token')
if token and token ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'info', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
RELEASE = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# KEYS: lru (sorted set by last use), sizes (hash), total; ARGV: digest, size, time
RECORD = """
local previous = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - previous)
"""
# KEYS: lru, sizes, total; ARGV: digest
FORGET = """
local size = redis.call('HGET', KEYS[2], ARGV[1])
if not size then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('INCRBY', KEYS[3], -tonumber(size))
"""


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class Coordination:
    """Shared state of every instance, in Redis; degraded (local only) while Redis cannot be reached.

    Create one per process, after forking: its heartbeat thread does not survive a fork.
    """

    def __init__(self, url: str, namespace: str = "mirror", *, timeout: float = 1.0):
        self.namespace = namespace
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           health_check_interval=HEALTH_CHECK, decode_responses=True,
                                           # once more on a new connection: a pooled one dies when Redis restarts
                                           retry=Retry(NoBackoff(), 1, (redis.exceptions.ConnectionError,)),
                                           retry_on_error=[redis.exceptions.ConnectionError])
        self._hold_script = self._redis.register_script(HOLD)
        self._release_script = self._redis.register_script(RELEASE)
        self._up, self._retry_at = True, 0.0
        self._state = threading.Lock()  # guards _up and the local marks
        self._watchers: list[Callable[[bool], None]] = []
        self._until: dict[str, float] = {}  # local marks: key -> monotonic expiry
        self._claims: dict[str, Claim] = {}  # live claims of this process, by Redis key
        self._wake = threading.Condition()  # guards _claims and _closed; wakes the heartbeat
        self._closed = False
        self._heartbeat = threading.Thread(target=self._beat, name="coordination-heartbeat", daemon=True)
        self._heartbeat.start()

    @property
    def up(self) -> bool:
        """Whether the last Redis operation succeeded."""
        return self._up

    def watch(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(up)`` now and whenever Redis is lost or comes back (from the thread that noticed)."""
        self._watchers.append(callback)
        callback(self._up)

    def key(self, *parts: str) -> str:
        """The Redis key named by ``parts``, under the namespace."""
        return ":".join((self.namespace, *parts))

    # claims
    def claim(self, key: str, info: dict[str, Any], ttl: float = 10.0) -> Claim | None:
        """Hold ``key`` and publish ``info`` until released; None while another live holder (in any process) has it.

        While Redis is down the claim is this process's alone: two instances may then both hold a key.
        """
        return self._take(self.key("claim", key), info, ttl)

    def holder(self, key: str) -> dict[str, Any] | None:
        """The info the live holder of ``key`` published, or None (also while Redis is down)."""
        info = self._call(None, lambda: self._redis.hget(self.key("claim", key), "info"))
        return None if info is None else json.loads(info)

    # marks
    def mark(self, key: str, seconds: float) -> None:
        """Remember ``key`` for ``seconds``."""
        now = time.monotonic()
        with self._state:
            if len(self._until) > LOCAL_MARKS:  # forget expired entries: clients choose the keys
                self._until = {key: until for key, until in self._until.items() if until > now}
            self._until[key] = now + seconds
        self._call(None, lambda: self._redis.set(self.key("mark", key), 1, px=_milliseconds(seconds)))

    def marked(self, key: str) -> bool:
        """Whether ``key`` is remembered (while Redis is down: by this process)."""
        local = time.monotonic() < self._until.get(key, 0)
        return self._call(local, lambda: self._redis.exists(self.key("mark", key)) == 1)

    def unmark(self, key: str) -> None:
        """Forget ``key``."""
        with self._state:
            self._until.pop(key, None)
        self._call(None, lambda: self._redis.delete(self.key("mark", key)))

    # exclusive work
    @contextlib.contextmanager
    def exclusive(self, name: str, ttl: float = 60.0) -> Iterator[bool]:
        """True while this caller holds the work ``name`` (heartbeated like a claim), False if another does.

        While Redis is down it is True unless this process already holds it: local work goes on.
        """
        claim = self._take(self.key("exclusive", name), {}, ttl)
        try:
            yield claim is not None
        finally:
            if claim is not None:
                claim.release()

    def close(self) -> None:
        """Stop the heartbeat and close the connections (live claims then expire after their ttl)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._heartbeat.join()
        self._redis.close()

    def _take(self, key: str, info: dict[str, Any], ttl: float) -> Claim | None:
        claim = Claim(self, key, info, ttl)
        with self._wake:
            if key in self._claims:
                return None
            self._claims[key] = claim
            self._wake.notify()
        with claim._lock:
            return claim if claim._hold() else None

    def _drop(self, claim: Claim) -> None:
        with self._wake:
            if self._claims.get(claim.key) is claim:
                del self._claims[claim.key]

    def _beat(self) -> None:
        """Refresh each live claim every third of its ttl, and while Redis is down look for it every
        ``RETRY_AFTER`` seconds (so the changes it missed are replayed without waiting for traffic), until closed."""
        while True:
            with self._wake:
                if self._closed:
                    return
                now = time.monotonic()
                due = [claim for claim in self._claims.values() if claim.next_beat <= now]
                if not due:
                    beats = [claim.next_beat for claim in self._claims.values()]
                    beats += [] if self._up else [max(self._retry_at, now + 0.05)]
                    if not self._up and now >= self._retry_at:
                        self._wake.release()  # a PING may take the whole timeout: not while holding the lock
                        try:
                            self._call(None, self._redis.ping)
                        finally:
                            self._wake.acquire()
                        continue
                    self._wake.wait(min(beats) - now if beats else None)
                    continue
            for claim in due:
                claim.next_beat = now + claim.ttl / 3
                with claim._lock:
                    if not (claim._lost or claim._released):
                        claim._hold()

    def _call(self, fallback: T, operation: Callable[[], T]) -> T:
        """``operation()``, or ``fallback`` when Redis fails (or failed less than RETRY_AFTER seconds ago)."""
        if time.monotonic() < self._retry_at:
            return fallback
        try:
            result = operation()
        except (redis.RedisError, OSError) as exc:
            self._retry_at = time.monotonic() + RETRY_AFTER
            self._change(False, exc)
            return fallback
        self._change(True, None)
        return result

    def _change(self, up: bool, error: Exception | None) -> None:
        with self._state:
            if up == self._up:
                return
            self._up = up
        if not up:
            with self._wake:  # the heartbeat looks for Redis from now on
                self._wake.notify()
        if up:
            log.info("redis is back: claims, marks and the access index are shared again")
        else:
            log.warning("redis is unreachable (%s): this instance works alone (claims and marks are local, no "
                        "eviction) until it is back", error)
        for watcher in self._watchers:
            watcher(up)


class Claim:
    """A key this process holds while its Coordination heartbeats it; free ``ttl`` seconds after the process died."""

    def __init__(self, coordination: Coordination, key: str, info: dict[str, Any], ttl: float):
        self.key, self.ttl, self.token = key, ttl, uuid.uuid4().hex
        self.next_beat = time.monotonic() + ttl / 3
        self._coordination, self._info = coordination, info
        self._lost = self._released = False
        self._lock = threading.Lock()  # one write of the key at a time: a heartbeat never revives a released key

    def update(self, info: dict[str, Any]) -> None:
        """Replace the published info (e.g. the upload session, the bytes so far)."""
        with self._lock:
            self._info = info
            if not (self._lost or self._released):
                self._hold()

    @property
    def lost(self) -> bool:
        """Whether another holder took the key (seen by the heartbeat or an update)."""
        return self._lost

    def release(self) -> None:
        """Give the key up; it is deleted only while this claim still owns it."""
        with self._lock:
            if self._released:
                return
            self._released = True
            coordination = self._coordination
            coordination._drop(self)
            coordination._call(None, lambda: coordination._release_script(keys=[self.key], args=[self.token]))

    def _hold(self) -> bool:
        """Take or keep the key (with ``_lock`` held); False, and lost, once another holder has it."""
        coordination = self._coordination
        held = coordination._call(None, lambda: coordination._hold_script(
            keys=[self.key], args=[self.token, json.dumps(self._info), _milliseconds(self.ttl)]))
        if held == 0:
            self._lost = True
            coordination._drop(self)
        return held != 0


MISSED = 100_000  # index changes kept while Redis is down


class SharedAccessIndex:
    """The least-recently-used index of pull-through blobs, in Redis (a sorted set by last use, sizes, a total).

    The methods are those of ``access.AccessIndex``. While Redis is down nothing is evicted (the total is 0 and
    the list of blobs empty), and what is recorded or forgotten meanwhile is kept here and replayed when Redis is
    back; beyond ``MISSED`` changes the index is marked for a rebuild from the store instead.
    """

    def __init__(self, coordination: Coordination):
        self._coordination = coordination
        self._redis = coordination._redis
        lru = coordination.key("lru")
        self._keys = [lru, f"{lru}:sizes", f"{lru}:total"]
        self._built = f"{lru}:built"  # set by rebuild: gone when Redis lost its data
        self._record, self._forget = self._redis.register_script(RECORD), self._redis.register_script(FORGET)
        self._touched: dict[str, float] = {}
        self._missed: dict[str, tuple[int, float] | None] = {}  # changes Redis missed: (size, time), or forgotten
        self._overflowed = False
        self._missing = threading.Lock()
        coordination.watch(self._replay)

    def record(self, digest: Digest, size: int) -> None:
        """Note a newly cached blob (a blob recorded again is counted once)."""
        now = time.time()
        if not self._coordination._call(False, lambda: self._record(keys=self._keys, args=[str(digest), size, now])
                                        is not None):
            self._miss(str(digest), (size, now))

    def touch(self, digest: Digest) -> None:
        """Note that a cached blob was used (at most once a minute per blob; never brings a forgotten one back)."""
        key, now = str(digest), time.time()
        if now - self._touched.get(key, 0) > TOUCH_INTERVAL:
            self._touched[key] = now
            self._coordination._call(None, lambda: self._redis.zadd(self._keys[0], {key: now}, xx=True))

    def total(self) -> int:
        """Bytes of all indexed blobs (0 while Redis is down)."""
        return int(self._coordination._call(None, lambda: self._redis.get(self._keys[2])) or 0)

    def oldest_first(self) -> list[tuple[Digest, int]]:
        """Every indexed blob with its size, least recently used first (none while Redis is down)."""
        return self._coordination._call([], self._oldest_first)

    def _oldest_first(self) -> list[tuple[Digest, int]]:
        with self._redis.pipeline(transaction=True) as pipe:
            digests, sizes = pipe.zrange(self._keys[0], 0, -1).hgetall(self._keys[1]).execute()
        return [(Digest.parse(digest), int(sizes[digest])) for digest in digests if digest in sizes]

    def forget(self, digest: Digest) -> None:
        """Drop a blob from the index."""
        if not self._coordination._call(False, lambda: self._forget(keys=self._keys, args=[str(digest)]) is not None):
            self._miss(str(digest), None)
        self._touched.pop(str(digest), None)

    def _miss(self, digest: str, change: tuple[int, float] | None) -> None:
        with self._missing:
            if len(self._missed) < MISSED or digest in self._missed:
                self._missed[digest] = change
            else:
                self._overflowed = True

    def _replay(self, up: bool) -> None:
        """Once Redis is back, apply the changes it missed (or, after too many, mark the index for a rebuild)."""
        if not up:
            return
        with self._missing:
            missed, overflowed = self._missed, self._overflowed
            self._missed, self._overflowed = {}, False
        for digest, change in missed.items():
            if change is None:
                self.forget(Digest.parse(digest))
            else:
                self._coordination._call(None, lambda d=digest, c=change: self._record(keys=self._keys,
                                                                                        args=[d, c[0], c[1]]))
        if overflowed:
            self._coordination._call(None, lambda: self._redis.delete(self._built))

    def rebuild(self, entries: Iterable[tuple[Digest, int, float]]) -> None:
        """Replace the whole index with these (digest, size, last use) entries, in one transaction."""
        sizes, used = {}, {}
        for digest, size, last_use in entries:
            sizes[str(digest)], used[str(digest)] = size, last_use
        self._coordination._call(None, lambda: self._replace(sizes, used))

    def _replace(self, sizes: dict[str, int], used: dict[str, float]) -> None:
        lru, sizes_key, total = self._keys
        with self._redis.pipeline(transaction=True) as pipe:  # MULTI/EXEC: a reader sees the old index or the new
            pipe.delete(lru, sizes_key)
            if sizes:
                pipe.hset(sizes_key, mapping=sizes).zadd(lru, used)
            pipe.set(total, sum(sizes.values())).set(self._built, 1).execute()

    def empty(self) -> bool:
        """Whether the index was never rebuilt since Redis last lost its data (or ever); False while Redis is down.

        Blobs recorded meanwhile are indexed, but the blobs cached before are not: rebuild it from the store.
        """
        return self._coordination._call(False, lambda: self._redis.exists(self._built) == 0)

    def close(self) -> None:
        """Nothing to close: the connection belongs to the Coordination."""
