"""Run MaxText's own `to_huggingface` (Orbax -> HF safetensors) offline on a tiny test model.

Run it with the MaxText peer interpreter (benchmarks/setup_maxtext_peer.sh), never ckptbeam's:

    HF_HUB_OFFLINE=1 DECOUPLE_GCLOUD=TRUE JAX_PLATFORMS=cpu PYTHONPATH=/tmp/maxtext-src/src \\
    /tmp/maxtext-peer-venv/bin/python benchmarks/maxtext_to_hf_peer.py --hf_config_dir tests/fixtures/llama_bf16 \\
        model_name=llama3.1-8b load_parameters_path=/tmp/x/0/items base_output_directory=/tmp/x-hf \\
        scan_layers=true weight_dtype=bfloat16 [override_model_config=true head_dim=24 ...]

to_huggingface takes its HF config from the hard-coded `HF_MODEL_CONFIGS[model_name]` (the real
model's dimensions; the mappings read num_hidden_layers, head_dim, vocab_size, ... from it) and
downloads a tokenizer from the Hub. For a tiny model this wrapper changes only those inputs, then
runs the unmodified `main`:

- `HF_MODEL_CONFIGS[model_name]` = the transformers config read from `--hf_config_dir`'s config.json;
- `AutoTokenizer` / `AutoProcessor` = a stub whose `save_pretrained` writes nothing (no Hub here);
- `_validate_or_update_architecture` (HF config vs MaxText config dims) = no-op: the MaxText side
  keeps its model yml's dims unless overridden, and only the HF config (replaced above) drives the
  tensor mapping. MaxText config values the hooks do read (mixtral `num_experts`/`head_dim`, gemma4
  `share_kv_projections`, ...) must be passed as `override_model_config=true key=value` arguments.

`--hf_set KEY=JSON` (repeatable, right after `--hf_config_dir`) sets a config attribute the way
MaxText's own table does but config.json does not say (e.g. `attention_bias=true`: MaxText's
Qwen2Config entries set it, and its HF_SHAPE only lists q/k/v biases when it is true).

What the tiny fixtures needed (model_name, extra arguments), all else as in the example above:

    llama*, golden llama3.1      llama3.1-8b
    qwen2_*                      qwen2.5-7b    --hf_set attention_bias=true
    qwen3_*, golden qwen3        qwen3-8b;  qwen3_moe: qwen3-30b-a3b
    deepseek2 / deepseek3* / deepseek32_fp8   deepseek2-16b / deepseek3-671b / deepseek3.2-671b attention=dot_product
    gpt_oss_*                    gpt-oss-20b
    gemma2_* / gemma3_mm         gemma2-2b / gemma3-4b
    gemma4_moe / gemma4_dense    gemma4-26b / gemma4-31b override_model_config=true share_kv_projections=false
    gemma4_small                 gemma4-e2b (scan_layers=false only)
    qwen3_next                   qwen3-next-80b-a3b  --hf_set full_attention_interval=4
    mixtral (head_dim = hidden/heads only: its HF_SHAPE assumes it)
                                 mixtral-8x7b override_model_config=true num_experts=4 head_dim=16
    olmo3: fails (no HF_SHAPE entry); mistral: no MaxText name (llama3.1-8b de-interleaves RoPE).

Everything else after `--hf_config_dir DIR` is passed to MaxText unchanged (pyconfig `key=value` and
its absl flags such as `--override_model_architecture`).
"""

from __future__ import annotations

import json
import os
import sys


class _NoTokenizer:
    """Stands in for the tokenizer/processor MaxText would download; saves nothing."""

    def save_pretrained(self, *args, **kwargs) -> list[str]:
        return []


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 2 or argv[0] != "--hf_config_dir":
        sys.exit(__doc__)
    hf_config_dir, rest = argv[1], argv[2:]
    overrides = {}
    while rest and rest[0] == "--hf_set":
        key, value = rest[1].split("=", 1)
        overrides[key] = json.loads(value)
        rest = rest[2:]
    model_name = next(a.split("=", 1)[1] for a in rest if a.startswith("model_name="))

    # As to_huggingface's __main__ does, before JAX initialises.
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    import jax
    import transformers
    from absl import app

    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    jax.config.update("jax_platforms", "cpu")

    from maxtext.checkpoint_conversion import to_huggingface as th
    from maxtext.checkpoint_conversion.utils.hf_model_configs import HF_MODEL_CONFIGS

    hf_config = transformers.AutoConfig.from_pretrained(hf_config_dir)
    for key, value in overrides.items():
        setattr(hf_config, key, value)
    HF_MODEL_CONFIGS[model_name] = hf_config

    class _Stub:
        @staticmethod
        def from_pretrained(*args, **kwargs) -> _NoTokenizer:
            return _NoTokenizer()

    th.AutoTokenizer = _Stub
    th.AutoProcessor = _Stub
    th._validate_or_update_architecture = lambda hf_config, max_config, override: None
    app.run(th.main, argv=[sys.argv[0], *rest])  # pyconfig infers base.yml


if __name__ == "__main__":
    main()
