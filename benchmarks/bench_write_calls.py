"""Page-cache writes in big `writev` calls vs small `write` calls, measured in one run.

    python benchmarks/bench_write_calls.py [--mb 1300] [--repeats 3] [--pause 3] [--workdir DIR]

Why: perf on `ckptbeam convert` shows a quarter of its CPU in the kernel's copy into the page cache
(`copy_folio_from_iter_atomic` under TensorStore's `writev`), for the same ~1.3 GB of compressed
output that `zstd` writes at a fraction of that cost. strace shows the difference in how the bytes
reach the kernel: TensorStore writes a chunk's encoded bytes (a Cord of ~64 KiB blocks) with
`writev` calls of up to 1024 blocks, i.e. up to 64 MiB per call; the zstd CLI writes 128 KiB at a
time. This script writes the same bytes both ways into fresh files and prints CPU seconds and the
ratio. `--pause` waits after deleting the previous output, as happens between a real run's start
and its first write; on a VM whose host reclaims freed guest memory (virtio-balloon free page
reporting), pages touched for the first time after that pause are expensive, and big calls
suffer far more than small ones (they fill large page-cache folios). It is the size of the call,
not writev itself: a single 64 MiB `write` or 2 MiB `write`s cost like the big writev here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

BLOCK = 65523  # the block size seen in TensorStore's writev calls (strace)
IOV_PER_CALL = 1024  # IOV_MAX: blocks per writev call
SMALL_WRITE = 128 * 1024  # what the zstd CLI writes per call


def _write_files(out: str, blocks: list[bytes], files: int, big: bool) -> float:
    """CPU seconds (user + system) to write `files` files of `blocks` each."""
    os.makedirs(out)
    small = b"".join(blocks)
    started = time.process_time()
    for k in range(files):
        fd = os.open(os.path.join(out, f"f{k}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if big:
                for i in range(0, len(blocks), IOV_PER_CALL):
                    os.writev(fd, blocks[i : i + IOV_PER_CALL])
            else:
                view = memoryview(small)
                for i in range(0, len(view), SMALL_WRITE):
                    os.write(fd, view[i : i + SMALL_WRITE])
        finally:
            os.close(fd)
    return time.process_time() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1300, help="bytes written per measurement (MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between deleting the output and writing")
    ap.add_argument("--workdir", default="/tmp/ckptbeam-write-calls")
    a = ap.parse_args()
    blocks = [os.urandom(BLOCK) for _ in range(IOV_PER_CALL)]  # one 64 MiB file's worth
    files = max(1, round(a.mb * 1e6 / (BLOCK * IOV_PER_CALL)))
    total = files * BLOCK * IOV_PER_CALL
    cpu: dict[str, list[float]] = {"writev 64 MiB calls": [], "write 128 KiB calls": []}
    for _ in range(a.repeats):
        for name in cpu:
            shutil.rmtree(a.workdir, ignore_errors=True)
            time.sleep(a.pause)
            cpu[name].append(_write_files(a.workdir, blocks, files, big=name.startswith("writev")))
    shutil.rmtree(a.workdir, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in cpu.items()}
    print(
        f"{total / 1e6:.0f} MB into fresh files, {a.pause:g} s after deleting the last output; medians of {a.repeats}"
    )
    for name, seconds in med.items():
        runs = ", ".join(f"{s:.2f}" for s in cpu[name])
        print(f"  {name}: {seconds:.2f} CPU s ({runs}), {total / seconds / 1e6:.0f} MB/s")
    big, small = med["writev 64 MiB calls"], med["write 128 KiB calls"]
    print(f"big calls / small calls: {big / small:.1f}x CPU")


if __name__ == "__main__":
    main()
