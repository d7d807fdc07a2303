"""Peak RSS as the model grows: it must stay flat (bounded by --max_item_bytes), not grow with size.

    python benchmarks/bench_memory.py [--layers 2 8 16] [--workdir /tmp/ckptbeam-mem] [--export]

Generates Llama-shaped bf16 checkpoints of the same width and growing depth, converts each with
the default budget under /usr/bin/time -v, and prints peak RSS per size and the ratio
largest/smallest (goal <= 1.2, and under 1 GiB). With --export, each checkpoint is converted
untimed and `ckptbeam export` back to HF safetensors is what is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import CKPTBEAM, CKPTBEAM_EXPORT, ckptbeam_convert, timed  # noqa: E402
from make_llama_checkpoint import make_benchmark_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 16])
    ap.add_argument("--workdir", default="/tmp/ckptbeam-mem")
    ap.add_argument("--extra", nargs="*", default=[], help="extra ckptbeam flags, e.g. --max_item_bytes=64MiB")
    ap.add_argument("--export", action="store_true", help="measure ckptbeam export of the converted checkpoint")
    a = ap.parse_args()
    rows = []
    for layers in a.layers:
        src, total, _ = make_benchmark_model(a.workdir, layers)
        out = os.path.join(a.workdir, "out")
        if a.export:
            ckptbeam_convert(src, os.path.join(a.workdir, "ckpt"))
            shutil.rmtree(src)
            wall, rss = timed(
                [*CKPTBEAM_EXPORT, "--source", os.path.join(a.workdir, "ckpt"), "--output", out, *a.extra]
            )
        else:
            wall, rss = timed([*CKPTBEAM, "--source", src, "--output", out, *a.extra])
        rows.append((layers, total, wall, rss))
        print(f"{layers:3d} layers  {total / 1e9:6.2f} GB  {wall:7.1f} s  peak RSS {rss / 2**20:7.0f} MiB", flush=True)
    shutil.rmtree(a.workdir, ignore_errors=True)
    print(f"{'export' if a.export else 'convert'}: ", end="")
    print(
        f"peak RSS largest/smallest model: {rows[-1][3] / rows[0][3]:.2f}x (model grew {rows[-1][1] / rows[0][1]:.1f}x)"
    )


if __name__ == "__main__":
    main()
