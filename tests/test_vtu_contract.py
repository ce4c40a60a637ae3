"""The VTU ops' contract on every backend (torch, C++, Triton — the Triton
kernels under the CPU interpreter here), prefill and decode:

- NaN/inf: positions a query does not attend never influence it; a NaN/inf
  score of an attended pair makes the query NaN; values combine in IEEE
  arithmetic over the attended keys (ops/vtu.py states it). Expected outputs
  are derived here from the attends-relation, independently of the kernels.
- decode with padding among the new tokens and the cache.
- partial rotary (``rotary_dim``), against an expand written plainly
  (tests/vtu_plain.py), HF-format and half tables.
"""

import math

import pytest
import torch

from conftest import TRITON_DEVICE, randn
from vtu_plain import plain_vtu_attention, plain_vtu_decode

import dymu_kernels
from dymu_kernels import _ext
from dymu_kernels import reference as ref

BACKENDS = ["torch"] + (["cpp"] if _ext.missing_reason() is None else []) + ["triton"]
NAN, INF = float("nan"), float("inf")


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def prefill(backend, q, k, v, merge_map, cos, sin, **kw):
    dev = device_of(backend)
    args = [t.to(dev) for t in (q, k, v, merge_map, cos, sin)]
    return dymu_kernels.vtu_attention(*args, backend=backend, **kw).cpu()


def decode(backend, q, k, v, merge_map, cos, sin, **kw):
    dev = device_of(backend)
    args = [t.to(dev) for t in (q, k, v, merge_map, cos, sin)]
    return dymu_kernels.vtu_decode_attention(*args, backend=backend, **kw).cpu()


def contract_map():
    """Two samples of N = 40: left padding, text, an image block merged in
    groups, text (sample 0); text, image, text, right padding (sample 1).
    Returns the map, the unique count (2 unused slots) and, per sample, an
    image group (attended by every later token) and the last token (a text
    singleton nothing after it attends)."""
    gen = torch.Generator().manual_seed(7)
    rows, middle, last = [], [], []
    for b in range(2):
        n_pad = 5 if b == 0 else 6
        text_a, text_b = 4, 40 - n_pad - 4 - 26
        groups = torch.randint(0, 6, (26,), generator=gen)
        groups[:6] = torch.arange(6)
        body = torch.cat([torch.arange(text_a), text_a + groups, text_a + 6 + torch.arange(text_b)])
        pad = torch.full((n_pad,), -1)
        rows.append(torch.cat([pad, body]) if b == 0 else torch.cat([body, pad]))
        middle.append(text_a + 2)
        last.append(int(body[-1]))
    merge_map = torch.stack(rows).to(torch.int32)
    return merge_map, int(merge_map.max()) + 3, middle, last


def inputs(gen, merge_map, n_rows, H=4, H_kv=2, D=32, T=None):
    """fp32 q ([B, H, n_rows, D], or T new queries), k, v ([B, H_kv, n_rows, D]), cos/sin of the positions."""
    B, N = merge_map.shape
    q = randn(B, H, n_rows if T is None else T, D, gen=gen)
    k = randn(B, H_kv, n_rows, D, gen=gen)
    v = randn(B, H_kv, n_rows, D, gen=gen)
    cos, sin = ref.rope_cos_sin(torch.arange(N) + 2, D)
    return q, k, v, cos, sin


def attends(merge_map, T=None):
    """``[B, Q, N]``: query (position p; or new token t at N - T + t) attends key
    position s. Restated from the contract: s is a token, s <= the query's
    position, and (prefill) the query is a token itself."""
    B, N = merge_map.shape
    valid = merge_map >= 0
    qpos = torch.arange(N) if T is None else torch.arange(N - T, N)
    q_ok = valid if T is None else torch.ones(B, T, dtype=torch.bool)
    return valid[:, None, :] & q_ok[:, :, None] & (torch.arange(N)[None, None, :] <= qpos[None, :, None])


def affected(merge_map, which, b, row, head, dim, H, H_kv, D, n_out, T=None):
    """``[B, H, n_out, D]`` True where a non-finite value placed in ``which``
    (q, k or v) at sample b, row ``row`` (unique row; a new token's index for
    q in decode), head ``head`` (a KV head for k, v), dim ``dim`` reaches the
    output."""
    A = attends(merge_map, T)[b]  # [Q, N]
    if which == "q":
        hit = (merge_map[b] == row) if T is None else (torch.arange(T) == row)
        hit = hit & A.any(-1)  # a query with no key outputs 0 whatever its q
        heads = [head]
    else:
        hit = A[:, merge_map[b] == row].any(-1)  # queries attending a position of that row
        rep = H // H_kv
        heads = list(range(head * rep, (head + 1) * rep))
    if T is None:  # queries -> their unique tokens (a mean is hit if any position is)
        rows = torch.zeros(n_out, dtype=torch.bool)
        rows[merge_map[b][hit].long()] = True
    else:
        rows = hit
    mask = torch.zeros(merge_map.shape[0], H, n_out, D, dtype=torch.bool)
    dims = [dim] if which == "v" else list(range(D))
    for h in heads:
        for d in dims:
            mask[b, h, :, d] = rows
    return mask


def check_contract(out, clean, hit, expect):
    """``out`` is ``expect`` (NaN or +inf) where ``hit``, and equal to the clean run elsewhere."""
    if expect != expect:
        assert torch.isnan(out[hit]).all(), "an attended NaN/inf did not make the output NaN"
    else:
        assert torch.isposinf(out[hit]).all(), "an attended +inf value did not make the output +inf"
    assert torch.isfinite(out[~hit]).all(), "a non-finite value reached a query that does not attend it"
    torch.testing.assert_close(out[~hit], clean[~hit], atol=1e-5, rtol=1e-5)


PLACEMENTS = [(which, value, where) for which in ("q", "k", "v") for value in (NAN, INF) for where in ("middle", "last")]
# The Triton interpreter costs seconds a call on the CPU: it checks a representative subset (every
# operand, NaN and inf, attended from later tokens and only by itself); the other backends check all.
TRITON_PLACEMENTS = {("q", "nan", "middle"), ("k", "inf", "middle"), ("v", "nan", "last"), ("v", "inf", "middle")}


def backends_for(which, value, where):
    key = (which, "nan" if value != value else "inf", where)
    return BACKENDS if TRITON_DEVICE == "cuda" or key in TRITON_PLACEMENTS else [b for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize("which,value,where", PLACEMENTS)
def test_non_finite_prefill(gen, which, value, where):
    merge_map, U, middle, last = contract_map()
    q, k, v, cos, sin = inputs(gen, merge_map, U)
    H, H_kv, D = q.shape[1], k.shape[1], q.shape[-1]
    backends = backends_for(which, value, where)
    clean = {be: prefill(be, q, k, v, merge_map, cos, sin) for be in backends}
    for b in range(2):
        row = (middle if where == "middle" else last)[b]
        head = 1 if which == "q" else 0
        t = {"q": q, "k": k, "v": v}[which].clone()
        t[b, head, row, 5] = value
        dirty = {**dict(q=q, k=k, v=v), which: t}
        hit = affected(merge_map, which, b, row, head, 5, H, H_kv, D, U)
        assert hit.any() and not hit.all()
        if where == "last" and which != "q":  # only the last token attends itself
            assert hit.any(-1).sum() == H // H_kv
        expect = value if which == "v" else NAN
        spec = ref.vtu_attention_expand(dirty["q"], dirty["k"], dirty["v"], merge_map, cos, sin)
        check_contract(spec, ref.vtu_attention_expand(q, k, v, merge_map, cos, sin), hit, expect)
        for be in backends:
            out = prefill(be, dirty["q"], dirty["k"], dirty["v"], merge_map, cos, sin)
            check_contract(out, clean[be], hit, expect)
            torch.testing.assert_close(out, spec, atol=1e-5, rtol=1e-5, equal_nan=True)


def decode_case(gen, T=3):
    """A cache over the contract map's positions plus T new tokens, of which
    sample 1's middle one is padding (its cache row is absent)."""
    merge_map, U, middle, last = contract_map()
    B = merge_map.shape[0]
    new = torch.arange(U, U + T).expand(B, T).clone()
    new[1, 1] = -1
    merge_map = torch.cat([merge_map, new.to(torch.int32)], dim=1)
    q, k, v, cos, sin = inputs(gen, merge_map, U + T, T=T)
    return q, k, v, merge_map, cos, sin, middle, U + T - 1  # the last new token's row: only it attends itself


@pytest.mark.parametrize("which,value,where", PLACEMENTS)
def test_non_finite_decode(gen, which, value, where):
    T = 3
    q, k, v, merge_map, cos, sin, middle, last_row = decode_case(gen, T)
    H, H_kv, D = q.shape[1], k.shape[1], q.shape[-1]
    backends = backends_for(which, value, where)
    clean = {be: decode(be, q, k, v, merge_map, cos, sin) for be in backends}
    for b in range(2):
        if which == "q":
            row = 1 if where == "middle" else T - 1  # a new token (sample 1's middle one is padding)
        else:
            row = middle[b] if where == "middle" else last_row
        head = 1 if which == "q" else 0
        t = {"q": q, "k": k, "v": v}[which].clone()
        t[b, head, row, 5] = value
        dirty = {**dict(q=q, k=k, v=v), which: t}
        hit = affected(merge_map, which, b, row, head, 5, H, H_kv, D, T, T=T)
        assert hit.any()
        expect = value if which == "v" else NAN
        spec = ref.vtu_decode_attention_ref(dirty["q"], dirty["k"], dirty["v"], merge_map, cos, sin)
        check_contract(spec, ref.vtu_decode_attention_ref(q, k, v, merge_map, cos, sin), hit, expect)
        for be in backends:
            out = decode(be, dirty["q"], dirty["k"], dirty["v"], merge_map, cos, sin)
            check_contract(out, clean[be], hit, expect)
            torch.testing.assert_close(out, spec, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_tables_and_unused_rows(gen, backend):
    """NaN in cos/sin at padding positions and in unique rows no position uses
    change nothing; NaN in the tables at the last token's position reaches only
    that token (its query and its key are rotated there)."""
    merge_map, U, middle, last = contract_map()
    q, k, v, cos, sin = inputs(gen, merge_map, U)
    clean = prefill(backend, q, k, v, merge_map, cos, sin)
    pad = (merge_map < 0)[:, :, None]
    dirty_tables = [t[None].expand(2, -1, -1).masked_fill(pad, NAN) for t in (cos, sin)]
    dirty_rows = [t.clone() for t in (q, k, v)]
    for t in dirty_rows:
        t[:, :, U - 2:] = NAN  # the two unused unique slots
    out = prefill(backend, *dirty_rows, merge_map, *dirty_tables)
    torch.testing.assert_close(out, clean, atol=1e-5, rtol=1e-5)
    # The tables at sample 0's last position (its last token, a singleton) are NaN.
    c = cos[None].repeat(2, 1, 1)
    c[0, -1] = NAN
    out = prefill(backend, q, k, v, merge_map, c, sin[None].expand(2, -1, -1))
    hit = torch.zeros_like(out, dtype=torch.bool)
    hit[0, :, last[0]] = True
    check_contract(out, clean, hit, NAN)
    # Decode: a padding new token's q sees NaN tables at its own position only if it attends a key.
    q1, k1, v1, map1, cos1, sin1, _, _ = decode_case(gen)
    c1 = cos1[None].repeat(2, 1, 1)
    c1[1, -2] = NAN  # sample 1's padding new token (t = 1)
    c1[0, :5] = NAN  # sample 0's left padding
    base = decode(backend, q1, k1, v1, map1, cos1, sin1)
    out = decode(backend, q1, k1, v1, map1, c1, sin1[None].expand(2, -1, -1))
    hit = torch.zeros_like(out, dtype=torch.bool)
    hit[1, :, 1] = True
    check_contract(out, base, hit, NAN)


# ----------------------------------------------------------------------------
# Decode with padding among the new tokens and the cache
# ----------------------------------------------------------------------------


def padded_decode_case(gen, T, N_past=37, D=32, H=4, H_kv=2):
    """Random padding among past and new tokens, per sample; sample 2 has no
    token before its last new one (its first T - 1 queries, if any, attend nothing)."""
    B = 3
    rows = []
    U = 0
    for b in range(B):
        past = torch.randint(0, 12, (N_past,), generator=gen)
        past[torch.rand(N_past, generator=gen) < 0.3] = -1
        if b == 2:
            past[:] = -1
        new = torch.arange(12, 12 + T)
        new[torch.rand(T, generator=gen) < 0.4] = -1
        if b == 2:
            new[:-1] = -1
            new[-1] = 12 + T - 1
        rows.append(torch.cat([past, new]))
        U = max(U, 12 + T)
    merge_map = torch.stack(rows).to(torch.int32)
    q = randn(B, H, T, D, gen=gen)
    k = randn(B, H_kv, U, D, gen=gen)
    v = randn(B, H_kv, U, D, gen=gen)
    cos, sin = ref.rope_cos_sin(torch.arange(N_past + T), D)
    return q, k, v, merge_map, cos, sin


@pytest.mark.parametrize("T", [1, 4])
def test_decode_with_padding_queries(gen, T):
    for _ in range(3):  # fresh random padding patterns
        q, k, v, merge_map, cos, sin = padded_decode_case(gen, T)
        assert (merge_map[:, -T:] < 0).any() or T == 1
        expected = plain_vtu_decode(q, k, v, merge_map, cos, sin, q.shape[-1])
        spec = ref.vtu_decode_attention_ref(q.double(), k.double(), v.double(), merge_map, cos.double(), sin.double())
        torch.testing.assert_close(spec, expected, atol=1e-12, rtol=1e-10)
        for be in BACKENDS:
            out = decode(be, q, k, v, merge_map, cos, sin)
            assert out.shape == q.shape and torch.isfinite(out).all()
            torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
            if T > 1:  # sample 2: the queries before its only token attend nothing -> 0
                assert not out[2, :, : T - 1].any()
            assert out[2, :, T - 1].abs().sum() > 0


def test_decode_padding_query_without_any_key_is_zero(gen):
    """T = 1 and every position padding, the new one included: output 0, never NaN."""
    q, k, v, _, cos, sin = padded_decode_case(gen, 1)
    merge_map = torch.full((3, cos.shape[0]), -1, dtype=torch.int32)
    for be in BACKENDS:
        out = decode(be, q, k, v, merge_map, cos, sin)
        assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(ref.vtu_decode_attention_ref(q, k, v, merge_map, cos, sin), torch.zeros_like(q))


# ----------------------------------------------------------------------------
# Partial rotary: rotary_dim
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("R", [32, 16])
@pytest.mark.parametrize("table", ["hf", "half"])
def test_partial_rotary_prefill_and_decode(gen, R, table):
    D, N = 64, 45
    merge_map, U, _, _ = contract_map()
    merge_map = torch.cat([merge_map, torch.arange(U, U + 5).expand(2, 5).to(torch.int32)], dim=1)  # N = 45
    U += 5
    q, k, v, _, _ = inputs(gen, merge_map, U, D=D)
    cos, sin = ref.rope_cos_sin(torch.arange(N) + 3, R)  # HF format, width R
    c, s = (cos, sin) if table == "hf" else (cos[..., : R // 2], sin[..., : R // 2])
    expected = plain_vtu_attention(q, k, v, merge_map, cos, sin, R)
    # The partial rotation really differs from rotating the whole head.
    full = plain_vtu_attention(q, k, v, merge_map, *ref.rope_cos_sin(torch.arange(N) + 3, D), D)
    assert (expected - full).abs().max() > 1e-2
    torch.testing.assert_close(ref.vtu_attention_expand(q.double(), k.double(), v.double(), merge_map, c.double(),
                                                        s.double(), rotary_dim=R), expected, atol=1e-12, rtol=1e-10)
    if table == "hf":
        torch.testing.assert_close(ref.vtu_attention_decomposed(q.double(), k.double(), v.double(), merge_map,
                                                                c.double(), s.double(), rotary_dim=R),
                                   expected, atol=1e-12, rtol=1e-10)
    T = 3
    q_new = randn(2, 4, T, D, gen=gen)
    expected_dec = plain_vtu_decode(q_new, k, v, merge_map, cos, sin, R)
    for be in BACKENDS:
        out = prefill(be, q, k, v, merge_map, c, s, rotary_dim=R)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
        out = decode(be, q_new, k, v, merge_map, c, s, rotary_dim=R)
        torch.testing.assert_close(out.double(), expected_dec, atol=2e-5, rtol=2e-5)


def test_full_rotary_half_and_hf_tables_agree_with_plain(gen):
    """rotary_dim = D: a half table (one entry per frequency) is the HF table's first half."""
    merge_map, U, _, _ = contract_map()
    q, k, v, cos, sin = inputs(gen, merge_map, U)
    D = q.shape[-1]
    expected = plain_vtu_attention(q, k, v, merge_map, cos, sin, D)
    for be in BACKENDS:
        for c, s, rd in ((cos, sin, None), (cos, sin, D), (cos[:, : D // 2], sin[:, : D // 2], D)):
            out = prefill(be, q, k, v, merge_map, c, s, rotary_dim=rd)
            torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


ROTARY_ERRORS = [
    (dict(cos=torch.ones(8, 32), sin=torch.zeros(8, 32)), "cos/sin have width 32, narrower than the head dim D=64: "
     "ambiguous without rotary_dim; pass rotary_dim=64 if it holds one entry per frequency \\(half table\\) or "
     "rotary_dim=32 if it is an HF-format table"),
    (dict(cos=torch.ones(8, 24), sin=torch.zeros(8, 24)), "cos/sin have width 24, narrower than the head dim D=64"),
    (dict(cos=torch.ones(8, 80), sin=torch.zeros(8, 80)), "cos/sin must have last dim D=64 \\(HF format\\)"),
    (dict(rotary_dim=31), "rotary_dim must be an even int with 2 <= rotary_dim <= D=64, got 31"),
    (dict(rotary_dim=128), "rotary_dim must be an even int with 2 <= rotary_dim <= D=64, got 128"),
    (dict(rotary_dim=0), "rotary_dim must be an even int"),
    (dict(rotary_dim=32, cos=torch.ones(8, 24), sin=torch.zeros(8, 24)),
     "cos/sin must have last dim rotary_dim=32 \\(HF format\\) or rotary_dim/2=16 \\(one entry per frequency\\), "
     "got width 24"),
    (dict(rotary_dim=32), "cos/sin must have last dim rotary_dim=32"),  # HF tables of the whole head
]


@pytest.mark.parametrize("overrides,match", ROTARY_ERRORS)
def test_rotary_dim_and_table_width_errors(overrides, match):
    args = dict(q=torch.randn(2, 4, 5, 64), k=torch.randn(2, 2, 5, 64), v=torch.randn(2, 2, 5, 64),
                merge_map=torch.zeros(2, 8, dtype=torch.int32), cos=torch.ones(8, 64), sin=torch.zeros(8, 64))
    args.update(overrides)
    for fn in (dymu_kernels.vtu_attention, ref.vtu_attention_expand):
        with pytest.raises(ValueError, match=match):
            fn(**args)
    dec = dict(args, q=args["q"][:, :, :1])
    for fn in (dymu_kernels.vtu_decode_attention, ref.vtu_decode_attention_ref):
        with pytest.raises(ValueError, match=match):
            fn(**dec)


# ----------------------------------------------------------------------------
# Gradients (the backward recomputes through the reference)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R", [None, 16])
def test_gradients_equal_an_independent_expand(gen, backend, R):
    """The op's backward against autograd through the plain fp64 expand
    (tests/vtu_plain.py), for partial rotary too (the head-dim permutation
    that maps it onto the kernels is outside the op, so its backward is
    autograd's)."""
    merge_map, U, _, _ = contract_map()
    q, k, v, cos, sin = inputs(gen, merge_map, U)
    D = q.shape[-1]
    rd = R or D
    cos, sin = ref.rope_cos_sin(torch.arange(merge_map.shape[1]), rd)
    grad = randn(*q.shape, gen=gen)
    dev = device_of(backend)
    leaves = [t.to(dev, copy=True).requires_grad_(True) for t in (q, k, v)]
    out = dymu_kernels.vtu_attention(*leaves, merge_map.to(dev), cos.to(dev), sin.to(dev), backend=backend,
                                     rotary_dim=R)
    out.backward(grad.to(dev))
    plain = [t.double().requires_grad_(True) for t in (q, k, v)]
    plain_vtu_attention(*plain, merge_map, cos, sin, rd).backward(grad.double())
    for name, a, b in zip("qkv", leaves, plain):
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=2e-5, rtol=2e-5, msg=f"d{name}")
    # The unused unique slots get no gradient.
    assert not leaves[0].grad[:, :, U - 2:].any()


def test_gradcheck_fp64_torch_backend_with_partial_rotary(gen):
    """torch.autograd.gradcheck (finite differences, fp64) through the public
    op, rotary_dim < D included (the permutation outside the op)."""
    merge_map, U, _, _ = contract_map()
    merge_map = merge_map[:, :16].contiguous()
    q, k, v, _, _ = inputs(gen, merge_map, U, H=2, H_kv=1, D=8)
    cos, sin = ref.rope_cos_sin(torch.arange(16), 4, dtype=torch.float64)
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]

    def op(a, b, c):
        return dymu_kernels.vtu_attention(a, b, c, merge_map, cos[:, :2], sin[:, :2], backend="torch", rotary_dim=4)

    assert torch.autograd.gradcheck(op, leaves)
    assert math.isfinite(op(*leaves).sum().item())
