#!/usr/bin/env python3
"""Writes crates/cal-train/tests/fixtures/distill.json: the three distillation terms of
cal_train::distill and their gradients on fixed random inputs, computed independently in
numpy, for the Rust losses to be checked against.

    python3 scripts/make_distill_fixtures.py      # needs numpy

- logit: Σ_rows KL(softmax(t/τ) ‖ softmax(s/τ)) (the τ² factor and the mean are applied
  by the caller); d/ds = (softmax(s/τ) − softmax(t/τ)) / τ per row (Hinton et al. 2015).
- attention: Σ rows[b,q] · Σ_k ((P·A_s)[b,h,q,k] − A_t[b,h,q,k])², P mixing the
  student's heads; gradients in A_s and P.
- feature: Σ_b ‖W·pool(h_s)_b − pool(h_t)_b‖², pool a mean over the row's real tokens;
  gradients in h_s and W.
Every analytic gradient is checked here against central differences before writing.
"""
import json
import pathlib

import numpy as np

rng = np.random.default_rng(2026)


def log_softmax(x):
    m = x.max(-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_sum(s, t, tau):
    ls, lt = log_softmax(s / tau), log_softmax(t / tau)
    return float((np.exp(lt) * (lt - ls)).sum())


def kl_grad(s, t, tau):
    return (np.exp(log_softmax(s / tau)) - np.exp(log_softmax(t / tau))) / tau


def att(a_s, a_t, p, rows):
    s = np.einsum("ij,bjqk->biqk", p, a_s) if p is not None else a_s
    return float((((s - a_t) ** 2).sum(-1) * rows[:, None, :]).sum())


def att_grads(a_s, a_t, p, rows):
    s = np.einsum("ij,bjqk->biqk", p, a_s)
    d = 2 * (s - a_t) * rows[:, None, :, None]
    return np.einsum("ij,biqk->bjqk", p, d), np.einsum("biqk,bjqk->ij", d, a_s)


def pool(h, rows):
    return (h * rows[..., None]).sum(1) / rows.sum(1, keepdims=True)


def feat(h_s, h_t, w, rows):
    return float(((pool(h_s, rows) @ w.T - pool(h_t, rows)) ** 2).sum())


def feat_grads(h_s, h_t, w, rows):
    ps = pool(h_s, rows)
    d = 2 * (ps @ w.T - pool(h_t, rows))  # [B, dT]
    g_ps = d @ w  # [B, dS]
    g_h = g_ps[:, None, :] * (rows / rows.sum(1, keepdims=True))[..., None]
    return g_h, d.T @ ps


def fd(f, x, eps=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        hi = f()
        x[i] = old - eps
        lo = f()
        x[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


def softmax_maps(b, h, t, rows):
    """Causal attention maps over real keys, rows of padding left zero."""
    x = rng.normal(size=(b, h, t, t))
    mask = np.tril(np.ones((t, t)))[None, None] * rows[:, None, None, :]
    e = np.where(mask > 0, np.exp(x), 0.0)
    den = e.sum(-1, keepdims=True)
    return np.where(den > 0, e / np.where(den > 0, den, 1), 0.0)


out = {}
# logit
s, t, tau = rng.normal(size=(5, 7)) * 2, rng.normal(size=(5, 7)) * 2, 2.0
g = kl_grad(s, t, tau)
assert np.allclose(g, fd(lambda: kl_sum(s, t, tau), s), atol=1e-6)
out["logit"] = {"student": s.tolist(), "teacher": t.tolist(), "tau": tau,
                "value": kl_sum(s, t, tau), "grad_student": g.tolist()}
# attention: 2 rows, 3 student heads, 2 teacher heads, 4 tokens (row 1 left-padded)
rows = np.array([[1.0, 1, 1, 1], [0, 1, 1, 1]])
a_s, a_t = softmax_maps(2, 3, 4, rows), softmax_maps(2, 2, 4, rows)
p = rng.normal(size=(2, 3))
g_a, g_p = att_grads(a_s, a_t, p, rows)
assert np.allclose(g_a, fd(lambda: att(a_s, a_t, p, rows), a_s), atol=1e-5)
assert np.allclose(g_p, fd(lambda: att(a_s, a_t, p, rows), p), atol=1e-5)
out["attention"] = {"student": a_s.tolist(), "teacher": a_t.tolist(), "proj": p.tolist(),
                    "rows": rows.tolist(), "value": att(a_s, a_t, p, rows),
                    "value_same_heads": att(a_s[:, :2], a_t, None, rows),
                    "grad_student": g_a.tolist(), "grad_proj": g_p.tolist()}
# feature: 2 rows, 4 tokens, student width 3, teacher width 5
h_s, h_t, w = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 5)), rng.normal(size=(5, 3))
g_h, g_w = feat_grads(h_s, h_t, w, rows)
assert np.allclose(g_h, fd(lambda: feat(h_s, h_t, w, rows), h_s), atol=1e-5)
assert np.allclose(g_w, fd(lambda: feat(h_s, h_t, w, rows), w), atol=1e-5)
out["feature"] = {"student": h_s.tolist(), "teacher": h_t.tolist(), "proj": w.tolist(),
                  "rows": rows.tolist(), "value": feat(h_s, h_t, w, rows),
                  "grad_student": g_h.tolist(), "grad_proj": g_w.tolist()}
path = pathlib.Path(__file__).resolve().parent.parent / "crates/cal-train/tests/fixtures/distill.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(f"wrote {path}")
