"""Shared benchmark helpers: timing a command (/usr/bin/time -v, other load), the ckptbeam CLI
commands, a Qwen3-0.6B-shaped checkpoint, and running MaxText's converters from the peer venv."""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import struct
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

CKPTBEAM = [sys.executable, "-m", "pipelines.cli", "convert"]
CKPTBEAM_EXPORT = [sys.executable, "-m", "pipelines.cli", "export"]


def timed(cmd: list[str], shell: bool = False) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, via /usr/bin/time -v."""
    full = ["/usr/bin/time", "-v", "bash", "-c", cmd[0]] if shell else ["/usr/bin/time", "-v", *cmd]
    started = time.perf_counter()
    result = subprocess.run(full, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{cmd} failed:\n{result.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return wall, rss_kb * 1024


def measured(cmd: list[str], out: str, shell: bool = False) -> tuple[float, int]:
    """Time `cmd` writing into the fresh directory `out`, then delete `out` (fresh memory on a VM
    is slow the first time it is touched, so every timed run starts from the same state)."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    wall, rss = timed(cmd, shell=shell)
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed_with_load(cmd: list[str], shell: bool = False) -> tuple[float, int, float]:
    """`timed`, plus the other load during the run: cores kept busy by anything but this command.
    (The command's own CPU seconds, user + system, are left in `LAST_CPU[0]`.)"""
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_busy = _busy_seconds()
    wall, rss = timed(cmd, shell=shell)
    busy = _busy_seconds() - before_busy
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = (after_children.ru_utime + after_children.ru_stime) - (before_children.ru_utime + before_children.ru_stime)
    LAST_CPU[0] = ours
    return wall, rss, max(0.0, busy - ours) / wall


LAST_CPU = [0.0]


# --- Qwen3-0.6B-shaped checkpoints (the MaxText comparisons) --------------------------------------

MODEL_NAME = "qwen3-0.6b"
REAL_LAYERS = 28
HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 1024, 3072, 16, 8, 128, 151936


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


# --- MaxText's converters, run from the peer venv (benchmarks/setup_maxtext_peer.sh) -------------

# Run by the peer interpreter: `-c WRAPPER MODULE LAYERS NO_TOKENIZER args...`. MaxText's Qwen
# param mapping reads num_hidden_layers from its built-in HF_MODEL_CONFIGS table (not from the
# checkpoint), so for a layer count other than the real model's (LAYERS != 0) the table entry is
# set to it. to_huggingface loads a tokenizer with AutoTokenizer.from_pretrained (the Hub, or
# --hf_model_path); the Qwen3 tokenizer files are not available offline here, so with
# NO_TOKENIZER=1 that call returns None, and MaxText's save_model_files then writes no tokenizer
# files (its `tokenizer is not None` branch). Then the unmodified module runs as __main__.
WRAPPER = """\
import runpy, sys
module, layers, no_tokenizer = sys.argv.pop(1), int(sys.argv.pop(1)), sys.argv.pop(1) == "1"
if layers:
    from maxtext.checkpoint_conversion.utils.hf_model_configs import HF_MODEL_CONFIGS
    HF_MODEL_CONFIGS[{model!r}].num_hidden_layers = layers
if no_tokenizer:
    import transformers
    transformers.AutoTokenizer.from_pretrained = staticmethod(lambda *args, **kwargs: None)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

PEER_PYTHON = "/tmp/maxtext-peer-venv/bin/python"
MAXTEXT_SRC = "/tmp/maxtext-src"


def check_peer(peer_python: str, maxtext_src: str) -> None:
    if not os.path.isfile(os.path.join(maxtext_src, "src", "maxtext", "checkpoint_conversion", "to_maxtext.py")):
        raise SystemExit(f"no MaxText source at {maxtext_src}; run benchmarks/setup_maxtext_peer.sh")
    if not os.access(peer_python, os.X_OK):
        raise SystemExit(f"no peer interpreter {peer_python}; run benchmarks/setup_maxtext_peer.sh")


def maxtext_command(
    peer_python: str, maxtext_src: str, module: str, args: list[str], layers: int, log: str, no_tokenizer: bool = False
) -> str:
    """A MaxText converter command line (a shell string: its output goes to `log`, /usr/bin/time's
    to us). `module` is e.g. maxtext.checkpoint_conversion.to_maxtext; `args` its own arguments."""
    env = {
        "PYTHONPATH": os.path.join(maxtext_src, "src"),  # run exactly this source tree
        "DECOUPLE_GCLOUD": "TRUE",  # no Google Cloud SDK in the peer venv (decoupled requirements)
        "HF_HUB_OFFLINE": "1",  # the Hub is unreachable here; checkpoints are local directories
        "JAX_PLATFORMS": "cpu",
    }
    args = [
        f"model_name={MODEL_NAME}", "scan_layers=True", "use_multimodal=false", "hardware=cpu",
        "skip_jax_distributed_system=true", *args,
    ]  # fmt: skip
    if layers == REAL_LAYERS and not no_tokenizer:
        prog = ["-m", module]
    else:
        wrapped_layers = 0 if layers == REAL_LAYERS else layers
        prog = ["-c", WRAPPER.format(model=MODEL_NAME), module, str(wrapped_layers), "1" if no_tokenizer else "0"]
    if layers != REAL_LAYERS:
        args += ["override_model_config=true", f"base_num_decoder_layers={layers}"]
    words = ["exec", "env", *(f"{k}={v}" for k, v in env.items()), peer_python, *prog, *args]
    return " ".join(shlex.quote(w) for w in words) + f" > {shlex.quote(log)} 2>&1"


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


def maxtext_elapsed(log: str) -> str:
    """MaxText's own 'Overall Elapse' (after its imports) from its log, as text."""
    with open(log, errors="replace") as f:
        own = re.search(r"Overall Elapse: ([0-9.]+) min", f.read())
    return f"{float(own.group(1)) * 60:.0f} s" if own else "?"


# --- Reading and comparing HF safetensors model directories ---------------------------------------


def ckptbeam_convert(src: str, out: str, *extra: str) -> None:
    """Convert `src` (HF) into the Orbax checkpoint `out`, untimed (the source of an export)."""
    result = subprocess.run([*CKPTBEAM, "--source", src, "--output", out, *extra], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"ckptbeam convert {src} failed:\n{result.stderr[-3000:]}")


def hf_tensors(model_dir: str) -> dict[str, tuple[str, tuple[int, ...], str, int, int]]:
    """Every tensor of a safetensors model directory: name -> (dtype, shape, file, start, end),
    start/end absolute byte offsets in the file."""
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(model_dir, name)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, t in header.items():
            a, b = t["data_offsets"]
            out[key] = (t["dtype"], tuple(t["shape"]), name, 8 + n + a, 8 + n + b)
    return out


def _read(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def _value_diff(x: bytes, y: bytes, dtype: str) -> str:
    np_dtype = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F16": np.float16}.get(dtype, np.uint8)
    a = np.frombuffer(x, np_dtype).astype(np.float32)
    b = np.frombuffer(y, np_dtype).astype(np.float32)
    bad = a != b
    return f"{int(bad.sum())} of {a.size} elements differ (max |diff| {float(np.abs(a - b).max()):.3g})"


def compare_hf_dirs(a_dir: str, b_dir: str, a_name: str, b_name: str, limit: int = 10) -> tuple[bool, list[str]]:
    """Tensor by tensor: names, dtypes, shapes, bytes. Returns (all equal, findings); findings
    also say how the files are laid out when they differ (shard names, header bytes)."""
    a, b = hf_tensors(a_dir), hf_tensors(b_dir)
    notes, diffs = [], []
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a:
        diffs.append(f"{len(only_a)} tensor(s) only in {a_name}, e.g. {only_a[:3]}")
    if only_b:
        diffs.append(f"{len(only_b)} tensor(s) only in {b_name}, e.g. {only_b[:3]}")
    equal = 0
    for key in sorted(set(a) & set(b)):
        (da, sa, fa, a0, a1), (db, sb, fb, b0, b1) = a[key], b[key]
        if (da, sa) != (db, sb):
            diffs.append(f"{key}: {da} {list(sa)} in {a_name}, {db} {list(sb)} in {b_name}")
            continue
        x, y = _read(os.path.join(a_dir, fa), a0, a1), _read(os.path.join(b_dir, fb), b0, b1)
        if x == y:
            equal += 1
        else:
            diffs.append(f"{key} ({da} {list(sa)}): {_value_diff(x, y, da)}")
    total = sum(a1 - a0 for _, _, _, a0, a1 in a.values())
    notes.append(
        f"{len(set(a) & set(b))} common tensors, {equal} byte-equal; {total / 1e9:.3f} GB of tensors in {a_name}"
    )
    files_a = sorted(f for f in os.listdir(a_dir) if f.endswith(".safetensors"))
    files_b = sorted(f for f in os.listdir(b_dir) if f.endswith(".safetensors"))
    if files_a != files_b:
        notes.append(f"shard files differ: {a_name} {files_a}, {b_name} {files_b}")
    else:
        for f in files_a:
            same_header = _read(os.path.join(a_dir, f), 0, 8 + _header_len(a_dir, f)) == _read(
                os.path.join(b_dir, f), 0, 8 + _header_len(b_dir, f)
            )
            same_size = os.path.getsize(os.path.join(a_dir, f)) == os.path.getsize(os.path.join(b_dir, f))
            notes.append(
                f"{f}: header bytes {'equal' if same_header else 'DIFFER'}, size {'equal' if same_size else 'DIFFERS'}"
            )
    others_a = sorted(f for f in os.listdir(a_dir) if not f.endswith(".safetensors"))
    others_b = sorted(f for f in os.listdir(b_dir) if not f.endswith(".safetensors"))
    notes.append(f"other files: {a_name} {others_a}; {b_name} {others_b}")
    shown = diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])
    return not diffs, shown + notes


def _header_len(model_dir: str, name: str) -> int:
    with open(os.path.join(model_dir, name), "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def print_peer_table(rows: list[tuple], same_header: str, goal: str) -> None:
    """The ckptbeam-vs-MaxText results table shared by bench_maxtext.py and bench_maxtext_export.py:
    rows of (layers, model bytes, MaxText wall, RSS, ckptbeam wall, RSS, same, other loads)."""
    print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")
    print()
    head = (
        f"{'layers':>6} {'model GB':>8} | {'MaxText s':>9} {'RSS MiB':>8} | {'ckptbeam s':>10} {'RSS MiB':>8} | "
        f"{'wall ratio':>10} {'RSS ratio':>9} | {same_header} | other load (cores) MaxText/ckptbeam"
    )
    print(head)
    print("-" * len(head))
    for layers, total, mt_wall, mt_rss, cb_wall, cb_rss, same, mt_other, cb_other in rows:
        print(
            f"{layers:>6} {total / 1e9:>8.2f} | {mt_wall:>9.1f} {mt_rss / 2**20:>8.0f} | {cb_wall:>10.1f} "
            f"{cb_rss / 2**20:>8.0f} | {cb_wall / mt_wall:>10.2f} {cb_rss / mt_rss:>9.2f} | "
            f"{same:<{len(same_header)}} | {mt_other:.2f} / {cb_other:.2f}"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"peak RSS growth {first[0]} -> {last[0]} layers (model {last[1] / first[1]:.1f}x): "
            f"MaxText {last[3] / first[3]:.2f}x (+{(last[3] - first[3]) / 2**20:.0f} MiB), "
            f"ckptbeam {last[5] / first[5]:.2f}x (+{(last[5] - first[5]) / 2**20:.0f} MiB)"
        )
    print(f"ratios are ckptbeam / MaxText; goal: {goal}")
    print(f"other load: mean cores busy with anything else during each timed run ({os.cpu_count()} cores here)")
