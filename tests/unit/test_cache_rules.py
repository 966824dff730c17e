"""The response cache's own rules (handlers.cache): what makes two requests one entry, the byte bound and the LRU
order, and what a client's Cache-Control lets it do."""

from __future__ import annotations

import pytest

from handlers import cache
from handlers.kinds import generate
from handlers.oip import BinaryAnswer
from handlers.settings import HandlerSettings

SERVED = ("digits", "1.0")
JSON = {"body": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}], "id": "a"}}


def key(request=JSON, content_type="application/json", header_length=None, served=SERVED):
    return cache.key_of(served, request, content_type, header_length)


def test_requests_the_pipeline_cannot_tell_apart_share_a_key_and_any_difference_it_reads_does_not():
    reordered = {"body": {"id": "a", "inputs": [{"data": [1.0, 2.0], "shape": [1, 2], "datatype": "FP32",
                                                 "name": "x"}]}}
    assert key() == key(reordered) and len(key()) == 32
    others = [
        key(served=("digits", "2.0")), key(served=("shapes", "1.0")),
        key(content_type=""), key(header_length=12),
        key({"body": {**JSON["body"], "id": "b"}}),
        key({"body": {**JSON["body"], "parameters": {"binary_data_output": True}}}),
        key({**JSON, "topk": "3"}),  # a query parameter (handlers.requests.with_query)
        key({"body": b"1.0 2.0"}), key({"body": "1.0 2.0"}), key({"body": bytearray(b"1.0 2.0 ")}),
    ]
    assert len({key(), *others}) == len(others) + 1
    # a field's name and value are framed by their lengths: moving bytes between them is another key
    assert key({"ab": "c"}) != key({"a": "bc"})
    assert key({"body": float("nan")}) is not None


def test_the_cache_keeps_at_most_its_bytes_and_drops_the_least_recently_used_first():
    store = cache.ResponseCache(4000)
    cost = store._cost(b"k" * 32, "x" * 700)
    keys = [bytes([i]) * 32 for i in range(8)]
    evicted = [store.put(k, "x" * 700) for k in keys[:4]]
    assert evicted == [0, 0, 0, 0] and store.bytes == 4 * cost <= 4000
    assert store.get(keys[0]) == "x" * 700  # now the most recently used
    assert store.put(keys[4], "x" * 700) == 1
    assert store.get(keys[1]) is None and store.get(keys[0]) is not None
    assert store.bytes == 4 * cost and len(store) == 4
    store.put(keys[5], BinaryAnswer(b"\0" * 500, 40))
    assert store.bytes <= 4000 and store.get(keys[5]).header_length == 40
    assert store.put(keys[6], "x" * 1200) == 0 and store.get(keys[6]) is None, "over a quarter of the cache: not kept"
    before = store.bytes
    store.put(keys[0], "y" * 100)  # the key's older answer gives its bytes back
    assert store.bytes == before - 600 and store.get(keys[0]) == "y" * 100


def test_cache_control_decides_reading_and_keeping():
    assert cache.use_of({}) is cache.Use.READ
    assert cache.use_of({"Cache-Control": "max-age=60"}) is cache.Use.READ
    assert cache.use_of({"cache-control": "No-Cache"}) is cache.Use.REFRESH
    assert cache.use_of({"Cache-Control": "max-age=0, no-cache"}) is cache.Use.REFRESH
    assert cache.use_of({"Pragma": "no-cache"}) is cache.Use.REFRESH
    assert cache.use_of({"Cache-Control": "no-cache, no-store"}) is cache.Use.NONE
    assert cache.use_of({"Cache-Control": 'no-store="x"'}) is cache.Use.NONE


def test_the_setting_is_off_by_default_may_be_zero_and_a_generator_refuses_it():
    assert HandlerSettings().response_cache_mb == 0
    assert HandlerSettings.from_mapping({"response_cache_mb": 64}).response_cache_mb == 64
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="response_cache_mb"):
            HandlerSettings.from_mapping({"response_cache_mb": bad})
    with pytest.raises(ValueError, match="response_cache_mb"):
        generate.Settings.from_mapping({"response_cache_mb": 8})
    with pytest.raises(ValueError):
        cache.ResponseCache(0)
