"""benchmarks/bench_e2e.py --quick: runs, and its rows say what they must."""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("skimage")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    path = os.path.join(ROOT, "benchmarks", "bench_e2e.py")
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its `common` import
    return module


bench = _load()
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = bench.main(["--quick", "--device", "cpu", "--threads", "1", "--new-tokens", str(NEW_TOKENS),
                         "--results-dir", str(out)])
    with open(out / "e2e_cpu.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return rc, rows, buf.getvalue(), out


def _by(rows, config, metric):
    found = [r for r in rows if r.get("op") == "e2e_llava" and r["config"] == config and r["metric"] == metric]
    assert len(found) == 1, f"expected one {metric} row for {config}, got {len(found)}"
    return found[0]


@pytest.mark.slow
def test_quick_run_rows_make_sense(quick_run):
    rc, rows, stdout, out = quick_run
    assert rc == 0
    e2e = [r for r in rows if r.get("op") == "e2e_llava"]
    assert {r["config"] for r in e2e} == set(bench.DEFAULT_CONFIGS)  # every config, threshold calibrated
    for r in e2e:
        assert r["commit"] and r["torch"] == torch.__version__ and r["device"] and r["date"]
        assert r["size"] == "quick" and r["dtype"] == "float32" and r["batch"] == 1 and r["new_tokens"] == NEW_TOKENS
    patches, positions = e2e[0]["image_tokens"], e2e[0]["positions"]
    assert patches == 256 and positions == 256 + 66

    stock_flops = _by(rows, "stock", "prefill_flops")["value"]
    stock_kv = _by(rows, "stock", "kv_cache")["value"]
    assert _by(rows, "stock", "tokens_kept")["value"] == [patches]
    blocks = 5  # the quick tower's 6 blocks, LLaVA reads block 5
    flops = {}
    for c in bench.DEFAULT_CONFIGS:
        for metric in ("prefill", "generate", "vision_tower"):
            t = _by(rows, c, metric)
            assert t["n_samples"] == 3 and len(t["samples"]) == 3
            assert 0 < t["min"] <= t["p25"] <= t["median"] <= t["p75"] <= t["max"]
        gen = _by(rows, c, "generate")
        assert gen["tokens_per_s"] == pytest.approx(NEW_TOKENS / gen["median"])
        step = _by(rows, c, "decode_step")
        assert step["decode_ok"], f"{c}: generate() left a cache of {step['cache_positions']} positions"
        assert step["cache_positions"] == positions + NEW_TOKENS - 1
        direct = _by(rows, c, "decode_step_direct")
        assert direct["n_samples"] == 3 * (NEW_TOKENS - 1) and direct["median"] > 0
        mem = _by(rows, c, "peak_memory")
        assert mem["prefill"] >= 0 and mem["generate"] >= 0 and mem["method"].startswith("cpu:")
        flops[c] = _by(rows, c, "prefill_flops")["value"]
        kept = _by(rows, c, "tokens_kept")["value"]
        kv = _by(rows, c, "kv_cache")
        if c == "stock":
            continue
        # Merging: fewer image tokens, fewer FLOPs, a KV cache of one row per unique token.
        assert 0 < kept[0] < patches
        if c.startswith("r="):
            assert kept == [patches - int(c[2:]) * blocks]  # fixed r: the same count for any image
        assert flops[c] < stock_flops and _by(rows, c, "prefill_flops")["ratio"] == pytest.approx(flops[c] / stock_flops)
        assert _by(rows, c, "prefill")["flop_ratio"] == pytest.approx(flops[c] / stock_flops)
        assert _by(rows, c, "vision_tower")["flop_ratio"] < 1
        assert kv["bytes_without_dymu"] == stock_kv
        assert kv["value"] * positions == stock_kv * (positions - patches + kept[0])
        assert "same_generated_tokens_as_stock" in _by(rows, c, "generate")
    assert flops["r=21"] < flops["r=16"] < flops["r=8"] < stock_flops  # more merging, less work

    att = [r for r in rows if r.get("op") in ("vtu_attention", "vtu_decode")]
    for op in ("vtu_attention", "vtu_decode"):
        providers = {r["provider"]: r for r in att if r["op"] == op}
        floor = next(r for p, r in providers.items() if "floor" in p)
        reference = next(r for p, r in providers.items() if p.startswith("reference"))
        torch_path = next(r for p, r in providers.items() if p.endswith(" torch"))
        assert floor["ms"] > 0 and torch_path["vs_floor"] == pytest.approx(torch_path["ms"] / floor["ms"])
        assert torch_path["speedup_vs_reference"] == pytest.approx(reference["ms"] / torch_path["ms"])
        cpp = next(r for p, r in providers.items() if p.endswith(" cpp"))
        assert cpp.get("ms", 0) > 0 or cpp["unavailable"]  # the C++ backend is optional

    assert "| config | image tokens kept |" in stdout
    for c in bench.DEFAULT_CONFIGS:
        assert f"\n| {c} |" in stdout
    pytest.importorskip("matplotlib")
    png = out / "e2e_cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--samples", "2"])
    assert "must be >= 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "r=x"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
        assert "no CUDA device" in capsys.readouterr().err
    args, _ = bench.parse_args(["--configs", "r=8", "--quick"])
    assert args.configs == ["stock", "r=8"] and args.added_stock and args.lm_layers == 2


def test_clip_preprocess_matches_the_processor_steps():
    import numpy as np

    flat = np.full((200, 300, 3), 128, dtype=np.uint8)  # landscape: shortest side -> 336, centre crop
    x = bench.clip_preprocess(flat, 336)
    assert x.shape == (3, 336, 336)
    expected = (128 / 255 - torch.tensor(bench.CLIP_MEAN)) / torch.tensor(bench.CLIP_STD)
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)
    gray = bench.clip_preprocess(np.zeros((50, 50), dtype=np.uint8), 28)  # grayscale -> 3 channels
    assert gray.shape == (3, 28, 28)


def test_merge_map_of_the_attention_benchmark():
    m = bench.merge_map_642(torch.Generator().manual_seed(0))
    assert m.shape == (1, 642) and int(m.max()) + 1 == 159
    assert torch.equal(torch.unique(m), torch.arange(159, dtype=m.dtype))  # every unique token used
    assert torch.equal(m[0, :5], torch.arange(5, dtype=m.dtype))  # text singletons
