#!/usr/bin/env python3
"""Writes crates/cal-core/tests/fixtures/advantage.json: GAE, REINFORCE++ and masked
whitening computed by verl's formulas (core_algos.py, transcribed from torch to numpy),
for the Rust estimators in cal_core::advantage to be checked against.

    python3 scripts/make_advantage_fixtures.py      # needs numpy

Cases: random rewards and values, prefix masks (right padding, as completions are) and
masks with holes, several (gamma, lambda) pairs.
"""
import json
import pathlib

import numpy as np


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_var(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1)  # unbiased, as verl's masked_var


def masked_whiten(x, mask):
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) / np.sqrt(var + 1e-8)


def gae(rewards, values, mask, gamma, lam):
    # verl compute_gae_advantage_return (masked positions skipped)
    b, t_len = rewards.shape
    next_values = np.zeros(b)
    last = np.zeros(b)
    rev = []
    for t in reversed(range(t_len)):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_ = delta + gamma * lam * last
        next_values = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_values
        last = last_ * mask[:, t] + (1 - mask[:, t]) * last
        rev.append(last)
    adv = np.stack(rev[::-1], axis=1)
    returns = adv + values
    return adv * mask, returns * mask


def reinforce_pp(rewards, mask, gamma):
    # verl compute_reinforce_plus_plus_outcome_advantage
    b, t_len = rewards.shape
    returns = np.zeros_like(rewards)
    running = np.zeros(b)
    for t in reversed(range(t_len)):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return masked_whiten(returns, mask) * mask


def main():
    rng = np.random.default_rng(20261203)
    cases = []
    for k, (gamma, lam) in enumerate([(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.8, 0.6), (1.0, 1.0), (0.95, 0.9)]):
        b, t_len = 3 + k % 2, 5 + k
        lens = rng.integers(1, t_len + 1, size=b)
        mask = (np.arange(t_len)[None, :] < lens[:, None]).astype(np.float64)
        if k % 2 == 1:  # holes inside the completions
            mask *= rng.random((b, t_len)) > 0.2
            mask[:, 0] = 1.0
        rewards = np.round(rng.normal(size=(b, t_len)) * (rng.random((b, t_len)) < 0.4), 4) * mask
        values = np.round(rng.normal(size=(b, t_len)), 4) * mask
        adv, ret = gae(rewards, values, mask, gamma, lam)
        cases.append({
            "gamma": gamma,
            "lambda": lam,
            "rewards": rewards.tolist(),
            "values": values.tolist(),
            "mask": mask.astype(bool).tolist(),
            "gae_advantages": adv.tolist(),
            "gae_returns": ret.tolist(),
            "gae_whitened": (masked_whiten(adv, mask) * mask).tolist(),
            # verl's loop restarts the return at a masked token, cal_core skips it as GAE
            # does; the two agree on right-padded rows, the only masks completions have
            "reinforce_pp": reinforce_pp(rewards, mask, gamma).tolist() if k % 2 == 0 else None,
        })
    out = pathlib.Path(__file__).resolve().parent.parent / "crates/cal-core/tests/fixtures/advantage.json"
    out.write_text(json.dumps({"generator": "scripts/make_advantage_fixtures.py", "cases": cases}, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
