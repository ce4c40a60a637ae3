"""benchmarks/bench_vllm.py --size quick: runs both engines and its rows say what they must."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, VLLM_PYTHON, require_vllm_env

pytest.importorskip("transformers")
pytest.importorskip("skimage")

VLLM_TORCH = "2.13.0"  # what scripts/setup_vllm.sh installs for vLLM's CPU build
VLLM_TRANSFORMERS = "5.19"  # vLLM 0.32 pins transformers <= 5.19; the main environment's is newer



@pytest.mark.slow
def test_quick_run_writes_rows(tmp_path):
    require_vllm_env()
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_vllm.py"), "--size", "quick", "--configs",
           "stock,r=8", "--requests", "2", "--new-tokens", "2", "--samples", "3", "--results-dir", str(tmp_path),
           "--vllm-python", VLLM_PYTHON]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "vllm_cpu.jsonl")]
    # One stock engine (the committed runs put one each side and pool their samples: a third engine process
    # would cost this test half a minute)
    assert [r["config"] for r in rows] == ["stock", "r=8"]
    stock, dymu = rows
    baseline = stock["seconds"]["median"]
    for r in rows:
        assert r["seconds"]["n_samples"] == 3 and r["output_tokens"] == 2 * 2
        assert r["requests_per_s"] == pytest.approx(2 / r["seconds"]["median"])
        assert r["vllm"].startswith("0.32") and r["commit"] and r["device"].startswith("cpu")
        # the engine's versions, not this environment's
        assert r["vllm_torch"].split("+")[0] == VLLM_TORCH and r["vllm_transformers"].startswith(VLLM_TRANSFORMERS)
    assert stock["time_ratio_vs_stock"] == pytest.approx(1.0)
    assert stock["vision_kept_fraction"] == 1.0 and dymu["stock_samples_pooled"] == 3
    # 256 patches, 5 blocks read, 8 merges each: 216 kept; the language model runs fewer rows, all positions.
    assert dymu["vision_kept_fraction"] == pytest.approx(216 / 256)
    assert 0.5 < dymu["llm_tokenwise_fraction"] < 1.0 and dymu["attention_kv_fraction"] == 1.0
    assert dymu["time_ratio_vs_stock"] == pytest.approx(dymu["seconds"]["median"] / baseline)
    md = open(tmp_path / "vllm_cpu.md").read()
    assert "| r=8 |" in md and "attention + KV positions" in md and f"torch {rows[0]['vllm_torch']}" in md


def test_engine_specs():
    """Each configuration's engine: stock eager / vLLM's defaults; DyMU eager / compiled where nothing merged."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_vllm import engine_spec

    assert engine_spec("stock", "t.json") == ("none", None, {"enforce_eager": True})
    assert engine_spec("stock-compiled", "t.json") == ("none", None, {})
    assert engine_spec("r=8", "t.json") == (None, {"r": 8}, {})
    assert engine_spec("r=8-compiled", "t.json") == (None, {"r": 8}, {"enforce_eager": False})
    assert engine_spec("threshold-compiled", "t.json") == (None, {"thresholds": "t.json"}, {"enforce_eager": False})
    for bad in ("r=x", "fast", "r=8-compiled-compiled"):
        with pytest.raises(ValueError, match="unknown config"):
            engine_spec(bad, "t.json")


def test_chat_prompts_extend_each_turn():
    """--workload chat: each turn's prompt extends the previous turn's (what prefix caching serves), every
    conversation starts with the throughput prompt (one image, the shared system words) and diverges after it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_e2e
    from bench_vllm import chat_prompts, prompt_text

    config = bench_e2e.llava_config("small", 2)
    chats = chat_prompts(config, 3, 4)
    assert len(chats) == 3 and all(len(c) == 4 for c in chats)
    first = prompt_text(config)
    for conversation in chats:
        assert conversation[0] == first and all(p.count("<image>") == 1 for p in conversation)
        for before, after in zip(conversation, conversation[1:]):
            assert after.startswith(before + " ") and len(after.split()) == len(before.split()) + 20
    assert len({c[1] for c in chats}) == 3  # the conversations' second turns differ
