"""DeepSeek-V3 671B from a sparse source: plan all of it, convert a slice, restore it.

    python benchmarks/bench_sparse_671b.py [--workdir /tmp/ckptbeam-sparse671b] [--only PATTERNS] [--keep]

Steps: write DeepSeek-V3 (tests/golden/deepseek_v3_config.json) as a sparse model directory:
real safetensors headers and index, FP8 weights + F32 scale_inv grids, the MTP layer, ~689 GB
apparent and a few MB on disk (ckpt_transforms.safetensors_io.synthetic.write_sparse_model). Time `ckptbeam plan`
on it under /usr/bin/time -v (real header reader, scanned layout) and print the plan: items,
bytes, largest item vs the budget. Then fill the tensors a slice reads with deterministic random
values, convert that slice (`--only`, unscanned) under /usr/bin/time -v (wall, peak RSS), restore
the partial checkpoint with orbax.checkpoint and check names, shapes, dtypes and values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from common import CKPTBEAM, timed  # noqa: E402

import model_maps  # noqa: E402
from ckpt_transforms.planning.convert_plan import build_plan, item_working_bytes  # noqa: E402
from ckpt_transforms.safetensors_io.index import load_source_model  # noqa: E402
from ckpt_transforms.safetensors_io.synthetic import (  # noqa: E402
    disk_usage,
    fill_tensors,
    supports_sparse_files,
    write_sparse_model,
)
from ckpt_transforms.storage.sources import open_source  # noqa: E402
from pipelines.convert import human_bytes  # noqa: E402
from pipelines.options import parse_only  # noqa: E402

CONFIG = os.path.join(ROOT, "tests", "golden", "deepseek_v3_config.json")
# Two layers' attention (a dense and a MoE layer) and one MoE layer's shared experts:
# ~420 MB of FP8 + scales read, ~0.8 GB of bf16 written.
DEFAULT_ONLY = (
    "decoder.dense_layers_0.self_attention.*,"
    "decoder.moe_layers_0.self_attention.*,"
    "decoder.moe_layers_0.DeepSeekMoeBlock_0.shared_experts.*"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/ckptbeam-sparse671b")
    ap.add_argument("--only", default=DEFAULT_ONLY, help="params to convert (--only of ckptbeam convert)")
    ap.add_argument("--extra", nargs="*", default=[], help="extra ckptbeam convert flags, e.g. --max_item_bytes=128MiB")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    src, out = os.path.join(a.workdir, "hf"), os.path.join(a.workdir, "out")
    with open(CONFIG, encoding="utf-8") as f:
        config = json.load(f)
    family = model_maps.detect_family(config)

    if not supports_sparse_files(src):
        raise SystemExit(f"{a.workdir}: the file system does not keep holes; pick a --workdir on ext4/xfs/tmpfs")
    started = time.perf_counter()
    infos = write_sparse_model(src, config, family.build)
    apparent, allocated = disk_usage(src)
    print(
        f"sparse source: {len(infos)} tensors in {len(os.listdir(src)) - 2} shards, {apparent / 1e9:.1f} GB apparent, "
        f"{allocated / 2**20:.1f} MiB on disk; written in {time.perf_counter() - started:.1f} s"
    )

    # 1. `ckptbeam plan` on the real headers, as a user runs it (process start-up included).
    wall, rss = timed([sys.executable, "-m", "pipelines.cli", "plan", "--source", src])
    print(f"ckptbeam plan (CLI, scanned): {wall:.1f} s wall, peak RSS {rss / 2**20:.0f} MiB")
    t0 = time.perf_counter()
    source = load_source_model(open_source(src))
    t1 = time.perf_counter()
    model_map = family.build(config)
    for scan in (True, False):
        t2 = time.perf_counter()
        plan = build_plan(source, model_map, scan)
        t3 = time.perf_counter()
        s = plan.summary()
        over = sum(item_working_bytes(i) > plan.max_item_bytes for i in plan.items)
        print(
            f"  scan_layers={scan!s:5}  params {s['params']:5d}  work items {s['work_items']:6d}  "
            f"read {human_bytes(s['bytes_read'])}  write {human_bytes(s['bytes_written'])}  "
            f"largest item {human_bytes(s['largest_item_bytes'])} of budget {human_bytes(s['max_item_bytes'])} "
            f"({s['largest_item']})  items over budget: {over}  build_plan {t3 - t2:.1f} s"
        )
        assert over == 0
    print(f"  in-process: headers read in {t1 - t0:.1f} s ({len(source.files)} shards); known extras "
          f"(MTP) {s['unused_source_keys']} tensors")  # fmt: skip

    # 2. Fill what the slice reads, convert it, restore it.
    patterns = parse_only(a.only)
    subset = build_plan(source, model_map, False, only=patterns)
    keys = {info.key for item in subset.items for slab in item.slabs for info in (slab.source, *slab.aux)}
    t0 = time.perf_counter()
    filled = fill_tensors(src, infos, keys)
    print(
        f"filled {len(keys)} tensors ({filled / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s; "
        f"source now {disk_usage(src)[1] / 2**20:.0f} MiB on disk"
    )
    cmd = [*CKPTBEAM, "--source", src, "--output", out, "--scan_layers", "false", "--only", a.only, *a.extra]
    wall, rss = timed(cmd)
    written = subset.summary()["bytes_written"]
    print(
        f"convert --only: {len(subset.arrays)} of {subset.params_total} params, {len(subset.items)} work items, "
        f"{filled / 1e6:.0f} MB read, {written / 1e6:.0f} MB written: {wall:.1f} s wall "
        f"({written / 1e6 / wall:.1f} MB/s incl. start-up and planning), peak RSS {rss / 2**20:.0f} MiB"
    )

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    t0 = time.perf_counter()
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(out, "0", "items"))
    leaves = {
        ".".join(str(getattr(p, "key", p)) for p in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
    }
    leaves.pop("step")
    expected = {arr.name: arr for arr in subset.arrays}
    assert set(leaves) == set(expected), sorted(set(leaves) ^ set(expected))
    for name, arr in expected.items():
        value = leaves[name]
        assert value.shape == arr.shape and str(value.dtype) == arr.dtype, (name, value.shape, value.dtype)
        f32 = value.astype(np.float32)
        assert np.isfinite(f32).all() and np.count_nonzero(f32) > f32.size // 2, name
    print(
        f"restored {len(leaves)} params with orbax in {time.perf_counter() - t0:.1f} s: names, shapes, dtypes "
        "match the plan; values finite and non-zero"
    )
    for name in sorted(expected)[:3]:
        print(f"  {name}  {list(expected[name].shape)}  {expected[name].dtype}")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
