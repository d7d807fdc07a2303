"""`ckptbeam export` with gs:// sources and outputs against a local fake-gcs-server.

The reference is the same export done on local paths (itself compared with an independent
oracle in test_export.py): every shard must come out byte for byte the same, and every tensor
equal bit for bit. google-cloud-storage (part uploads, listing, compose) goes through the
fault-injecting proxy (STORAGE_EMULATOR_HOST), so the tests count and fail those requests;
TensorStore (checkpoint reads, small files) talks to the emulator directly.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse

import pytest
from conftest import FIXTURES, assert_bitwise_equal, convert
from gcs_emulator import FakeGcs, FaultProxy
from helpers_safetensors import read_tensors

from ckpt_transforms.safetensors_io import writer as shard_writer
from ckpt_transforms.safetensors_io.writer import GcsPartWriter, Part, ShardAssemblyError, check_tiling
from ckpt_transforms.storage import outdir
from pipelines.export_graph import DONE_DIR, EXPORT_PROVENANCE_FILE, count_done

FIXTURE = "llama_bf16"  # ~350 KiB of bf16 weights: several 100KB shards
BUCKET = "exports"
SMALL = ("--max_shard_size=100KB", "--max_item_bytes=16KiB")
# Chunked as MaxText's to_maxtext saves from several devices: a chunk is a band of the MaxText
# kernel's first axis, so an export item writes a column band of the HF tensor (many short runs).
CHUNKED = "--shard_count=4"
# Small thresholds so one export takes both paths: groups of >= 2 KiB go up as parts, shorter
# runs through scatter objects and 16 KiB segments.
DIRECT_BYTES, SEGMENT = 2048, 16384


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """Emulator + proxy, one bucket, and the fixture converted once to gs:// and locally."""
    emulator = FakeGcs()
    proxy = FaultProxy(emulator.url)
    env = {
        "STORAGE_EMULATOR_HOST": proxy.url,
        "TENSORSTORE_GCS_HTTP_URL": emulator.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
        "CKPTBEAM_REMOTE_BACKOFF_S": "0.01",
        shard_writer.DIRECT_PART_ENV: str(DIRECT_BYTES),
        shard_writer.SEGMENT_ENV: str(SEGMENT),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": emulator.url}
        )
        client.create_bucket(BUCKET)
        emulator.client, emulator.proxy = client, proxy
        source = os.path.join(FIXTURES, FIXTURE)
        emulator.ckpt = f"gs://{BUCKET}/ckpt"
        emulator.local_ckpt = str(tmp_path_factory.mktemp("ckpt") / "ckpt")
        convert(source, emulator.ckpt, CHUNKED)
        convert(source, emulator.local_ckpt, CHUNKED)
        emulator.local_hf = str(tmp_path_factory.mktemp("hf") / "hf")
        export(emulator.local_ckpt, emulator.local_hf, *SMALL)
        try:
            yield emulator
        finally:
            proxy.stop()
            emulator.stop()


@pytest.fixture
def proxy(gcs):
    """The proxy, reset; `proxy.uploads` collects the object names of the uploads it saw."""
    gcs.proxy.fault = None
    gcs.proxy.forwarded.clear()
    gcs.proxy.failed.clear()
    gcs.proxy.uploads = []

    def record(method, path, headers, body):
        name = _upload_name(method, path, body)
        if name is not None:
            gcs.proxy.uploads.append(name)
        return None

    gcs.proxy.body_fault = record
    yield gcs.proxy
    gcs.proxy.fault = gcs.proxy.body_fault = None


def _upload_name(method: str, path: str, body: bytes | None) -> str | None:
    """The object name of an upload request (multipart: in the JSON part; resumable: in the body)."""
    if method != "POST" or not path.startswith("/upload/"):
        return None
    m = re.search(rb'"name":\s*"([^"]+)"', body or b"")
    return m.group(1).decode() if m else None


def export(source: str, output: str, *args: str) -> dict:
    from pipelines.export import run

    return run(["--source", source, "--output", output, *args])


def _objects(gcs, prefix: str) -> dict[str, int]:
    """name -> generation of every object under `prefix`."""
    return {b.name: b.generation for b in gcs.client.list_blobs(BUCKET, prefix=prefix)}


def _download(gcs, prefix: str, dest) -> str:
    os.makedirs(dest, exist_ok=True)
    for name in _objects(gcs, prefix + "/"):
        gcs.client.bucket(BUCKET).blob(name).download_to_filename(os.path.join(dest, name[len(prefix) + 1 :]))
    return str(dest)


def _uploads(proxy) -> list[str]:
    """Object names of the uploads that went through the proxy (part objects)."""
    return list(proxy.uploads)


def _composes(proxy) -> list[str]:
    return [urllib.parse.unquote(p) for m, p, _ in proxy.forwarded if m == "POST" and "/compose" in p]


def _assert_same_export(local_dir: str, other_dir: str) -> None:
    """Same files; shards byte-identical; every tensor bit-equal; the provenance differs only in naming the checkpoint."""
    local_files, other_files = sorted(os.listdir(local_dir)), sorted(os.listdir(other_dir))
    assert other_files == local_files
    shards = [f for f in local_files if f.endswith(".safetensors")]
    assert len(shards) >= 3, shards
    for name in local_files:
        with open(os.path.join(local_dir, name), "rb") as a, open(os.path.join(other_dir, name), "rb") as b:
            ours, theirs = a.read(), b.read()
        if name == EXPORT_PROVENANCE_FILE:
            ours, theirs = json.loads(ours), json.loads(theirs)
            for key in ("source", "checkpoint"):  # where the checkpoint is, and its own bytes
                ours.pop(key), theirs.pop(key)
        assert theirs == ours, name
    for shard in shards:
        expected = read_tensors(os.path.join(local_dir, shard))
        actual = read_tensors(os.path.join(other_dir, shard))
        assert sorted(actual) == sorted(expected)
        for key, value in expected.items():
            assert_bitwise_equal(actual[key], value, key)


def test_gcs_source_to_local_output(gcs, proxy, tmp_path):
    out = str(tmp_path / "hf")
    summary = export(gcs.ckpt, out, *SMALL)
    assert summary["shards"] >= 3
    _assert_same_export(gcs.local_hf, out)
    assert not _uploads(proxy) and not _composes(proxy)  # a local output writes nothing to GCS


def test_gcs_to_gcs_matches_local_export_and_reruns_up_to_date(gcs, proxy, tmp_path):
    out = f"gs://{BUCKET}/hf"
    summary = export(gcs.ckpt, out, *SMALL)
    assert summary["output"] == out
    objects = _objects(gcs, "hf")
    assert not [o for o in objects if not o.startswith("hf/")], "staging prefix left behind"
    assert EXPORT_PROVENANCE_FILE in {o.split("/", 1)[1] for o in objects}
    _assert_same_export(gcs.local_hf, _download(gcs, "hf", tmp_path / "hf"))

    # Each header is a part at offset 0; every object went up once; parts are few and large.
    uploads = _uploads(proxy)
    assert all(re.search(r"\.ckptbeam-tmp-\d+/(parts|scatter)/[^/]+\.safetensors/\d{20}$", u) for u in uploads)
    parts = [u for u in uploads if "/parts/" in u]
    scatter = [u for u in uploads if "/scatter/" in u]
    composes = _composes(proxy)
    shards = [o for o in objects if o.endswith(".safetensors")]
    headers = sorted(p.rsplit("/", 2)[1] for p in parts if p.endswith("/" + "0" * 20))
    assert headers == sorted(s.split("/", 1)[1] for s in shards)
    assert len(uploads) == len(set(uploads))
    assert len(parts) > len(shards) and scatter, "both paths (direct parts, scatter + segments) taken"
    assert len(parts) <= len(shards) + summary["bytes_written"] // DIRECT_BYTES + summary["bytes_written"] // SEGMENT
    assert len(composes) == len(shards)  # fewer than 33 parts per shard: one compose each
    print(
        f"\n{len(shards)} shards, {summary['work_items']} items: {len(scatter)} scatter objects, "
        f"{len(parts)} parts, {len(composes)} compose calls"
    )

    # Same checkpoint and options: up to date, nothing written.
    proxy.forwarded.clear()
    proxy.uploads.clear()
    again = export(gcs.ckpt, out, *SMALL)
    assert again["up_to_date"] is True
    assert _objects(gcs, "hf") == objects
    assert not _uploads(proxy) and not _composes(proxy)


def test_existing_gcs_output_needs_force_and_is_replaced_whole(gcs, proxy, tmp_path):
    out = f"gs://{BUCKET}/replace"
    export(gcs.ckpt, out, "--max_shard_size=100KB", "--max_item_bytes=64KiB")
    before = _objects(gcs, "replace")
    with pytest.raises(FileExistsError, match="cannot be replaced atomically: rerun with --force"):
        export(gcs.ckpt, out, *SMALL, "--weight_dtype=float32")
    assert _objects(gcs, "replace") == before

    # Someone else's objects at OUT are never replaced without --force either.
    gcs.client.bucket(BUCKET).blob("theirs/model.safetensors").upload_from_string(b"not ours")
    with pytest.raises(FileExistsError, match="not written by ckptbeam export"):
        export(gcs.ckpt, f"gs://{BUCKET}/theirs", *SMALL)
    assert list(_objects(gcs, "theirs")) == ["theirs/model.safetensors"]

    # --force: the old export (other shard count, other dtype) goes, the new one is complete.
    export(gcs.ckpt, out, *SMALL, "--weight_dtype=float32", "--force")
    local = str(tmp_path / "local32")
    export(gcs.local_ckpt, local, *SMALL, "--weight_dtype=float32")
    _assert_same_export(local, _download(gcs, "replace", tmp_path / "replaced"))
    assert not [o for o in _objects(gcs, "replace") if "ckptbeam-tmp" in o]


def test_failing_item_publishes_nothing_and_leaves_no_parts(gcs, proxy):
    shard = "model-00002-of-00004.safetensors"

    def fault(method, path, headers, body):
        # 403 on the data of one shard (its header goes up): the items writing it fail for good.
        m = re.search(r"/(?:parts|scatter)/([^/]+)/(\d{20})$", _upload_name(method, path, body) or "")
        return 403 if m and m.group(1) == shard and int(m.group(2)) > 0 else None

    proxy.body_fault = fault
    with pytest.raises(Exception) as info:
        export(gcs.ckpt, f"gs://{BUCKET}/failed", *SMALL, "--no_resume")
    message = str(info.value)
    assert f"gs://{BUCKET}/failed.ckptbeam-tmp-" in message and "403" in message, message
    assert "export work item" in message
    assert proxy.failed
    assert _objects(gcs, "failed") == {}  # neither OUT/ nor the staging prefix


def test_failure_while_publishing_removes_the_objects_already_written(gcs, proxy):
    composes = {"n": 0}

    def fault(method, path, headers):
        if method == "POST" and "/compose" in path:
            composes["n"] += 1
            return 403 if composes["n"] == 3 else None  # two shards are in place by then
        return None

    proxy.fault = fault
    with pytest.raises(Exception, match="403"):
        export(gcs.ckpt, f"gs://{BUCKET}/halfway", *SMALL, "--no_resume")
    assert composes["n"] >= 3  # shards compose in parallel: the others may finish
    assert _objects(gcs, "halfway") == {}


def test_missing_part_is_named_and_nothing_is_published(gcs, proxy, monkeypatch):
    """A part lost between the workers and the finalize step: the tiling check names the gap."""
    real = shard_writer.list_parts

    def lose_one(staging):
        found = real(staging)
        parts = found["model-00003-of-00004.safetensors"]
        del parts[len(parts) // 2]
        return found

    monkeypatch.setattr(shard_writer, "list_parts", lose_one)
    with pytest.raises(Exception, match=r"model-00003-of-00004\.safetensors.*: bytes \[\d+, \d+\) .* never written"):
        export(gcs.ckpt, f"gs://{BUCKET}/gap", *SMALL, "--no_resume")
    assert _objects(gcs, "gap") == {}


def test_check_tiling_names_gaps_overlaps_and_size():
    def parts(*spans):
        return [Part(o, n, f"p/{o}") for o, n in spans]

    check_tiling("gs://b/x", parts((0, 10), (10, 5)), 15)
    with pytest.raises(ShardAssemblyError, match=r"gs://b/x: bytes \[10, 12\) of the planned 17 were never written"):
        check_tiling("gs://b/x", parts((0, 10), (12, 5)), 17)
    with pytest.raises(ShardAssemblyError, match="offset 8 overlaps bytes up to 10"):
        check_tiling("gs://b/x", parts((0, 10), (8, 5)), 13)
    with pytest.raises(ShardAssemblyError, match=r"bytes \[15, 20\) of the planned 20"):
        check_tiling("gs://b/x", parts((0, 10), (10, 5)), 20)
    with pytest.raises(ShardAssemblyError, match="past the planned size 12"):
        check_tiling("gs://b/x", parts((0, 10), (10, 5)), 12)
    with pytest.raises(ShardAssemblyError, match=r"bytes \[0, 4\)"):
        check_tiling("gs://b/x", [], 4)


def test_part_writer_coalesces_runs_and_streams_large_parts(gcs, proxy):
    """Adjacent runs become one group; a large group is a part (over the multipart limit: a
    resumable upload read straight from the views); short strided runs become one scatter
    object with one progression."""
    import numpy as np

    staging = f"gs://{BUCKET}/writer-test"
    writer = GcsPartWriter(staging, direct_bytes=1024)
    big = np.random.default_rng(0).integers(0, 256, 9 * 2**20 + 123, dtype=np.uint8)
    views = [memoryview(big)[: 5 * 2**20], memoryview(big)[5 * 2**20 :]]
    writer("a.safetensors", 8, views[0])
    writer("a.safetensors", 8 + views[0].nbytes, views[1])  # adjacent: same part
    rows = bytes(range(40))
    base = 8 + big.nbytes + 100
    for i in range(10):  # a column band: 10 rows of 4 bytes, 16 apart
        writer("a.safetensors", base + 16 * i, memoryview(rows)[4 * i : 4 * i + 4])
    writer.write_part("b.safetensors", 0, memoryview(b"header"))  # a part, however small
    scatter = writer.end_item()
    assert writer.parts_uploaded == 2 and writer.scatter_uploaded == 1
    assert [(sc.file, sc.runs) for sc in scatter] == [("a.safetensors", ((base, 16, 10, 4, 0),))]
    writer("c.safetensors", 0, memoryview(b"dropped"))
    writer.discard()  # a failed attempt's held-back bytes are not sent
    assert writer.end_item() == []
    found = shard_writer.list_parts(staging)
    assert {f: [(p.offset, p.size) for p in ps] for f, ps in found.items()} == {
        "a.safetensors": [(8, big.nbytes)],
        "b.safetensors": [(0, 6)],
    }
    data = gcs.client.bucket(BUCKET).blob(found["a.safetensors"][0].name).download_as_bytes()
    assert data == big.tobytes()

    # A segment across the band's middle takes the rows (and row parts) inside it.
    segment = shard_writer.Segment("a.safetensors", base + 18, base + 100, tuple(scatter))
    with pytest.raises(ShardAssemblyError, match=r"bytes \[\d+, \d+\) were never written"):
        shard_writer.assemble_segment(staging, "gs://x/out", segment)  # the gaps between rows
    dense = shard_writer.Segment("a.safetensors", base + 2, base + 18, tuple(scatter))
    with pytest.raises(ShardAssemblyError, match=rf"bytes \[{base + 4}, {base + 16}\) were never written"):
        shard_writer.assemble_segment(staging, "gs://x/out", dense)
    outdir.remove_tree(staging)
    assert _objects(gcs, "writer-test") == {}


def test_segments_rebuild_strided_rows_exactly(gcs, proxy):
    """Interleaved column bands from four "items" -> segments cut anywhere -> the exact bytes."""
    import numpy as np

    from ckpt_transforms.safetensors_io.layout import TensorSpec, shard_layout

    staging, output = f"gs://{BUCKET}/bands.ckptbeam-tmp-1", f"gs://{BUCKET}/bands"
    rows, cols = 37, 24  # a [37, 24] uint8 tensor; each item writes a 6-column band
    shard = shard_layout("model.safetensors", [TensorSpec("w", "U8", (rows, cols))])
    tensor = np.random.default_rng(1).integers(0, 256, (rows, cols), dtype=np.uint8)
    shard_writer.create_shards(staging, [shard])
    scatters = []
    for band in range(4):
        writer = GcsPartWriter(staging, direct_bytes=1024)
        block = np.ascontiguousarray(tensor[:, band * 6 : band * 6 + 6])
        for r in range(rows):
            writer(shard.file, shard.offsets["w"] + r * cols + band * 6, memoryview(block[r]))
        scatters += writer.end_item()
    assert len(scatters) == 4 and all(len(sc.runs) == 1 for sc in scatters)
    segments = shard_writer.plan_segments([shard], shard_writer.list_parts(staging), scatters, 100)
    assert [(s.start, s.end) for s in segments][0] == (len(shard.header), len(shard.header) + 100)
    for segment in segments:
        shard_writer.assemble_segment(staging, output, segment)
    parts = shard_writer.check_parts(staging, output, [shard])
    shard_writer.compose_shards(staging, output, [shard], parts)
    blob = gcs.client.bucket(BUCKET).blob("bands/model.safetensors")
    assert blob.download_as_bytes() == shard.header + tensor.tobytes()
    outdir.remove_tree(staging)
    outdir.remove_tree(output)


def test_progress_counts_done_markers_on_gcs(gcs):
    staging = f"gs://{BUCKET}/progress.ckptbeam-tmp-1"
    assert count_done(staging) == 0
    for i in (0, 3, 7):
        outdir.write_bytes(outdir.join(staging, DONE_DIR, str(i)), b"")
    assert count_done(staging) == 3
    outdir.remove_tree(staging)


def test_shard_of_many_parts_is_composed_in_rounds(gcs, proxy):
    """71 parts: three intermediate composes of <= 32 sources, then one final compose."""
    from ckpt_transforms.safetensors_io.layout import TensorSpec, shard_layout

    staging, output = f"gs://{BUCKET}/rounds.ckptbeam-tmp-1", f"gs://{BUCKET}/rounds"
    shard = shard_layout("model.safetensors", [TensorSpec("w", "U8", (70,))])
    data = bytes(range(70))
    shard_writer.create_shards(staging, [shard])
    writer = GcsPartWriter(staging)
    for i in reversed(range(70)):  # any order: parts are composed by offset
        writer.write_part(shard.file, shard.offsets["w"] + i, memoryview(data)[i : i + 1])
    parts = shard_writer.check_parts(staging, output, [shard])
    stats = shard_writer.compose_shards(staging, output, [shard], parts)
    assert (stats.parts, stats.compose_calls) == (71, 4)
    composes = _composes(proxy)
    assert len(composes) == 4 and composes[-1].startswith(f"/storage/v1/b/{BUCKET}/o/rounds/model.safetensors/")
    blob = gcs.client.bucket(BUCKET).blob("rounds/model.safetensors")
    assert blob.download_as_bytes() == shard.header + data
    intermediates = list(_objects(gcs, "rounds.ckptbeam-tmp-1/compose/"))
    assert len(intermediates) == 3
    outdir.remove_tree(staging)
    outdir.remove_tree(output)


def test_killed_gcs_export_resumes_writing_only_the_rest(gcs, proxy, tmp_path, monkeypatch):
    """gs:// output: a killed export's records (with their scatter objects) are adopted; the
    rerun uploads only the other items' bytes and publishes the same shards."""
    from test_resume import cli, count_region_reads, export_plan, kill_when_half_done, record_ids

    out = f"gs://{BUCKET}/resumed"
    plan, _ = export_plan(gcs.local_ckpt, out, *SMALL)

    def staging() -> str | None:
        found = outdir.list_children(f"gs://{BUCKET}", prefix="resumed.ckptbeam-tmp-")
        return f"gs://{BUCKET}/{found[0]}" if found else None

    kill_when_half_done(cli("export", "--source", gcs.local_ckpt, "--output", out, *SMALL), staging, len(plan.items))
    adopted = record_ids(staging())
    assert len(plan.items) // 2 <= len(adopted) < len(plan.items)
    assert not _objects(gcs, "resumed/")

    monkeypatch.setenv("CKPTBEAM_LEASE_EXPIRY_S", "0")  # the killed run's lease has expired
    reads = count_region_reads(monkeypatch)
    summary = export(gcs.local_ckpt, out, *SMALL)

    assert summary["resumed_items"] == len(adopted)
    rest = [i for i in plan.items if i.item_id not in adopted]
    assert len(reads) == sum(len(i.reads) for i in rest)
    assert summary["metrics"]["bytes_read"] == sum(i.bytes_read for i in rest)
    _assert_same_export(gcs.local_hf, _download(gcs, "resumed", tmp_path / "resumed"))
    assert not [o for o in _objects(gcs, "resumed") if "ckptbeam-tmp" in o]


def test_failure_while_publishing_keeps_the_items_and_the_rerun_publishes(gcs, proxy, tmp_path):
    """Composing fails half-way: the final objects already written are removed, the staged items
    and segments are kept, and the rerun redoes no item, only the segments and the publishing."""
    composes = {"n": 0}

    def fault(method, path, headers):
        if method == "POST" and "/compose" in path:
            composes["n"] += 1
            return 403 if composes["n"] == 3 else None
        return None

    proxy.fault = fault
    with pytest.raises(Exception, match="403"):
        export(gcs.ckpt, f"gs://{BUCKET}/retried", *SMALL)
    assert not _objects(gcs, "retried/")  # nothing at OUT/
    assert [o for o in _objects(gcs, "retried.ckptbeam-tmp-") if "/parts/" in o]
    proxy.fault = None
    proxy.uploads.clear()
    summary = export(gcs.ckpt, f"gs://{BUCKET}/retried", *SMALL)
    assert summary["resumed_items"] == summary["work_items"]
    assert "items_done" not in summary["metrics"] or summary["metrics"]["items_done"] == 0
    assert not [u for u in _uploads(proxy) if "/scatter/" in u]  # no item ran again
    _assert_same_export(gcs.local_hf, _download(gcs, "retried", tmp_path / "retried"))
