"""The worker's buffer pool: reuse only what nothing references any more, within its limit."""

from __future__ import annotations

import numpy as np
import tensorstore as ts
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_transforms.tensors.buffers import BufferPool

MiB = 1 << 20


def _pool(limit: int = 64 * MiB) -> BufferPool:
    return BufferPool(limit)


def test_a_released_buffer_is_reused():
    pool = _pool()
    a = pool.empty((1024, 1024), np.uint16)
    address = a.ctypes.data
    del a
    b = pool.empty((1024, 1024), np.uint16)
    assert b.ctypes.data == address
    assert pool.held_bytes == b.nbytes


def test_a_buffer_with_a_live_view_is_never_handed_out_again():
    pool = _pool()
    a = pool.empty((1024, 1024), np.uint16)
    a[...] = 1
    view = a[3:]
    del a
    b = pool.empty((1024, 1024), np.uint16)
    b[...] = 2
    assert not np.shares_memory(b, view)
    assert (view == 1).all()


def test_a_memoryview_or_frombuffer_array_keeps_a_buffer_busy():
    pool = _pool()
    raw = pool.empty((4 * MiB,), np.uint8)
    decoded = np.frombuffer(memoryview(raw)[MiB : 3 * MiB], dtype=np.float32)
    del raw
    again = pool.empty((4 * MiB,), np.uint8)
    assert not np.shares_memory(again, decoded)


def test_small_arrays_are_not_pooled():
    pool = _pool()
    a = pool.empty((16, 16), np.float32)
    assert a.shape == (16, 16) and a.dtype == np.float32
    assert pool.held_bytes == 0


def test_requests_beyond_the_limit_are_plain_allocations():
    pool = _pool(limit=3 * MiB)
    a = pool.empty((2 * MiB,), np.uint8)
    b = pool.empty((2 * MiB,), np.uint8)  # a is still in use: no room for b in the pool
    assert pool.held_bytes == 2 * MiB
    assert not np.shares_memory(a, b)
    b[...] = 7  # an ordinary array, usable as usual
    assert (b == 7).all()


def test_an_oversized_free_buffer_is_dropped_to_make_room_for_one_that_fits():
    pool = _pool(limit=10 * MiB)
    big = pool.empty((8 * MiB,), np.uint8)
    del big
    small = pool.empty((2 * MiB,), np.uint8)  # far smaller than the free 8 MiB buffer
    other = pool.empty((6 * MiB,), np.uint8)  # fits only because the 8 MiB one was dropped
    assert pool.held_bytes == 8 * MiB
    assert not np.shares_memory(small, other)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=30))
def test_live_arrays_never_share_memory_and_the_pool_stays_within_its_limit(steps):
    pool = _pool(limit=12 * MiB)
    live: list[np.ndarray] = []
    for i, (mib, keep) in enumerate(steps):
        a = pool.empty((mib * MiB // 4,), np.float32)
        a[...] = i
        live.append(a)
        if not keep:
            live.pop(0)
        assert pool.held_bytes <= pool.limit_bytes
        for x in live:  # every live array still holds what was written into it
            assert (x == x[0]).all()
        for j, x in enumerate(live):
            for y in live[j + 1 :]:
                assert not np.shares_memory(x, y)


def test_tensorstore_holds_a_region_until_its_commit(tmp_path):
    """What the worker relies on: a write that references its source keeps the buffer busy."""
    pool = _pool()
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}/"},
        "metadata": {"shape": [1024, 1024], "data_type": "uint16"},
    }
    store = ts.open(spec, create=True).result()
    txn = ts.Transaction()
    region = pool.empty((1024, 1024), np.uint16)
    region[...] = 7
    store.with_transaction(txn)[...].write(region, can_reference_source_data_indefinitely=True).result()
    del region
    busy = pool.empty((1024, 1024), np.uint16)
    busy[...] = 9  # must not land in the staged write
    commit = txn.commit_async()
    commit.result()
    assert (store.read().result() == 7).all()
    del busy
    assert len(pool._buffers) == 2
    again = pool.empty((1024, 1024), np.uint16)  # both are free now: one is reused
    assert any(np.shares_memory(again, b) for b in pool._buffers)
    assert len(pool._buffers) == 2
