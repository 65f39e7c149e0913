#!/usr/bin/env python3
"""Writes crates/cal-train/tests/fixtures/preference.json: the sigmoid (DPO), IPO and
ORPO losses, their gradients and TRL's logged rewards on fixed sequence log-probs, for
cal_train::preference to be checked against.

    python3 scripts/make_preference_fixtures.py      # needs numpy

Transcribed from TRL 1.16.0 (torch → numpy):
- `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py), f-divergence `reverse_kl`:
  chosen_logratios = chosen_logps − ref_chosen_logps (summed over completion tokens);
  sigmoid: −logsigmoid(β·(chosen_logratios − rejected_logratios));
  ipo: ((chosen_logratios/n_chosen − rejected_logratios/n_rejected) − 1/(2β))²;
  the loss is the mean over pairs; rewards/chosen = β·chosen_logratios, and so on.
- `ORPOTrainer.odds_ratio_loss` and `log1mexp` (trl/experimental/orpo/orpo_trainer.py),
  on log-probs averaged over tokens: log_odds = (c − r) − (log1mexp(c) − log1mexp(r));
  loss = NLL(chosen) − mean(β·logsigmoid(log_odds)), the NLL a token mean over the
  batch's chosen tokens; rewards/chosen = β·c (the averaged log-prob).

The gradients (with respect to the policy's summed log-probs of each answer) are the
analytic derivatives of those formulas, checked here against central differences.
"""
import json
import pathlib

import numpy as np


def logsigmoid(x):
    return -np.logaddexp(0.0, -x)


def log1mexp(x):
    t = -0.6931471805599453
    return np.where(x < t, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def loss(kind, beta, c, r, rc, rr, nc, nr):
    """The batch loss from summed log-probs c, r (policy) and rc, rr (reference)."""
    if kind == "sigmoid":
        h = (c - rc) - (r - rr)
        return np.mean(-logsigmoid(beta * h))
    if kind == "ipo":
        d = (c - rc) / nc - (r - rr) / nr
        return np.mean((d - 1.0 / (2.0 * beta)) ** 2)
    if kind == "orpo":
        mc, mr = c / nc, r / nr
        log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        nll = -np.sum(c) / np.sum(nc)
        return nll - np.mean(beta * logsigmoid(log_odds))
    raise ValueError(kind)


def grads(kind, beta, c, r, rc, rr, nc, nr):
    p = len(c)
    if kind == "sigmoid":
        h = (c - rc) - (r - rr)
        g = -beta * (1.0 / (1.0 + np.exp(beta * h))) / p  # d/dh of −logσ(βh), over pairs
        return g, -g
    if kind == "ipo":
        d = (c - rc) / nc - (r - rr) / nr
        g = 2.0 * (d - 1.0 / (2.0 * beta)) / p
        return g / nc, -g / nr
    if kind == "orpo":
        mc, mr = c / nc, r / nr
        log_odds = (mc - mr) - (log1mexp(mc) - log1mexp(mr))
        s = 1.0 / (1.0 + np.exp(log_odds))  # d logσ(x)/dx = σ(−x)
        # d log_odds / d mc = 1 + e^mc / (1 − e^mc) = 1 / (1 − e^mc)
        gc = -np.ones(p) / np.sum(nc) - beta * s / (1.0 - np.exp(mc)) / nc / p
        gr = beta * s / (1.0 - np.exp(mr)) / nr / p
        return gc, gr
    raise ValueError(kind)


def rewards(kind, beta, c, r, rc, rr, nc, nr):
    if kind == "orpo":
        return beta * c / nc, beta * r / nr
    return beta * (c - rc), beta * (r - rr)


def main():
    rng = np.random.default_rng(2026)
    cases = []
    for kind in ["sigmoid", "ipo", "orpo"]:
        for beta in [0.1, 0.5]:
            p = 5
            nc = rng.integers(3, 40, p).astype(float)
            nr = rng.integers(3, 40, p).astype(float)
            # per-token log-probs around −1.5, the reference near the policy
            c = -rng.uniform(0.2, 2.5, p) * nc
            r = -rng.uniform(0.2, 2.5, p) * nr
            rc = c + rng.normal(0.0, 2.0, p)
            rr = r + rng.normal(0.0, 2.0, p)
            args = (kind, beta, c, r, rc, rr, nc, nr)
            gc, gr = grads(*args)
            # the analytic gradients against central differences
            for which, g in ((2, gc), (3, gr)):
                for i in range(p):
                    a = list(args)
                    up, dn = a[which].copy(), a[which].copy()
                    up[i] += 1e-6
                    dn[i] -= 1e-6
                    a[which] = up
                    lu = loss(*a)
                    a[which] = dn
                    fd = (lu - loss(*a)) / 2e-6
                    assert abs(fd - g[i]) < 1e-7, (kind, which, i, fd, g[i])
            ch, rj = rewards(*args)
            cases.append({
                "loss_type": kind, "beta": beta,
                "chosen": c.tolist(), "rejected": r.tolist(),
                "ref_chosen": rc.tolist(), "ref_rejected": rr.tolist(),
                "chosen_tokens": nc.tolist(), "rejected_tokens": nr.tolist(),
                "loss": float(loss(*args)),
                "grad_chosen": gc.tolist(), "grad_rejected": gr.tolist(),
                "rewards_chosen": ch.tolist(), "rewards_rejected": rj.tolist(),
                "rewards_accuracies": float(np.mean(ch > rj)),
                "rewards_margins": float(np.mean(ch - rj)),
            })
    out = pathlib.Path(__file__).resolve().parent.parent / "crates/cal-train/tests/fixtures/preference.json"
    out.write_text(json.dumps({"source": "TRL 1.16.0 dpo_trainer.py / orpo_trainer.py, transcribed to numpy", "cases": cases}, indent=1) + "\n")
    print(f"wrote {out} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
