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
import json
import os
import re
import resource
import shlex
import shutil
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from common import CKPTBEAM, timed  # noqa: E402

MODEL_NAME = "qwen3-0.6b"
REAL_LAYERS = 28
HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 3072, 16, 8, 128, 151936

# Run by the peer interpreter when the layer count differs from the real model's: MaxText's Qwen
# param mapping reads num_hidden_layers from HF_MODEL_CONFIGS, so set it, then run to_maxtext as is.
WRAPPER = """\
import runpy, sys
layers = int(sys.argv.pop(1))
from maxtext.checkpoint_conversion.utils.hf_model_configs import HF_MODEL_CONFIGS
HF_MODEL_CONFIGS[{model!r}].num_hidden_layers = layers
runpy.run_module("maxtext.checkpoint_conversion.to_maxtext", run_name="__main__", alter_sys=True)
"""


def qwen3_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Qwen3ForCausalLM tensor names and shapes (tied embeddings: no lm_head.weight)."""
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (p + "self_attn.q_norm.weight", (HEAD_DIM,)),
            (p + "self_attn.k_norm.weight", (HEAD_DIM,)),
            (p + "mlp.gate_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, MLP)),
        ]
    return tensors


def make_qwen3_checkpoint(out: str, layers: int, seed: int = 0) -> int:
    """Write config.json + one model.safetensors of random bf16 weights, streamed tensor by tensor."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = qwen3_tensors(layers)
    header, offset = {}, 0
    for key, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape in tensors:
            rows_per_block = max(1, (1 << 24) // int(np.prod(shape[1:], dtype=np.int64)))
            for start in range(0, shape[0], rows_per_block):
                block = (min(rows_per_block, shape[0] - start), *shape[1:])
                w = rng.standard_normal(block, dtype=np.float32) * 0.02
                f.write(w.astype(ml_dtypes.bfloat16).tobytes())
    config = {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16", "head_dim": HEAD_DIM,
        "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": MLP,
        "max_position_embeddings": 40960, "max_window_layers": layers, "model_type": "qwen3",
        "num_attention_heads": HEADS, "num_hidden_layers": layers, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
    }  # fmt: skip
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return offset


def maxtext_command(peer_python: str, maxtext_src: str, src: str, out: str, layers: int, log: str) -> str:
    """The to_maxtext command line (a shell string: its output goes to `log`, /usr/bin/time's to us)."""
    env = {
        "PYTHONPATH": os.path.join(maxtext_src, "src"),  # run exactly this source tree
        "DECOUPLE_GCLOUD": "TRUE",  # no Google Cloud SDK in the peer venv (decoupled requirements)
        "HF_HUB_OFFLINE": "1",  # the Hub is unreachable here; the checkpoint is a local directory
        "JAX_PLATFORMS": "cpu",
    }
    args = [
        f"model_name={MODEL_NAME}",
        f"base_output_directory={out}",
        "scan_layers=True",
        "use_multimodal=false",
        "hardware=cpu",
        "skip_jax_distributed_system=true",
        f"--hf_model_path={src}",
        "--lazy_load_tensors=true",
        "--simulated_cpu_devices_count=1",
        "--save_dtype=bfloat16",
    ]
    if layers == REAL_LAYERS:
        prog = ["-m", "maxtext.checkpoint_conversion.to_maxtext"]
    else:
        prog = ["-c", WRAPPER.format(model=MODEL_NAME), str(layers)]
        args += ["override_model_config=true", f"base_num_decoder_layers={layers}"]
    words = ["exec", "env", *(f"{k}={v}" for k, v in env.items()), peer_python, *prog, *args]
    return " ".join(shlex.quote(w) for w in words) + f" > {shlex.quote(log)} 2>&1"


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


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed_with_load(cmd: list[str], shell: bool = False) -> tuple[float, int, float]:
    """`timed`, plus the other load during the run: cores kept busy by anything but this command."""
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_busy = _busy_seconds()
    wall, rss = timed(cmd, shell=shell)
    busy = _busy_seconds() - before_busy
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (after_children.ru_utime + after_children.ru_stime) - (before_children.ru_utime + before_children.ru_stime)
    return wall, rss, max(0.0, busy - ours) / wall


def maxtext_commit(path: str) -> str:
    """The source tree's commit: from git, or from the .maxtext_commit that setup writes into an export."""
    try:
        cmd = ["git", "-C", path, "rev-parse", "--short", "HEAD"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open(os.path.join(path, ".maxtext_commit")) as f:
            return f.read().strip()[:9]
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[14, 28, 56, 112, 224], help="decoder layer counts")
    ap.add_argument("--peer_python", default="/tmp/maxtext-peer-venv/bin/python")
    ap.add_argument("--maxtext_src", default="/tmp/maxtext-src", help="MaxText source tree (has src/maxtext)")
    ap.add_argument("--workdir", default="/tmp/ckptbeam-vs-maxtext")
    ap.add_argument("--no_verify", action="store_true", help="skip the leaf-by-leaf comparison")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and logs")
    a = ap.parse_args()
    if not os.path.isfile(os.path.join(a.maxtext_src, "src", "maxtext", "checkpoint_conversion", "to_maxtext.py")):
        raise SystemExit(f"no MaxText source at {a.maxtext_src}; run benchmarks/setup_maxtext_peer.sh")
    if not os.access(a.peer_python, os.X_OK):
        raise SystemExit(f"no peer interpreter {a.peer_python}; run benchmarks/setup_maxtext_peer.sh")
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
            mt_cmd = maxtext_command(a.peer_python, a.maxtext_src, src, mt_out, layers, mt_log)
            mt_wall, mt_rss, mt_other = timed_with_load([mt_cmd], shell=True)
        except SystemExit:
            with open(mt_log, errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            raise
        with open(mt_log, errors="replace") as f:
            own = re.search(r"Overall Elapse: ([0-9.]+) min", f.read())
        own_s = f"{float(own.group(1)) * 60:.0f} s" if own else "?"
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

    print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")
    print()
    head = (
        f"{'layers':>6} {'model GB':>8} | {'MaxText s':>9} {'RSS MiB':>8} | {'ckptbeam s':>10} {'RSS MiB':>8} | "
        f"{'wall ratio':>10} {'RSS ratio':>9} | same values | other load (cores) MaxText/ckptbeam"
    )
    print(head)
    print("-" * len(head))
    for layers, total, mt_wall, mt_rss, cb_wall, cb_rss, same, mt_other, cb_other in rows:
        print(
            f"{layers:>6} {total / 1e9:>8.2f} | {mt_wall:>9.1f} {mt_rss / 2**20:>8.0f} | {cb_wall:>10.1f} "
            f"{cb_rss / 2**20:>8.0f} | {cb_wall / mt_wall:>10.2f} {cb_rss / mt_rss:>9.2f} | {same:<11} | "
            f"{mt_other:.2f} / {cb_other:.2f}"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"peak RSS growth {first[0]} -> {last[0]} layers (model {last[1] / first[1]:.1f}x): "
            f"MaxText {last[3] / first[3]:.2f}x (+{(last[3] - first[3]) / 2**20:.0f} MiB), "
            f"ckptbeam {last[5] / first[5]:.2f}x (+{(last[5] - first[5]) / 2**20:.0f} MiB)"
        )
    print("ratios are ckptbeam / MaxText; goal: wall ratio <= 1, RSS ratio < 0.5, ckptbeam's RSS flat")
    print(f"other load: mean cores busy with anything else during each timed run ({os.cpu_count()} cores here)")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
