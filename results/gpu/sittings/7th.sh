#!/usr/bin/env bash
# The 7th sitting's passes (2026-12-07), written before they ran (results/gpu/README.md, "Order of the next
# sittings"), run in the background on the lent GPU after env/offline_unpack.sh:
#   results/gpu/sittings/7th.sh END    # END: Unix time by which every pass has ended
# 1. notebook 02 (the corpus: NLL passages and SFT data, by construction as in the 1st sitting), unless the kit
#    brought it;
# 2. NLL: notebook 03 trains `sft` and `cap500` again (sft.rebuild; their fp32 output layer: sft.fp32_loss_head),
#    then notebook 05 (base, sft, cap500);
# 3. if the rebuilt `sft` is within 1% of its recorded loss curve (rebuild.json; then it counts as the same model
#    and its DPO samples resume in a later sitting): DPO seed 0 (notebook 04, cut at END - BENCH_S); otherwise the
#    next runs of (a) (notebook 03, `cap8000` seed 0 onwards), which end within the sitting;
# 4. in the last BENCH_S seconds, for issue 28: the identity tests (tests/test_decoding_windows_gpu.py: the tiny
#    and the real model, with Gemma's norm kernels, lwlib.decode_norm, added 2026-12-07 16:30 before any GPU run),
#    then the decoding step with and without them, and its breakdown (benchmarks/generation.py).
set -uo pipefail
END=$1 BENCH_S=${BENCH_S:-300}
export LWLIB_DATA_DIR=${LWLIB_DATA_DIR:-/tmp/kit/data} PYTHONUNBUFFERED=1
left() { echo $(( END - $(date +%s) )); }
# (the corpus may come built on a CPU in the kit: lwlib.corpus.build_corpus, the same files; then 02 is skipped)
[ -f runs/gpu/corpus/heldout_nll.jsonl ] || ./run_all.sh gpu --only 02 || exit 1
./run_all.sh gpu --only 03 --set "sft.runs=[main]" --set "sft.rebuild=[sft, cap500]" || exit 1
./run_all.sh gpu --only 05
if python3 -c "import json, sys; sys.exit(0 if json.load(open('runs/gpu/sft/rebuild.json'))['within_tol'] else 1)"
then
  echo "7th.sh: sft rebuilt within 1%: DPO seed 0 until $(( END - BENCH_S ))"
  [ "$(( $(left) - BENCH_S ))" -gt 60 ] && LWLIB_SITTING_END=$(( END - BENCH_S )) LWLIB_SITTING_RUN_S=0 timeout $(( $(left) - BENCH_S )) \
    ./run_all.sh gpu --only 04
else
  echo "7th.sh: sft's rebuild is not within 1% (runs/gpu/sft/rebuild.json): the next runs of (a)"
  LWLIB_SITTING_END=$(( END - BENCH_S )) LWLIB_SITTING_RUN_S=260 ./run_all.sh gpu --only 03 \
    --set "sft.runs=[cap, uncapped]"
fi
[ "$(left)" -gt 180 ] && timeout 150 .venv/bin/python -m pytest -x -q -rA tests/test_decoding_windows_gpu.py 2>&1 | tail -30
mkdir -p benchmarks/results
[ "$(left)" -gt 60 ] && timeout $(( $(left) - 5 )) .venv/bin/python benchmarks/generation.py --model gemma3-270m --workloads decode \
  --decode-batches 192 --decode-context 16384 --decode-tokens 64 --max-batch 192 --generate-tokens 0 \
  --check-prompts 0 --breakdown --fused-kernels gemma_norm none \
  --out benchmarks/results/generation_gemma3_breakdown_sitting7.json
echo "7th.sh: done at $(date -u +%T)"
