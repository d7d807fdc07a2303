"""Conversion vs the physical floor of this job on one machine, measured in one run.

    python benchmarks/bench_floor.py [--layers 16] [--repeats 3] [--workdir /tmp/ckptbeam-floor]

(a) `cp` of the safetensors files; (b) the floor: read every source byte, `zstd -3 -T2`, write
(MaxText's zarr3 chunks are zstd level 3 too); (c) ckptbeam convert with the default runner
(Beam's DirectRunner -> FnApiRunner: one process, TensorStore's threads encode on both cores
while Python builds the next item); (d) DirectRunner in multi_processing mode with 2 and 1
worker processes, for the scaling figure. Prints convert/floor (goal <= 1.5), convert/cp, MB/s.

Fair to both sides on a VM: fresh memory is expensive the first time it is touched (the host
backs it lazily), so one unmeasured warm-up pass runs first, every output is deleted right after
it is measured, and (a)-(c) alternate `--repeats` times; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import CKPTBEAM, timed  # noqa: E402
from make_llama_checkpoint import make_benchmark_model  # noqa: E402

MULTI = ["--runner=DirectRunner", "--direct_running_mode=multi_processing"]


def _measured(cmd: list[str], out: str) -> tuple[float, int]:
    """Time `cmd` writing into the fresh directory `out`, then delete `out`."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    wall, rss = timed(cmd)
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/ckptbeam-floor")
    a = ap.parse_args()
    src, total, files = make_benchmark_model(a.workdir, a.layers)
    out = os.path.join(a.workdir, "out")

    def cp() -> tuple[float, int]:
        return _measured(["cp", *files, out], out)

    def floor() -> tuple[float, int]:
        return _measured(["zstd", "-q", "-3", "-T2", *files, "--output-dir-flat", out], out)

    def convert(*extra: str) -> tuple[float, int]:
        # The converter publishes OUT/0 itself; it refuses an existing non-empty output.
        return _measured([*CKPTBEAM, "--source", src, "--output", os.path.join(out, "ckpt"), *extra], out)

    floor(), convert()  # warm-up, not measured
    runs: dict[str, list[tuple[float, int]]] = {"cp": [], "floor": [], "default": []}
    for _ in range(a.repeats):
        runs["cp"].append(cp())
        runs["floor"].append(floor())
        runs["default"].append(convert())
    two = convert(*MULTI, "--direct_num_workers=2")
    one = convert(*MULTI, "--direct_num_workers=1")

    def med(name: str) -> float:
        return statistics.median(w for w, _ in runs[name])

    mb = total / 1e6
    t_cp, t_floor, t_conv = med("cp"), med("floor"), med("default")
    rss = max(r for _, r in runs["default"])
    print(f"model {mb:.0f} MB, {len(files)} files; medians of {a.repeats} alternating runs after a warm-up")
    print(f"cp {t_cp:.2f} s; floor (read + zstd -3 -T2 + write) {t_floor:.2f} s")
    print(
        f"convert, default runner: {t_conv:.2f} s ({', '.join(f'{w:.2f}' for w, _ in runs['default'])}), "
        f"{mb / t_conv:.0f} MB/s, peak RSS {rss / 2**20:.0f} MiB"
    )
    print(f"convert, DirectRunner 2 worker processes: {two[0]:.2f} s, peak RSS {two[1] / 2**20:.0f} MiB")
    print(f"convert, DirectRunner 1 worker process:   {one[0]:.2f} s, peak RSS {one[1] / 2**20:.0f} MiB")
    print(
        f"convert/floor {t_conv / t_floor:.2f}  convert/cp {t_conv / t_cp:.1f}  "
        f"speed-up 1->2 worker processes {one[0] / two[0]:.2f}x"
    )
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
