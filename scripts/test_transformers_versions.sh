#!/usr/bin/env bash
# The model-contract tests on the other transformers version pyproject.toml allows (5.23; the main environment has
# 5.24), in a small virtual environment beside the main one: it holds only transformers and reads everything else
# (torch, accelerate, pytest, this project installed editable) from the main environment, so it costs one wheel.
# Usage: bash scripts/test_transformers_versions.sh [PYTEST ARGS...]
#   PYTHON: the main environment's Python (default: `python` on PATH, the activated venv)
#   TRANSFORMERS_VERSION: the version to test (default 5.23); its venv is .venv-transformers-VERSION, made once and
#   reused (gitignored)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
version=${TRANSFORMERS_VERSION:-5.23}
venv=.venv-transformers-$version

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv --without-pip "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main_site=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# After this venv's own site-packages: the main environment's, with its .pth files run (the editable install of this
# project, and any environment it chains to), so that this venv's transformers comes first on sys.path.
"$venv/bin/python" -c 'import sys; print(f"import site; site.addsitedir({sys.argv[1]!r})")' "$main_site" \
    > "$site/_main_environment.pth"

installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("transformers"))' 2>/dev/null || true)
if [[ "$installed" != "$version".* ]] || [ ! -d "$site/transformers" ]; then
    # Its dependencies (tokenizers, huggingface-hub, safetensors...) are the main environment's: 5.23 and 5.24 ask
    # for the same ranges.
    "$python" -m pip install --quiet --no-deps --upgrade --target "$site" "transformers==$version.*"
fi
"$venv/bin/python" - "$version" <<'EOF'
import sys

import transformers

assert transformers.__version__.startswith(sys.argv[1] + "."), transformers.__file__
print(f"transformers {transformers.__version__} from {transformers.__file__}")
EOF

OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -q tests/test_modeling_contract.py "$@"
