"""Resuming an unfinished run: durable records of committed work items, tied to a plan hash.

A run stages its output in one place (convert: `OUT/0.orbax-checkpoint-tmp-<ts>`, or `OUT/0`
itself on gs://; export: `OUT.ckptbeam-tmp-<ts>`). Once that staging is fully prepared, the
launcher writes `<staging>/.ckptbeam_plan`, the hash of everything that decides the staged bytes.
A worker writes `<staging>/.ckptbeam_done/<item id>` only after the item's data is durable (its
OCDBT database committed; its shard bytes fsynced or its part objects uploaded), so a record is a
commitment, not a hope. A rerun whose plan hashes the same adopts the staging, keeps the items its
records name and runs only the others. A record that does not parse, or names another plan or an
item the plan does not have, is not adopted; data no adopted record names is removed by the caller,
which alone knows its layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from ckpt_transforms.storage import outdir

log = logging.getLogger("ckptbeam")
PLAN_FILE = ".ckptbeam_plan"
RECORDS_DIR = ".ckptbeam_done"
FORMAT = "ckptbeam-resume/1"


def plan_hash(*parts: object) -> str:
    """A stable hash of the plan: its work items, the options that affect bytes, the source
    fingerprints. Plan data are plain dataclasses, so their repr is a complete, stable text."""
    text = json.dumps([FORMAT, *parts], sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def mark_plan(staging: str, plan: str) -> None:
    """Make `staging` adoptable by reruns of `plan`: call once it is fully prepared."""
    if not outdir.is_gcs(staging):
        os.makedirs(records_dir(staging), exist_ok=True)
    outdir.write_text(outdir.join(staging, PLAN_FILE), json.dumps({"format": FORMAT, "plan": plan}))


def plan_of(staging: str) -> str | None:
    """The plan hash an unfinished staging belongs to, or None (not marked, or unreadable)."""
    try:
        data = json.loads(outdir.read_text(outdir.join(staging, PLAN_FILE)) or "null")
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("plan"), str):
        return None
    return data["plan"]


def pick_staging(candidates: list[str], plan: str) -> tuple[str | None, list[str]]:
    """(the newest unfinished staging of `plan`, every other candidate: to be removed)."""
    matching = [c for c in candidates if plan_of(c) == plan]
    chosen = max(matching) if matching else None
    return chosen, [c for c in candidates if c != chosen]


def records_dir(staging: str) -> str:
    return outdir.join(staging, RECORDS_DIR)


def write_record(staging: str, plan: str, item_id: int, payload: dict) -> None:
    """Record work item `item_id` as committed (one small file or object, written whole).

    Call only after the item's data is durable: a rerun trusts the record without looking."""
    record = {"format": FORMAT, "plan": plan, "item": item_id, **payload}
    outdir.write_text(outdir.join(records_dir(staging), str(item_id)), json.dumps(record, separators=(",", ":")))


def record_committed(staging: str, plan: str, item_id: int, payload: dict) -> None:
    """Write a committed item's record. A failure that will repeat (a full disk) fails the item, so
    the run reports it once; any other failure only costs a rerun this item, so it is logged."""
    from ckpt_transforms.storage.remote import is_permanent_failure

    try:
        write_record(staging, plan, item_id, payload)
    except Exception as e:  # noqa: BLE001 - sorted below
        if is_permanent_failure(e):
            raise
        log.warning("work item %d: could not write its resume record (a rerun redoes it): %s", item_id, e)


def parse_record(name: str, data: bytes | None, plan: str, item_ids: set[int]) -> dict | None:
    """A record's payload if it is whole, of `plan` and names an item of it (by its own name too)."""
    try:
        record = json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("plan") != plan:
        return None
    item = record.get("item")
    if not isinstance(item, int) or isinstance(item, bool) or item not in item_ids or name != str(item):
        return None
    return {k: v for k, v in record.items() if k not in ("format", "plan", "item")}


def read_records(staging: str, plan: str, item_ids: set[int]) -> dict[int, dict]:
    """item id -> payload of every valid record under `staging` (one listing, reads in parallel)."""
    directory = records_dir(staging)
    names = [n for n in outdir.list_files(directory) if "/" not in n and not n.endswith(".tmp")]
    found: dict[int, dict] = {}
    for name, data in zip(names, outdir.read_many([outdir.join(directory, n) for n in names]), strict=True):
        payload = parse_record(name, data, plan, item_ids)
        if payload is None:
            log.warning("not adopting %s: not a whole record of this plan", outdir.join(directory, name))
            continue
        found[int(name)] = payload
    return found


def count_records(staging: str) -> int:
    """Committed items so far (one listing): the launcher's progress counter."""
    try:
        return sum(1 for n in outdir.list_files(records_dir(staging)) if not n.endswith(".tmp"))
    except FileNotFoundError:
        return 0


def forget(staging: str) -> None:
    """Remove the records and the plan mark (before a commit: a finished step keeps neither)."""
    outdir.remove_tree(records_dir(staging))
    outdir.remove_file(outdir.join(staging, PLAN_FILE))


def resumed_line(reused: int, total: int) -> str:
    return f"resumed: {reused} of {total} items reused"
