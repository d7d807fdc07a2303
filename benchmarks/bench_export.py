"""Export (Orbax -> HF safetensors) vs the physical floor of that job on one machine, in one run.

    python benchmarks/bench_export.py [--layers 16] [--repeats 3] [--workdir /tmp/ckptbeam-export]
        [--extra=--max_item_bytes=128MiB ...]

The source is the Llama-shaped bf16 model of the other benchmarks (`make_benchmark_model`),
converted once with `ckptbeam convert` (untimed). Every export writes the same tensor bytes the
checkpoint's chunks decode to (bf16 in, bf16 out, no vocab padding), so the floor is: read the
checkpoint's compressed chunk bytes, zstd-decode them, write the decoded bytes.

- floor: the compressed zstd frame of every chunk is pulled out of the OCDBT store once
  (untimed: TensorStore's kvstore reads each shard, the sharding_indexed index at its end gives
  the frame) into two files of concatenated frames, balanced by size. Timed: two `zstd -d`
  processes side by side (zstd decodes on one thread, so one per core), each reading its file
  from the page cache and writing the decoded bytes to a fresh file (128 KiB writes, no fsync).
- floor + fsync: the same, then `sync FILE` on both outputs (export fsyncs what it wrote before
  an item reports, so it pays for writeback; the plain floor leaves that to the kernel).
- TensorStore floor: a bare Python process (TensorStore + numpy only) reads every leaf whole
  with TensorStore (2 leaves in flight) and `pwrite`s its bytes into one file, one call per leaf:
  the library's decoding and export's write pattern, without Beam, planning or the inverse ops.
- export: `ckptbeam export --source CKPT --output OUT` with default options (+ --extra).

One unmeasured warm-up of each runs first; then the four alternate --repeats times, each output
deleted right after it is timed; medians are reported with every run's figure (the machine is
shared: other load is printed too). Also checks once that the export gives back the source
model's tensors (names, shapes, dtypes, bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import struct
import sys

import tensorstore as ts

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import CKPTBEAM_EXPORT, LAST_CPU, ckptbeam_convert, compare_hf_dirs, timed_with_load  # noqa: E402
from make_llama_checkpoint import make_benchmark_model  # noqa: E402

# The TensorStore floor, run as `python -c TS_FLOOR ITEMS_DIR OUT_FILE`.
TS_FLOOR = """\
import concurrent.futures, os, sys
import numpy as np, tensorstore as ts
items, out = sys.argv[1], sys.argv[2]
ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
kv = {"driver": "ocdbt", "base": "file://" + items.rstrip("/") + "/"}
keys = ts.KvStore.open(kv, context=ctx).result().list().result()
names = [k[: -len("/zarr.json")].decode() for k in keys if k.endswith(b"/zarr.json")]
stores = [ts.open({"driver": "zarr3", "kvstore": {**kv, "path": n + "/"}}, context=ctx).result() for n in names]
offsets = np.cumsum([0] + [s.dtype.numpy_dtype.itemsize * int(np.prod(s.shape)) for s in stores])
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
def one(i):
    view = memoryview(np.ascontiguousarray(stores[i].read().result()).reshape(-1).view(np.uint8))
    pos = int(offsets[i])
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n
with concurrent.futures.ThreadPoolExecutor(2) as pool:
    list(pool.map(one, range(len(stores))))
os.close(fd)
"""


def extract_frames(items_dir: str, parts: list[str]) -> int:
    """Write the zstd frame of every chunk of the checkpoint into `parts` (concatenated frames,
    balanced by size); returns the decoded bytes. Orbax's zarr3 arrays use sharding_indexed with
    one inner chunk per shard: the shard is [frame][offset u64, nbytes u64][crc32c]."""
    kv = ts.KvStore.open({"driver": "ocdbt", "base": "file://" + items_dir.rstrip("/") + "/"}).result()
    frames, decoded = [], 0
    for key in kv.list().result():
        if b"/c/" not in key:
            continue
        name = key.split(b"/c/")[0]
        meta = json.loads(kv.read(name + b"/zarr.json").result().value)
        codecs = meta["codecs"][0]
        inner = [c["name"] for c in codecs["configuration"]["codecs"]]
        if codecs["name"] != "sharding_indexed" or inner != ["bytes", "zstd"]:
            raise SystemExit(f"{name}: unexpected codecs {codecs['name']} {inner}")
        if codecs["configuration"]["chunk_shape"] != meta["chunk_grid"]["configuration"]["chunk_shape"]:
            raise SystemExit(f"{name}: more than one inner chunk per shard")
        value = kv.read(key).result().value
        offset, nbytes = struct.unpack("<QQ", value[-20:-4])
        frames.append(value[offset : offset + nbytes])
        chunk = meta["chunk_grid"]["configuration"]["chunk_shape"]
        itemsize = {"bfloat16": 2, "float32": 4, "float16": 2}[meta["data_type"]]
        decoded += math.prod(chunk) * itemsize  # (an edge chunk decodes to the whole chunk shape)
    sizes = [0] * len(parts)
    files = [open(p, "wb") for p in parts]
    for frame in sorted(frames, key=len, reverse=True):
        i = sizes.index(min(sizes))
        files[i].write(frame)
        sizes[i] += len(frame)
    for f in files:
        f.close()
    return decoded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/ckptbeam-export")
    ap.add_argument("--extra", nargs="*", default=[], help="extra export flags, e.g. --extra=--max_item_bytes=128MiB")
    a = ap.parse_args()
    src, total, _ = make_benchmark_model(a.workdir, a.layers)
    ckpt = os.path.join(a.workdir, "ckpt")
    ckptbeam_convert(src, ckpt)
    items = os.path.join(ckpt, "0", "items")
    parts = [os.path.join(a.workdir, f"frames{i}.zst") for i in range(2)]
    decoded = extract_frames(items, parts)
    compressed = sum(os.path.getsize(p) for p in parts)
    out = os.path.join(a.workdir, "out")
    decode = " & ".join(
        f"zstd -d -q --no-sparse {shlex.quote(p)} -o {shlex.quote(os.path.join(out, f'part{i}'))}"
        for i, p in enumerate(parts)
    )
    outs = " ".join(shlex.quote(os.path.join(out, f"part{i}")) for i in range(len(parts)))
    commands = {
        "floor": [f"{decode} & wait"],
        "floor + fsync": [f"{decode} & wait; sync {outs}"],
        "TensorStore floor": [sys.executable, "-c", TS_FLOOR, items, os.path.join(out, "all")],
        "export": [*CKPTBEAM_EXPORT, "--source", ckpt, "--output", os.path.join(out, "hf"), *a.extra],
    }
    shell = {"floor": True, "floor + fsync": True}

    def run(name: str) -> tuple[float, int, float, float]:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        result = timed_with_load(commands[name], shell=shell.get(name, False))
        shutil.rmtree(out, ignore_errors=True)
        return (*result, LAST_CPU[0])

    # Warm-up (not measured); the export's output is kept once to check it against the source.
    for name in commands:
        if name != "export":
            run(name)
    os.makedirs(out)
    timed_with_load(commands["export"])
    ok, findings = compare_hf_dirs(os.path.join(out, "hf"), src, "export", "source")
    shutil.rmtree(out, ignore_errors=True)
    runs: dict[str, list[tuple[float, int, float, float]]] = {name: [] for name in commands}
    for _ in range(a.repeats):
        for name in commands:
            runs[name].append(run(name))

    mb = total / 1e6
    print(
        f"model: {a.layers} layers, {mb:.0f} MB of bf16 tensors; checkpoint chunks {compressed / 1e6:.0f} MB "
        f"compressed -> {decoded / 1e6:.0f} MB decoded; medians of {a.repeats} alternating runs after a warm-up"
    )
    print(f"export == source, tensor by tensor: {'yes' if ok else 'NO'}")
    for line in findings:
        print(f"  {line}")
    floor = statistics.median(r[0] for r in runs["floor"])
    floor_cpu = statistics.median(r[3] for r in runs["floor"])
    print(
        f"{'step':<20} {'wall s':>7} {'MB/s':>6} {'÷ floor':>8} {'CPU s':>6} {'÷ floor':>8} {'peak RSS':>9} "
        f"{'other load':>10}  runs (wall)"
    )
    for name, rs in runs.items():
        wall, cpu = statistics.median(r[0] for r in rs), statistics.median(r[3] for r in rs)
        rss = max(r[1] for r in rs)
        load = statistics.median(r[2] for r in rs)
        each = ", ".join(f"{r[0]:.2f}" for r in rs)
        print(
            f"{name:<20} {wall:>7.2f} {mb / wall:>6.0f} {wall / floor:>8.2f} {cpu:>6.2f} {cpu / floor_cpu:>8.2f} "
            f"{rss / 2**20:>7.0f} Mi {load:>9.2f}c  {each}"
        )
    print("CPU s: user + system of the command and its children; other load: mean cores busy with anything")
    print("else during the run (median over runs); on a loaded machine CPU s is the steadier figure")
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
