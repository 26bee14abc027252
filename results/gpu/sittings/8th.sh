#!/usr/bin/env bash
# The next sitting's passes (written 2026-12-07 after the 8th sitting, before this one ran; results/gpu/README.md,
# "The 8th sitting"), run in the background on the lent GPU after env/offline_unpack.sh:
#   results/gpu/sittings/8th.sh END    # END: Unix time by which every pass has ended
# 0. the slots engine's exact kernels (issue 28: Gemma's norms, lwlib.decode_norm, measured in the 8th sitting; the
#    RoPE, lwlib.decode_rope, added after it and not yet run on a GPU): their GPU tests first (bit-exact kernels,
#    the tiny Gemma 3's graph steps equal to `generate`); if one fails, every pass below runs without them
#    (fused_kernels none: the same tokens, slower);
# 1. notebook 02 (the corpus), unless the kit brought it;
# 2. notebook 03 trains `sft` again (sft.rebuild; its fp32 output layer: sft.fp32_loss_head);
# 3. if the rebuilt `sft` is within 1% of its recorded loss curve (rebuild.json: then it counts as the same model and
#    DPO seed 0's 963 samples of the 8th sitting, dpo_records.tar.xz, resume): DPO seed 0 (notebook 04) until
#    END - BENCH_S; otherwise those samples cannot be pooled, and the pass runs the next runs of (a) (notebook 03,
#    `cap8000` seed 0 onwards), which end within the sitting;
# 4. in the last BENCH_S seconds, for issue 28: the decoding step at batch 192 and 16k with and without the exact
#    kernels, and its breakdown (benchmarks/generation.py; written under runs/, which the next call's copy of the
#    working tree leaves alone).
# Figures go under runs/figures/ (LWLIB_FIGURES): files written into the checkout's figures/ on the lent machine are
# replaced by the next call's copy of the working tree (the 8th sitting lost its NLL figure so); collect.sh brings
# them back.
set -uo pipefail
END=$1 BENCH_S=${BENCH_S:-150}
export LWLIB_DATA_DIR=${LWLIB_DATA_DIR:-/tmp/kit/data} PYTHONUNBUFFERED=1 LWLIB_FIGURES=${LWLIB_FIGURES:-$PWD/runs/figures}
left() { echo $(( END - $(date +%s) )); }
FUSED=()
if ! timeout 240 .venv/bin/python -m pytest -x -q -rA tests/test_decoding_windows_gpu.py -k "not real" 2>&1 | tail -15
then
  echo "8th.sh: the exact kernels' GPU tests failed: the passes run with fused_kernels none"
  FUSED=(--set dpo.backend.fused_kernels=none --set bench.backend.fused_kernels=none
         --set probe.backend.fused_kernels=none)
fi
[ -f runs/gpu/corpus/heldout_nll.jsonl ] || ./run_all.sh gpu --only 02 || exit 1
./run_all.sh gpu --only 03 --set "sft.runs=[main]" --set "sft.rebuild=[sft]" || exit 1
if python3 -c "import json, sys; sys.exit(0 if json.load(open('runs/gpu/sft/rebuild.json'))['within_tol'] else 1)"
then
  echo "8th.sh: sft rebuilt within 1%: DPO seed 0 until $(( END - BENCH_S ))"
  [ "$(( $(left) - BENCH_S ))" -gt 60 ] && LWLIB_SITTING_END=$(( END - BENCH_S )) LWLIB_SITTING_RUN_S=0 \
    timeout $(( $(left) - BENCH_S )) ./run_all.sh gpu --only 04 "${FUSED[@]}"
else
  echo "8th.sh: sft's rebuild is not within 1% (runs/gpu/sft/rebuild.json): the next runs of (a)"
  LWLIB_SITTING_END=$(( END - BENCH_S )) LWLIB_SITTING_RUN_S=260 ./run_all.sh gpu --only 03 \
    --set "sft.runs=[cap, uncapped]" "${FUSED[@]}"
fi
mkdir -p runs/gpu/benchmarks
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 5 )) .venv/bin/python benchmarks/generation.py --model gemma3-270m \
  --workloads decode --decode-batches 192 --decode-context 16384 --decode-tokens 64 --max-batch 192 \
  --generate-tokens 0 --check-prompts 0 --breakdown --fused-kernels exact none \
  --out runs/gpu/benchmarks/generation_gemma3_exact_kernels.json
echo "8th.sh: done at $(date -u +%T)"
