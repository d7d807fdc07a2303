"""Reusable big buffers for work items' regions and source reads.

A fresh large numpy array is fresh memory from the kernel, which zeroes it page by page on first
touch. At conversion speed that zeroing costs about as much CPU as the transposed copies
themselves (perf on a 1.7 GB Llama: a fifth of all cycles in `clear_page`), once for every read
buffer and once for every region. A worker therefore keeps its big buffers and reuses them.

A pooled buffer is free again when nothing references it any more -- no views, no memoryviews,
and no TensorStore write still holding a region until its database commits -- so callers never
release anything by hand, and a buffer still in use can never be handed out twice.
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

# Below this size malloc already reuses freed memory; pooling would only add bookkeeping.
MIN_POOLED_BYTES = 1 << 20


class BufferPool:
    """Hands out arrays backed by reusable buffers; at most `limit_bytes` are kept."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.min_bytes = MIN_POOLED_BYTES
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        # References a buffer has when only this pool holds it, counted the same way as in
        # `_is_free` (the list slot plus getrefcount's own argument on this interpreter).
        probe = [np.empty(0, np.uint8)]
        self._idle_refs = sys.getrefcount(probe[0])

    def _is_free(self, i: int) -> bool:
        return sys.getrefcount(self._buffers[i]) <= self._idle_refs

    @property
    def held_bytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def _buffer(self, nbytes: int) -> np.ndarray | None:
        """A pooled buffer for `nbytes`, or None if the limit does not allow one.

        A free buffer of about the right size is reused. Otherwise, if dropping free buffers
        makes room, a new one is allocated: an oversized buffer serving a smaller array would
        crowd out the next request. Failing that, any free buffer big enough.
        """
        size = [b.nbytes for b in self._buffers]
        free = [i for i in range(len(size)) if self._is_free(i)]
        close = [i for i in free if nbytes <= size[i] <= nbytes + nbytes // 8]
        if close:
            return self._buffers[min(close, key=size.__getitem__)]
        held = sum(size)
        if held - sum(size[i] for i in free) + nbytes <= self.limit_bytes:
            drop = set()
            for i in sorted(free, key=lambda i: (size[i] >= nbytes, -size[i])):  # too small first
                if held + nbytes <= self.limit_bytes:
                    break
                drop.add(i)
                held -= size[i]
            self._buffers = [b for i, b in enumerate(self._buffers) if i not in drop]
            self._buffers.append(np.empty(nbytes, np.uint8))
            return self._buffers[-1]
        bigger = [i for i in free if size[i] >= nbytes]
        return self._buffers[min(bigger, key=size.__getitem__)] if bigger else None

    def empty(self, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
        """Like `np.empty(shape, dtype)`; contents are whatever the buffer held before."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            buf = self._buffer(nbytes)
        if buf is None:  # over the limit: an ordinary allocation, freed as usual
            return np.empty(shape, dtype)
        return buf[:nbytes].view(dtype).reshape(shape)
