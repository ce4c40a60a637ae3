#!/usr/bin/env bash
# GPU checks and benchmarks, for a machine with an NVIDIA GPU and no network
# (torch, triton and transformers preinstalled). Runs the test suite on the GPU
# (Triton kernels compiled for real, CUDA-only tests enabled) and the GPU
# benchmarks; logs and result rows go to $OUT (default /tmp/dymu_gpu).
#
#   bash scripts/gpu_check.sh            # everything
#   bash scripts/gpu_check.sh tests      # tests only
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/dymu_gpu}"
mkdir -p "$OUT"
what="${1:-all}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
status=0
# no -x: a GPU hour is scarce, see every failure. With DYMU_VLLM_PYTHON (the python of a vLLM GPU environment
# with this package installed) the vLLM plugin's tests serve on the GPU under vLLM's defaults there (compiled,
# CUDA graphs FULL_AND_PIECEWISE, async scheduling, prefix caching): stock == transformers, nothing merged ==
# stock vLLM, merging == patched transformers, prefix-cache hits exact.
python3 -m pytest -q -rs tests 2>&1 | tee "$OUT/pytest.log" || status=1
if [[ "$what" == "all" ]]; then
  python3 benchmarks/bench_dtome.py 2>&1 | tee "$OUT/bench_dtome.log" || status=1
  python3 benchmarks/bench_vtu.py 2>&1 | tee "$OUT/bench_vtu.log" || status=1
  python3 benchmarks/bench_vtu.py --sweep 2>&1 | tee "$OUT/bench_vtu_sweep.log" || status=1
  # The fused op's latency, deterministic=True (position-order re-merge) vs the fp32-atomic default
  python3 benchmarks/bench_vtu.py --deterministic 2>&1 | tee "$OUT/bench_vtu_deterministic.log" || status=1
  # End to end, LLaVA-1.5-7B shape (random weights): stock vs DyMU prefill / generate / memory / FLOPs
  python3 benchmarks/bench_e2e.py --device cuda --size 7b --dtype bfloat16 --samples 5 2>&1 | tee "$OUT/bench_e2e.log" || status=1
  # Qwen2.5-VL-3B shape (random weights, whole depth): stock vs DyMU in the tower, a photograph and a video
  python3 benchmarks/bench_qwen.py --device cuda --dtype bfloat16 --vision-layers 32 --lm-layers 36 --samples 5 2>&1 | tee "$OUT/bench_qwen.log" || status=1
  # Qwen3-VL-8B shape (random weights, whole depth: 27 tower blocks with deepstack, 36 LM layers), r = 4 / 6 units
  python3 benchmarks/bench_qwen.py --family qwen3_vl --r 4 6 --device cuda --dtype bfloat16 --vision-layers 27 --lm-layers 36 --samples 5 2>&1 | tee "$OUT/bench_qwen3.log" || status=1
  # Qwen3.5 9B-class shape (random weights; 27 tower blocks, 32 LM layers: 24 Gated DeltaNet + 8 gated attention;
  # on CUDA transformers takes flash-linear-attention / causal-conv1d kernels where installed), r = 4 / 6 units
  python3 benchmarks/bench_qwen.py --family qwen3_5 --r 4 6 --device cuda --dtype bfloat16 --vision-layers 27 --lm-layers 32 --samples 5 2>&1 | tee "$OUT/bench_qwen3_5.log" || status=1
  python3 benchmarks/bench_decode_ab.py --device cuda 2>&1 | tee "$OUT/bench_decode_ab.log" || status=1
  # The paper's Table 1 with every provider's latency on this GPU (bf16, causal)
  python3 benchmarks/table1.py --device cuda 2>&1 | tee "$OUT/table1.log" || status=1
  # vLLM offline throughput with and without the plugin, when a vLLM GPU environment is given
  # (DYMU_VLLM_PYTHON: its python, with vllm and this package installed): bf16, small LLaVA
  if [[ -n "${DYMU_VLLM_PYTHON:-}" ]]; then
    # vLLM's GPU defaults on both sides (stock-compiled: compiled + CUDA graphs; DyMU's engine_kwargs keep them)
    python3 benchmarks/bench_vllm.py --configs stock-compiled,r=21,threshold,stock-compiled 2>&1 | tee "$OUT/bench_vllm.log" || status=1
    # Qwen3.5 (hybrid: Gated DeltaNet under VTU; vLLM compiles its whole class, merged steps run eagerly)
    python3 benchmarks/bench_vllm.py --family qwen3_5 --configs stock-compiled,r=20,threshold,stock-compiled --requests 4 2>&1 | tee "$OUT/bench_vllm_qwen3_5.log" || status=1
  fi
  cp benchmarks/results/*cuda*.jsonl benchmarks/results/*cuda*.md benchmarks/results/*cuda*.png "$OUT/" 2>/dev/null
fi
exit $status
