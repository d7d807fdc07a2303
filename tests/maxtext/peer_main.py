"""Run by MaxText's own interpreter (the peer venv), never by the project's: drives MaxText's
converters and its model on tiny fixtures. Only MaxText's public entry points are called.

    PEER_PYTHON peer_main.py to_maxtext HF_DIR MODEL_NAME [to_maxtext args...]
    PEER_PYTHON peer_main.py to_huggingface HF_DIR MODEL_NAME [to_huggingface args...]
    PEER_PYTHON peer_main.py logits nnx|linen TOKENS.npy OUT.npy [MaxText config args...]

MaxText's converters take the HF config of a model (its layer count, head sizes, expert count...)
from their own built-in table `HF_MODEL_CONFIGS[model_name]`, not from the checkpoint, so a tiny
fixture can only be converted if that entry is replaced by the fixture's own config; that is the
only thing changed before the unmodified converter module runs as `__main__`.
"""

from __future__ import annotations

import runpy
import sys


def _patch_hf_config(hf_dir: str, model_name: str) -> None:
    from maxtext.checkpoint_conversion.utils.hf_model_configs import HF_MODEL_CONFIGS
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    # Multimodal families' table entries are the composite config; keep the fixture's as it is.
    HF_MODEL_CONFIGS[model_name] = config


def _run_module(module: str, hf_dir: str, model_name: str, args: list[str]) -> None:
    _patch_hf_config(hf_dir, model_name)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def _inputs(tokens_path: str):
    import jax.numpy as jnp
    import numpy as np
    from maxtext.common.common_types import DECODING_ACTIVE_SEQUENCE_INDICATOR

    tokens = np.load(tokens_path)
    batch, seq = tokens.shape
    ids = jnp.asarray(tokens, dtype=jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    segments = jnp.full((batch, seq), DECODING_ACTIVE_SEQUENCE_INDICATOR, dtype=jnp.int32)
    return ids, positions, segments


def _logits_nnx(config, tokens_path: str):
    """MaxText's default loader: `from_pretrained` builds the NNX model and restores
    `load_parameters_path` into it; one training-mode forward pass."""
    import jax
    from maxtext.common.common_types import MODEL_MODE_TRAIN
    from maxtext.utils import maxtext_utils, model_creation_utils

    mesh = jax.sharding.Mesh(maxtext_utils.create_device_mesh(config), config.mesh_axes)
    model = model_creation_utils.from_pretrained(config, mesh=mesh, model_mode=MODEL_MODE_TRAIN)
    ids, positions, segments = _inputs(tokens_path)
    return model(
        decoder_input_tokens=ids, decoder_positions=positions, decoder_segment_ids=segments, enable_dropout=False
    )


def _logits_linen(config, tokens_path: str):
    """MaxText's Linen decode path: its inference engine (MaxEngine, enable_nnx / pure_nnx /
    pure_nnx_decoder false) restores `load_parameters_path` with `load_params`, then the prefill
    forward pass exactly as `MaxEngine.prefill` calls it, keeping every position's logits (prefill
    itself returns only the last one)."""
    import jax
    from flax.linen import partitioning as nn_partitioning
    from maxtext.common.common_types import MODEL_MODE_PREFILL
    from maxtext.inference.maxengine.maxengine import MaxEngine

    engine = MaxEngine(config)
    params = engine.load_params(rng=jax.random.PRNGKey(0))
    ids, positions, segments = _inputs(tokens_path)
    with engine._mesh, nn_partitioning.axis_rules(config.logical_axis_rules):  # noqa: SLF001 (as prefill)
        logits, _ = engine.model.apply(
            params,
            ids,
            positions,
            decoder_segment_ids=segments,
            enable_dropout=False,
            model_mode=MODEL_MODE_PREFILL,
            rngs={"params": jax.random.PRNGKey(1)},
            mutable=["cache"],
        )
    return logits


LINEN = ("enable_nnx=false", "pure_nnx=false", "pure_nnx_decoder=false")


def _logits(loader: str, tokens_path: str, out_path: str, args: list[str]) -> None:
    """MaxText's forward pass over `tokens` [batch, seq] with the params restored from
    `load_parameters_path` by `loader` (nnx or linen); writes float32 logits [batch, seq, vocab]."""
    import numpy as np
    from maxtext.configs import pyconfig

    if loader not in ("nnx", "linen"):
        raise SystemExit(f"unknown loader {loader!r}: nnx or linen")
    config = pyconfig.initialize([sys.argv[0], *args, *(LINEN if loader == "linen" else ())])
    logits = (_logits_linen if loader == "linen" else _logits_nnx)(config, tokens_path)
    np.save(out_path, np.asarray(logits, dtype=np.float32))


def main(argv: list[str]) -> None:
    command, rest = argv[0], argv[1:]
    if command == "to_maxtext":
        _run_module("maxtext.checkpoint_conversion.to_maxtext", rest[0], rest[1], rest[2:])
    elif command == "to_huggingface":
        _run_module("maxtext.checkpoint_conversion.to_huggingface", rest[0], rest[1], rest[2:])
    elif command == "logits":
        _logits(rest[0], rest[1], rest[2], rest[3:])
    else:
        raise SystemExit(f"unknown command {command!r}: to_maxtext, to_huggingface or logits")


if __name__ == "__main__":
    main(sys.argv[1:])
