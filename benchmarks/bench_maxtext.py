"""ckptbeam vs MaxText's own converter (to_maxtext) on the same Qwen3-0.6B-shaped checkpoints, in one run.

    bash benchmarks/setup_maxtext_peer.sh            # once: MaxText in its own virtualenv (never a dependency)
    python benchmarks/bench_maxtext.py [--sizes 14 28 56 112 224] [--workdir /tmp/ckptbeam-vs-maxtext]
        [--peer_python /tmp/maxtext-peer-venv/bin/python] [--maxtext_src /tmp/maxtext-src] [--keep]

For each size (a layer count; 28 is the real Qwen3-0.6B, 1.19 GB of bf16 weights; 224 is 7.4 GB,
so plan on ~25 GB of disk under --workdir, ~8 GB of RAM for MaxText, ~10 minutes) this writes a
random-weight checkpoint with Qwen3-0.6B's real HF tensor names and config.json (width fixed:
hidden 1024, 16 heads, 8 kv heads, head_dim 128, mlp 3072, vocab 151936, tied embeddings; one
`model.safetensors` as on the Hub), then converts it twice, each under `/usr/bin/time -v`:

- MaxText: `python -m maxtext.checkpoint_conversion.to_maxtext model_name=qwen3-0.6b ...` from the
  peer virtualenv, reading the local directory (`--hf_model_path`, lazy safetensors loading, its
  default), `--simulated_cpu_devices_count=1`, `--save_dtype=bfloat16`, `scan_layers=True`,
  OCDBT + zarr3 (its defaults). For a layer count other than 28 the model config is overridden
  with `override_model_config=true base_num_decoder_layers=N`; MaxText's Qwen param mapping takes
  its layer count from its own built-in HF config table (`HF_MODEL_CONFIGS`, not from the
  checkpoint), so a tiny wrapper sets that table entry's `num_hidden_layers` to N and then runs
  the unmodified `to_maxtext` module as `__main__` (nothing else is changed).
- ckptbeam: `python -m pipelines.cli convert --source SRC --output OUT`, default options.

The page cache is synced before each timed run; both read a source that is still cached.
Then it checks the two checkpoints hold the same leaves (names, shapes, dtypes) with the same
bytes (every leaf, read with TensorStore as Orbax does), and prints wall seconds, peak RSS and
the ratios ckptbeam/MaxText per size, and each side's peak-RSS growth from the smallest size to
the largest. Goal: wall ratio <= 1, RSS ratio < 0.5, ckptbeam's RSS flat while MaxText's grows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from common import (  # noqa: E402
    CKPTBEAM,
    MAXTEXT_SRC,
    MODEL_NAME,
    PEER_PYTHON,
    check_peer,
    make_qwen3_checkpoint,
    maxtext_command,
    maxtext_commit,
    maxtext_elapsed,
    print_peer_table,
    timed_with_load,
)

TO_MAXTEXT = "maxtext.checkpoint_conversion.to_maxtext"


def compare_checkpoints(ours: str, theirs: str) -> tuple[bool, str]:
    """Same leaf names, shapes and dtypes, and the same bytes in every leaf."""
    from ckpt_transforms.orbax_io.inspect import inspect_checkpoint
    from ckpt_transforms.orbax_io.reader import open_leaf, resolve_items_dir

    a_leaves, _ = inspect_checkpoint(ours)
    b_leaves, _ = inspect_checkpoint(theirs)
    a = {leaf.name: leaf for leaf in a_leaves}
    b = {leaf.name: leaf for leaf in b_leaves}
    if set(a) != set(b):
        return (
            False,
            f"leaf names differ: only ckptbeam {sorted(set(a) - set(b))}, only MaxText {sorted(set(b) - set(a))}",
        )
    a_dir, b_dir = resolve_items_dir(ours), resolve_items_dir(theirs)
    for name in sorted(a):
        if (a[name].shape, a[name].dtype) != (b[name].shape, b[name].dtype):
            return False, f"{name}: {a[name].shape} {a[name].dtype} vs MaxText {b[name].shape} {b[name].dtype}"
        x = open_leaf(a_dir, name, True, True).read().result()
        y = open_leaf(b_dir, name, True, True).read().result()
        if x.tobytes() != y.tobytes():
            return False, f"{name}: values differ"
    return True, f"{len(a)} leaves, all bytes equal"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[14, 28, 56, 112, 224], help="decoder layer counts")
    ap.add_argument("--peer_python", default=PEER_PYTHON)
    ap.add_argument("--maxtext_src", default=MAXTEXT_SRC, help="MaxText source tree (has src/maxtext)")
    ap.add_argument("--workdir", default="/tmp/ckptbeam-vs-maxtext")
    ap.add_argument("--no_verify", action="store_true", help="skip the leaf-by-leaf comparison")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and logs")
    a = ap.parse_args()
    check_peer(a.peer_python, a.maxtext_src)
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    print(f"MaxText {MODEL_NAME} from {a.maxtext_src} (commit {maxtext_commit(a.maxtext_src)}), peer {a.peer_python}")
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} cores", flush=True)

    rows = []
    for layers in sorted(a.sizes):
        d = os.path.join(a.workdir, f"L{layers}")
        src = os.path.join(d, "hf")
        total = make_qwen3_checkpoint(src, layers)
        mt_out, cb_out = os.path.join(d, "maxtext"), os.path.join(d, "ckptbeam")
        mt_log = os.path.join(d, "maxtext.log")
        os.sync()  # don't let writeback of the checkpoint just written land inside a timed run
        try:
            args = [f"base_output_directory={mt_out}", f"--hf_model_path={src}", "--lazy_load_tensors=true",
                    "--simulated_cpu_devices_count=1", "--save_dtype=bfloat16"]  # fmt: skip
            mt_cmd = maxtext_command(a.peer_python, a.maxtext_src, TO_MAXTEXT, args, layers, mt_log)
            mt_wall, mt_rss, mt_other = timed_with_load([mt_cmd], shell=True)
        except SystemExit:
            with open(mt_log, errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            raise
        own_s = maxtext_elapsed(mt_log)
        os.sync()
        cb_wall, cb_rss, cb_other = timed_with_load([*CKPTBEAM, "--source", src, "--output", cb_out])
        same = "skipped"
        if not a.no_verify:
            ok, detail = compare_checkpoints(cb_out, mt_out)
            same = "yes" if ok else "NO"
            print(f"  verify {layers} layers: {detail}")
        rows.append((layers, total, mt_wall, mt_rss, cb_wall, cb_rss, same, mt_other, cb_other))
        print(
            f"  {layers} layers ({total / 1e9:.2f} GB): MaxText {mt_wall:.1f} s {mt_rss / 2**20:.0f} MiB "
            f"(its own 'Overall Elapse', after imports: {own_s}), ckptbeam {cb_wall:.1f} s {cb_rss / 2**20:.0f} MiB",
            flush=True,
        )
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)

    print_peer_table(rows, "same values", "wall ratio <= 1, RSS ratio < 0.5, ckptbeam's RSS flat")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
