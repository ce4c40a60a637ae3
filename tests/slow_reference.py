"""Obviously-correct loop implementations (per image, per token), float64.

They restate docs/design.md §1 with Python loops and no vectorisation, so the
batched references can be checked against something a reader verifies by eye.
"""

import math

import torch


def normalise(v):
    return v / max(float(v.norm()), 1e-12)


def loop_merge_one(x, size, metric, *, threshold=None, r=None, cls_token=True):
    """One image's merge on its valid tokens. Returns (x, size, slot_of_old_token).

    New order (docs/design.md §1.1): nothing merged -> unchanged; else the kept A
    tokens (position order with CLS, else by descending score, ties by
    position), then all B tokens."""
    L = x.shape[0]
    m = metric.double()
    if m.dim() == 3:  # [H, L, Dh] -> head mean
        m = m.mean(0)
    keys = [normalise(m[t]) for t in range(L)]
    a_slots, b_slots = list(range(0, L, 2)), list(range(1, L, 2))
    best = {}  # A slot -> (score, B index)
    for ai, a in enumerate(a_slots):
        if (cls_token and ai == 0) or not b_slots:
            continue
        scores = [float(keys[a] @ keys[b]) for b in b_slots]
        j = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first max wins
        best[a] = (scores[j], j)
    if threshold is not None:
        merged = {a for a, (s, _) in best.items() if s > threshold}
    else:
        order = sorted(best, key=lambda a: (-best[a][0], a))
        merged = set(order[:r])
    if not merged:  # rule (a): the sequence stays as it is, order included
        return x.double(), size.double(), {t: t for t in range(L)}
    kept_a = [a for a in a_slots if a not in merged]
    if not cls_token:  # rule (b): best score first, ties by position
        kept_a.sort(key=lambda a: (-best.get(a, (float("-inf"),))[0], a))
    new_slots = kept_a + b_slots
    groups = {slot: [slot] for slot in new_slots}
    for a in merged:
        groups[b_slots[best[a][1]]].append(a)
    new_x, new_size, slot_of = [], [], {}
    for new_i, slot in enumerate(new_slots):
        members = groups[slot]
        w = [float(size[t]) for t in members]
        new_x.append(sum(x[t].double() * wt for t, wt in zip(members, w)) / sum(w))
        new_size.append(sum(w))
        for t in members:
            slot_of[t] = new_i
    return torch.stack(new_x) if new_x else x[:0].double(), torch.tensor(new_size, dtype=torch.float64), slot_of


def loop_rope(x, cos, sin):
    """HF rotate_half rotation of one vector."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[h:], x[:h]])
    return x * cos + rot * sin


def loop_vtu_attention(q, k, v, merge_map, cos, sin, scale, causal=True):
    """Expand every position explicitly, attend with plain softmax, average per group."""
    B, H, n_un, D = q.shape
    n_rep = H // k.shape[1]
    N = merge_map.shape[1]
    out = torch.zeros(B, H, n_un, D, dtype=torch.float64)
    for b in range(B):
        m = [int(u) for u in merge_map[b]]
        for h in range(H):
            hk = h // n_rep
            qs = {p: loop_rope(q[b, h, m[p]].double(), cos[b, p].double(), sin[b, p].double()) for p in range(N) if m[p] >= 0}
            ks = {p: loop_rope(k[b, hk, m[p]].double(), cos[b, p].double(), sin[b, p].double()) for p in range(N) if m[p] >= 0}
            groups = {}
            for p in qs:
                visible = [s for s in ks if (s <= p or not causal)]
                logits = [float(qs[p] @ ks[s]) * scale for s in visible]
                mx = max(logits)
                w = [math.exp(l - mx) for l in logits]
                o = sum(wi * v[b, hk, m[s]].double() for wi, s in zip(w, visible)) / sum(w)
                groups.setdefault(m[p], []).append(o)
            for u, outs in groups.items():
                out[b, h, u] = sum(outs) / len(outs)
    return out
