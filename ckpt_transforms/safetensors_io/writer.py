"""Writing planned safetensors shards from many workers: every byte range has one writer.

The launcher creates each shard at its final size with its header in place (the rest a sparse
hole); work items then write their tensors' bytes at the offsets the plan fixed (`os.pwrite`, no
locking needed: ranges are disjoint, and a retried item rewrites the same bytes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ckpt_transforms.safetensors_io.layout import ShardLayout


def create_shards(directory: str, shards: Sequence[ShardLayout]) -> None:
    """Each shard file at its final size, header written, data region zero (sparse)."""
    for shard in shards:
        path = os.path.join(directory, shard.file)
        with open(path, "wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)


class LocalShardWriter:
    """`write(file, offset, data)` into the pre-sized shards of one directory."""

    def __init__(self, directory: str):
        self.directory = directory
        self._fds: dict[str, int] = {}

    def __call__(self, file: str, offset: int, data: memoryview) -> None:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(os.path.join(self.directory, file), os.O_WRONLY)
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        """Make the written bytes durable before the item reports them."""
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
