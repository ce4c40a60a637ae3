"""Shared test helpers. Every test draws fresh seeded random data."""

import os

# Under pytest-xdist each worker takes one core (pyproject: two workers): one
# thread for OpenMP (torch, and the processes tests start: benchmark scripts,
# vLLM workers and servers — torch in a child would take every core, spinning
# against the other worker) and for OpenBLAS (NumPy: the Triton interpreter's
# dots). Set before torch and NumPy load, which read them once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in its CPU interpreter, which must be
# chosen before any @triton.jit decorator runs (kernel modules import lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The vLLM environment of the plugin's tests (scripts/setup_vllm.sh makes it).
VLLM_PYTHON = os.environ.get("DYMU_VLLM_PYTHON", os.path.join(ROOT, "build", "vllm-env", "bin", "python"))
# What scripts/setup.sh --test's background job says of it: "building PID", "ready" or "failed".
VLLM_STATUS = os.path.join(ROOT, "build", "vllm-env.status")
VLLM_WAIT_S = 1800


def _vllm_status():
    try:
        words = open(VLLM_STATUS).read().split()
    except OSError:
        return None, None
    status = words[0] if words else None
    pid = int(words[1]) if status == "building" and len(words) > 1 and words[1].isdigit() else None
    return status, pid


def require_vllm_env() -> str:
    """The vLLM environment's python, for a test that runs vLLM. While
    ``scripts/setup.sh --test`` still makes it in the background, wait (the
    other tests run meanwhile); if that failed or its job is gone, fail with
    its log; with no environment at all, skip."""
    import time

    deadline = time.monotonic() + VLLM_WAIT_S
    status, pid = _vllm_status()
    while status == "building":
        if pid is not None and not os.path.exists(f"/proc/{pid}"):
            status = "failed"  # the job ended without a word (killed)
            break
        if time.monotonic() > deadline:
            pytest.fail(f"the vLLM environment was still being made after {VLLM_WAIT_S} s ({VLLM_STATUS})")
        time.sleep(2)
        status, pid = _vllm_status()
    if status == "failed":
        log = os.path.join(ROOT, "build", "setup_vllm.log")
        tail = open(log, errors="replace").read()[-4000:] if os.path.exists(log) else "(no log)"
        pytest.fail(f"scripts/setup.sh --test could not make the vLLM environment ({log}):\n{tail}")
    if not os.path.exists(VLLM_PYTHON):
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (bash scripts/setup_vllm.sh makes it)")
    return VLLM_PYTHON



def run_vllm_worker(job, folder, name):
    """Run ``tests/vllm_worker.py`` on ``job`` in the vLLM environment (its
    doc gives the job's form: engines without and with the plugin, in one
    process) and return what it wrote."""
    import json
    import subprocess

    job_path, out_path = os.path.join(folder, f"{name}.json"), os.path.join(folder, f"{name}.out.json")
    json.dump(job, open(job_path, "w"))
    # One unbound thread: the tiny models gain nothing from a second one, whose spinning (bound to the cores the
    # suite's other process runs on) costs that process time.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run([VLLM_PYTHON, os.path.join(ROOT, "tests", "vllm_worker.py"), job_path, out_path],
                          env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM worker failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.load(open(out_path))


# Tensor parallel on the CPU: two workers, one core each (vLLM binds one NUMA node's cores per worker otherwise).
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "OMP_NUM_THREADS": "1"}


def greedy_generation(model, inputs, new_tokens: int):
    """transformers' greedy ``generate()`` of one prompt: its new tokens and
    each one's log-probability (what the vLLM worker reports, to compare)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return {"tokens": tokens, "logprobs": logprobs}


def assert_same_generation(got, want, what):
    """Equal tokens, log-probabilities within 2e-4 (``{"tokens", "logprobs"}`` each)."""
    import numpy as np

    assert got["tokens"] == want["tokens"], what
    np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=2e-4, err_msg=what)


# Where Triton kernels are tested: the GPU when there is one.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen():
    """A seeded generator per test: reproducible, fresh data for each check."""
    return torch.Generator().manual_seed(1234)


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


# The C++ extension: wherever the suite runs it must have built (a broken build
# fails CI, as scripts/setup.sh does), unless DYMU_NO_EXT=1 opts out on purpose.
EXT_OPT_OUT = os.environ.get("DYMU_NO_EXT", "0") == "1"  # as dymu_kernels._ext.opted_out() reads it
EXT_MISSING = "C++ extension not built"  # the skip reason of tests that need it


def needs_extension():
    """The compiled extension for a test that needs it: skipped only under
    DYMU_NO_EXT=1; otherwise a missing extension fails the test."""
    from dymu_kernels import _ext

    error = _ext.check_built()
    if error is not None:
        pytest.fail(error, pytrace=False)
    if _ext.extension() is None:
        pytest.skip(f"{EXT_MISSING} (DYMU_NO_EXT=1)")
    return _ext.extension()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip for a missing extension is a failure unless DYMU_NO_EXT=1 (for
    modules that skip with ``reason="C++ extension not built"`` themselves)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not EXT_OPT_OUT and EXT_MISSING in str(report.longrepr):
        report.outcome = "failed"
        report.longrepr = f"skipped for a missing extension ({report.longrepr}), but DYMU_NO_EXT=1 is not set: " \
                          "the C++ extension must build here"


# Files whose module fixtures run for minutes (ptxas, whole-model torch.compile, a cmake build), slowest
# first. The suite runs a file per process at a time (--dist loadfile), handing files out in
# collection order: these go first, so the last minutes are not one of them running alone.
SLOW_FILES = ("test_triton_aot.py", "test_qwen_vl.py", "test_qwen3_vl.py", "test_llava_generation.py",
              "test_segment.py")
# The files that run vLLM come last: scripts/setup.sh --test may still be making its environment when the
# suite starts (require_vllm_env waits), and their minutes-long fixtures, one per process, end the run together.
VLLM_FILES = ("test_vllm_families.py", "test_vllm_plugin.py", "test_bench_vllm.py")


def pytest_collection_modifyitems(config, items):
    order = SLOW_FILES + (None,) + VLLM_FILES  # None: every other file, in collection order
    rank = {name: i for i, name in enumerate(order)}
    items.sort(key=lambda item: rank.get(item.path.name, order.index(None)))  # stable: file order kept otherwise
