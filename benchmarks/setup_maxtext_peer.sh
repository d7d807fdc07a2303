#!/usr/bin/env bash
# Build MaxText from its own source in a separate virtualenv, as a benchmark-only peer for
# benchmarks/bench_maxtext.py. MaxText is never a dependency of ckptbeam: nothing here touches the
# project's environment, and nothing in the project imports from the peer venv.
#
#   bash benchmarks/setup_maxtext_peer.sh
#   env: PEER_VENV (default /tmp/maxtext-peer-venv), MAXTEXT_SRC (default /tmp/maxtext-src),
#        MAXTEXT_MIRROR (git dir to export the source from if MAXTEXT_SRC is missing; default
#        /work/.mirror/AI-Hypercomputer+maxtext/repo), PEER_PYTHON_BIN (a Python >= 3.12),
#        FORCE=1 (rebuild even if the venv already imports the converter).
#
# What had to be done, and why:
# - Python: MaxText's pyproject says requires-python >= 3.12 and some modules use 3.12 syntax;
#   the project's Python is 3.11, so the venv is made from a 3.12+ interpreter (python3.12/3.13
#   on PATH, else pyenv's 3.12.x/3.13.x, which this machine image ships).
# - Source: the local mirror is a partial clone; 7 large blobs (tokenizer files for Qwen3/Gemma and
#   some golden-logit test files) are absent, so a plain `git archive HEAD` fails. The export skips
#   exactly the blobs the mirror lacks; the converter needs none of them (it reads the model config
#   from its own HF_MODEL_CONFIGS table and never loads a tokenizer).
# - Requirements: MaxText's full install (`maxtext[tpu]`) pulls libtpu and the Google Cloud clients.
#   MaxText ships src/dependencies/requirements/generated_requirements/decoupled-requirements.txt
#   for exactly this case ("DECOUPLE_GCLOUD=TRUE", no accelerator wheels, installs on any
#   hardware): that is what is installed, from PyPI, with pip (MaxText's CI uses
#   `uv pip install --resolution=lowest`; plain pip's newest-compatible resolution worked too).
#   jax/jaxlib from it are the CPU build. Then MaxText itself with --no-deps (editable), as its
#   docs say for a decoupled environment. The converter runs with DECOUPLE_GCLOUD=TRUE.
# - torch is NOT installed: to_maxtext's default lazy path (--lazy_load_tensors=true) reads
#   safetensors with framework="np", and the module falls back to `torch = None` when torch is
#   absent. transformers is installed (the decoupled requirements include it): MaxText's HF config
#   table is built from transformers config classes.
# - The Hub is unreachable: bench_maxtext.py passes --hf_model_path=LOCAL_DIR and HF_HUB_OFFLINE=1.
set -euo pipefail

PEER_VENV=${PEER_VENV:-/tmp/maxtext-peer-venv}
MAXTEXT_SRC=${MAXTEXT_SRC:-/tmp/maxtext-src}
MAXTEXT_MIRROR=${MAXTEXT_MIRROR:-/work/.mirror/AI-Hypercomputer+maxtext/repo}
started=$(date +%s)

# 1. MaxText source tree.
if [[ ! -f "$MAXTEXT_SRC/src/maxtext/checkpoint_conversion/to_maxtext.py" ]]; then
  [[ -d "$MAXTEXT_MIRROR" ]] || { echo "no MaxText source at $MAXTEXT_SRC and no mirror at $MAXTEXT_MIRROR" >&2; exit 1; }
  echo "exporting MaxText $(git -C "$MAXTEXT_MIRROR" rev-parse --short HEAD) from $MAXTEXT_MIRROR to $MAXTEXT_SRC"
  excludes=()
  while read -r _mode _type sha path; do
    if ! git -C "$MAXTEXT_MIRROR" cat-file -e "$sha" 2>/dev/null; then
      echo "  skipping $path (blob not in the partial mirror)"
      excludes+=(":(exclude)$path")
    fi
  done < <(git -C "$MAXTEXT_MIRROR" ls-tree -r HEAD | awk '$2 == "blob"')
  rm -rf "$MAXTEXT_SRC" && mkdir -p "$MAXTEXT_SRC"
  # git still prints "error: invalid object ..." for the excluded paths, but exits 0 and the
  # archive holds every other file.
  git -C "$MAXTEXT_MIRROR" archive HEAD -- . "${excludes[@]}" 2> >(grep -v 'invalid object' >&2) | tar -x -C "$MAXTEXT_SRC"
  [[ -f "$MAXTEXT_SRC/src/maxtext/checkpoint_conversion/to_maxtext.py" ]] || { echo "export failed" >&2; exit 1; }
  git -C "$MAXTEXT_MIRROR" rev-parse HEAD > "$MAXTEXT_SRC/.maxtext_commit"  # an export has no .git
  echo "  $(find "$MAXTEXT_SRC" -type f | wc -l) files exported"
fi
REQS="$MAXTEXT_SRC/src/dependencies/requirements/generated_requirements/decoupled-requirements.txt"
[[ -f "$REQS" ]] || { echo "missing $REQS" >&2; exit 1; }

smoke() {
  DECOUPLE_GCLOUD=TRUE JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 PYTHONPATH="$MAXTEXT_SRC/src" \
    "$PEER_VENV/bin/python" -c "import jax, orbax.checkpoint, maxtext.checkpoint_conversion.to_maxtext as t; \
print('MaxText converter imports:', t.__file__, '| jax', jax.__version__, jax.devices())"
}
if [[ "${FORCE:-0}" != 1 && -x "$PEER_VENV/bin/python" ]] && smoke 2>/dev/null; then
  echo "peer venv $PEER_VENV already works (FORCE=1 to rebuild)"
  exit 0
fi

# 2. A Python >= 3.12 for the venv.
PY=${PEER_PYTHON_BIN:-}
if [[ -z "$PY" ]]; then
  # (a pyenv shim for python3.12 may exist on PATH yet refuse to run, so each candidate is tried)
  for cand in python3.12 python3.13 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.13*/bin/python3.13; do
    if "$cand" -c 'import sys, venv; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
      PY=$(command -v "$cand"); break
    fi
  done
fi
[[ -n "$PY" ]] || { echo "need Python >= 3.12 for MaxText (set PEER_PYTHON_BIN)" >&2; exit 1; }
"$PY" -c 'import sys; assert sys.version_info >= (3, 12), sys.version'
echo "peer interpreter: $PY ($("$PY" --version))"

# 3. The venv: MaxText's decoupled requirements from PyPI (JAX CPU), then MaxText itself.
rm -rf "$PEER_VENV"
"$PY" -m venv "$PEER_VENV"
"$PEER_VENV/bin/pip" install -q --upgrade pip
"$PEER_VENV/bin/pip" install -q -r "$REQS"
"$PEER_VENV/bin/pip" install -q --no-deps -e "$MAXTEXT_SRC"

# 4. Check the converter imports on CPU.
smoke
"$PEER_VENV/bin/pip" list 2>/dev/null | grep -iE '^(maxtext|jax|jaxlib|flax|orbax-checkpoint|tensorstore|transformers|safetensors|numpy) '
echo "peer venv ready at $PEER_VENV in $(($(date +%s) - started)) s"
