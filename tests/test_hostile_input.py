"""Hostile input is refused before anything proportional to it is allocated, read or written.

Each case gets one of our errors (SourceError, ConfigError, PlanError) whose message names the
file and field and what was expected; `test_peak_rss_while_refusing_hostile_input` runs the
worst of them in a fresh process and holds its peak RSS under 300 MiB.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import FIXTURES, ROOT
from fake_hub import FakeHub
from helpers_safetensors import encode_file, write_raw, write_tensors

import model_maps
from ckpt_transforms.planning.convert_plan import PlanError, build_plan
from ckpt_transforms.safetensors_io.index import (
    MAX_CONFIG_BYTES,
    MAX_INDEX_BYTES,
    MAX_JSON_DEPTH,
    MAX_TENSOR_ELEMENTS,
    load_source_model,
)
from ckpt_transforms.storage.remote import CappedSink, HfSource, check_range_headers
from ckpt_transforms.storage.sources import SourceError, open_source
from ckpt_transforms.tensors.ops import MergeAxes, PutEvery, RopeHalves, RopeInterleave
from model_maps.common import MAX_LAYERS, ConfigError

OUR_ERRORS = (SourceError, ConfigError, PlanError, model_maps.UnknownModelError)
RSS_LIMIT_MIB = 300


def plan(d) -> None:
    """Everything `ckptbeam convert` does before the first byte of tensor data moves."""
    source = load_source_model(open_source(str(d)))
    family = model_maps.detect_family(source.config)
    build_plan(source, family.build(source.config), scan_layers=True)


def refused(d, *fragments: str) -> str:
    with pytest.raises(OUR_ERRORS) as exc:
        plan(d)
    msg = str(exc.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert "\n" not in msg
    return msg


@pytest.fixture
def llama(tmp_path):
    """A copy of the 3-layer Llama fixture (one safetensors file)."""
    d = tmp_path / "llama"
    shutil.copytree(os.path.join(FIXTURES, "llama_bf16"), d)
    return d


def set_config(d, **changes) -> None:
    path = d / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def tiny_model(tmp_path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_raw(d / "model.safetensors", header, data, header_len)
    return d


# --------------------------------------------------------------------------- safetensors headers


def test_header_length_of_2_to_the_62_is_refused_before_reading(tmp_path):
    d = tiny_model(tmp_path, {}, header_len=2**62)
    refused(d, "model.safetensors", f"header length {2**62}", "limit")


@pytest.mark.parametrize(
    "entry, field",
    [
        ({"dtype": "U8", "shape": [True, 2], "data_offsets": [0, 2]}, "shape"),
        ({"dtype": "U8", "shape": [2.5], "data_offsets": [0, 2]}, "shape"),
        ({"dtype": "U8", "shape": [-2], "data_offsets": [0, 2]}, "shape"),
        ({"dtype": "U8", "shape": [1] * 17, "data_offsets": [0, 1]}, "dimensions"),
        ({"dtype": "U8", "shape": [2], "data_offsets": [False, 2]}, "data_offsets"),
        ({"dtype": "U8", "shape": [2], "data_offsets": [2, 0]}, "begin <= end"),
        ({"dtype": "U8", "shape": [10**9], "data_offsets": [0, 10**9]}, "ending at byte"),
        ({"dtype": "U8", "shape": [2], "data_offsets": [0, 2**70]}, "ending at byte"),
        ({"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}, "unknown dtype 'Q4_K' (expected one of BOOL"),
    ],
)
def test_malformed_tensor_entries_name_the_tensor_and_the_expectation(tmp_path, entry, field):
    d = tiny_model(tmp_path, {"w": entry}, bytes(2))
    refused(d, "model.safetensors", "'w'", field)


def test_a_10_to_the_12_element_tensor_is_refused(tmp_path):
    n = 10**6
    d = tiny_model(tmp_path, {"w": {"dtype": "BF16", "shape": [n, n], "data_offsets": [0, 2 * n * n]}})
    refused(d, "'w'", f"{MAX_TENSOR_ELEMENTS}-element limit")


def test_duplicate_keys_in_the_header_are_refused(tmp_path):
    raw = b'{"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}, "w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}'
    d = tiny_model(tmp_path, raw, bytes(2))
    refused(d, "model.safetensors", "key 'w' twice")


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeply_nested_header_is_refused(tmp_path, depth):
    raw = b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}"
    d = tiny_model(tmp_path, raw)
    refused(d, "model.safetensors", "nested too deeply")


def test_integer_with_thousands_of_digits_is_refused(tmp_path):
    raw = b'{"w": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 2]}}'
    d = tiny_model(tmp_path, raw, bytes(2))
    refused(d, "model.safetensors", "not valid JSON")


# --------------------------------------------------------------------------- index and directory


def test_duplicate_keys_in_the_index_are_refused(tmp_path):
    d = tiny_model(tmp_path, {})
    write_tensors(d / "a.safetensors", {"w": np.zeros(2, np.float32)})
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"w": "a.safetensors", "w": "../../etc/passwd"}}')
    refused(d, "model.safetensors.index.json", "key 'w' twice")


@pytest.mark.parametrize(
    "name, cap", [("config.json", MAX_CONFIG_BYTES), ("model.safetensors.index.json", MAX_INDEX_BYTES)]
)
def test_oversized_json_files_are_refused_before_reading(tmp_path, name, cap):
    d = tiny_model(tmp_path, {})
    with open(d / name, "wb") as f:
        f.truncate(cap + 1)  # sparse: reading it would be the bug
    refused(d, name, f"{cap + 1} bytes, over the {cap}-byte limit")


@pytest.mark.parametrize("text", ["[]", '"llama"', "null", "[" * 50 + "]" * 50])
def test_config_json_that_is_not_an_object(tmp_path, text):
    d = tiny_model(tmp_path, {})
    (d / "config.json").write_text(text)
    refused(d, "config.json")


def test_symlinked_config_outside_the_directory_is_refused(llama, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(llama / "config.json", outside)
    (llama / "config.json").symlink_to(outside)
    refused(llama, "escapes the model directory")


# --------------------------------------------------------------------------- config.json sizes

BAD_SIZES = [10**6, 10**15, "abc", [4], 0, -3, True, 2.5]
SIZE_FIELDS = [
    "num_hidden_layers",
    "vocab_size",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
]


@pytest.mark.parametrize("value", BAD_SIZES, ids=repr)
@pytest.mark.parametrize("field", SIZE_FIELDS)
def test_bad_sizes_in_config_json_are_refused_naming_the_field(llama, field, value):
    set_config(llama, **{field: value})
    msg = refused(llama, "config.json")
    # A size in range but wrong for the tensors is a shape mismatch naming the tensor instead.
    assert field in msg or "from config.json" in msg, msg


def test_layer_count_beyond_the_tensors_is_refused_from_the_headers(llama):
    set_config(llama, num_hidden_layers=MAX_LAYERS)  # in range, but the file holds 3 layers
    refused(llama, "config.json: num_hidden_layers is 4096", "hold 3 layers", "expected at most 3")


def test_expert_count_beyond_the_tensors_is_refused_from_the_headers(tmp_path):
    d = tmp_path / "moe"
    shutil.copytree(os.path.join(FIXTURES, "qwen3_moe_bf16"), d)
    present = json.loads((d / "config.json").read_text())["num_local_experts"]
    set_config(d, num_local_experts=4000)
    refused(d, "config.json: num_local_experts is 4000", f"expected at most {present}")


@pytest.mark.parametrize("value", ["false", 0, [True]])
def test_tie_word_embeddings_must_be_a_bool(llama, value):
    set_config(llama, tie_word_embeddings=value)
    refused(llama, "tie_word_embeddings", "expected true or false")


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"architectures": "LlamaForCausalLM", "model_type": 5}, "architectures"),
        ({"rope_parameters": "llama3"}, "rope_scaling"),
        ({"layer_types": "full_attention"}, None),
    ],
)
def test_config_fields_of_the_wrong_type(llama, config, fragment):
    set_config(llama, **config)
    if fragment is None:  # llama ignores layer_types
        plan(llama)
    else:
        refused(llama, "config.json", fragment)


# --------------------------------------------------------------------------- quantization_config that lies


@pytest.mark.parametrize(
    "qcfg, fragment",
    [
        ({"quant_method": "fp8", "weight_block_size": [True, True]}, "weight_block_size is [True, True]"),
        ({"quant_method": "fp8", "weight_block_size": [16, 10**9]}, "weight_block_size"),
        ({"quant_method": "fp8", "weight_block_size": [16, 32], "modules_to_not_convert": 5}, "modules_to_not_convert"),
        ({"quant_method": ["fp8"]}, "quant_method is ['fp8']; expected a string"),
        ("fp8", "quantization_config is not an object"),
        # Lies about the tensors: the headers say BF16, the config says FP8 blocks.
        ({"quant_method": "fp8", "weight_block_size": [16, 32]}, "implies F8_E4M3"),
    ],
)
def test_quantization_config_that_lies(tmp_path, qcfg, fragment):
    d = tmp_path / "ds"
    shutil.copytree(os.path.join(FIXTURES, "deepseek3_bf16"), d)
    set_config(d, quantization_config=qcfg)
    refused(d, fragment)


def test_fp8_tensors_under_an_unquantized_config_are_refused(tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(os.path.join(FIXTURES, "deepseek3_fp8"), d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    refused(d, "dtype F8_E4M3", "quantization_config")


# --------------------------------------------------------------------------- servers that ignore Range


class Headers(dict):
    def get(self, key, default=None):
        return next((v for k, v in self.items() if k.lower() == key.lower()), default)


@pytest.mark.parametrize(
    "status, headers, fragment",
    [
        (200, {"Content-Length": "1000000000"}, "ignored the byte range request for bytes [8, 16) (HTTP 200"),
        (200, {}, "HTTP 200 with a body of unknown size"),
        (206, {"Content-Range": "bytes 0-999/1000"}, "Content-Range 'bytes 0-999/1000'"),
        (206, {}, "Content-Range None"),
        (206, {"Content-Range": "bytes 8-15/100", "Content-Length": "92"}, "does not match"),
        (206, {"Content-Range": "bytes 8-15/100", "Content-Length": "x"}, "Content-Length 'x'"),
        (204, {}, "unexpected HTTP 204"),
    ],
)
def test_range_answers_are_checked_before_the_body(status, headers, fragment):
    with pytest.raises(SourceError) as exc:
        check_range_headers(status, Headers(headers), "gs://b/m/f", 8, 8)
    assert str(exc.value).startswith("gs://b/m/f: ") and fragment in str(exc.value)


def test_range_answers_that_are_fine():
    check_range_headers(206, Headers({"Content-Range": "bytes 8-15/100", "Content-Length": "8"}), "f", 8, 8)
    check_range_headers(200, Headers({"Content-Length": "8"}), "f", 0, 8)  # the whole file was asked for


def test_capped_sink_refuses_more_than_asked_for():
    sink = CappedSink("hf://a/b@c/model.safetensors", 8, 10)
    sink.write(b"x" * 10)
    with pytest.raises(SourceError, match=r"more than the 10 bytes asked for at bytes \[8, 18\)"):
        sink.write(b"y")


@pytest.fixture(scope="module")
def mirror():
    hub = FakeHub(ignore_range=True, extra_body_bytes=256 * 2**20)
    hub.add_repo("acme/tiny", os.path.join(FIXTURES, "llama_bf16"))
    yield hub
    hub.stop()


@pytest.mark.parametrize("send_length", [True, False])
def test_hub_mirror_ignoring_range_is_refused_without_buffering_the_body(mirror, monkeypatch, tmp_path, send_length):
    monkeypatch.setenv("HF_ENDPOINT", mirror.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("CKPTBEAM_REMOTE_ATTEMPTS", "1")
    mirror.send_length = send_length
    mirror.reset_log()
    source = HfSource("hf://acme/tiny")
    with pytest.raises(SourceError, match=r"model\.safetensors: the server (ignored the byte range|sent more than)"):
        source.read_range("model.safetensors", 8, 64)
    taken = mirror.bytes_served()
    assert taken < 32 * 2**20, f"the client took {taken} bytes of a 256 MiB body"


# --------------------------------------------------------------------------- peak RSS while refusing

CHILD = textwrap.dedent(
    """
    import json, os, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    import model_maps
    from ckpt_transforms.planning.convert_plan import PlanError, build_plan
    from ckpt_transforms.safetensors_io.index import load_source_model
    from ckpt_transforms.storage.remote import HfSource
    from ckpt_transforms.storage.sources import SourceError, open_source
    from model_maps.common import ConfigError

    def plan(d):
        source = load_source_model(open_source(d))
        build_plan(source, model_maps.detect_family(source.config).build(source.config), True)

    def hub_read():
        HfSource("hf://acme/tiny").read_range("model.safetensors", 8, 64)

    def peak_mib():
        # VmHWM: this process's own high-water mark (getrusage's ru_maxrss survives exec, so a
        # child of a big pytest process would report its parent's peak).
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM:"))

    out = []
    for name, target in json.loads(sys.argv[1]):
        try:
            hub_read() if target == "hub" else plan(target)
            out.append((name, "ACCEPTED", 0))
        except (SourceError, ConfigError, PlanError, model_maps.UnknownModelError) as e:
            peak = peak_mib()
            out.append((name, f"{{type(e).__name__}}: {{str(e)[:160]}}", peak))
    print(json.dumps(out))
    """
)


def hostile_dirs(tmp_path) -> list[tuple[str, str]]:
    cases = []

    def case(name: str, header=None, data: bytes = b"", header_len=None, config=None, files=None, base="llama_bf16"):
        d = tmp_path / name
        shutil.copytree(os.path.join(FIXTURES, base), d)
        if header is not None or header_len is not None:
            (d / "model.safetensors").write_bytes(encode_file(header or {}, data, header_len))
        if config:
            set_config(d, **config)
        for fname, size in (files or {}).items():
            with open(d / fname, "wb") as f:
                f.truncate(size)
        cases.append((name, str(d)))

    n = 10**6
    case("header_length_2^62", header_len=2**62)
    case("tensor_10^12_elements", {"w": {"dtype": "BF16", "shape": [n, n], "data_offsets": [0, 2 * n * n]}})
    case("offsets_2^70", {"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2**70]}})
    case("header_nested_10^6", b'{"a": ' + b"[" * n + b"]" * n + b"}")
    case("header_duplicate_keys", b'{"w": {}, "w": {}}')
    case("config_1GiB", files={"config.json": 2**30})
    case("index_1GiB", files={"model.safetensors.index.json": 2**30})
    for field in ("num_hidden_layers", "vocab_size", "hidden_size", "num_attention_heads", "intermediate_size"):
        for value in (10**6, 10**15):
            case(f"{field}={value:.0e}", config={field: value})
    for value in (10**6, 10**15):
        case(f"num_local_experts={value:.0e}", config={"num_local_experts": value}, base="qwen3_moe_bf16")
    case("num_hidden_layers=4096", config={"num_hidden_layers": 4096})
    case("every_size_at_its_cap", config={"vocab_size": 2**24, "hidden_size": 2**20, "intermediate_size": 2**20})
    return cases


def test_peak_rss_while_refusing_hostile_input(tmp_path, mirror):
    """Each child process reports its own peak RSS (VmHWM) after every refusal."""
    env = {
        **os.environ,
        "HF_ENDPOINT": mirror.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "CKPTBEAM_REMOTE_ATTEMPTS": "1",
    }
    batches = [
        (True, hostile_dirs(tmp_path) + [("hub_ignores_range_1GiB_body", "hub")]),
        (False, [("hub_ignores_range_no_length", "hub")]),
    ]
    script = CHILD.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    results = []
    mirror.extra_body_bytes = 2**30
    try:
        for send_length, batch in batches:
            mirror.send_length = send_length
            proc = subprocess.run(
                [sys.executable, "-c", script, json.dumps(batch)], capture_output=True, text=True, env=env, timeout=300
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            results += json.loads(proc.stdout)
    finally:
        mirror.extra_body_bytes, mirror.send_length = 256 * 2**20, True
    for name, outcome, peak in results:
        print(f"{name:32s} {peak:4d} MiB  {outcome}")
        assert outcome != "ACCEPTED", name
        assert peak < RSS_LIMIT_MIB, f"{name}: peak RSS {peak} MiB"


@pytest.mark.parametrize(
    "op",
    [RopeInterleave(), RopeHalves(), MergeAxes(0, (2**20, 2**20)), PutEvery(0, 0, 2)],
    ids=lambda o: type(o).__name__,
)
def test_planning_shapes_of_huge_tensors_need_no_arrays(op):
    """Ops compute their output shapes arithmetically: config sizes never become allocations."""
    shape = (2**20, 2**20, 4)
    out = op.output_shape(shape)
    assert math.prod(out) == math.prod(shape) * (2 if isinstance(op, PutEvery) else 1)
