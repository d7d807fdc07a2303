"""A slab's inputs that sit side by side in a shard are fetched with one ranged read."""

from __future__ import annotations

import os

from conftest import FIXTURES

import model_maps
from ckpt_transforms.planning.convert_plan import build_plan
from ckpt_transforms.safetensors_io.index import load_source_model
from ckpt_transforms.storage import sources as storage
from ckpt_transforms.work_items import convert as convert_item


def _plan_and_reads(fixture: str, monkeypatch):
    source = storage.open_source(os.path.join(FIXTURES, fixture))
    model = load_source_model(source)
    plan = build_plan(model, model_maps.detect_family(model.config).build(model.config), True)
    reads: list[tuple[str, int, int]] = []
    original = storage.LocalSource.read_into

    def spy(self, name, offset, out):
        reads.append((name, offset, out.nbytes))
        return original(self, name, offset, out)

    monkeypatch.setattr(storage.LocalSource, "read_into", spy)
    return plan, source, reads


GAP = convert_item.COALESCE_GAP


def _gap(a, b) -> int:
    """Bytes between two ranges, whichever comes first in the file."""
    return max(a.offset, b.offset) - min(a.offset + a.length, b.offset + b.length)


def test_fp8_weight_and_scales_come_in_one_request(monkeypatch):
    plan, source, reads = _plan_and_reads("deepseek3_fp8", monkeypatch)
    items = [i for i in plan.items if any(s.aux for s in i.slabs)]
    assert items, "the FP8 fixture has quantized slabs"
    for item in items:
        reads.clear()
        convert_item.build_region(item, source)
        inputs = [t for s in item.slabs for t in (s.source, *s.aux)]
        adjacent_pairs = sum(
            1 for s in item.slabs for a in s.aux if a.file == s.source.file and _gap(s.source, a) <= GAP
        )
        assert len(reads) == len(inputs) - adjacent_pairs
        # Never more bytes than the inputs plus the gaps between coalesced neighbours.
        assert sum(r[2] for r in reads) <= sum(t.length for t in inputs) + adjacent_pairs * GAP


def test_read_tensors_returns_each_tensor_exactly(monkeypatch):
    plan, source, reads = _plan_and_reads("deepseek3_fp8", monkeypatch)
    slab = next(s for i in plan.items for s in i.slabs if s.aux)
    together = convert_item.read_tensors([slab.source, *slab.aux], source)
    alone = [convert_item.read_tensors([t], source)[0] for t in (slab.source, *slab.aux)]
    for a, b in zip(together, alone, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_zero_length_tensor_needs_no_read():
    from ckpt_transforms.safetensors_io.index import TensorInfo

    class NoReads:
        uri = "none://"

        def read_range(self, *args):
            raise AssertionError("nothing should be read")

    (empty,) = convert_item.read_tensors([TensorInfo("e", "f.safetensors", "BF16", (0, 4), 8, 0)], NoReads())
    assert empty.shape == (0, 4)
