#!/usr/bin/env bash
# Regenerates every parity golden with the reference implementations (PyTorch CPU, diffusers, transformers).
# Usage: bash tests/goldens/regenerate.sh   (creates .venv-ref with Python 3.11 on first use)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ! -x .venv-ref/bin/python ]]; then
  PYENV_VERSION=3.11.7 python3 -m venv .venv-ref
fi
.venv-ref/bin/python -m pip install -q -r tests/goldens/requirements.txt
for script in tests/goldens/make_*.py; do
  echo "regenerating goldens: $script"
  .venv-ref/bin/python "$script"
done
