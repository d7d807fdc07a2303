"""Every fixture x scan/unscan x save dtype: convert, restore with orbax, compare every leaf."""

from __future__ import annotations

import json
import os

import pytest
from conftest import FIXTURE_NAMES, FIXTURES, UNSCANNED_ONLY, assert_bitwise_equal, convert, restore_leaves
from reference import expected_leaves


@pytest.mark.parametrize("save_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unscan"])
@pytest.mark.parametrize("fixture", FIXTURE_NAMES)
def test_fixture_converts_to_expected_leaves(fixture, scan, save_dtype, out_dir):
    source = os.path.join(FIXTURES, fixture)
    if scan and fixture in UNSCANNED_ONLY:  # MaxText has no scanned form of these layers either
        with pytest.raises(ValueError, match="no scanned form"):
            convert(source, out_dir, "--scan_layers=true", f"--save_dtype={save_dtype}")
        assert not os.path.exists(os.path.join(out_dir, "0"))
        return
    convert(source, out_dir, f"--scan_layers={str(scan).lower()}", f"--save_dtype={save_dtype}")

    restored = restore_leaves(out_dir)
    expected = expected_leaves(source, scan, save_dtype)
    assert restored.pop("step") == 0
    assert sorted(restored) == sorted(expected)
    for name, value in expected.items():
        assert_bitwise_equal(restored[name], value, name)

    with open(os.path.join(out_dir, "0", "_CHECKPOINT_METADATA")) as f:
        assert json.load(f)["custom_metadata"] == {"scan_layers": scan}
    for marker in ("0/commit_success.txt", "0/items/commit_success.txt"):
        assert os.path.isfile(os.path.join(out_dir, marker))


def test_maxtext_style_restore_with_checkpoint_manager(out_dir):
    """MaxText loads with a CheckpointManager over OUT (step 0, item 'items')."""
    import orbax.checkpoint as ocp

    source = os.path.join(FIXTURES, "qwen3_bf16_tied")
    convert(source, out_dir)
    manager = ocp.CheckpointManager(
        out_dir,
        item_names=("items",),
        item_handlers={"items": ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True)},
    )
    assert manager.all_steps() == [0]
    restored = manager.restore(0, args=ocp.args.Composite(items=ocp.args.PyTreeRestore()))["items"]
    expected = expected_leaves(source, True)
    emb = restored["params"]["params"]["token_embedder"]["embedding"]
    assert_bitwise_equal(emb, expected["params.params.token_embedder.embedding"], "embedding")
    assert "logits_dense" not in restored["params"]["params"]["decoder"]  # tied embeddings
