"""A second, deliberately naive implementation of every layer of SPEC.md.

Written from the spec alone, with explicit Python loops over samples, channels and
positions, so that it shares no code and no vectorisation tricks with
``guidedrop.reference``. It is slow on purpose; use it on small tensors only.

Every ``naive_<layer>(x, noise, **params)`` returns ``(y, w)`` where ``w`` is the full
``(N, C, H, W)`` float64 multiplier (mask x scale) and ``y = (x * w)`` cast back to
``x.dtype``.

Numerics: the decisions (top-k, thresholds, argmax, comparisons against ``x``) are made
on the float32 values of ``x`` (float64 for float64 inputs), exactly as SPEC §1 says the
statistics are computed, so masks can be compared exactly. Continuous quantities
(means, correlations, scales) are computed in float64; ``bernoulli(q)`` is ``u < q`` with
``q`` rounded to float32, as the package does.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- helpers


def stat_values(x: torch.Tensor) -> list:
    """Nested Python lists of x's values at statistics precision (SPEC §1)."""
    x = x.detach().cpu()
    if x.dtype != torch.float64:
        x = x.float()
    return x.tolist()


def f32(q: float) -> float:
    """q rounded to float32 (returned as a Python float holding that exact value)."""
    return float(torch.tensor(q, dtype=torch.float32))


def u_values(noise: torch.Tensor) -> list:
    return noise.detach().cpu().double().tolist()


def kth_largest(values: list, k: int) -> float:
    return sorted(values, reverse=True)[k - 1]


def top_k_ties(values: list, k: int) -> list:
    """Booleans: every element >= the k-th largest value (ties kept, SPEC §1)."""
    vk = kth_largest(values, k)
    return [v >= vk for v in values]


def zeros4(n: int, c: int, h: int, w: int, fill: float = 0.0) -> list:
    return [[[[fill] * w for _ in range(h)] for _ in range(c)] for _ in range(n)]


def naive_normalize(s, mode: str) -> torch.Tensor:
    """SPEC §1 normalisation of the mask s (nested lists or tensor (N, C, H, W))."""
    if isinstance(s, torch.Tensor):
        s = s.double().tolist()
    n = len(s)
    w = [[[[float(v) for v in row] for row in ch] for ch in smp] for smp in s]
    if mode == "none":
        pass
    elif mode == "batch":
        total, count = 0.0, 0
        for smp in w:
            for ch in smp:
                for row in ch:
                    for v in row:
                        total += v
                        count += 1
        scale = count / total if total != 0 else 0.0
        w = [[[[v * scale for v in row] for row in ch] for ch in smp] for smp in w]
    elif mode == "sample":
        for i in range(n):
            total, count = 0.0, 0
            for ch in w[i]:
                for row in ch:
                    for v in row:
                        total += v
                        count += 1
            scale = count / total if total != 0 else 0.0
            w[i] = [[[v * scale for v in row] for row in ch] for ch in w[i]]
    else:
        raise ValueError(mode)
    return torch.tensor(w, dtype=torch.float64).reshape(_shape4(s))


def _shape4(s: list) -> tuple:
    n = len(s)
    c = len(s[0]) if n else 0
    h = len(s[0][0]) if c else 0
    w = len(s[0][0][0]) if h else 0
    return (n, c, h, w)


def apply(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x * w in float64, cast back to x's dtype (contiguous)."""
    return (x.detach().cpu().double() * w).to(x.dtype)


def _channel_w_to_full(wc: list, h: int, w: int) -> list:
    return [[[[v] * w for _ in range(h)] for v in row] for row in wc]


# --------------------------------------------------------------------------- CorrDrop


def corrdrop_stats(x: torch.Tensor, k: int):
    """SPEC §2 steps 1-3: pooled map a, F and kappa, per sample.

    Returns (F, kappa, Hp, Wp) with F, kappa lists [N][N'] (pooled position i = row*Wp+col).
    """
    xs = stat_values(x)
    n, c, h, w = x.shape
    hp, wp = math.ceil(h / k), math.ceil(w / k)
    fs, kappas = [], []
    for b in range(n):
        rows = []
        for i in range(hp):
            for j in range(wp):
                hs = range(i * k, min((i + 1) * k, h))
                ws = range(j * k, min((j + 1) * k, w))
                cnt = len(hs) * len(ws)
                vec = []
                for ch in range(c):
                    tot = 0.0
                    for hh in hs:
                        for ww in ws:
                            tot += xs[b][ch][hh][ww]
                    vec.append(tot / cnt)
                rows.append(vec)
        nrm = []
        for vec in rows:
            norm = math.sqrt(sum(v * v for v in vec))
            d = max(norm, 1e-12)
            nrm.append([v / d for v in vec])
        npos = len(rows)
        f = []
        for i in range(npos):
            tot = 0.0
            for j in range(npos):
                dot = sum(nrm[i][q] * nrm[j][q] for q in range(c))
                tot += abs(dot - (1.0 if i == j else 0.0))
            f.append(tot / npos)
        fmin, fmax = min(f), max(f)
        if fmax == fmin:
            kap = [0.0] * npos
        else:
            kap = [(v - fmin) / (fmax - fmin) for v in f]
        fs.append(f)
        kappas.append(kap)
    return fs, kappas, hp, wp


def corrdrop_phat(p: float, k: int, h: int, w: int, z: int) -> float:
    hp, wp = math.ceil(h / k), math.ceil(w / k)
    pprime = p * h * w / (k * k * hp * wp)
    if z == 0:
        return 0.0
    return min(1.0, pprime * (hp * wp) / z)


def corrdrop_block_mask(x, noise, p, block_size):
    """S (N, H', W') as nested lists of 0/1 (SPEC §2 step 4)."""
    n, c, h, w = x.shape
    k = block_size
    _, kap, hp, wp = corrdrop_stats(x, k)
    u = u_values(noise)
    s_all = []
    for b in range(n):
        m = [1 if u[0][b][i // wp][i % wp] < kap[b][i] else 0 for i in range(hp * wp)]
        z = m.count(0)
        s = list(m)
        if z > 0:
            q = f32(1.0 - corrdrop_phat(p, k, h, w, z))
            for i in range(hp * wp):
                bern = 1 if u[1][b][i // wp][i % wp] < q else 0
                s[i] = m[i] | bern
        s_all.append([[s[i * wp + j] for j in range(wp)] for i in range(hp)])
    return s_all


def naive_corrdrop(x, noise, p=0.1, block_size=7, normalize="batch"):
    n, c, h, w = x.shape
    k = block_size
    s = corrdrop_block_mask(x, noise, p, k)
    full = [[[[float(s[b][hh // k][ww // k]) for ww in range(w)] for hh in range(h)]
             for _ in range(c)] for b in range(n)]
    wt = naive_normalize(full, normalize)
    return apply(x, wt), wt


# --------------------------------------------------------------- SelectScale family


def channel_scores(x) -> list:
    """s[n][c] = max |x| over the map."""
    xs = stat_values(x)
    return [[max(abs(v) for row in ch for v in row) for ch in smp] for smp in xs]


def candidates(x, top_rate) -> list:
    n, c, _, _ = x.shape
    nt = max(1, round(top_rate * c))
    return [top_k_ties(row, nt) for row in channel_scores(x)]


def _scale_w(rho, u):
    return rho + 2.0 * (1.0 - rho) * u


def naive_selectscale(x, noise, top_rate=0.2, retain=0.1):
    n, c, h, w = x.shape
    cand = candidates(x, top_rate)
    u = u_values(noise)
    wc = [[_scale_w(retain, u[b][ch]) if cand[b][ch] else 1.0 for ch in range(c)]
          for b in range(n)]
    wt = torch.tensor(_channel_w_to_full(wc, h, w), dtype=torch.float64).reshape(n, c, h, w)
    return apply(x, wt), wt


def naive_spatialscale(x, noise, retain=0.4):
    n, c, h, w = x.shape
    u = u_values(noise)
    wc = [[_scale_w(retain, u[b][ch]) for ch in range(c)] for b in range(n)]
    wt = torch.tensor(_channel_w_to_full(wc, h, w), dtype=torch.float64).reshape(n, c, h, w)
    return apply(x, wt), wt


def selectout_dropped(x, noise, top_rate=0.2, keep=0.9) -> list:
    """dropped[n][c] booleans (SPEC §3 Selectout)."""
    n, c, _, _ = x.shape
    nd = round((1 - keep) * c)
    cand = candidates(x, top_rate)
    u = u_values(noise)
    out = []
    for b in range(n):
        order = sorted((u[b][ch], ch) for ch in range(c) if cand[b][ch])
        drop = {ch for _, ch in order[:nd]}
        out.append([ch in drop for ch in range(c)])
    return out


def naive_selectout(x, noise, top_rate=0.2, keep=0.9):
    n, c, h, w = x.shape
    dropped = selectout_dropped(x, noise, top_rate, keep)
    wc = [[0.0 if dropped[b][ch] else 1.0 / keep for ch in range(c)] for b in range(n)]
    wt = torch.tensor(_channel_w_to_full(wc, h, w), dtype=torch.float64).reshape(n, c, h, w)
    return apply(x, wt), wt


# ---------------------------------------------------------------------- AttentionDrop


def n_beta(beta, h, w) -> int:
    return max(1, math.ceil(beta * h * w / 100))


def map_threshold(x, beta) -> list:
    """t[n][c]: the n_beta-th largest value of each map."""
    n, c, h, w = x.shape
    xs = stat_values(x)
    nb = n_beta(beta, h, w)
    return [[kth_largest([v for row in ch for v in row], nb) for ch in smp] for smp in xs]


def attention_soft_mask(x, beta, mode) -> list:
    """S (N, C, H, W) of SPEC §4 step 3, as nested lists (every map)."""
    n, c, h, w = x.shape
    xs = stat_values(x)
    t = map_threshold(x, beta)
    out = zeros4(n, c, h, w)
    for b in range(n):
        for ch in range(c):
            flat = [v for row in xs[b][ch] for v in row]
            mn, mx = min(flat), max(flat)
            for hh in range(h):
                for ww in range(w):
                    v = xs[b][ch][hh][ww]
                    # f̂ = 0 wherever it is not a number in [0, 1] (max = min, ±Inf)
                    fh = (v - mn) / (mx - mn) if mx != mn else 0.0
                    fh = fh if 0.0 <= fh <= 1.0 else 0.0
                    top = v >= t[b][ch]
                    if mode == "am":
                        s = 0.0 if top else 1.0
                    elif mode == "sm":
                        s = 1.0 - fh
                    elif mode == "ad":
                        s = 1.0 - fh if top else 1.0
                    else:
                        raise ValueError(mode)
                    out[b][ch][hh][ww] = s
    return out


def attention_gamma(noise, alpha) -> list:
    q = f32(alpha)
    return [[ui < q for ui in row] for row in u_values(noise)]


def naive_attentiondrop(x, noise, alpha=0.1, beta=20.0, mode="ad", normalize="batch"):
    n, c, h, w = x.shape
    s = attention_soft_mask(x, beta, mode)
    gam = attention_gamma(noise, alpha)
    for b in range(n):
        for ch in range(c):
            if not gam[b][ch]:
                s[b][ch] = [[1.0] * w for _ in range(h)]
    wt = naive_normalize(s, normalize)
    return apply(x, wt), wt


# --------------------------------------------------------------------- FocusedDropout


def focused_reference(x):
    """(r[n], v[n]): reference channel (first argmax of the channel means) and its max."""
    xs = stat_values(x)
    n, c, h, w = x.shape
    refs, vs = [], []
    for b in range(n):
        best, best_m = 0, None
        for ch in range(c):
            m = sum(v for row in xs[b][ch] for v in row) / (h * w)
            if best_m is None or m > best_m:
                best, best_m = ch, m
        refs.append(best)
        vs.append(max(v for row in xs[b][best] for v in row))
    return refs, vs


def naive_focused_dropout(x, noise, low=0.3, high=0.6, per_position=False):
    n, c, h, w = x.shape
    xs = stat_values(x)
    refs, vs = focused_reference(x)
    u = u_values(noise)
    wt = zeros4(n, c, h, w, 1.0)
    for b in range(n):
        v = vs[b]
        if v <= 0:
            continue
        xr = xs[b][refs[b]]
        for hh in range(h):
            for ww in range(w):
                ub = u[b][hh][ww] if per_position else u[b]
                gamma = low + (high - low) * ub
                keep = 1.0 if xr[hh][ww] > gamma * v else 0.0
                for ch in range(c):
                    wt[b][ch][hh][ww] = keep
    wt = torch.tensor(wt, dtype=torch.float64).reshape(n, c, h, w)
    return apply(x, wt), wt


# ---------------------------------------------------------------- seeds and blocks


def valid_centre(i: int, r: int, size: int) -> bool:
    """The r-block of centre i (offset r//2 before it) lies inside [0, size)."""
    start = i - r // 2
    return start >= 0 and start + r - 1 <= size - 1


def expand_seeds(seeds: list, r: int) -> list:
    """dropped[n][c][h][w]: any seed at (h', w') with h'-r//2 <= h <= h'-r//2+r-1, same w."""
    n, c, h, w = _shape4(seeds)
    out = zeros4(n, c, h, w)
    for b in range(n):
        for ch in range(c):
            for sh in range(h):
                for sw in range(w):
                    if not seeds[b][ch][sh][sw]:
                        continue
                    for hh in range(sh - r // 2, sh - r // 2 + r):
                        for ww in range(sw - r // 2, sw - r // 2 + r):
                            if 0 <= hh < h and 0 <= ww < w:
                                out[b][ch][hh][ww] = 1.0
    return out


def seed_rate(rate: float, r: int, h: int, w: int) -> float:
    """DropBlock's seed rate g = rate/r^2 * H*W/((H-r+1)(W-r+1)), as a Python float."""
    return rate / (r * r) * h * w / ((h - r + 1) * (w - r + 1))


# --------------------------------------------------------------------------- CamDrop


def cam_alpha(x, weight, target) -> list:
    """alpha[n][c]: W[y] averaged over groups of C_fc / C consecutive weights."""
    n, c, _, _ = x.shape
    wv = weight.detach().cpu()
    wv = (wv.double() if x.dtype == torch.float64 else wv.float()).tolist()
    tv = target.detach().cpu().tolist()
    cfc = len(wv[0])
    g = cfc // c
    out = []
    for b in range(n):
        row = wv[tv[b]]
        out.append([sum(row[ch * g:(ch + 1) * g]) / g for ch in range(c)])
    return out


def cam_map(x, alpha) -> list:
    xs = stat_values(x)
    n, c, h, w = x.shape
    return [[[sum(alpha[b][ch] * xs[b][ch][hh][ww] for ch in range(c)) for ww in range(w)]
             for hh in range(h)] for b in range(n)]


def camdrop_candidates(x, weight, target, block_size=5, channel_rate=0.125):
    """(cand_s[n][h][w], cand_c[n][c]) of SPEC §6 step 3."""
    n, c, h, w = x.shape
    r = block_size
    alpha = cam_alpha(x, weight, target)
    j = cam_map(x, alpha)
    ns = max(1, (h * w) // (r * r))
    nc = max(1, round(channel_rate * c))
    cand_s, cand_c = [], []
    for b in range(n):
        flat = [v for row in j[b] for v in row]
        top = top_k_ties(flat, ns)
        cand_s.append([[top[hh * w + ww] for ww in range(w)] for hh in range(h)])
        cand_c.append(top_k_ties(alpha[b], nc))
    return cand_s, cand_c


def naive_camdrop(x, weight, target, noise, block_size=5, keep=0.9, channel_rate=0.125,
                  normalize="batch"):
    n, c, h, w = x.shape
    r = block_size
    seeds = zeros4(n, c, h, w)
    if r <= h and r <= w:
        cand_s, cand_c = camdrop_candidates(x, weight, target, r, channel_rate)
        g = f32((1 - keep) / (r * r) * h * w / ((h - r + 1) * (w - r + 1)))
        u = u_values(noise)
        for b in range(n):
            for ch in range(c):
                for hh in range(h):
                    for ww in range(w):
                        seeds[b][ch][hh][ww] = float(
                            u[b][ch][hh][ww] < g and cand_s[b][hh][ww] and cand_c[b][ch]
                            and valid_centre(hh, r, h) and valid_centre(ww, r, w))
    dropped = expand_seeds(seeds, r)
    s = [[[[1.0 - v for v in row] for row in ch] for ch in smp] for smp in dropped]
    wt = naive_normalize(s, normalize)
    return apply(x, wt), wt


# ------------------------------------------------------------------------ DropBlock


def naive_dropblock(x, noise, p=0.1, block_size=7, shared_channels=False, normalize="batch"):
    n, c, h, w = x.shape
    r = min(block_size, h, w)
    g = f32(seed_rate(p, r, h, w))
    u = u_values(noise)
    cs = 1 if shared_channels else c
    seeds = zeros4(n, cs, h, w)
    for b in range(n):
        for ch in range(cs):
            for hh in range(h):
                for ww in range(w):
                    seeds[b][ch][hh][ww] = float(
                        u[b][ch][hh][ww] < g and valid_centre(hh, r, h)
                        and valid_centre(ww, r, w))
    dropped = expand_seeds(seeds, r)
    s = [[[[1.0 - dropped[b][0 if shared_channels else ch][hh][ww] for ww in range(w)]
           for hh in range(h)] for ch in range(c)] for b in range(n)]
    wt = naive_normalize(s, normalize)
    return apply(x, wt), wt


# ------------------------------------------------------------------ noise shapes


def noise_shape(layer: str, shape, *, block_size=7, per_position=False,
                shared_channels=False) -> tuple:
    n, c, h, w = shape
    if layer == "corrdrop":
        return (2, n, math.ceil(h / block_size), math.ceil(w / block_size))
    if layer in ("selectscale", "spatialscale", "selectout", "attentiondrop"):
        return (n, c)
    if layer == "focused_dropout":
        return (n, h, w) if per_position else (n,)
    if layer == "camdrop":
        return (n, c, h, w)
    if layer == "dropblock":
        return (n, 1 if shared_channels else c, h, w)
    raise ValueError(layer)


# ----------------------------------------------------- noise away from boundaries


def corrdrop_well_conditioned(x, k, spread=1e-3) -> list:
    """Per sample: whether SPEC §2's kappa is robust to float32 rounding.

    kappa divides by F_max - F_min; when that spread is mathematically 0 but not in
    floating point (e.g. N' = 2, or identical pooled rows), kappa is decided by rounding
    and no two implementations can be expected to agree. N' = 1 and all-zero samples are
    exact.
    """
    f, _, hp, wp = corrdrop_stats(x, k)
    xs = stat_values(x)
    out = []
    for b, fb in enumerate(f):
        allzero = all(v == 0 for ch in xs[b] for row in ch for v in row)
        rng = max(fb) - min(fb)
        out.append(hp * wp == 1 or allzero or rng > spread)
    return out


def safe_corrdrop_noise(x, p, k, generator, margin=2e-3) -> torch.Tensor:
    """noise (2, N, H', W') whose draws keep `margin` away from every bernoulli boundary."""
    n, c, h, w = x.shape
    _, kap, hp, wp = corrdrop_stats(x, k)
    u = torch.rand((2, n, hp, wp), generator=generator, dtype=torch.float64)
    for b in range(n):
        for i in range(hp * wp):
            q = kap[b][i]
            if abs(u[0, b, i // wp, i % wp].item() - q) < margin:
                u[0, b, i // wp, i % wp] = min(q + 2 * margin, 0.999) if q < 0.5 else max(
                    q - 2 * margin, 0.0)
        m = [u[0, b, i // wp, i % wp].item() < kap[b][i] for i in range(hp * wp)]
        z = m.count(False)
        q = 1.0 - corrdrop_phat(p, k, h, w, z)
        for i in range(hp * wp):
            if abs(u[1, b, i // wp, i % wp].item() - q) < margin:
                u[1, b, i // wp, i % wp] = min(q + 2 * margin, 0.999) if q < 0.5 else max(
                    q - 2 * margin, 0.0)
    return u.float()
