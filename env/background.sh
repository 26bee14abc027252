#!/usr/bin/env bash
# Long work across short calls on a machine lent for a fixed time (each call limited to minutes; the machine and
# what runs on it stay while calls follow each other): start a command in its own process session, so it outlives
# the call that started it, then follow it from later calls.
#
#   env/background.sh start NAME CMD [ARG...]   # runs CMD in the background (setsid); its output in /tmp/bg/NAME.log
#   env/background.sh wait NAME UNTIL           # prints the log's new lines until NAME ends or Unix time UNTIL;
#                                               # exits 0 when it ended with 0, 3 when still running, else its code
#   env/background.sh status NAME               # running / ended <code>
#
# e.g. one call: env/background.sh start setup env/offline_unpack.sh /tmp/kit wheels; the next calls: carry a part
# each; a later call: env/background.sh wait setup $(( $(date +%s) + 500 )) && LWLIB_SITTING_END=... ./run_all.sh ...
set -euo pipefail
BG=${LWLIB_BG_DIR:-/tmp/bg}
mkdir -p "$BG"
cmd=${1:-}; name=${2:-}
[ -n "$cmd" ] && [ -n "$name" ] || { sed -n '2,13p' "$0"; exit 2; }
log="$BG/$name.log" pidf="$BG/$name.pid" rcf="$BG/$name.rc"
running() { [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; }
case "$cmd" in
  start)
    shift 2
    [ $# -ge 1 ] || { echo "background.sh start $name: no command" >&2; exit 2; }
    if running; then echo "background.sh: $name is running already (pid $(cat "$pidf"))" >&2; exit 1; fi
    rm -f "$rcf" "$BG/$name.seen"
    : > "$log"
    setsid bash -c '"$@" >>"$0" 2>&1; echo $? >"$0.rc.tmp"; mv "$0.rc.tmp" "'"$rcf"'"' "$log" "$@" </dev/null >/dev/null 2>&1 &
    echo $! > "$pidf"
    echo "[background] $name started (pid $!): $*; log $log"
    ;;
  wait)
    until=${3:?background.sh wait NAME UNTIL (Unix time)}
    seen=$(cat "$BG/$name.seen" 2>/dev/null || echo 0)
    while :; do
      lines=$(wc -l < "$log")
      if [ "$lines" -gt "$seen" ]; then sed -n "$((seen + 1)),${lines}p" "$log" | tr '\r' '\n' | grep -v '^\s*$' | tail -n 40; seen=$lines; echo "$seen" > "$BG/$name.seen"; fi
      if [ -f "$rcf" ]; then rc=$(cat "$rcf"); echo "[background] $name ended: $rc"; exit "$rc"; fi
      running || { echo "[background] $name is gone without an exit code (killed?)" >&2; exit 1; }
      [ "$(date +%s)" -lt "$until" ] || { echo "[background] $name still running"; exit 3; }
      sleep 1
    done
    ;;
  status)
    if [ -f "$rcf" ]; then echo "ended $(cat "$rcf")"; elif running; then echo running; else echo "not running"; fi
    ;;
  *) echo "background.sh: unknown command $cmd (start, wait, status)" >&2; exit 2 ;;
esac
