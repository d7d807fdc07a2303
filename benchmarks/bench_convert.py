"""Conversion time vs a plain copy of the same bytes, MB/s and peak RSS, measured in one run.

    python benchmarks/bench_convert.py [--workdir /tmp/ckptbeam-bench] [--layers 6] [--keep]

Steps: generate a Llama-shaped bf16 checkpoint (~0.8 GB); time `cp` of its safetensors files;
time `ckptbeam convert` (in-process FnApiRunner) and `ckptbeam convert` with DirectRunner
multi_processing on both cores, each under `/usr/bin/time -v` for peak RSS. Prints ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import CKPTBEAM, timed  # noqa: E402
from make_llama_checkpoint import make_benchmark_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/ckptbeam-bench")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    src, total, files = make_benchmark_model(a.workdir, a.layers)
    mb = total / 1e6
    print(f"model: {a.layers} layers, {mb:.0f} MB of bf16 tensors in {len(files)} shards")

    copy_dir = os.path.join(a.workdir, "copy")
    os.makedirs(copy_dir)
    cp_wall, _ = timed(["cp", *files, copy_dir])
    rows = [("cp of the safetensors files", cp_wall, None)]
    exe = [*CKPTBEAM, "--source", src]
    for label, extra in (
        ("ckptbeam convert (FnApiRunner, 1 process)", []),
        (
            "ckptbeam convert (DirectRunner multi_processing, 2 workers)",
            ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
        ),
    ):
        out = os.path.join(a.workdir, f"out{len(rows)}")
        wall, rss = timed([*exe, "--output", out, *extra])
        rows.append((label, wall, rss))
    print(f"{'step':<62} {'wall s':>8} {'MB/s':>8} {'÷ cp':>6} {'peak RSS MB':>12}")
    for label, wall, rss in rows:
        rss_text = f"{rss / 1e6:12.0f}" if rss else f"{'':>12}"
        print(f"{label:<62} {wall:8.2f} {mb / wall:8.1f} {wall / cp_wall:6.1f} {rss_text}")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
