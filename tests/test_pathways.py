"""Pathways layout (`--use_ocdbt=false --use_zarr3=false`) and the two mixed layouts.

What Orbax 0.12.8 writes without OCDBT (PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)):
one directory per param, `items/<param>/.zarray` (zarr2, zstd level 1) plus chunk files named
`0.0`, ...; the `step` scalar as `step/.zarray` + `step/0`. Each test restores with orbax (which reads
the `_METADATA` flags) and compares with the independent numpy reference; the layout tests save the
same tree with Orbax itself and require the same files and bytes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import FIXTURES, UNSCANNED_ONLY, assert_matches_reference, convert, restore_leaves
from test_pipeline import FailsOnceAfterWriting, ZombieWriter

from ckpt_transforms.orbax_io import writer as orbax_writer
from ckpt_transforms.planning.convert_plan import ArrayPlan, WorkItem

PATHWAYS = ("--use_ocdbt=false", "--use_zarr3=false")
SHARDED = os.path.join(FIXTURES, "llama_f32_sharded")
SINGLE = os.path.join(FIXTURES, "llama_bf16")


def _items(out_dir: str) -> str:
    return os.path.join(out_dir, "0", "items")


def _files(directory: str) -> list[str]:
    found = []
    for root, _, files in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, f), directory) for f in files]
    return sorted(found)


def _metadata(out_dir: str) -> dict:
    with open(os.path.join(_items(out_dir), "_METADATA"), encoding="utf-8") as f:
        return json.load(f)


def _assert_plain_layout(out_dir: str) -> None:
    """No OCDBT and no attempt directories: only param directories, `step` and Orbax's files."""
    entries = os.listdir(_items(out_dir))
    assert not [e for e in entries if e.startswith((orbax_writer.PROCESS_PREFIX, orbax_writer.ATTEMPT_PREFIX))]
    assert not {"manifest.ocdbt", "d"} & set(entries)
    assert {"_METADATA", "commit_success.txt", "step"} <= set(entries)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize("fixture", ["llama_bf16", "qwen3_moe_bf16", "gemma2_f32", "deepseek3_bf16"])
def test_pathways_conversion_restores_bit_exact(fixture, scan, out_dir):
    if scan and fixture in UNSCANNED_ONLY:
        pytest.skip("unscanned only")
    model = os.path.join(FIXTURES, fixture)
    convert(model, out_dir, *PATHWAYS, f"--scan_layers={str(scan).lower()}", "--max_item_bytes=40000")
    assert_matches_reference(out_dir, model, scan)
    _assert_plain_layout(out_dir)
    meta = _metadata(out_dir)
    assert (meta["use_ocdbt"], meta["use_zarr3"]) == (False, False)


@pytest.mark.parametrize("use_ocdbt, use_zarr3", [(False, True), (True, False)])
def test_mixed_layouts_restore_bit_exact(use_ocdbt, use_zarr3, out_dir):
    convert(
        SHARDED,
        out_dir,
        f"--use_ocdbt={str(use_ocdbt).lower()}",
        f"--use_zarr3={str(use_zarr3).lower()}",
        "--max_item_bytes=20000",  # layer- and row-split items: many chunks per param
    )
    assert_matches_reference(out_dir, SHARDED)
    meta = _metadata(out_dir)
    assert (meta["use_ocdbt"], meta["use_zarr3"]) == (use_ocdbt, use_zarr3)
    entries = os.listdir(_items(out_dir))
    assert ("manifest.ocdbt" in entries) == use_ocdbt
    assert not [e for e in entries if e.startswith(orbax_writer.ATTEMPT_PREFIX)]
    if not use_ocdbt:
        assert os.path.isfile(os.path.join(_items(out_dir), "step", "zarr.json"))
        assert os.path.isfile(os.path.join(_items(out_dir), "step", "c"))


def _save_with_orbax(leaves: dict[str, np.ndarray], paths: dict[str, tuple[str, ...]], dest: str, use_zarr3: bool):
    import orbax.checkpoint as ocp

    tree: dict = {"step": np.int64(0), "params": {}, "opt_state": {}}
    for name, value in leaves.items():
        node = tree
        *parents, last = paths[name]
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=use_zarr3)
    ocp.Checkpointer(handler).save(dest, tree)


@pytest.mark.parametrize("use_zarr3", [False, True], ids=["zarr2", "zarr3"])
def test_layout_is_what_orbax_writes(use_zarr3, out_dir, tmp_path):
    """Same tree saved by Orbax without OCDBT: same files, same metadata bytes, same chunk bytes."""
    from pipelines.convert import make_plan
    from pipelines.options import ConvertOptions

    convert(SINGLE, out_dir, "--use_ocdbt=false", f"--use_zarr3={str(use_zarr3).lower()}")
    plan, _ = make_plan(ConvertOptions(["--source", SINGLE]))
    assert all(a.chunk_shape == a.shape for a in plan.arrays)  # Orbax's chunking of numpy leaves
    leaves = restore_leaves(out_dir)
    leaves.pop("step")
    ref = str(tmp_path / "orbax" / "items")
    _save_with_orbax(leaves, {a.name: a.path for a in plan.arrays}, ref, use_zarr3)

    orbax_only = {"_CHECKPOINT_METADATA"}  # a bare Checkpointer puts it in items/, MaxText's manager in 0/
    ours, theirs = _files(_items(out_dir)), [f for f in _files(ref) if f not in orbax_only]
    assert ours == theirs
    meta_file = "zarr.json" if use_zarr3 else ".zarray"
    assert f"step/{'c' if use_zarr3 else '0'}" in ours
    for rel in ours:
        if rel == "_METADATA":
            assert _metadata(out_dir) == json.load(open(os.path.join(ref, rel), encoding="utf-8"))
        elif rel != "commit_success.txt":
            with open(os.path.join(_items(out_dir), rel), "rb") as a, open(os.path.join(ref, rel), "rb") as b:
                assert a.read() == b.read(), rel  # .zarray / zarr.json and every chunk file
    assert any(rel.endswith(meta_file) for rel in ours)


def test_split_chunks_have_orbax_metadata(out_dir, tmp_path):
    """With chunks smaller than the array (what sharded jax arrays give Orbax), `.zarray` is what
    Orbax's own ArrayWriteSpec produces for that chunk (write) shape."""
    import tensorstore as ts
    from orbax.checkpoint._src.serialization.tensorstore_utils import ArrayWriteSpec

    from pipelines.convert import make_plan
    from pipelines.options import ConvertOptions

    convert(SHARDED, out_dir, *PATHWAYS, "--max_item_bytes=20000")
    plan, _ = make_plan(ConvertOptions(["--source", SHARDED, "--max_item_bytes=20000"]))
    split = [a for a in plan.arrays if a.chunk_shape != a.shape]
    assert split
    for a in split:
        spec = ArrayWriteSpec(
            str(tmp_path),
            a.name,
            global_shape=a.shape,
            write_shape=a.chunk_shape,
            dtype=np.dtype(a.dtype),
            use_zarr3=False,
            use_ocdbt=False,
        )
        ts.open(spec.json, create=True, open=True).result()
        with open(os.path.join(tmp_path, a.name, ".zarray"), "rb") as x:
            with open(os.path.join(_items(out_dir), a.name, ".zarray"), "rb") as y:
                assert x.read() == y.read(), a.name
        expected = orbax_writer.chunk_keys(a.shape, a.chunk_shape, use_zarr3=False)
        assert sorted(os.listdir(os.path.join(_items(out_dir), a.name))) == sorted([".zarray", *expected])
    # `ckptbeam inspect` reads the layout from _METADATA
    from ckpt_transforms.orbax_io.inspect import inspect_checkpoint

    leaves, _ = inspect_checkpoint(out_dir)
    chunks = {leaf.name: leaf.chunk_shape for leaf in leaves}
    assert chunks == {"step": (), **{a.name: a.chunk_shape for a in plan.arrays}}


@pytest.mark.parametrize("fn", [FailsOnceAfterWriting, ZombieWriter], ids=["retried", "zombie"])
def test_unnamed_attempts_leave_no_trace(fn, out_dir, tmp_path):
    clean = str(tmp_path / "clean")
    convert(SHARDED, clean, *PATHWAYS, "--max_item_bytes=20000")
    summary = convert(SHARDED, out_dir, *PATHWAYS, "--max_item_bytes=20000", convert_fn=fn)
    if fn is FailsOnceAfterWriting:
        assert summary["metrics"]["item_retries"] == summary["work_items"]
    assert_matches_reference(out_dir, SHARDED)
    _assert_plain_layout(out_dir)
    assert _files(_items(out_dir)) == _files(_items(clean))


def test_stitch_is_idempotent_and_refuses_missing_chunks(tmp_path):
    """A retried stitch finishes what a failed one started; a chunk no named attempt wrote fails it."""
    import ml_dtypes

    layout = orbax_writer.Layout(use_ocdbt=False, use_zarr3=False)
    array = ArrayPlan("p.w", ("params", "w"), (4, 6), "bfloat16", (2, 6))
    items = str(tmp_path / "items")
    os.makedirs(items)
    for i in range(2):
        item = WorkItem(i, "p.w", ((2 * i, 2 * i + 2), (0, 6)), (), (), "bfloat16")
        data = np.full((2, 6), i + 1, ml_dtypes.bfloat16)
        orbax_writer.write_regions(items, f"a{i}", [(array, item, data)], layout)
    orbax_writer.write_regions(items, "stray", [(array, item, np.zeros((2, 6), ml_dtypes.bfloat16))], layout)
    first = orbax_writer.stitch(items, ["a0", "a1"], [array], layout)
    assert first["removed_leftovers"] == [orbax_writer.ATTEMPT_PREFIX + "stray"]
    files = _files(items)
    assert files == ["_METADATA", "p.w/.zarray", "p.w/0.0", "p.w/1.0", "step/.zarray", "step/0"]
    orbax_writer.stitch(items, ["a0", "a1"], [array], layout)  # e.g. Beam retrying the stitch bundle
    assert _files(items) == files

    os.remove(os.path.join(items, "p.w", "1.0"))
    with pytest.raises(RuntimeError, match=r"p.w: 1 chunk file\(s\) missing after the stitch, e.g. 1.0"):
        orbax_writer.stitch(items, ["a0"], [array], layout)


def test_layout_is_recorded_only_when_not_default(out_dir, tmp_path):
    convert(SINGLE, out_dir, *PATHWAYS)
    with open(os.path.join(out_dir, "0", "ckptbeam_provenance.json"), encoding="utf-8") as f:
        options = json.load(f)["options"]
    assert options["use_ocdbt"] is False and options["use_zarr3"] is False
    default = str(tmp_path / "default")
    convert(SINGLE, default)
    with open(os.path.join(default, "0", "ckptbeam_provenance.json"), encoding="utf-8") as f:
        options = json.load(f)["options"]
    assert "use_ocdbt" not in options and "use_zarr3" not in options
    # a different layout is a different conversion: not "up to date"
    summary = convert(SINGLE, default, *PATHWAYS)
    assert not summary.get("up_to_date")
    _assert_plain_layout(default)
