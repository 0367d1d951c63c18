"""Coordination of instances through a real redis-server: claims (exclusive, heartbeated, taken over from a dead or
paused holder), marks, exclusive work, the shared access index, and degraded work while Redis is gone.

Each test has a redis-server of its own (the ``redis_server`` fixture), which it may stop and restart."""
from __future__ import annotations

import logging
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from mirror.digest import Digest
from mirror.storage.coordination import Coordination, SharedAccessIndex
from tests.peers import REPO_ROOT, wait_until

A, B, C = (Digest("sha256", letter * 64) for letter in "abc")

# a holder in a process of its own: prints whether it claimed, then answers each line with `claim.lost`
# (after releasing the claim when the line is "release")
HOLDER = """
import sys
from mirror.storage.coordination import Coordination
claim = Coordination(sys.argv[1]).claim(sys.argv[2], {"holder": "child"}, ttl=float(sys.argv[3]))
print("claimed" if claim else "refused", flush=True)
for line in sys.stdin:
    if line.strip() == "release":
        claim.release()
    print(claim.lost, flush=True)
"""


@pytest.fixture
def instances(redis_server):
    """Make Coordination objects on the test's Redis (each one an instance), closed after the test."""
    made: list[Coordination] = []

    def make(timeout: float = 1.0) -> Coordination:
        made.append(Coordination(redis_server.url, timeout=timeout))
        return made[-1]

    yield make
    for coordination in made:
        coordination.close()


@pytest.fixture
def holder(redis_server):
    """Start a holder process claiming a key with a ttl; it is killed by its pid after the test."""
    processes: list[subprocess.Popen[str]] = []

    def start(key: str, ttl: float) -> subprocess.Popen[str]:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, redis_server.url, key, str(ttl)], cwd=REPO_ROOT,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == "claimed"
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def ask(process: subprocess.Popen[str], line: str = "") -> str:
    """Send ``line`` to a holder process and return its answer."""
    process.stdin.write(line + "\n")
    process.stdin.flush()
    return process.stdout.readline().strip()


def test_a_claim_is_exclusive_across_instances(instances):
    first, second = instances(), instances()
    claim = first.claim("blob", {"session": "s1"})
    assert claim is not None and not claim.lost
    assert second.claim("blob", {}) is None
    assert first.claim("blob", {}) is None  # a holder in the same process is another holder too
    assert second.holder("blob") == {"session": "s1"}
    claim.update({"session": "s1", "bytes": 10})
    assert second.holder("blob") == {"session": "s1", "bytes": 10}
    assert second.holder("other") is None

    claim.release()
    assert second.holder("blob") is None
    theirs = second.claim("blob", {"session": "s2"})
    assert theirs is not None
    claim.release()  # again: never deletes the key another holder owns now
    assert first.holder("blob") == {"session": "s2"}
    assert first.claim("blob", {}) is None


def test_a_dead_holders_claim_is_free_after_its_ttl(instances, holder):
    other = instances()
    process = holder("blob", ttl=1.0)
    assert other.holder("blob") == {"holder": "child"}
    time.sleep(1.5)  # longer than the ttl: the holder's heartbeat keeps it
    assert other.claim("blob", {}) is None

    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = time.monotonic()
    wait_until(lambda: other.claim("blob", {"holder": "other"}) is not None, 3, "the claim to be free")
    assert time.monotonic() - killed < 1.5
    assert other.holder("blob") == {"holder": "other"}


def test_a_paused_holder_loses_its_claim_and_its_release_spares_the_new_holder(instances, holder):
    other = instances()
    process = holder("blob", ttl=1.0)
    process.send_signal(signal.SIGSTOP)  # a holder that stops heartbeating longer than its ttl
    try:
        claims = []
        wait_until(lambda: claims.append(other.claim("blob", {"holder": "other"})) or claims[-1], 3,
                   "the paused holder's claim to expire")
    finally:
        process.send_signal(signal.SIGCONT)
    wait_until(lambda: ask(process) == "True", 3, "the holder to see its claim lost")
    assert ask(process, "release") == "True"
    assert other.holder("blob") == {"holder": "other"}
    assert not claims[-1].lost


def test_marks_are_shared_and_expire(instances):
    first, second = instances(), instances()
    first.mark("missing", 0.3)
    first.mark("fresh", 10)
    assert second.marked("missing") and second.marked("fresh")
    assert not second.marked("other")
    second.unmark("fresh")
    assert not first.marked("fresh")
    time.sleep(0.4)
    assert not second.marked("missing")


def test_exclusive_work_runs_on_one_instance_at_a_time(instances):
    first, second = instances(), instances()
    with first.exclusive("gc", ttl=0.6) as mine:
        assert mine
        time.sleep(1.0)  # longer than the ttl: heartbeated while held
        with second.exclusive("gc") as theirs, first.exclusive("gc") as again:
            assert not theirs and not again
        with second.exclusive("evict") as other_work:
            assert other_work
    with second.exclusive("gc") as theirs:
        assert theirs


def test_the_shared_total_stays_exact_under_concurrent_records_and_forgets(instances):
    indexes = [SharedAccessIndex(instances()) for _ in range(2)]
    digests = [Digest("sha256", f"{number:064x}") for number in range(60)]
    sizes = {digest: number + 1 for number, digest in enumerate(digests)}
    barrier = threading.Barrier(8)

    def work(number: int) -> None:
        index, rng = indexes[number % 2], random.Random(number)
        for digest in digests:  # every digest recorded by every thread: counted once
            index.record(digest, sizes[digest])
        barrier.wait()
        for digest in digests[1::2]:
            index.forget(digest)
        barrier.wait()
        for _ in range(200):  # contention: records and forgets of the same few digests
            digest = rng.choice(digests[:4])
            (index.record(digest, sizes[digest]) if rng.random() < 0.5 else index.forget(digest))

    threads = [threading.Thread(target=work, args=(number,)) for number in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = indexes[0].oldest_first()
    assert {digest for digest, _ in entries} >= set(digests[4::2])
    assert not {digest for digest, _ in entries} & set(digests[5::2])
    assert indexes[0].total() == indexes[1].total() == sum(size for _, size in entries)
    assert all(size == sizes[digest] for digest, size in entries)


def test_oldest_first_follows_use(instances, monkeypatch):
    monkeypatch.setattr("mirror.storage.coordination.TOUCH_INTERVAL", 0)
    index = SharedAccessIndex(instances())
    for digest, size in ((A, 1), (B, 2), (C, 3)):
        index.record(digest, size)
        time.sleep(0.01)
    index.touch(A)
    assert index.oldest_first() == [(B, 2), (C, 3), (A, 1)]
    index.forget(B)
    index.touch(B)  # a touch after a forget does not bring the blob back
    assert index.oldest_first() == [(C, 3), (A, 1)]
    assert index.total() == 4


def test_rebuild_replaces_the_index(instances, redis_server):
    first, second = SharedAccessIndex(instances()), SharedAccessIndex(instances())
    assert first.empty()
    first.record(C, 5)
    assert first.empty()  # recorded meanwhile, but the blobs cached before are not indexed
    first.rebuild([(A, 10, 3.0), (B, 20, 1.0), (A, 10, 3.0)])
    assert not second.empty()
    assert second.total() == 30
    assert second.oldest_first() == [(B, 20), (A, 10)]

    with redis.Redis.from_url(redis_server.url) as raw:
        raw.flushall()  # Redis lost its data
    assert second.empty()
    second.rebuild([])
    assert not first.empty() and first.total() == 0 and first.oldest_first() == []


def test_without_redis_everything_works_alone_and_comes_back(instances, redis_server, caplog):
    coordination, other = instances(timeout=0.3), instances(timeout=0.3)
    index = SharedAccessIndex(coordination)
    index.rebuild([(A, 10, 1.0)])
    changes: list[bool] = []
    coordination.watch(changes.append)
    redis_server.stop()

    with caplog.at_level(logging.INFO, logger="mirror.coordination"):
        started = time.monotonic()
        claim = coordination.claim("blob", {"holder": "local"})
        assert time.monotonic() - started < 0.6
        assert claim is not None  # this process's own claim: it still fetches once
        assert not coordination.up and changes == [True, False]
        started = time.monotonic()
        assert coordination.claim("blob", {}) is None
        assert coordination.holder("blob") is None
        coordination.mark("missing", 10)
        assert coordination.marked("missing")
        coordination.unmark("missing")
        assert not coordination.marked("missing")
        with coordination.exclusive("gc") as mine:
            assert mine
        index.record(B, 5)
        index.touch(A)
        index.forget(A)
        index.rebuild([(C, 1, 1.0)])
        assert index.total() == 0 and index.oldest_first() == [] and not index.empty()
        assert time.monotonic() - started < 0.1  # Redis is left alone for a second after a failure

        time.sleep(1.1)
        started = time.monotonic()
        assert coordination.holder("blob") is None  # tried again: fails within the timeout
        assert time.monotonic() - started < 0.6

        redis_server.start()  # same port, empty
        wait_until(lambda: coordination.holder("blob") == {"holder": "local"}, 3,
                   "the local claim to be taken in Redis again")
        assert coordination.up and changes == [True, False, True]
        assert other.claim("blob", {}) is None
        claim.release()
        assert other.claim("blob", {}) is not None

    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    back = [record for record in caplog.records if record.levelno == logging.INFO]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()
    assert len(back) == 1


def test_a_hanging_redis_costs_each_call_at_most_its_timeout(instances, redis_server):
    coordination = instances(timeout=0.3)
    assert coordination.claim("blob", {}) is not None
    redis_server.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert not coordination.marked("missing")
        assert time.monotonic() - started < 0.6
        assert not coordination.up
    finally:
        redis_server.send_signal(signal.SIGCONT)
    time.sleep(1.1)
    assert coordination.holder("blob") == {}
    assert coordination.up
