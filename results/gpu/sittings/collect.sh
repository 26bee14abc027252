#!/usr/bin/env bash
# Bring a sitting's records back through the lent GPU's $OUT (at most 8 files of 16 MiB): runs/<profile>/ without
# model weights, checkpoints or the corpus (rebuilt by notebook 02), figures/<profile>/ (and runs/figures/<profile>/,
# where a sitting's script writes them: LWLIB_FIGURES), the benchmark results and
# the background jobs' logs, as one xz tar split into parts of 15 MB (back.tar.xz.00, .01, ...; join with cat).
#   results/gpu/sittings/collect.sh [PROFILE]
set -euo pipefail
PROFILE=${1:-gpu}
[ -n "${OUT:-}" ] || { echo "collect.sh: \$OUT is not set" >&2; exit 2; }
paths=(runs/"$PROFILE" figures/"$PROFILE")
[ -d runs/figures/"$PROFILE" ] && paths+=(runs/figures/"$PROFILE")
[ -d benchmarks/results ] && paths+=(benchmarks/results)
[ -d /tmp/bg ] && mkdir -p runs/"$PROFILE"/bg_logs && cp /tmp/bg/*.log runs/"$PROFILE"/bg_logs/ 2>/dev/null || true
tar cf - --exclude=model --exclude=checkpoints --exclude="runs/$PROFILE/corpus" --exclude='*.safetensors' \
  --exclude='*.bin' --exclude='*.pt' "${paths[@]}" 2>/dev/null | xz -T0 -3 > /tmp/back.tar.xz
split -b 15000000 -d /tmp/back.tar.xz "$OUT/back.tar.xz."
ls -la "$OUT"
