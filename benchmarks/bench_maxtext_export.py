"""ckptbeam export vs MaxText's to_huggingface on the same Orbax checkpoints, in one run.

    bash benchmarks/setup_maxtext_peer.sh            # once: MaxText in its own virtualenv (never a dependency)
    python benchmarks/bench_maxtext_export.py [--sizes 14 56 112] [--workdir /tmp/ckptbeam-export-vs-maxtext]
        [--peer_python ...] [--maxtext_src ...] [--keep]

For each size (a layer count of a Qwen3-0.6B-shaped model, as in bench_maxtext.py: 56 layers are
2.07 GB of bf16 weights, 112 are 3.7 GB; disk ~3.6x the model, MaxText's RAM ~2x the model) this
writes the random-weight HF checkpoint, converts it once with `ckptbeam convert` (untimed; its
leaves are byte-equal to MaxText's to_maxtext output, see bench_maxtext.py), deletes the HF
weights, then exports the checkpoint twice, each under `/usr/bin/time -v`:

- MaxText: `python -m maxtext.checkpoint_conversion.to_huggingface model_name=qwen3-0.6b
  load_parameters_path=CKPT/0/items base_output_directory=OUT scan_layers=True
  weight_dtype=bfloat16 ...` from the peer venv (one CPU device, as the module forces), through
  the wrapper in common.py: it sets the layer count in MaxText's HF config table
  (`override_model_config=true base_num_decoder_layers=N` on MaxText's side) and makes
  `AutoTokenizer.from_pretrained` return None, because the Qwen3 tokenizer files are neither
  on this machine nor reachable (HF_HUB_OFFLINE=1); MaxText then writes no tokenizer files.
  Nothing else changes: the restore, hooks, sharding and save_file are MaxText's.
- ckptbeam: `python -m pipelines.cli export --source CKPT --output OUT --weight_dtype bfloat16`.

The page cache is synced before each timed run. Then both outputs are compared tensor by tensor
(names, dtypes, shapes, bytes) and file by file (shard names, header bytes, side files). Prints
wall seconds, peak RSS and ckptbeam/MaxText ratios per size. Goal: wall ratio <= 0.5, peak-RSS
ratio <= 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (  # noqa: E402
    CKPTBEAM_EXPORT,
    MAXTEXT_SRC,
    MODEL_NAME,
    PEER_PYTHON,
    check_peer,
    ckptbeam_convert,
    compare_hf_dirs,
    make_qwen3_checkpoint,
    maxtext_command,
    maxtext_commit,
    maxtext_elapsed,
    print_peer_table,
    timed_with_load,
)

TO_HUGGINGFACE = "maxtext.checkpoint_conversion.to_huggingface"


def config_diff(a_dir: str, b_dir: str) -> str:
    """Keys whose values differ between two config.json files (a short summary)."""
    with open(os.path.join(a_dir, "config.json")) as f:
        a = json.load(f)
    with open(os.path.join(b_dir, "config.json")) as f:
        b = json.load(f)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return ", ".join(f"{k}: {a.get(k, '<absent>')!r} vs {b.get(k, '<absent>')!r}" for k in keys) or "equal"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[14, 56, 112], help="decoder layer counts")
    ap.add_argument("--peer_python", default=PEER_PYTHON)
    ap.add_argument("--maxtext_src", default=MAXTEXT_SRC, help="MaxText source tree (has src/maxtext)")
    ap.add_argument("--workdir", default="/tmp/ckptbeam-export-vs-maxtext")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints, outputs and logs")
    a = ap.parse_args()
    check_peer(a.peer_python, a.maxtext_src)
    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    print(f"MaxText {MODEL_NAME} from {a.maxtext_src} (commit {maxtext_commit(a.maxtext_src)}), peer {a.peer_python}")
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} cores", flush=True)

    rows = []
    for layers in sorted(a.sizes):
        d = os.path.join(a.workdir, f"L{layers}")
        src, ckpt = os.path.join(d, "hf"), os.path.join(d, "ckpt")
        total = make_qwen3_checkpoint(src, layers)
        ckptbeam_convert(src, ckpt)
        shutil.rmtree(src)  # the checkpoint keeps config.json (ckptbeam_hf/); the weights are not needed
        mt_out, cb_out, mt_log = os.path.join(d, "maxtext"), os.path.join(d, "ckptbeam"), os.path.join(d, "maxtext.log")
        args = [
            f"load_parameters_path={os.path.join(ckpt, '0', 'items')}",
            f"base_output_directory={mt_out}",
            "weight_dtype=bfloat16",
        ]
        os.sync()
        try:
            mt_cmd = maxtext_command(a.peer_python, a.maxtext_src, TO_HUGGINGFACE, args, layers, mt_log, True)
            mt_wall, mt_rss, mt_other = timed_with_load([mt_cmd], shell=True)
        except SystemExit:
            with open(mt_log, errors="replace") as f:
                sys.stderr.write(f.read()[-4000:])
            raise
        own_s = maxtext_elapsed(mt_log)
        os.sync()
        cb_cmd = [*CKPTBEAM_EXPORT, "--source", ckpt, "--output", cb_out, "--weight_dtype", "bfloat16"]
        cb_wall, cb_rss, cb_other = timed_with_load(cb_cmd)
        ok, findings = compare_hf_dirs(cb_out, mt_out, "ckptbeam", "MaxText")
        print(f"  compare {layers} layers: {'all tensors equal' if ok else 'DIFFERENCES'}")
        for line in findings:
            print(f"    {line}")
        print(f"    config.json (ckptbeam vs MaxText): {config_diff(cb_out, mt_out)}")
        rows.append((layers, total, mt_wall, mt_rss, cb_wall, cb_rss, "yes" if ok else "NO", mt_other, cb_other))
        print(
            f"  {layers} layers ({total / 1e9:.2f} GB): MaxText {mt_wall:.1f} s {mt_rss / 2**20:.0f} MiB "
            f"(its own 'Overall Elapse', after imports: {own_s}), ckptbeam {cb_wall:.1f} s {cb_rss / 2**20:.0f} MiB",
            flush=True,
        )
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)

    print_peer_table(rows, "same tensors", "wall ratio <= 0.5, RSS ratio <= 0.25")
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
