"""Checkpoints written by Orbax itself export exactly like ours.

A subprocess with 4 simulated devices re-saves a converted checkpoint with real orbax-checkpoint
as MaxText's own writers would: a Linen *training* checkpoint (jax arrays sharded MaxText's way,
small chunks, an `opt_state` beside the params, step 7, no scan_layers recorded), and an NNX
checkpoint (every leaf wrapped as `{value: array}`). Exporting either must give the same bytes as
exporting the original checkpoint (whose output is checked against the independent oracle in
test_export.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import FIXTURES, convert

from ckpt_transforms.orbax_io.reader import load_checkpoint
from pipelines.export import run

RESAVE = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    src, base, mode = sys.argv[1:4]
    params = ocp.PyTreeCheckpointer().restore(src)["params"]["params"]
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("d",))

    def put(x):  # MaxText's shard_jax_weights rule
        n = len(devices)
        spec = P("d") if x.shape and x.shape[0] % n == 0 else P(None, "d") if x.ndim > 1 and x.shape[1] % n == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    jparams = jax.tree.map(put, params)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)
    if mode == "training":
        tree = {"params": {"params": jparams}, "opt_state": {"mu": jax.tree.map(lambda x: x * 0, jparams)}, "step": 7}
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=2048), tree)
        mgr = ocp.CheckpointManager(base, item_names=("items",), item_handlers={"items": handler})
        mgr.save(7, args=ocp.args.Composite(items=ocp.args.PyTreeSave(tree, save_args=save_args)))
        mgr.wait_until_finished()
    else:
        tree = jax.tree.map(lambda x: {"value": x}, jparams)
        ocp.Checkpointer(handler).save(base + "/0/items", args=ocp.args.PyTreeSave(tree))
    """
)


def _resave(src_items: str, base: str, mode: str) -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", RESAVE, src_items, base, mode], env=env, check=True, timeout=300)


def _files(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith((".safetensors", ".index.json")):
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
    return out


@pytest.mark.parametrize("fixture,scan", [("llama_bf16", True), ("qwen3_moe_bf16", True), ("qwen3_moe_bf16", False)])
@pytest.mark.parametrize("mode", ["training", "nnx"])
def test_orbax_written_checkpoints_export_like_ours(fixture, scan, mode, tmp_path):
    source = os.path.join(FIXTURES, fixture)
    ours = str(tmp_path / "ours")
    convert(source, ours, f"--scan_layers={str(scan).lower()}")
    run(["--source", ours, "--output", str(tmp_path / "hf_ours")])

    theirs = str(tmp_path / "theirs")
    _resave(os.path.join(ours, "0", "items"), theirs, mode)
    # A small budget: items then follow the small chunks of the training checkpoint.
    summary = run(
        ["--source", theirs, "--output", str(tmp_path / "hf_theirs"), f"--hf_config={source}", "--max_item_bytes=16KiB"]
    )
    assert summary["scan_layers"] is scan
    if mode == "training":
        leaves = load_checkpoint(theirs).leaves.values()
        assert any(leaf.chunk_shape != leaf.shape for leaf in leaves)
    assert _files(str(tmp_path / "hf_theirs")) == _files(str(tmp_path / "hf_ours"))
