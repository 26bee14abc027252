#!/usr/bin/env bash
# Run every notebook headlessly for a profile, in order, through papermill.
#   ./run_all.sh [PROFILE] [--from NN] [--only NN] [--resume] [--set KEY=VALUE ...]
#   PROFILE: smoke (default) | gpu_short | gpu | paper | a YAML file (a relative path is taken from where you are)
# Executed copies go to runs/<profile>/notebooks/ (or $LWLIB_RUNS/<profile>/notebooks/); figures to figures/<profile>/;
# an HTML report of the run (each executed notebook, manifests, claims) to runs/<profile>/report/index.html.
# Stages resume from their run-folder files, so re-running after an interruption continues where it stopped;
# --from NN starts at notebook NN, --only NN runs one notebook, --resume skips notebooks whose executed copy
# finished without error (for machines that cut jobs at a time limit: run the same command again).
# --set KEY=VALUE overrides a profile value in every notebook (repeatable; the value is read as YAML, e.g.
# --set sft.max_steps=10 --set "probe.lengths=[1000, 2000]"). Before any notebook starts, the whole profile
# and its overrides are checked (python -m lwlib.config check): a mistake is reported with the file (or the
# --set) and the field, and nothing is created.
set -euo pipefail
CALLER_DIR=$PWD  # a relative PROFILE or $LWLIB_RUNS is the caller's (papermill runs the notebooks in notebooks/)
cd "$(dirname "$0")"

# --- arguments -----------------------------------------------------------------------------------------------
PROFILE=smoke FROM="" ONLY="" RESUME=0 SETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --from|--only|--set) [ $# -ge 2 ] || { echo "run_all.sh: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --from) FROM=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    --set=*) SETS+=(--set "${1#--set=}"); shift ;;
    --resume) RESUME=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "run_all.sh: unknown option $1" >&2; exit 2 ;;
    *) PROFILE=$1; shift ;;
  esac
done
check_notebook() {  # check_notebook OPTION NN: NN must be the number of a notebook
  local nb
  [ -z "$2" ] && return 0
  for nb in notebooks/[0-9][0-9]_*.ipynb; do nb=$(basename "$nb"); [ "${nb:0:2}" = "$2" ] && return 0; done
  { echo "run_all.sh: $1 $2: no such notebook; give the two-digit number of one of:"
    for nb in notebooks/[0-9][0-9]_*.ipynb; do echo "  $(basename "$nb")"; done; } >&2
  exit 2
}
check_notebook --from "$FROM"
check_notebook --only "$ONLY"
case "${LWLIB_RUNS:-}" in "" | /*) ;; *) export LWLIB_RUNS="$CALLER_DIR/$LWLIB_RUNS" ;; esac
case "${LWLIB_FIGURES:-}" in "" | /*) ;; *) export LWLIB_FIGURES="$CALLER_DIR/$LWLIB_FIGURES" ;; esac
export LWLIB_CONSOLE_PROGRESS=${LWLIB_CONSOLE_PROGRESS:-1}  # lwlib's bars: a line per 10% on this console too
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the kernels import this checkout's lwlib (a venv may serve several)

env/setup.sh

# --- the profile: loaded and validated (sections, fields, types, values, overrides) before anything is created --
checked=$(.venv/bin/python -m lwlib.config check "$PROFILE" --base-dir "$CALLER_DIR" --papermill-params \
          ${SETS[@]+"${SETS[@]}"}) || exit 2
{ read -r name; read -r params; } <<< "$checked"  # the profile's name; papermill parameters (profile, overrides)
rerun=$(printf '%q ' ./run_all.sh "$PROFILE" ${SETS[@]+"${SETS[@]}"}); rerun=${rerun% }  # for the failure message
write_report() {  # the HTML report of what ran (also after a failure); a failed report does not fail the run
  .venv/bin/python -m lwlib.report "${LWLIB_RUNS:-runs}/$name" || echo "run_all.sh: the HTML report failed" >&2
}
out="${LWLIB_RUNS:-runs}/$name/notebooks"
mkdir -p "$out"
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  base=$(basename "$nb")
  num=${base:0:2}
  [ -n "$FROM" ] && [[ "$num" < "$FROM" ]] && continue
  [ -n "$ONLY" ] && [ "$num" != "$ONLY" ] && continue
  if [ "$RESUME" = 1 ] && .venv/bin/python - "$out/$base" <<'PYEOF'
import json, sys
try:
    meta = json.load(open(sys.argv[1]))["metadata"].get("papermill", {})
except (OSError, ValueError, KeyError):
    sys.exit(1)
sys.exit(0 if meta.get("end_time") and not meta.get("exception") else 1)
PYEOF
  then
    echo "=== [$name] $base: finished earlier (--resume), skipped"
    continue
  fi
  echo "=== [$name] $base  ($(date -u +%H:%M:%S) UTC)"
  # lwlib.nbrun: papermill with kernel python3 (this venv's python) and an encrypted kernel connection
  if ! .venv/bin/python -m lwlib.nbrun "$nb" "$out/$base" -y "$params" -k python3 --cwd notebooks --progress-bar; then
    echo "run_all.sh: $base FAILED for profile $name." >&2
    echo "  The executed copy, with the error in it: $out/$base" >&2
    echo "  Fix it, then resume with: $rerun --resume   (or --from $num)" >&2
    write_report
    exit 1
  fi
done
write_report
echo "=== [$name] all notebooks done: executed copies in $out, figures in figures/$name"
echo "    report: ${LWLIB_RUNS:-runs}/$name/report/index.html"
