"""Independent reference implementations of the formulas in docs/methods.md, for the tests only.

Plain numpy in float64, one sample at a time, written from the formulas (not from the
package's code): if the package and this file agree, both read docs/methods.md the same way.
"""

from __future__ import annotations

import math

import numpy as np


def log_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    m = v.max()
    return v - m - math.log(np.exp(v - m).sum())


def softmax(v):
    return np.exp(log_softmax(v))


def ce_row(z, y):
    return -log_softmax(z)[y]


def ce(z, y):
    return float(np.mean([ce_row(z[i], y[i]) for i in range(len(y))]))


def kl_row(zs, zt, T):
    """T² · KL(p^T(zt) ‖ p^T(zs)) for one sample."""
    lt, ls = log_softmax(np.asarray(zt) / T), log_softmax(np.asarray(zs) / T)
    return T * T * float(np.sum(np.exp(lt) * (lt - ls)))


def kd_kl(zs, zt, T):
    return float(np.mean([kl_row(zs[i], zt[i], T) for i in range(len(zs))]))


def confidence_row(zt):
    p = softmax(zt)
    entropy = -float(np.sum(p * np.log(p)))
    return 1.0 - entropy / math.log(len(p))


def p_gt_row(z, y):
    return float(softmax(z)[y])


def kd(zs, zt, y, T=4.0, w_ce=0.5, w_kd=0.5):
    return w_ce * ce(zs, y) + w_kd * kd_kl(zs, zt, T)


def uncertainty(zs, zt, y, T=4.0, alpha=0.5, beta=0.5):
    terms = [confidence_row(zt[i]) * kl_row(zs[i], zt[i], T) for i in range(len(y))]
    return alpha * ce(zs, y) + beta * float(np.mean(terms))


def dual(za, zb, zt, y, T, alpha, beta, gamma):
    def one(own, peer):
        return uncertainty(own, zt, y, T, alpha, beta) + gamma * kd_kl(own, peer, T)

    return one(za, zb), one(zb, za)


def dml(za, zb, y):
    return ce(za, y) + kd_kl(za, zb, 1.0), ce(zb, y) + kd_kl(zb, za, 1.0)


def aver(zs, zm, y, T=4.0):
    return ce(zs, y) + sum(kd_kl(zs, zm[k], T) for k in range(len(zm)))


def ca_weights_row(zm, y, i):
    K = len(zm)
    ces = np.array([ce_row(zm[k][i], y[i]) for k in range(K)])
    return (1.0 - softmax(ces)) / (K - 1)


def ca_kl(zs, zm, y, T, reference_code=False):
    K = len(zm)
    per_sample = []
    for i in range(len(y)):
        w = ca_weights_row(zm, y, i)
        per_sample.append(sum(w[k] * kl_row(zs[i], zm[k][i], T) for k in range(K)))
    value = float(np.mean(per_sample))
    return value / K if reference_code else value


def ca_wkd(zs, zm, y, T=4.0, reference_code=False):
    return ce(zs, y) + ca_kl(zs, zm, y, T, reference_code)


def alpha_guided(zs, zm, y, T=4.0, gamma=2.0, theta=0.3, confidence="gt", reference_code=False):
    mean_logits = np.mean(np.asarray(zm, dtype=np.float64), axis=0)
    if confidence == "gt":
        conf = np.mean([p_gt_row(mean_logits[i], y[i]) for i in range(len(y))])
    else:
        conf = np.mean([softmax(mean_logits[i]).max() for i in range(len(y))])
    alpha = 1.0 / (1.0 + math.exp(-gamma * (conf - theta)))
    return alpha * ca_kl(zs, zm, y, T, reference_code) + (1 - alpha) * ce(zs, y)


def adaptive_alpha(zs, zm, y, T=4.0):
    best, kls = [], []
    for i in range(len(y)):
        p = [p_gt_row(zm[k][i], y[i]) for k in range(len(zm))]
        k_star = int(np.argmax(p))
        best.append(p[k_star])
        kls.append(kl_row(zs[i], zm[k_star][i], T))
    alpha = float(np.mean(best))
    return alpha * float(np.mean(kls)) + (1 - alpha) * ce(zs, y)


def _ranks(weights, num_mentors, ranking, round_ranks):
    """weights: {model: w}; returns {model: r}."""
    if ranking == "weight":
        total = sum(weights.values())
        if round_ranks is None:
            return {m: num_mentors * w / total for m, w in weights.items()}
        return {m: num_mentors * round(w / total, round_ranks) for m, w in weights.items()}  # the share is rounded
    # 0.1 · position in Algorithm 1's sorted(weights.items()) (stable: ties keep classroom order)
    ordered = [m for m, _ in sorted(weights.items(), key=lambda item: item[1])]
    ranks = {m: 0.1 * (1 + ordered.index(m)) for m in weights}
    if round_ranks is not None:
        ranks = {m: round(r, round_ranks) for m, r in ranks.items()}
    return ranks


def classroom(zs, zm, y, tau=12.0, beta=1.0, delta=0.0, rank_mean="arithmetic", active_if="gt",
              alpha_source="rank", round_ranks=None, granularity="batch", ranking="weight"):
    """Returns (loss, ranks [K] or [K][B], active, temperatures) following Algorithm 1."""
    K, B = len(zm), len(y)
    models = {"s": zs, **{k: zm[k] for k in range(K)}}
    p = {m: [p_gt_row(z[i], y[i]) for i in range(B)] for m, z in models.items()}

    def one_group(weights, rows):
        r = _ranks(weights, K, ranking, round_ranks)
        r_s = r["s"]
        alpha = r_s if alpha_source == "rank" else weights["s"]
        active, temps, loss = [], [], alpha * float(np.mean([ce_row(zs[i], y[i]) for i in rows]))
        for k in range(K):
            on = r[k] > r_s if active_if == "gt" else r[k] >= r_s
            temp = 1.0 + abs(r[k] - r_s) / r[k] * tau
            active.append(on)
            temps.append(temp)
            if on:
                loss += beta * r[k] * float(np.mean([kl_row(zs[i], zm[k][i], temp) for i in rows]))
        return loss, [r[k] for k in range(K)], active, temps

    if granularity == "batch":
        if rank_mean == "arithmetic":
            weights = {m: float(np.mean(v)) for m, v in p.items()}
        else:
            weights = {m: math.exp(float(np.mean(np.log(v)))) for m, v in p.items()}
        loss, ranks, active, temps = one_group(weights, range(B))
    else:
        groups = [one_group({m: v[i] for m, v in p.items()}, [i]) for i in range(B)]
        loss = float(np.mean([g[0] for g in groups]))
        ranks, active, temps = ([[g[j][k] for g in groups] for k in range(K)] for j in (1, 2, 3))
    if delta:
        loss += delta * (ce(zs, y) + kd_kl(zs, zm[0], 1.0))
    return loss, ranks, active, temps
