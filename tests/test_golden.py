"""Bit-identical to MaxText: every leaf's sha256 equals what MaxText's own converter wrote."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from conftest import GOLDEN, convert, restore_leaves

with open(os.path.join(GOLDEN, "maxtext_fingerprints.json")) as f:
    FINGERPRINTS = json.load(f)


@pytest.mark.parametrize("case", sorted(FINGERPRINTS))
def test_matches_maxtext_fingerprints(case, out_dir):
    model, mode = case.rsplit("-", 1)
    reference = FINGERPRINTS[case]
    convert(os.path.join(GOLDEN, model), out_dir, f"--scan_layers={str(reference['scan_layers']).lower()}")
    restored = restore_leaves(out_dir)
    assert sorted(restored) == sorted(reference["leaves"])
    for name, ref in reference["leaves"].items():
        value = np.array(restored[name], dtype=np.dtype(ref["dtype"]), order="C")  # keeps 0-d step 0-d
        assert list(value.shape) == ref["shape"], name
        assert str(value.dtype) == ref["dtype"], name
        assert hashlib.sha256(value.tobytes()).hexdigest() == ref["sha256"], f"{name} differs from MaxText"
