#!/usr/bin/env bash
# Set up dymu_kernels in the active Python environment (a venv is fine).
#
#   bash scripts/setup.sh                   # package, transformers (apply_dymu) and demo dependencies
#   bash scripts/setup.sh --test            # ... plus test dependencies and the vLLM environment
#                                           # of the plugin's tests (scripts/setup_vllm.sh, ~2.2 GB)
#   bash scripts/setup.sh --test --no-vllm  # ... without the vLLM environment (its tests are skipped)
#
# The vLLM environment is made in the background and may still be in the
# making when this script returns (the main install is done then): the tests
# that need it wait for build/vllm-env.status to say "ready" (or fail with its
# log, build/setup_vllm.log), while the others run. So the minutes it takes to
# install are spent beside the test suite, not before it.
#
# torch is never replaced: an installed torch (and triton) is pinned for every
# pip call below, and only a machine without torch gets torch==2.13.0. The C++
# extension is compiled against that torch (--no-build-isolation); the script
# fails when it did not build, unless DYMU_NO_EXT=1 skips it on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras="demo,hf"
with_vllm=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="demo,hf,test"; with_vllm=1 ;;
    --no-vllm) no_vllm=1 ;;
    *) echo "[setup] unknown option $arg (expected --test and/or --no-vllm)" >&2; exit 2 ;;
  esac
done
if [[ "${no_vllm:-0}" == 1 ]]; then with_vllm=0; fi

# (pip byte-compiles what it installs: a process then imports from .pyc files even where
# PYTHONDONTWRITEBYTECODE=1 keeps Python from writing them, as on CI's machines.)
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# On exit: the pip constraints file goes; a main install that did not finish
# tells the vLLM job below (which waits for it) by build/.main-failed.
constraints=""
on_exit() {
  if [[ -n "$constraints" ]]; then rm -f "$constraints"; fi
  if [[ "$with_vllm" == 1 && ! -e build/.main-installed ]]; then touch build/.main-failed; fi
}
trap on_exit EXIT

# The vLLM environment (a venv of its own, minutes of installs from disk) is made
# in a detached background job: its dependencies now, beside the main install;
# this package goes into it once the extension is built here (build/.main-installed).
# The job writes its outcome to build/vllm-env.status ("building PID", "ready",
# "failed"), which tests/conftest.py reads.
if [[ "$with_vllm" == 1 ]]; then
  mkdir -p build
  vllm_log="build/setup_vllm.log"
  rm -f build/.main-installed build/.main-failed
  read -r state job < build/vllm-env.status 2>/dev/null || true
fi
if [[ "$with_vllm" == 1 && "${state:-}" == building && -n "${job:-}" && -e "/proc/${job}" ]]; then
  # An earlier run's job is still at it: it installs this package once this run's build is done.
  echo "[setup] the vLLM environment is already being made (job $job, log: $vllm_log)"
elif [[ "$with_vllm" == 1 ]]; then
  echo "[setup] making the vLLM environment in the background (log: $vllm_log)"
  echo building > build/vllm-env.status  # now: an older "ready" must not be read while this one runs
  nohup setsid bash -c '
    status=build/vllm-env.status
    echo "building $$" > "$status"
    start=$SECONDS
    ok=0
    if bash scripts/setup_vllm.sh --deps-only; then
      until [[ -e build/.main-installed || -e build/.main-failed ]]; do sleep 2; done
      if [[ -e build/.main-installed ]] && bash scripts/setup_vllm.sh; then ok=1; fi
    fi
    echo "[setup-vllm] finished after $((SECONDS - start))s"
    if [[ $ok == 1 ]]; then echo ready > "$status"; else echo failed > "$status"; fi
  ' > "$vllm_log" 2>&1 < /dev/null &
fi

# The installed torch's version, and triton's: an installed triton is kept (GPU
# machines ship one matched to torch); otherwise 3.6.0, the version whose CPU
# interpreter the tests are known to run on. One interpreter start (torch's
# import takes seconds).
versions() {
  "$PY" -c 'import torch
try:
    import triton
    triton_version = triton.__version__
except Exception:  # none, or one that does not import: the default
    triton_version = "3.6.0"
print(torch.__version__, triton_version)' 2>/dev/null | tail -n 1  # (the last line: an import may print)
}
if ! found="$(versions)"; then
  echo "[setup] no torch found: installing torch==2.13.0"
  pip_install "torch==2.13.0"
  found="$(versions)"
fi
read -r torch_version triton_version <<< "$found"
echo "[setup] using torch $torch_version"
constraints="$(mktemp)"
echo "torch==${torch_version}" > "$constraints"
echo "triton==${triton_version}" >> "$constraints"

# Build tools for the extension (no build isolation: it must see this torch).
pip_install -c "$constraints" "setuptools>=64" wheel "pybind11>=2.10" ninja
pip_install -c "$constraints" --no-build-isolation -e ".[${extras}]"
# A build that should have produced the C++ extension and did not is an error
# (exit 1), so a broken build cannot pass unnoticed; DYMU_NO_EXT=1 (which
# setup.py also reads) installs without it on purpose.
"$PY" - <<'PY'
import sys
from dymu_kernels import _ext
error = _ext.check_built()
if error is not None:
    print(f"[setup] ERROR: C++ extension NOT available: {error}", file=sys.stderr)
    sys.exit(1)
reason = _ext.missing_reason()
print("[setup] C++ extension:", "built" if reason is None else f"skipped on purpose (DYMU_NO_EXT=1): {reason}")
PY
echo "[setup] package installed (${SECONDS}s)"
if [[ "$with_vllm" == 1 ]]; then
  touch build/.main-installed
  echo "[setup] the vLLM environment is being finished in the background (build/vllm-env.status, log: $vllm_log);"
  echo "[setup] the tests that need it wait for it"
fi
