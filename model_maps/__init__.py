"""Registry of model families: how each is detected, its MaxText names, and what it covers.

The README's support table is generated from `FAMILIES` (`python -m model_maps`), so the docs
cannot drift from the code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from ckpt_transforms.planning.specs import ModelMap
from model_maps.common import EMBEDDING, ConfigError
from model_maps.deepseek import deepseek_map
from model_maps.gemma2 import gemma2_map
from model_maps.gemma3 import gemma3_map
from model_maps.gemma4 import gemma4_map
from model_maps.gpt_oss import gpt_oss_map
from model_maps.llama import llama_map
from model_maps.mixtral import mixtral_map
from model_maps.olmo3 import olmo3_map
from model_maps.qwen import qwen3_moe_map, qwen_map
from model_maps.qwen3_next import qwen3_next_map

# Bump when any map's output changes, so re-conversion jobs know old checkpoints are stale.
MAP_VERSION = "1"


@dataclass(frozen=True)
class Family:
    """`builder(config)` makes the map; a `multimodal` family's builder also takes
    `use_multimodal` (MaxText's flag: convert the vision tower too, or only the text decoder)."""

    name: str
    builder: Callable[..., ModelMap]
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    maxtext_names: tuple[str, ...]
    notes: str = ""
    scan: bool = True
    unscan: bool = True
    quantized_sources: str = "—"
    multimodal: bool = False

    def build(self, config: dict, use_multimodal: bool | None = None, vocab_size: int | None = None) -> ModelMap:
        """The family's map for `config`; `use_multimodal` None means MaxText's default (false).

        `vocab_size` (MaxText's option) is the row count of MaxText's embedding (and of an untied
        logits_dense): HF's rows are zero-padded or cut to it. None keeps today's default: the
        official vocabularies MaxText resizes (Gemma2, Gemma3) get MaxText's size, others keep
        theirs. Export builds the map with the checkpoint's rows, so the inverse ops cut (or pad)
        back to config.json's vocab_size."""
        check_vocab_size(vocab_size)
        if self.multimodal:
            return self.builder(config, use_multimodal=bool(use_multimodal), vocab_size=vocab_size)
        if use_multimodal:
            raise ConfigError(f"--use_multimodal: {self.name} has no vision tower to convert")
        return self.builder(config, vocab_size=vocab_size)


def check_vocab_size(vocab_size: int | None) -> None:
    if vocab_size is None:
        return
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size must be a whole number of rows >= 1, got {vocab_size!r}")


FAMILIES: tuple[Family, ...] = (
    Family(
        "llama",
        llama_map,
        ("llama",),
        ("LlamaForCausalLM",),
        ("llama3.1-8b", "llama3.1-8b-Instruct", "llama3.1-70b", "llama3.1-405b", "llama2-7b", "llama3-8b"),
        "Llama-3.1 RoPE re-interleave when rope_type is llama3; tied or untied head",
    ),
    Family(
        "mistral",
        llama_map,
        ("mistral",),
        ("MistralForCausalLM",),
        ("mistral-7b",),
        "Llama layout with default RoPE (no re-interleave)",
    ),
    Family(
        "qwen2",
        functools.partial(qwen_map, variant="qwen2"),
        ("qwen2",),
        ("Qwen2ForCausalLM",),
        ("qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b"),
        "q/k/v biases",
    ),
    Family(
        "qwen3",
        functools.partial(qwen_map, variant="qwen3"),
        ("qwen3",),
        ("Qwen3ForCausalLM",),
        (
            "qwen3-0.6b",
            "qwen3-1.7b",
            "qwen3-1.7b-base",
            "qwen3-4b",
            "qwen3-4b-base",
            "qwen3-4b-thinking-2507",
            "qwen3-8b",
            "qwen3-8b-base",
            "qwen3-14b",
            "qwen3-14b-base",
            "qwen3-32b",
        ),
        "dense; q_norm/k_norm",
    ),
    Family(
        "mixtral",
        mixtral_map,
        ("mixtral",),
        ("MixtralForCausalLM",),
        ("mixtral-8x7b", "mixtral-8x22b"),
        "experts stacked on axis 0",
    ),
    Family(
        "qwen3_moe",
        qwen3_moe_map,
        ("qwen3_moe",),
        ("Qwen3MoeForCausalLM",),
        ("qwen3-30b-a3b", "qwen3-30b-a3b-base", "qwen3-235b-a22b", "qwen3-480b-a35b", "qwen3-coder-480b-a35b"),
        "q_norm/k_norm; router moe_block/gate; experts stacked on axis 0 ([experts, layers, ...] scanned)",
    ),
    Family(
        "deepseek2",
        functools.partial(deepseek_map, variant="deepseek2"),
        ("deepseek_v2",),
        ("DeepseekV2ForCausalLM",),
        ("deepseek2-16b",),
        "MLA (q_proj when q_lora_rank is 0, else q_a/q_b); dense_layers then moe_layers stacks; shared experts",
    ),
    Family(
        "deepseek3",
        functools.partial(deepseek_map, variant="deepseek3"),
        ("deepseek_v3",),
        ("DeepseekV3ForCausalLM",),
        ("deepseek3-671b",),
        "as deepseek2 plus router bias (e_score_correction_bias); MTP layers reported as known extras",
        quantized_sources="FP8 blocks (weight_scale_inv)",
    ),
    Family(
        "deepseek3.2",
        functools.partial(deepseek_map, variant="deepseek3.2"),
        ("deepseek_v32",),
        ("DeepseekV32ForCausalLM",),
        ("deepseek3.2-671b",),
        "as deepseek3 plus the sparse-attention indexer (wq_b, wk, k_norm, weights_proj)",
        quantized_sources="FP8 blocks (weight_scale_inv)",
    ),
    Family(
        "gpt_oss",
        gpt_oss_map,
        ("gpt_oss",),
        ("GptOssForCausalLM",),
        ("gpt-oss-20b", "gpt-oss-120b"),
        "attention sinks and biases; fused gate_up_proj split even/odd into wi_0/wi_1; "
        "scanned as layers/layers_0, layers/layers_1 (sliding/full cycle)",
        quantized_sources="MXFP4 experts (_blocks/_scales)",
    ),
    Family(
        "gemma2",
        gemma2_map,
        ("gemma2",),
        ("Gemma2ForCausalLM",),
        ("gemma2-2b", "gemma2-9b", "gemma2-27b"),
        "HF layers 2i/2i+1 form MaxText layer i (`*_local`/`*_global`); query scaled by 1/sqrt(head_dim); "
        "norms stored as scale + 1 (float32); embedding scaled by sqrt(hidden), 256000 rows padded to 256128",
    ),
    Family(
        "gemma3",
        gemma3_map,
        ("gemma3", "gemma3_text"),
        ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"),
        ("gemma3-4b", "gemma3-12b", "gemma3-27b"),
        "text decoder scanned as layers/layers_0..5 + layers_remainder; with --use_multimodal=true also the "
        "SigLIP vision tower and projector; norms scale + 1 (float32); embedding scaled by bf16 sqrt(hidden), "
        "262208 rows cut to 262144; reads language_model.model.* / vision_tower.* names as saved",
        multimodal=True,
    ),
    Family(
        "gemma4",
        gemma4_map,
        ("gemma4", "gemma4_text"),
        ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM"),
        ("gemma4-26b", "gemma4-31b"),
        "scanned as scanned_blocks/local_layers ([block][local] at axes 1, 2) + scanned_blocks/global_layer; "
        "global layers with their own head_dim/KV heads, no value kernel when K=V; MoE (26B) gate_up_proj "
        "halves into wi_0/wi_1, shared expert, per-expert scale; --use_multimodal=true adds the vision tower",
        multimodal=True,
    ),
    # Detected as gemma4 (the same map handles both, from config.json); listed apart because
    # MaxText converts E2B/E4B only unscanned and text-only.
    Family(
        "gemma4_small",
        gemma4_map,
        ("gemma4", "gemma4_text"),
        ("Gemma4ForConditionalGeneration", "Gemma4ForCausalLM"),
        ("gemma4-e2b", "gemma4-e4b"),
        "per-layer embeddings (PLE); the last num_kv_shared_layers layers without K/V (double-wide MLP when "
        "use_double_wide_mlp); text only; MaxText's gemma4_small decoder has no scanned form",
        scan=False,
        multimodal=True,
    ),
    Family(
        "olmo3",
        olmo3_map,
        ("olmo3",),
        ("Olmo3ForCausalLM",),
        ("olmo3-7b", "olmo3-7b-pt", "olmo3-32b"),
        "post-norm layers; q/k norms over all heads; scanned as layers/layers_0..3 (3 sliding + 1 full)",
    ),
    Family(
        "qwen3_next",
        qwen3_next_map,
        ("qwen3_next",),
        ("Qwen3NextForCausalLM",),
        ("qwen3-next-80b-a3b",),
        "gated-delta-net linear attention + full attention every Nth layer (scanned as layers/layer_0..N-1); "
        "MoE with shared expert and its gate; experts stacked on axis 0; MTP head reported as known extras",
    ),
)


# vocab_size of each MaxText model config (configs/models/<name>.yml; `-Instruct` names read the
# base model's file). MaxText builds its embedding with exactly this many rows unless run with
# `vocab_size=N override_model_config=true`, and cannot load a checkpoint with other rows.
# qwen3-coder-480b-a35b has a mapping in MaxText but no model config, so it is not listed.
MAXTEXT_VOCAB_SIZES: dict[str, int] = {
    "llama3.1-8b": 128256,
    "llama3.1-8b-Instruct": 128256,
    "llama3.1-70b": 128256,
    "llama3.1-405b": 128256,
    "llama2-7b": 32000,
    "llama3-8b": 128256,
    "mistral-7b": 32000,
    "qwen2.5-1.5b": 151936,
    "qwen2.5-7b": 152064,
    "qwen2.5-14b": 152064,
    **dict.fromkeys(
        (
            "qwen3-0.6b",
            "qwen3-1.7b",
            "qwen3-1.7b-base",
            "qwen3-4b",
            "qwen3-4b-base",
            "qwen3-4b-thinking-2507",
            "qwen3-8b",
            "qwen3-8b-base",
            "qwen3-14b",
            "qwen3-14b-base",
            "qwen3-32b",
            "qwen3-30b-a3b",
            "qwen3-30b-a3b-base",
            "qwen3-235b-a22b",
            "qwen3-480b-a35b",
            "qwen3-next-80b-a3b",
        ),
        151936,
    ),
    "mixtral-8x7b": 32000,
    "mixtral-8x22b": 32768,
    "deepseek2-16b": 102400,
    "deepseek3-671b": 129280,
    "deepseek3.2-671b": 129280,
    "gpt-oss-20b": 201088,
    "gpt-oss-120b": 201088,
    **dict.fromkeys(("gemma2-2b", "gemma2-9b", "gemma2-27b"), 256128),
    **dict.fromkeys(("gemma3-4b", "gemma3-12b", "gemma3-27b"), 262144),
    **dict.fromkeys(("gemma4-26b", "gemma4-31b", "gemma4-e2b", "gemma4-e4b"), 262144),
    **dict.fromkeys(("olmo3-7b", "olmo3-7b-pt", "olmo3-32b"), 100278),
}


def maxtext_default_vocab(family: Family, model: str | None) -> tuple[int, str] | None:
    """(MaxText's default vocab_size, whose default it is) for this conversion: the --model
    MaxText name's config, else the size all of the family's model configs share; None when it
    cannot be told (the family's configs differ, e.g. llama2-7b vs llama3.1-8b)."""
    if model in MAXTEXT_VOCAB_SIZES:
        return MAXTEXT_VOCAB_SIZES[model], f"{model}'s config"
    sizes = {MAXTEXT_VOCAB_SIZES[n] for n in family.maxtext_names if n in MAXTEXT_VOCAB_SIZES}
    if len(sizes) == 1:
        return sizes.pop(), f"every {family.name} model config"
    return None


def vocab_summary(family: Family, model: str | None, model_map: ModelMap) -> dict:
    """What the run summary says about the vocabulary: the embedding rows written, config.json's
    vocab_size, MaxText's default, and whether MaxText must be run with `vocab_size=` (the rows
    differ from MaxText's default, or, when that is unknown, from config.json's)."""
    rule = next((r for r in model_map.global_rules if r.target == EMBEDDING), None)
    if rule is None:
        return {}
    rows, hf_rows = rule.slab_shape[0], rule.source_shape[0]
    default = maxtext_default_vocab(family, model)
    return {
        "vocab_size": rows,
        "hf_vocab_size": hf_rows,
        "maxtext_vocab_size": default[0] if default else None,
        "maxtext_vocab_of": default[1] if default else None,
        "run_with_vocab_size": rows != (default[0] if default else hf_rows),
    }


class UnknownModelError(ValueError):
    """The family could not be determined or is not supported."""


def _by_name(name: str) -> Family | None:
    for fam in FAMILIES:
        if name == fam.name or name in fam.maxtext_names:
            return fam
    return None


def detect_family(config: dict, model: str | None = None) -> Family:
    """`--model` (family or MaxText name) wins; otherwise config.json's model_type/architectures."""
    if model:
        fam = _by_name(model)
        if fam is None:
            known = ", ".join(f.name for f in FAMILIES)
            raise UnknownModelError(f"unknown --model {model!r}; families: {known} (or a MaxText model name)")
        return fam
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(model_type, str | None) or not (
        isinstance(archs, list) and all(isinstance(a, str) for a in archs)
    ):
        raise ConfigError(
            f"config.json: model_type {model_type!r} / architectures {archs!r}; expected a string and a list of strings"
        )
    for fam in FAMILIES:
        if model_type in fam.model_types or any(a in fam.architectures for a in archs):
            return fam
    raise UnknownModelError(
        f"unsupported architecture: model_type={model_type!r}, architectures={archs!r}; "
        f"supported: {', '.join(f.name for f in FAMILIES)}"
    )


def _export_cell(f: Family) -> str:
    # Quantized checkpoints are read dequantized: the export writes the weights unquantized.
    return "yes" if f.quantized_sources == "—" else "yes (written unquantized)"


def support_table() -> str:
    rows = [
        "| family | HF architectures | MaxText model names | scanned | unscanned | HF → Orbax | Orbax → HF "
        "| quantized sources | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        rows.append(
            f"| {f.name} | {', '.join(f.architectures)} | {', '.join(f.maxtext_names)} | "
            f"{'yes' if f.scan else 'no'} | {'yes' if f.unscan else 'no'} | yes | {_export_cell(f)} | "
            f"{f.quantized_sources} | {f.notes} |"
        )
    return "\n".join(rows)
