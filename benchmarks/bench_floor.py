"""Conversion vs the physical floor of this job on one machine, measured in one run.

    python benchmarks/bench_floor.py [--layers 6] [--workdir /tmp/ckptbeam-floor]

(a) `cp` of the safetensors files; (b) the floor: read every source byte, `zstd -3 -T2`, write
(MaxText's zarr3 chunks are zstd level 3 too); (c) ckptbeam convert on both cores (DirectRunner, 2 worker
processes); (d) the same with one worker, for the scaling figure; (e) the default runner. Prints convert/floor (goal <= 1.5), convert/cp, MB/s.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import CKPTBEAM, timed  # noqa: E402
from make_llama_checkpoint import make  # noqa: E402

MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--workdir", default="/tmp/ckptbeam-floor")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    src = os.path.join(a.workdir, "hf")
    total = make(src, a.layers, 2048, 5632, 16, 4, 32000)
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    os.makedirs(os.path.join(a.workdir, "cp"))
    os.makedirs(os.path.join(a.workdir, "zst"))
    cp, _ = timed(["cp", *files, os.path.join(a.workdir, "cp")])
    floor, _ = timed(["zstd", "-q", "-3", "-T2", *files, "--output-dir-flat", os.path.join(a.workdir, "zst")])
    two, rss2 = timed(
        [*CKPTBEAM, "--source", src, "--output", os.path.join(a.workdir, "o2"), *MULTI, "--direct_num_workers=2"]
    )
    one, rss1 = timed(
        [*CKPTBEAM, "--source", src, "--output", os.path.join(a.workdir, "o1"), *MULTI, "--direct_num_workers=1"]
    )
    # The default runner: one process, TensorStore's threads encode while Python builds slabs.
    fn, rss_fn = timed([*CKPTBEAM, "--source", src, "--output", os.path.join(a.workdir, "o0")])
    mb = total / 1e6
    print(f"model {mb:.0f} MB; cp {cp:.2f} s; floor (read+zstd -3 -T2+write) {floor:.2f} s")
    print(f"convert, 2 workers: {two:.2f} s, {mb / two:.0f} MB/s, peak RSS {rss2 / 2**20:.0f} MiB")
    print(f"convert, 1 worker:  {one:.2f} s, {mb / one:.0f} MB/s, peak RSS {rss1 / 2**20:.0f} MiB")
    print(
        f"convert, default (FnApiRunner, 1 process): {fn:.2f} s, {mb / fn:.0f} MB/s, peak RSS {rss_fn / 2**20:.0f} MiB"
    )
    print(
        f"convert/floor {two / floor:.2f} (default runner {fn / floor:.2f})  convert/cp {two / cp:.1f}  "
        f"speed-up 1->2 workers {one / two:.2f}x"
    )
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
