"""benchmarks/gpu_model.py: the GPU roofline model's counts, bounds, report and compile facts.

CPU only, no timing: the model's byte and FLOP counts are checked against
closed forms written here independently, and the torch glue it counts against
a dispatch trace of the package's real launch code (Triton kernels stubbed).
"""

import importlib.util
import json
import os
import sys

import pytest
import torch

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _load():
    path = os.path.join(ROOT, "benchmarks", "gpu_model.py")
    spec = importlib.util.spec_from_file_location("gpu_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through the module
    spec.loader.exec_module(module)  # puts benchmarks/ on sys.path for its `common` import
    return module


gm = _load()
H100 = gm.GPUS["h100"]

# A small odd shape: B = 1 (the release's batch), 3 heads, 37 positions, 13 unique tokens.
B, H, N, U, D = 1, 3, 37, 13, 48
SHAPE = gm.LMShape("odd", B, H, H, N, U, D)


def _total(kernels, part=None):
    ks = [k for k in kernels if k.in_total and (part is None or k.part == part)]
    return sum(k.reads for k in ks), sum(k.writes for k in ks), sum(k.flops for k in ks), sum(k.launches for k in ks)


def test_fused_prefill_counts_match_closed_form():
    from dymu_kernels.ops.vtu import attention_flops

    ks = gm.prefill_fused(SHAPE, H100)
    kernel = next(k for k in ks if k.triton == "_vtu_fwd_kernel")
    q_bf16 = H * U * D * 2  # q, k and v each, bf16
    acc = H * U * D * 4  # fp32 accumulator [B, H, N_un, D]
    tables = 2 * N * D * 2  # cos + sin, bf16 [N, D]
    assert kernel.reads == 3 * q_bf16 + N * 4 + tables + U * 4 + acc  # q, k, v, map, cos/sin, counts, out32 RMW
    assert kernel.writes == acc
    assert kernel.flops == 2 * H * N * N * D == attention_flops(B, H, N, D, True)
    # Whole op: map>=0 / .long() / clamp_min / zeros / .float() / scatter_add_, zero-fill, kernel, cast to bf16.
    glue_reads = N * 4 + N * 4 + N * 8 + N * 1 + (N * 8 + N * 4 + U * 4)
    glue_writes = N * 1 + N * 8 + N * 8 + U * 4 + N * 4 + U * 4
    reads, writes, flops, launches = _total(ks)
    assert reads == glue_reads + kernel.reads + acc
    assert writes == glue_writes + acc + acc + H * U * D * 2
    assert flops == 2 * H * N * N * D and launches == 9
    # The integration adds the identity RoPE (5 kernels per tensor) and the output transpose.
    block = gm.prefill_dymu(SHAPE, H100)
    rope = next(k for k in block if k.name.startswith("HF RoPE"))
    table_u = U * D * 2
    assert (rope.reads, rope.writes, rope.launches) == (2 * (q_bf16 * 11 // 2 + 2 * table_u), 2 * (q_bf16 * 9 // 2), 10)
    assert _total(block)[:2] == (reads + rope.reads + q_bf16, writes + rope.writes + q_bf16)


def test_expand_path_counts_match_closed_form():
    from dymu_kernels.ops.vtu import attention_flops

    e_u, e_n, table = H * U * D * 2, H * N * D * 2, N * D * 2
    index_select = (3 * e_u + 3 * N * 8, 3 * e_n)
    rope = (2 * (e_n * 11 // 2 + 2 * table), 2 * (e_n * 9 // 2))  # x*cos, -x2, cat, rot*sin, + for q and k
    flash = (3 * e_n, e_n + H * N * 4)  # q, k, v in; o (bf16) and lse (fp32) out
    # scatter_mean: zeros, scatter_add_ (RMW), ones[N], zeros[U], scatter_add_, count < 1, masked_fill_, true_divide_
    smean = (e_n + N * 8 + e_u + N * 2 + N * 8 + U * 2 + U * 2 + U * 1 + U * 2 + e_u + U * 2,
             e_u + e_u + N * 2 + U * 2 + U * 2 + U * 1 + U * 2 + e_u)
    ks = gm.prefill_release(SHAPE)
    reads, writes, flops, launches = _total(ks)
    assert reads == index_select[0] + rope[0] + flash[0] + smean[0]
    assert writes == index_select[1] + rope[1] + flash[1] + smean[1]
    assert flops == attention_flops(B, H, N, D, True) == 2 * H * N * N * D
    assert launches == 3 + 10 + 1 + 8


def test_decode_counts_match_closed_form():
    s = gm.LMShape("odd", B, H, H, N, U, D)
    ks = gm.decode_dymu(s, H100)
    kernel = next(k for k in ks if k.triton == "_vtu_fwd_kernel")
    n, u = N + 1, U + 1
    splits = kernel.grid[2]
    assert kernel.flops == 4 * H * 1 * n * D
    assert kernel.reads == H * D * 2 + 2 * H * u * D * 2 + n * 4 + 2 * n * D * 2
    assert kernel.writes == splits * (H * D * 4 + H * 4)
    # The release's cache holds the expanded sequence: its step reads every position's K/V.
    flash = next(k for k in gm.decode_release(s) if k.unit == "tensor")
    assert flash.reads == H * D * 2 + 2 * H * n * D * 2 and flash.flops == kernel.flops
    # Cache appends are listed but not totalled.
    assert all(not k.in_total for k in ks + gm.decode_release(s) if "append" in k.name)


def test_glue_counts_equal_a_trace_of_the_launch_code(monkeypatch):
    """The torch ops between the Triton kernels, as the package really launches them."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from dymu_kernels.ops import dtome_triton, vtu_triton
    from dymu_kernels.reference.dtome import init_merge_state
    from dymu_kernels.reference.vtu import rope_cos_sin

    class Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for mod in (dtome_triton, vtu_triton):
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, Stub())
    no_launch = {"aten.unsqueeze.default", "aten.slice.Tensor", "aten.scalar_tensor.default",
                 "aten.empty.memory_format", "aten.new_empty.default"}

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = self.writes = self.launches = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if name in no_launch:
                return out
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
            if name.startswith(("aten.zeros", "aten.ones_like")):
                ins = []  # fills read nothing
            if name == "aten.cumsum.out":
                ins = ins[:1]  # the out= tensor is written, not read
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            self.reads += sum(t.numel() * t.element_size() for t in ins)
            self.writes += sum(t.numel() * t.element_size() for t in outs)
            self.launches += 3 if "sort" in name else 1
            return out

    def traced(fn):
        trace = Trace()
        with trace:
            fn()
        return trace.reads, trace.writes, trace.launches

    def glue(kernels):
        reads, writes, _, launches = _total([k for k in kernels if not k.triton])
        return reads, writes, launches

    Bq = 2
    s = gm.LMShape("odd", Bq, H, H, N, U, D)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(Bq, H, U, D, generator=gen).to(torch.bfloat16) for _ in range(3))
    merge_map = torch.randint(0, U, (Bq, N), generator=gen, dtype=torch.int32)
    cos, sin = rope_cos_sin(torch.arange(N)[None].expand(Bq, N), D, dtype=torch.bfloat16)
    for det in (False, True):
        got = traced(lambda det=det: vtu_triton.vtu_attention_fwd(q, k, v, merge_map, cos, sin, 0.1, True, det))
        assert got == glue(gm.prefill_fused(s, H100, "p", det)), det

    n_tok, channels = 41, 96
    x = torch.randn(3, n_tok, channels, generator=gen).to(torch.bfloat16)
    state = init_merge_state(x)
    n_a = (n_tok + 1) // 2
    idx = torch.randint(0, n_tok // 2, (3, n_a), generator=gen)
    flags = (torch.rand(3, n_a, generator=gen) < 0.3).to(torch.int8)
    scores = torch.rand(3, n_a, generator=gen)
    got = traced(lambda: dtome_triton.merge_tokens(state, idx, flags, scores))
    assert got == glue(gm.dtome_merge_kernels(gm.ViTShape(B=3, N=n_tok, C=channels, heads=3, N0=n_tok)))


def test_roofline_picks_the_bound():
    compute = gm.roofline(10**12, "tensor", 10**6, H100)  # 1 TFLOP on 1 MB
    assert compute["bound"] == "compute"
    assert compute["time_us"] == pytest.approx(1e12 / 989e12 * 1e6)
    assert compute["intensity"] == pytest.approx(1e6)
    memory = gm.roofline(10**6, "tensor", 10**9, H100)  # 1 MFLOP on 1 GB
    assert memory["bound"] == "memory"
    assert memory["time_us"] == pytest.approx(1e9 / 3.35e12 * 1e6)
    # Without counted FLOPs a kernel is memory-bound; fp32 work counts against the CUDA-core peak.
    assert gm.roofline(0, "", 100, H100)["bound"] == "memory"
    assert gm.roofline(10**9, "fp32", 1, H100)["time_us"] == pytest.approx(1e9 / 67e12 * 1e6)
    a100 = gm.GPUS["a100"]
    assert (a100.tflops, a100.tbps) == (312.0, 2.0)


def test_cta_schedule_is_a_list_schedule():
    gpu = gm.GPU("t", "toy", 2e-6, 1.0, 1.0, 2, 90, 1)  # 2 SMs at 1e6 FLOP/s each
    # Launch order: 3 then 1 go first; 1 finishes at 1 s and takes the 2; 3 finishes at 3 s.
    assert gm.cta_schedule_us([3e6, 1e6, 2e6], gpu, 1) == pytest.approx(3e6)


def test_report_and_rows(tmp_path, capsys):
    assert gm.main(["--results-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "gpu_model.md").read_text()
    assert text.strip() == printed.strip()
    first = text.splitlines()[0]
    assert first.startswith("Model, not measurement:")
    assert "989 TFLOP/s" in first and "3.35 TB/s" in first
    assert "A100 SXM" in text and "## What a GPU run has to confirm" in text
    rows = [json.loads(line) for line in (tmp_path / "gpu_model.jsonl").read_text().splitlines()]
    assert rows and all({"device", "torch", "commit", "gpu", "scenario"} <= set(r) for r in rows)
    kernels = [r for r in rows if r["scenario"] in ("prefill", "decode", "dtome_merge")]
    assert kernels and all({"flops", "bytes", "time_us", "bound", "intensity"} <= set(r) for r in kernels)
    assert {r["scenario"] for r in rows} == {"prefill", "decode", "dtome_merge", "clip_tower", "bench_vtu"}
    assert {r["gpu"] for r in rows} == {"H100 SXM", "A100 SXM"}
    assert all("model, not measurement" in r["model"] for r in rows)
    # Peaks are options.
    assert gm.main(["--no-save", "--tflops", "500", "--tbps", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0].count("500 TFLOP/s bf16") == 1


def _committed(arch, kernel, **constexprs):
    """Latest committed compile row of ``kernel`` with these constexprs, of a bf16 case where there is one
    (the dtype the model assumes; one report run writes fp16 and bf16 rows of a variant with the same date),
    parsed here, independently."""
    with open(os.path.join(RESULTS, f"triton_aot_sm{arch}.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    want = {f"{k}={v}" for k, v in constexprs.items()}
    rows = [r for r in rows if r["kernel"] == kernel and want <= set(r["variant"].split())]
    rows = [r for r in rows if r["case"].endswith("bf16")] or rows
    return max(rows, key=lambda r: r["date"]) if rows else None


@pytest.mark.skipif(not os.path.exists(os.path.join(RESULTS, "triton_aot_sm90.jsonl")), reason="no compile report")
def test_compile_facts_come_from_the_committed_rows(capsys):
    match = _committed(90, "_match_kernel", CLS=1, USE_THRESHOLD=1, BLOCK_A=32, BLOCK_B=64, BLOCK_D=64)
    fused = _committed(90, "_vtu_fwd_kernel", CAUSAL=1, DECODE=0, ATOMIC=1, HALF_TABLE=0, BLOCK_M=128, BLOCK_N=64,
                       BLOCK_H=64, BLOCK_D=128)
    assert match and fused
    m = gm.model(H100, gm.load_aot_rows(90))
    row = next(r for r in m["dtome_merge"] if r.get("triton_kernel") == "_match_kernel")
    assert (row["reg"], row["shared"], row["ffma"], row["hgmma"]) == (
        match["reg"], match["shared"], match["ffma"], match["hgmma"])
    krow = next(r for r in m["prefill"] if r.get("triton_kernel") == "_vtu_fwd_kernel" and "atomic" in r["kernel"])
    assert (krow["reg"], krow["stack"], krow["hgmma"], krow["shared"]) == (
        fused["reg"], fused["stack"], fused["hgmma"], fused["shared"])
    # ... and appear in the printed table next to the kernel.
    gm.main(["--no-save"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "_match_kernel" in ln)
    assert f"| {match['reg']} |" in line
