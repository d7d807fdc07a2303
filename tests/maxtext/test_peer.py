"""ckptbeam against MaxText itself, on every fixture family (opt-in: `-m maxtext`).

- to_maxtext: MaxText's own converter and ckptbeam's CLI on the same fixture must write the same
  leaves (names, shapes, dtypes, bytes).
- logits: MaxText restores ckptbeam's checkpoint through its normal load path
  (`load_parameters_path`), with its default NNX loader and with its Linen decode path
  (MaxEngine), and its model must agree with transformers' model on the same tokens (same top-1,
  small KL).
- to_huggingface: MaxText's exporter on ckptbeam's checkpoint gives back the fixture's tensors
  (the direction `ckptbeam export` will be checked in against the same runner).

Results (one JSON line per check) are appended to `results.jsonl` in the work directory.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer  # noqa: E402

pytestmark = pytest.mark.maxtext

SCANS = [pytest.param(True, id="scan"), pytest.param(False, id="unscan")]
# MaxText's gemma4_small decoder (E2B/E4B) has no scanned form.
UNSCANNED_ONLY = {"gemma4_small"}
# KL(HF || MaxText) per position, float32 on both sides. The HF reference holds the weights
# MaxText's bf16 checkpoint holds (peer.Fold: MaxText stores some weights times a constant, HF
# applies it at run time); the gap to the plain HF model is recorded too ("plain_*").
MAX_KL = 1e-4


# (No conftest.py here: a second module named `conftest` would shadow tests/conftest.py, which
# the other test modules import by that name.)
@pytest.fixture(scope="session")
def peer_workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A session directory for checkpoints and logs (CKPTBEAM_PEER_WORKDIR keeps them). Without the
    peer venv, tests/conftest.py skips the suite with one line."""
    keep = os.environ.get("CKPTBEAM_PEER_WORKDIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        return keep
    return str(tmp_path_factory.mktemp("maxtext-peer"))


def _record(workdir: str, **row: object) -> None:
    with open(os.path.join(workdir, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def _checkpoints(name: str, scan: bool, workdir: str, with_maxtext: bool = True) -> tuple[str, str]:
    """(ckptbeam items, MaxText items) for one family and layout, converted once per work dir."""
    family = peer.FAMILIES[name]
    if scan and name in UNSCANNED_ONLY:
        pytest.skip("MaxText's gemma4_small decoder has no scanned form")
    tag = f"{name}-{'scan' if scan else 'unscan'}"
    ours, theirs = os.path.join(workdir, tag + "-ckptbeam"), os.path.join(workdir, tag + "-maxtext")
    # Reused within a work dir (CKPTBEAM_PEER_WORKDIR) only if the step was committed.
    if not os.path.isfile(os.path.join(ours, "0", "commit_success.txt")):
        peer.run_ckptbeam_convert(family, ours, scan)
    if with_maxtext and not os.path.isfile(os.path.join(theirs, "0", "commit_success.txt")):
        if name in peer.NO_TO_MAXTEXT:
            pytest.skip(peer.NO_TO_MAXTEXT[name])
        peer.run_to_maxtext(family, theirs, scan, workdir)
    return os.path.join(ours, "0", "items"), os.path.join(theirs, "0", "items")


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("name", sorted(peer.FAMILIES))
def test_to_maxtext_leaves_match(name: str, scan: bool, peer_workdir: str) -> None:
    ours, theirs = _checkpoints(name, scan, peer_workdir)
    a, b = peer.read_leaves(ours), peer.read_leaves(theirs)
    diffs, notes = peer.compare_leaves(a, b)
    _record(peer_workdir, check="to_maxtext", family=name, scan=scan, leaves=len(b), diffs=diffs, notes=notes)
    assert not diffs, f"{len(diffs)} differences from MaxText's to_maxtext:\n" + "\n".join(diffs)


@pytest.mark.parametrize("loader", peer.LOADERS)
@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("name", sorted(peer.FAMILIES))
def test_maxtext_restores_ckptbeam_logits(name: str, scan: bool, loader: str, peer_workdir: str) -> None:
    family = peer.FAMILIES[name]
    ours, _ = _checkpoints(name, scan, peer_workdir, with_maxtext=False)
    got = peer.maxtext_logits(family, ours, scan, peer_workdir, loader)
    # transformers cannot run FP8 / MXFP4 on CPU: the reference is the dequantized copy MaxText reads.
    hf_dir = peer.maxtext_source(family, peer_workdir) if family.maxtext_source is peer.dequantized_copy else None
    stats = peer.logit_stats(got, peer.hf_logits(family, hf_dir=hf_dir, folded=True))
    plain = peer.logit_stats(got, peer.hf_logits(family, hf_dir=hf_dir)) if family.folds else stats
    stats |= {f"plain_{k}": v for k, v in plain.items()}
    _record(peer_workdir, check="logits", family=name, scan=scan, loader=loader, **stats)
    assert stats["top1"] == 1.0 and stats["kl_max"] < MAX_KL, stats


@pytest.mark.parametrize("name", sorted(peer.FAMILIES))
def test_maxtext_to_huggingface_gives_back_the_fixture(name: str, peer_workdir: str) -> None:
    """MaxText's exporter on ckptbeam's (unscanned) checkpoint returns every source tensor as it was
    (bf16 fixtures; quantized ones come back dequantized, compared with MaxText's own input)."""
    import reference

    family = peer.FAMILIES[name]
    if name in NO_TO_HUGGINGFACE:
        pytest.skip(NO_TO_HUGGINGFACE[name])
    ours, _ = _checkpoints(name, False, peer_workdir, with_maxtext=False)
    out = peer.run_to_huggingface(family, ours, os.path.join(peer_workdir, f"{name}-to-hf"), False, peer_workdir)
    got = reference.load_tensors(out)
    want = reference.load_tensors(peer.maxtext_source(family, peer_workdir))
    missing = sorted(set(want) - set(got))
    # MaxText writes its weight_dtype (float32); bf16 -> float32 is exact, so values compare exactly,
    # except a tensor the checkpoint holds folded (peer.Fold: bf16(w * c)), which comes back as
    # that bf16 value unfolded: folding it again must give the checkpoint's exact bf16 value.
    folds = family.folds(peer.text_config(peer.load_config(family.path))) if family.folds else ()
    diffs = [
        k
        for k in sorted(set(want) & set(got))
        if got[k].shape != want[k].shape or not peer.same_after_folds(k, got[k], want[k], folds)
    ]
    extra = sorted(set(got) - set(want))
    _record(peer_workdir, check="to_huggingface", family=name, missing=missing, diffs=diffs, extra=extra)
    assert not diffs, diffs


# ckptbeam writes Gemma3 under the names transformers' save_pretrained writes; MaxText under the
# model.* spellings (transformers loads both).
GEMMA3_NAMES = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


# Families MaxText's to_huggingface cannot export (its defects; ckptbeam exports them and
# tests/test_export.py checks them against the oracle, i.e. the inverse of to_maxtext).
NO_TO_HUGGINGFACE = {
    "qwen3_next": "MaxText's QWEN3_NEXT_HF_WEIGHTS_TO_SHAPE returns nothing: its export always fails",
    "olmo3": "MaxText has no HF_SHAPE entry for olmo3: its export fails ('Mappings not found')",
    "mistral": "MaxText has no mistral mapping (the fixture runs as llama3.1, which de-interleaves q/k)",
    "mixtral": "MaxText's mixtral export assumes head_dim == hidden/heads (the fixture's is not): reshape fails",
}


def _maxtext_name(key: str) -> str:
    for ours, theirs in GEMMA3_NAMES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key


def _comparable(key: str) -> str:
    """One spelling for both sides: MaxText writes a Gemma4 checkpoint whose config has no
    vision_config as `model.*` (which Gemma4ForConditionalGeneration does not load), ckptbeam
    keeps the checkpoint's `model.language_model.*`."""
    return key.replace("model.language_model.", "model.", 1)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("name", sorted(peer.FAMILIES))
def test_ckptbeam_export_equals_maxtext_to_huggingface(name: str, scan: bool, peer_workdir: str) -> None:
    """MaxText's to_huggingface and ckptbeam export on the same checkpoint, both at MaxText's
    default weight_dtype (float32): every tensor bit for bit."""
    import reference

    family = peer.FAMILIES[name]
    if name in NO_TO_HUGGINGFACE:
        pytest.skip(NO_TO_HUGGINGFACE[name])
    ours, _ = _checkpoints(name, scan, peer_workdir, with_maxtext=False)
    tag = f"{name}-{'scan' if scan else 'unscan'}"
    theirs = peer.run_to_huggingface(family, ours, os.path.join(peer_workdir, tag + "-mt-hf"), scan, peer_workdir)
    mine = peer.run_ckptbeam_export(ours, os.path.join(peer_workdir, tag + "-cb-hf"), "float32")
    got = {_comparable(_maxtext_name(k)): v for k, v in reference.load_tensors(mine).items()}
    want = {_comparable(k): v for k, v in reference.load_tensors(theirs).items()}
    diffs = [
        k
        for k in sorted(set(want) & set(got))
        if got[k].shape != want[k].shape or got[k].dtype != want[k].dtype or got[k].tobytes() != want[k].tobytes()
    ]
    only = sorted(set(want) ^ set(got))
    _record(peer_workdir, check="export_vs_to_huggingface", family=name, scan=scan, diffs=diffs, only_one_side=only)
    assert not diffs and not only, {"differ": diffs[:10], "only one side": only[:10]}
