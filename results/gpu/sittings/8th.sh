#!/usr/bin/env bash
# The next sitting's passes (written 2026-12-07 after the 8th sitting, before this one ran; results/gpu/README.md,
# "The 8th sitting"), run in the background on the lent GPU after env/offline_unpack.sh:
#   results/gpu/sittings/8th.sh END    # END: Unix time by which every pass has ended
# 1. notebook 02 (the corpus), unless the kit brought it;
# 2. notebook 03 trains `sft` again (sft.rebuild; its fp32 output layer: sft.fp32_loss_head);
# 3. if the rebuilt `sft` is within 1% of its recorded loss curve (rebuild.json: then it counts as the same model and
#    DPO seed 0's 963 samples of the 8th sitting, dpo_records.tar.xz, resume): DPO seed 0 (notebook 04) until END;
#    otherwise those samples cannot be pooled, and the pass runs the next runs of (a) (notebook 03, `cap8000` seed 0
#    onwards), which end within the sitting.
# Figures go under runs/figures/ (LWLIB_FIGURES): files written into the checkout's figures/ on the lent machine are
# replaced by the next call's copy of the working tree (the 8th sitting lost its NLL figure so); collect.sh brings
# them back.
set -uo pipefail
END=$1
export LWLIB_DATA_DIR=${LWLIB_DATA_DIR:-/tmp/kit/data} PYTHONUNBUFFERED=1 LWLIB_FIGURES=${LWLIB_FIGURES:-$PWD/runs/figures}
left() { echo $(( END - $(date +%s) )); }
[ -f runs/gpu/corpus/heldout_nll.jsonl ] || ./run_all.sh gpu --only 02 || exit 1
./run_all.sh gpu --only 03 --set "sft.runs=[main]" --set "sft.rebuild=[sft]" || exit 1
if python3 -c "import json, sys; sys.exit(0 if json.load(open('runs/gpu/sft/rebuild.json'))['within_tol'] else 1)"
then
  echo "8th.sh: sft rebuilt within 1%: DPO seed 0 until $END"
  LWLIB_SITTING_END=$END LWLIB_SITTING_RUN_S=0 timeout "$(left)" ./run_all.sh gpu --only 04
else
  echo "8th.sh: sft's rebuild is not within 1% (runs/gpu/sft/rebuild.json): the next runs of (a)"
  LWLIB_SITTING_END=$END LWLIB_SITTING_RUN_S=260 ./run_all.sh gpu --only 03 --set "sft.runs=[cap, uncapped]"
fi
echo "8th.sh: done at $(date -u +%T)"
