#!/usr/bin/env bash
# Run the tests (sets up .venv on first use).
#   ./test.sh            ruff check . (the lint of pyproject.toml's [tool.ruff]), then the default suite: everything
#                        but slow/gpu/multigpu tests (what CI runs)
#   ./test.sh slow       the slow tests (minutes each on 2 CPU cores)
#   ./test.sh gpu        tests that need one or more CUDA GPUs
#   ./test.sh -- ARGS    ruff, then the default suite with extra pytest arguments (e.g. -- -k probe)
set -euo pipefail
cd "$(dirname "$0")"
env/setup.sh
py=.venv/bin/python
case "${1:-}" in
  slow) shift; exec "$py" -m pytest -m slow "$@" ;;
  gpu) shift; exec "$py" -m pytest -m "gpu or multigpu" "$@" ;;
  --) shift ;;
esac
"$py" -m ruff check . || { echo "test.sh: ruff check found the problems above (fixable ones: .venv/bin/ruff check --fix)" >&2; exit 1; }
exec "$py" -m pytest -m "not slow and not gpu and not multigpu" "$@"
