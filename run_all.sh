#!/usr/bin/env bash
# Run every notebook headlessly for a profile, in order, through papermill.
#   ./run_all.sh [PROFILE] [--from NN] [--only NN] [--resume]   PROFILE: smoke (default) | gpu_short | gpu | paper | x.yaml
# Executed copies go to <run folder>/notebooks/ (run folder: ${LWLIB_RUNS:-runs}/<profile's name>); figures to figures/<name>/.
# Stages resume from their run-folder files, so re-running after an interruption continues where it stopped;
# --from NN starts at notebook NN, --only NN runs one notebook, --resume skips notebooks whose executed copy
# finished without error (for machines that cut jobs at a time limit: run the same command again).
set -euo pipefail
cd "$(dirname "$0")"
PROFILE=smoke FROM=00 ONLY="" RESUME=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --resume) RESUME=1; shift ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    -*) echo "run_all.sh: unknown option $1" >&2; exit 2 ;;
    *) PROFILE=$1; shift ;;
  esac
done
env/setup.sh

# --- run folder, one writer, signals (issue 19) -----------------------------------------------------------------
# The run folder follows one rule, the notebooks' own (README "Run folder"): <run root>/<the profile's name field,
# default its file stem>, run root = $LWLIB_RUNS or runs/. Asked of lwlib so that both can never disagree.
run_dir=$(.venv/bin/python -c 'import sys; from lwlib.config import load_profile; print(load_profile(sys.argv[1]).run_dir)' "$PROFILE") \
  || { echo "run_all.sh: cannot load profile $PROFILE (above)" >&2; exit 2; }
name=$(basename "$run_dir")
out="$run_dir/notebooks"
mkdir -p "$out"
# One run_all.sh per run folder: an exclusive lock on $run_dir/.lock for the whole run. It is inherited by papermill
# and the kernel, so orphans of a killed runner (kill -9) still hold it while they write.
lock="$run_dir/.lock"
if command -v flock >/dev/null 2>&1; then
  exec 9>>"$lock"
  if ! flock -n 9; then
    echo "run_all.sh: $run_dir is in use by another run_all.sh (PID $(head -c 20 "$lock" 2>/dev/null | tr -dc 0-9)):" >&2
    echo "  two writers would store every record twice; wait for it to finish or stop it (kill PID), then rerun." >&2
    exit 75
  fi
  echo $$ > "$lock"
else  # no flock(1) (macOS): a PID file, created atomically, taken over when its process is gone
  while ! (set -C; echo $$ > "$lock") 2>/dev/null; do
    holder=$(tr -dc 0-9 < "$lock" 2>/dev/null || true)
    if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then
      echo "run_all.sh: $run_dir is in use by another run_all.sh (PID $holder):" >&2
      echo "  two writers would store every record twice; wait for it to finish or stop it (kill $holder), then rerun." >&2
      exit 75
    fi
    rm -f "$lock"
  done
  trap 'rm -f "$lock"' EXIT
fi
# SIGTERM / SIGINT stop everything: papermill runs in a process group of its own (set -m below), and the kernel
# that jupyter starts in a session of its own is found as papermill's descendant; all get SIGTERM, then SIGKILL
# after LWLIB_STOP_GRACE_S (5) seconds. Exit status 143 (TERM) / 130 (INT);
# 75 when another run holds the lock.
child=""
descendants() {  # PIDs below $1, deepest last
  ps -e -o pid= -o ppid= | awk -v root="$1" '{ parent[$1] = $2 }
    END { want[root] = 1; grew = 1
          while (grew) { grew = 0; for (p in parent) if (!(p in want) && (parent[p] in want)) { want[p] = 1; grew = 1 } }
          for (p in want) if (p != root) print p }'
}
stop_all() {  # $1 signal name, $2 exit status
  trap '' TERM INT
  if [ -n "$child" ]; then
    pids="$child $(descendants "$child" | tr '\n' ' ')" alive="$child"
    echo "run_all.sh: SIG$1: stopping papermill and its kernel (PIDs $pids)" >&2
    kill -TERM -- "-$child" 2>/dev/null || true
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq $((${LWLIB_STOP_GRACE_S:-5} * 10))); do
      alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
      [ -z "$alive" ] && break
      sleep 0.1
    done
    [ -n "$alive" ] && kill -KILL $alive 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  echo "run_all.sh: stopped by SIG$1; rerun the same command to resume (--resume skips finished notebooks)" >&2
  exit "$2"
}
trap 'stop_all TERM 143' TERM
trap 'stop_all INT 130' INT
# ------------------------------------------------------------------------------------------------------------------
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  base=$(basename "$nb")
  num=${base:0:2}
  [[ "$num" < "$FROM" ]] && continue
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
  set -m  # papermill in a process group of its own, so that stop_all can signal all of it
  .venv/bin/papermill "$nb" "$out/$base" -p profile "$PROFILE" -k python3 --cwd notebooks --progress-bar &
  child=$!
  set +m
  status=0
  wait "$child" || status=$?
  child=""
  if [ "$status" != 0 ]; then
    echo "run_all.sh: $base FAILED for profile $name." >&2
    echo "  The executed copy, with the error in it: $out/$base" >&2
    echo "  Fix it, then resume with: ./run_all.sh $PROFILE --resume   (or --from $num)" >&2
    exit 1
  fi
done
echo "=== [$name] all notebooks done: executed copies in $out, figures in figures/$name"
