"""What a checkpoint was made from, so scheduled re-conversions can skip unchanged inputs.

The record is computed on the launcher from headers and file fingerprints only (sizes, mtimes,
etags, generations, resolved revisions), so checking "up to date" never reads tensor data.
"""

from __future__ import annotations

import hashlib
import json

from ckpt_transforms.safetensors_io.index import SourceModel

PROVENANCE_FILE = "ckptbeam_provenance.json"
FORMAT = "ckptbeam-provenance/1"


def provenance_record(source: SourceModel, family: str, map_version: str, options: dict) -> dict:
    """Everything that determines the bytes of the output checkpoint, and nothing else."""
    config_bytes = json.dumps(source.config, sort_keys=True).encode()
    return {
        "format": FORMAT,
        "source": source.uri,
        "config_sha256": hashlib.sha256(config_bytes).hexdigest(),
        "files": {name: source.file_fingerprints[name] for name in sorted(source.files)},
        "family": family,
        "map_version": map_version,
        "options": dict(sorted(options.items())),
    }


def differences(old: dict | None, new: dict) -> list[str]:
    """Human-readable reasons why `old` does not describe the same conversion as `new` (empty: same)."""
    if not old:
        return ["no provenance recorded"]
    reasons = []
    for key in ("format", "source", "config_sha256", "family", "map_version"):
        if old.get(key) != new.get(key):
            reasons.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    old_files, new_files = old.get("files", {}), new.get("files", {})
    for name in sorted(set(old_files) | set(new_files)):
        if old_files.get(name) != new_files.get(name):
            reasons.append(f"file {name}: {old_files.get(name)} -> {new_files.get(name)}")
    old_opts, new_opts = old.get("options", {}), new.get("options", {})
    for name in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(name) != new_opts.get(name):
            reasons.append(f"option {name}: {old_opts.get(name)!r} -> {new_opts.get(name)!r}")
    return reasons
