"""The pull-through access index: the running total of cached bytes stays the sum of its entries, also
across the worker processes that share it and for an index written before the total was kept."""
from __future__ import annotations

import diskcache

from mirror.digest import Digest
from mirror.storage.access import TOTAL_KEY, AccessIndex

A, B = Digest("sha256", "a" * 64), Digest("sha256", "b" * 64)


def test_total_follows_records_and_forgets(tmp_path):
    index = AccessIndex(tmp_path)
    index.record(A, 100)
    index.record(B, 30)
    index.record(A, 100)  # recorded again (fetched again after an eviction): counted once
    assert index.total() == 130
    index.forget(A)
    index.forget(A)  # forgetting what is gone changes nothing
    assert index.total() == 30
    assert index.oldest_first() == [(B, 30)]
    index.close()


def test_workers_sharing_the_index_see_one_total(tmp_path):
    first, second = AccessIndex(tmp_path), AccessIndex(tmp_path)
    first.record(A, 100)
    second.record(B, 30)
    second.forget(A)
    first.touch(A)  # a touch after another worker forgot the blob does not bring it back
    assert first.total() == second.total() == 30
    assert [digest for digest, _ in first.oldest_first()] == [B]
    first.close()
    second.close()


def test_an_index_without_a_total_gets_one(tmp_path):
    with diskcache.Cache(str(tmp_path)) as old:
        old.set(str(A), (100, 1.0))
        old.set(str(B), (30, 2.0))
    index = AccessIndex(tmp_path)
    assert index.total() == 130
    assert index.oldest_first() == [(A, 100), (B, 30)]
    assert TOTAL_KEY not in {str(digest) for digest, _ in index.oldest_first()}
    index.close()
