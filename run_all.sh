#!/usr/bin/env bash
# Run every notebook headlessly for a profile, in order, through papermill.
#   ./run_all.sh [PROFILE] [--from NN] [--only NN] [--resume] [--set KEY=VALUE ...]
#   PROFILE: smoke (default) | gpu_short | gpu | paper | a YAML file (a relative path is taken from where you are)
# Executed copies go to <run folder>/notebooks/ (run folder: ${LWLIB_RUNS:-runs}/<profile's name>); figures to
# $LWLIB_FIGURES/<name>, else figures/<name>/, or <run folder>/figures/ when $LWLIB_RUNS moves the run folder; an HTML
# report of the run (claims, figures, executed notebooks, manifests) to <run folder>/report/index.html.
# Stages resume from their run-folder files, so re-running after an interruption continues where it stopped;
# --from NN starts at notebook NN, --only NN runs one notebook, --resume skips notebooks whose executed copy
# finished without error, with the same --set values, and left no runs waiting (<run folder>/sitting.json; for
# machines that cut jobs at a time limit: run the same command again).
# $LWLIB_SITTING_END (Unix time): notebook 03 starts no training run that would end after it (lwlib.runs.Sitting;
# $LWLIB_SITTING_RUN_S: a run's length before one is timed), so a job cut at its limit loses no run halfway.
# --set KEY=VALUE overrides a profile value in every notebook (repeatable; the value is read as YAML, e.g.
# --set sft.max_steps=10 --set "probe.lengths=[1000, 2000]"). Before any notebook starts, the whole profile
# and its overrides are checked (python -m lwlib.config check): a mistake is reported with the file (or the
# --set) and the field, and nothing is created.
set -euo pipefail
# Started with SIGINT ignored (a background job of a non-interactive shell, as CI may start it), bash cannot trap
# it: the INT trap below would do nothing. Start again with SIGINT at its default (the same PID: exec).
if [ -z "${LWLIB_SIGINT_RESET:-}" ] && [ -r /proc/$$/status ] &&
   (( 16#$(awk '/^SigIgn:/ { print $2 }' /proc/$$/status) & 2 )); then
  export LWLIB_SIGINT_RESET=1
  if env --default-signal=INT true 2>/dev/null; then exec env --default-signal=INT bash "$0" "$@"; fi
  exec "${PYTHON:-python3}" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp("bash", ["bash"] + sys.argv[1:])' "$0" "$@"
fi
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
    -h|--help) sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
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
# papermill's cell counter redraws one line with \r: on a terminal lwlib's lines clear it first; in a log or a pipe
# it would run into them, so there the counter is off and lwlib's lines and the "===" lines tell the progress
if [ -t 2 ]; then bar=(--progress-bar); else bar=(--no-progress-bar); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the kernels import this checkout's lwlib (a venv may serve several)

env/setup.sh

# --- the profile: loaded and validated (sections, fields, types, values, overrides) before anything is created --
checked=$(.venv/bin/python -m lwlib.config check "$PROFILE" --base-dir "$CALLER_DIR" --papermill-params \
          ${SETS[@]+"${SETS[@]}"}) || exit 2
{ read -r name; read -r params; } <<< "$checked"  # the profile's name; papermill parameters (profile, overrides)
rerun=$(printf '%q ' ./run_all.sh "$PROFILE" ${SETS[@]+"${SETS[@]}"}); rerun=${rerun% }  # for the failure message
write_report() {  # the HTML report of what ran (also after a failure); a failed report does not fail the run
  .venv/bin/python -m lwlib.report "$run_dir" || echo "run_all.sh: the HTML report failed" >&2
}
# The run folder follows one rule, the notebooks' own (README "Run folder"): <run root>/<the profile's name field,
# default its file stem>, run root = $LWLIB_RUNS or runs/.
run_dir="${LWLIB_RUNS:-$PWD/runs}/$name"
out="$run_dir/notebooks"
mkdir -p "$out"
# One run_all.sh per run folder: an exclusive lock on $run_dir/.lock for the whole run. It is inherited by papermill
# and the kernel, so orphans of a killed runner (kill -9) still hold it while they write.
lock="$run_dir/.lock"
descendants() {  # PIDs below $1, deepest last
  ps -e -o pid= -o ppid= | awk -v root="$1" '{ parent[$1] = $2 }
    END { want[root] = 1; grew = 1
          while (grew) { grew = 0; for (p in parent) if (!(p in want) && (parent[p] in want)) { want[p] = 1; grew = 1 } }
          for (p in want) if (p != root) print p }'
}
if command -v flock >/dev/null 2>&1; then
  exec 9>>"$lock"
  if ! flock -n 9; then
    exec 9>&-  # (so that what follows does not hold it too)
    holder=$(head -c 20 "$lock" 2>/dev/null | tr -dc 0-9)
    if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then
      echo "run_all.sh: $run_dir is in use by another run_all.sh (PID $holder):" >&2
      echo "  two writers would store every record twice; wait for it to finish or stop it (kill $holder), then rerun." >&2
      exit 75
    fi
    # The runner that took the lock is gone (kill -9), but what it started still runs and holds the lock: papermill
    # inherited it, and the kernel below papermill writes. Name those (Linux: the processes with the file open).
    real_lock=$(cd "$run_dir" && pwd -P)/.lock
    pids=$(find /proc/[0-9]*/fd -maxdepth 1 -lname "$real_lock" 2>/dev/null | cut -d/ -f3 | sort -un || true)
    pids=$(for p in $pids; do echo "$p"; descendants "$p"; done | sort -un | tr '\n' ' ' || true)
    pids=${pids% }
    echo "run_all.sh: $run_dir is in use: run_all.sh PID ${holder:-?} took it and is gone (killed?), but what it" >&2
    echo "  started still runs and holds the lock:" >&2
    for p in $pids; do echo "    PID $p: $(ps -o args= -p "$p" 2>/dev/null | cut -c1-150)" >&2; done
    [ -z "${pids// }" ] && echo "    (not found: no /proc here; look for papermill and ipykernel processes)" >&2
    echo "  two writers would store every record twice; wait for them to finish or stop them (kill${pids:+ $pids}), then rerun." >&2
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
# after LWLIB_STOP_GRACE_S (5) seconds. Exit status 143 (TERM) / 130 (INT), also when started with SIGINT ignored
# (see the top);
# 75 when another run holds the lock.
child=""
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
  [ -n "$FROM" ] && [[ "$num" < "$FROM" ]] && continue
  [ -n "$ONLY" ] && [ "$num" != "$ONLY" ] && continue
  if [ "$RESUME" = 1 ] && .venv/bin/python - "$out/$base" "$run_dir" "$params" <<'PYEOF'
import os, sys
import yaml
from lwlib.nbrun import rerun_reason
why = rerun_reason(sys.argv[1], sys.argv[2], yaml.safe_load(sys.argv[3]) or {})
if why and os.path.exists(sys.argv[1]):
    print(f"=== {os.path.basename(sys.argv[1])}: {why}: run again")
sys.exit(1 if why else 0)
PYEOF
  then
    echo "=== [$name] $base: finished earlier (--resume), skipped"
    continue
  fi
  echo "=== [$name] $base  ($(date -u +%H:%M:%S) UTC)"
  # lwlib.nbrun: papermill with kernel python3 (this venv's python) and an encrypted kernel connection; in a process
  # group of its own (set -m), so that stop_all can signal all of it
  set -m
  LWLIB_COMMAND="$rerun (notebook $base)" \
    .venv/bin/python -m lwlib.nbrun "$nb" "$out/$base" -y "$params" -k python3 --cwd notebooks "${bar[@]}" &
  child=$!
  set +m
  status=0
  wait "$child" || status=$?
  child=""
  if [ "$status" != 0 ]; then
    echo "run_all.sh: $base FAILED for profile $name." >&2
    if .venv/bin/python -c 'import json, sys; json.load(open(sys.argv[1], encoding="utf-8"))["cells"]' \
         "$out/$base" 2>/dev/null; then
      echo "  The executed copy, with the error in it: $out/$base" >&2
    else  # a full disk (ENOSPC) leaves it cut off: do not send anyone to read it
      echo "  No readable executed copy: $out/$base is missing or cut off (not a whole notebook; was the disk" >&2
      echo "  full?). The error is in the output above." >&2
    fi
    echo "  Fix it, then resume with: $rerun --resume   (or --from $num)" >&2
    write_report
    # the failed pass joins <run>/timing_passes.json now: the next pass's executed copy replaces this one
    .venv/bin/python -c 'import sys; from lwlib.results import notebook_timing; notebook_timing(sys.argv[1])' \
      "$run_dir" >/dev/null 2>&1 || true
    exit 1
  fi
done
write_report
.venv/bin/python -m lwlib.results "$run_dir" || echo "run_all.sh: copying the results to results/$name failed" >&2
figs=$(.venv/bin/python -c 'import sys; from lwlib.config import figures_dir_for; print(figures_dir_for(sys.argv[1]))' \
       "$run_dir" 2>/dev/null || echo "figures/$name")
echo "=== [$name] all notebooks done: executed copies in $out, figures in $figs"
echo "    report: $run_dir/report/index.html; small result files: results/$name"
