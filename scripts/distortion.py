"""Distortion sweep for PolarQuant: unit vectors, real SmolLM2 K/V, and attention-level effect.

Sections (all in one run; ``--unit-only`` stops after the first):

1. **Unit vectors** (d = 64, 128, 256): an exact search on the analytic distortion
   ``theoretical_mse`` over levels 1..log2(d) and per-level bit allocations (a knapsack over
   the stored bits, fp16 radii and byte padding included) gives the MSE / bits frontier. The
   paper preset, the named presets and frontier points at fixed budgets are then measured on N
   seeded random unit vectors: MSE, inner-product error d*E[(<q,x> - <q,x_hat>)^2] for random
   unit q, and the inner-product slope E[<q,x><q,x_hat>] / E[<q,x>^2] (1 = unbiased), next to
   the Shannon bound 4^-b and TurboQuant's published MSE.
2. **Real K/V** from SmolLM2-135M (fp32, CPU, SDPA) on held-out essay text: relative MSE
   sum||x - x_hat||^2 / sum||x||^2 per preset for keys and values, offline codebooks and
   online ones fitted per layer on a calibration split, scored on held-out tokens.
3. **Attention**: a context of ``--ctx`` tokens is cached, the next ``--chunk`` tokens are scored
   against it with the cached keys and/or values replaced by quantize(x).dequantize() (the new
   tokens' own K/V stay full precision, as in chunked prefill). Next-token KL(full || quant)
   and perplexity, averaged over ``--windows`` held-out windows; offline and online codebooks
   (online: fitted per layer on the context's own K/V); plus one idea beyond the paper: keys
   centred by their per-(layer, head) mean over the context before quantizing (softmax is
   invariant to q.mu, so the cache can hold centred keys exactly).
4. **K/V pairing**: for average budgets of 2.5 / 3 / 3.5 / 4 bits per element, pairs of presets
   (key preset, value preset) are screened with KL_K-only + KL_V-only and the best candidates
   measured with both quantized; the lowest measured KL per budget is reported.

Usage: ``python scripts/distortion.py`` (the full run), ``python scripts/distortion.py --quick``
(tiny unit-vector run for tests). Writes ``<out>/distortion.json`` and ``<out>/distortion.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from polartensor.codebook import fit_online_codebook, level_cosine_gain  # noqa: E402
from polartensor.codebook import theoretical_mse as _theoretical_mse  # noqa: E402
from polartensor.config import MAX_BITS, PRESETS, PolarQuantConfig, get_preset  # noqa: E402
from polartensor.polar import polar_angles  # noqa: E402
from polartensor.polar_quant_tensor import quantize  # noqa: E402
from polartensor.rotation import rotate  # noqa: E402

# TurboQuant (Zandieh et al. 2025, arXiv 2504.19874), MSE-optimal variant, unit vectors.
TURBOQUANT_MSE = {1: 0.363, 2: 0.117, 3: 0.0345, 4: 0.0095}
UNIT_TARGETS = [1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.0, 4.5, 5.0]
PRESET_BUDGETS = [2.5, 3.0, 3.25, 3.5, 4.0]
PAIR_BUDGETS = [2.5, 3.0, 3.5, 4.0]
PAIR_SLACK = 0.13  # "about" a budget: the radius overhead differs by 0.125 b between d 64/128
ONLINE_PRESETS = ["paper", "polar-2.5", "polar-3", "polar-3.25", "polar-3.5", "polar-4"]

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. unit vectors
# ---------------------------------------------------------------------------------------------
def max_levels(d: int) -> int:
    lv = 0
    while d % (2 << lv) == 0 and lv < 12:
        lv += 1
    return lv


def frontier_search(d: int, max_bits: int = MAX_BITS, radius_bits: int = 16) -> list[dict]:
    """Exact analytic frontier at head_dim d: for every number of levels L, a knapsack over
    the code bits (level l holds d / 2^l angles of b_l bits) keeps the allocation with the
    largest prod_l E[cos] per exact bit cost; then the (bits/coord, MSE) Pareto set over L."""
    cands = []
    for L in range(1, max_levels(d) + 1):
        best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
        for lvl in range(1, L + 1):
            n = d >> lvl
            nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
            for b in range(1 if lvl == 1 else 0, max_bits + 1):
                lg = math.log(level_cosine_gain(lvl, b))
                for cost, (g, alloc) in best.items():
                    c, v = cost + n * b, g + lg
                    if c not in nxt or v > nxt[c][0]:
                        nxt[c] = (v, (*alloc, b))
            best = nxt
        for code_bits, (g, alloc) in best.items():
            bpc = (8 * max(1, (code_bits + 7) // 8) + radius_bits * (d >> L)) / d
            cands.append(dict(levels=L, bits=alloc, bpc=bpc, mse_theory=2.0 * (1.0 - math.exp(g))))
    cands.sort(key=lambda r: (r["bpc"], r["mse_theory"]))
    front, best_mse = [], float("inf")
    for r in cands:
        if r["mse_theory"] < best_mse - 1e-15:
            front.append(r)
            best_mse = r["mse_theory"]
    return front


def best_under(front: list[dict], budget: float) -> dict | None:
    ok = [r for r in front if r["bpc"] <= budget + 1e-9]
    return min(ok, key=lambda r: r["mse_theory"]) if ok else None


def unit_vectors(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True), q / q.norm(dim=-1, keepdim=True)


def measure_unit(cfg: PolarQuantConfig, x: torch.Tensor, q: torch.Tensor) -> dict:
    d = x.shape[-1]
    xh = quantize(x.float(), cfg).dequantize(torch.float64)
    err = x - xh
    ip, iph = (q * x).sum(-1), (q * xh).sum(-1)
    return dict(
        mse=float((err * err).sum(-1).mean()),
        ip_err=float(d * ((ip - iph) ** 2).mean()),
        ip_slope=float((ip * iph).sum() / (ip * ip).sum()),
    )


def cfg_of(levels: int, bits) -> PolarQuantConfig:
    return PolarQuantConfig(levels=levels, bits=tuple(bits), radius_dtype="float16")


def unit_section(dims: list[int], n: int, seed: int, max_bits: int) -> dict:
    out: dict = {}
    for d in dims:
        t = time.perf_counter()
        front = frontier_search(d, max_bits)
        log(
            f"unit d={d}: analytic frontier has {len(front)} points "
            f"({time.perf_counter() - t:.1f}s)"
        )
        x, q = unit_vectors(n, d, seed + d)
        rows = []

        def add(kind: str, name: str, cfg: PolarQuantConfig, d=d, x=x, q=q, rows=rows) -> None:
            bpc = cfg.bits_per_coordinate(d)
            m = measure_unit(cfg, x, q)
            rows.append(
                dict(
                    kind=kind,
                    name=name,
                    levels=cfg.levels,
                    bits=list(cfg.bits),
                    bpc=bpc,
                    mse_theory=_theoretical_mse(cfg),
                    **m,
                    ratio_shannon=m["mse"] / 4.0 ** (-bpc),
                )
            )

        for name in PRESETS:
            add("paper" if name == "paper" else "preset", name, get_preset(name, d))
        seen = set()
        for target in UNIT_TARGETS:
            r = best_under(front, target)
            if r is None or (r["levels"], r["bits"]) in seen:
                continue
            seen.add((r["levels"], r["bits"]))
            add("frontier", f"front<={target:g}", cfg_of(r["levels"], r["bits"]))
        # The cheapest frontier point that reaches the paper preset's MSE.
        paper = next(r for r in rows if r["kind"] == "paper")
        at_mse = min(
            (r for r in front if r["mse_theory"] <= paper["mse_theory"]),
            key=lambda r: r["bpc"],
            default=None,
        )
        if at_mse is not None and (at_mse["levels"], at_mse["bits"]) not in seen:
            add("frontier", "front@paper-mse", cfg_of(at_mse["levels"], at_mse["bits"]))
        suggested = {}
        for budget in PRESET_BUDGETS:
            r = best_under(front, budget)
            if r is not None:
                suggested[f"{budget:g}"] = dict(
                    levels=r["levels"],
                    bits=list(r["bits"]),
                    bpc=r["bpc"],
                    mse_theory=r["mse_theory"],
                )
        out[str(d)] = dict(
            n=n,
            rows=rows,
            suggested=suggested,
            frontier=[
                dict(
                    levels=r["levels"],
                    bits=list(r["bits"]),
                    bpc=r["bpc"],
                    mse_theory=r["mse_theory"],
                )
                for r in front
                if r["bpc"] <= 6
            ],
        )
        log(f"unit d={d}: measured {len(rows)} configs on {n} vectors")
    return out


# ---------------------------------------------------------------------------------------------
# 2-4. SmolLM2
# ---------------------------------------------------------------------------------------------
def fit_online(x: torch.Tensor, cfg: PolarQuantConfig, max_samples: int) -> torch.Tensor:
    """fit_codebook(x, cfg) with a cap on the angles sampled per level (k-means cost)."""
    y = rotate(x, cfg.rotation, cfg.seed)
    angles, weights, _ = polar_angles(y.to(torch.float64), cfg.levels)
    return fit_online_codebook(angles, weights, cfg.replace(codebook="online"), max_samples)


def qdq(x: torch.Tensor, cfg: PolarQuantConfig, centroids: torch.Tensor | None = None):
    if centroids is not None:
        cfg = cfg.replace(codebook="online")
    return quantize(x, cfg, centroids=centroids).dequantize(torch.float32)


def qdq_layers(
    xs: list[torch.Tensor],
    cfg: PolarQuantConfig,
    online: bool,
    samples: int,
    fit_on: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Quantize-dequantize every layer's tensor; online: a codebook per layer."""
    if not online:
        stacked = qdq(torch.stack(xs), cfg)
        return list(stacked.unbind(0))
    fit_on = xs if fit_on is None else fit_on
    return [qdq(x, cfg, fit_online(f, cfg, samples)) for x, f in zip(xs, fit_on)]


def rel_mse(x: list[torch.Tensor], xh: list[torch.Tensor]) -> list[float]:
    return [float(((a - b) ** 2).sum() / (a * a).sum()) for a, b in zip(x, xh)]


class Scorer:
    """Holds one window: the context's cached K/V and the full-precision chunk logits."""

    def __init__(self, model, ids: torch.Tensor, ctx: int, chunk: int):
        from transformers import DynamicCache

        self.model, self.DynamicCache = model, DynamicCache
        with torch.inference_mode():
            out = model(ids[:, :ctx], use_cache=True)
        cache = out.past_key_values
        self.keys = [layer.keys.clone() for layer in cache.layers]
        self.values = [layer.values.clone() for layer in cache.layers]
        self.chunk = ids[:, ctx : ctx + chunk]
        self.target = ids[0, ctx + 1 : ctx + chunk + 1]
        self.logp_full = self._logp(self.keys, self.values)
        self.ppl_full = self._ppl(self.logp_full)
        self.forwards = 1

    def _logp(self, keys, values) -> torch.Tensor:
        cache = self.DynamicCache()
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k.to(self.keys[i].dtype), v.to(self.values[i].dtype), i)
        with torch.inference_mode():
            logits = self.model(self.chunk, past_key_values=cache, use_cache=True).logits
        return torch.log_softmax(logits[0].double(), dim=-1)

    def _ppl(self, logp: torch.Tensor) -> float:
        nll = -logp[: len(self.target)].gather(-1, self.target[:, None]).mean()
        return float(torch.exp(nll))

    def score(self, keys=None, values=None) -> dict:
        logp = self._logp(keys or self.keys, values or self.values)
        self.forwards += 1
        p = self.logp_full.exp()
        kl = float((p * (self.logp_full - logp)).sum(-1).mean())
        return dict(kl=kl, ppl=self._ppl(logp))


def model_section(args, presets: list[str]) -> dict:
    from polartensor import assets

    torch.manual_seed(0)
    log("loading SmolLM2-135M (fp32, CPU, sdpa)")
    model, tok = assets.load_smollm2(torch.float32, "cpu")
    head_dim = model.config.head_dim
    held = tok(
        assets.text_split("heldout"), return_tensors="pt", add_special_tokens=False
    ).input_ids
    cal = tok(
        assets.text_split("calibration"), return_tensors="pt", add_special_tokens=False
    ).input_ids
    span = args.ctx + args.chunk + 1
    room = held.shape[1] - span
    starts = [int(room * w / max(args.windows, 1)) for w in range(args.windows)]
    log(
        f"held-out text {held.shape[1]} tokens; windows at {starts}; ctx {args.ctx}, "
        f"chunk {args.chunk}"
    )
    cfgs = {name: get_preset(name, head_dim) for name in presets}
    bpc = {name: cfg.bits_per_coordinate(head_dim) for name, cfg in cfgs.items()}
    samples = args.online_samples
    online_presets = [p for p in presets if p in args.online_presets] if args.online else []

    # -- 2. real K/V distortion: calibration fit, held-out evaluation -------------------------
    t = time.perf_counter()
    with torch.inference_mode():
        cout = model(cal[:, : args.ctx], use_cache=True)
    cal_k = [layer.keys.clone() for layer in cout.past_key_values.layers]
    cal_v = [layer.values.clone() for layer in cout.past_key_values.layers]
    scorers = []
    s0 = Scorer(model, held[:, starts[0] : starts[0] + span], args.ctx, args.chunk)
    scorers.append(s0)
    keys, vals = s0.keys, s0.values
    mu_cal = [k.mean(dim=-2, keepdim=True) for k in cal_k]
    kc = [k - m for k, m in zip(keys, mu_cal)]  # centred with the calibration mean
    kc_cal = [k - m for k, m in zip(cal_k, mu_cal)]
    real_kv = {}
    for name, cfg in cfgs.items():
        row = dict(bpc=bpc[name])
        for tag, xs, fit in (("k", keys, cal_k), ("v", vals, cal_v), ("k_centred", kc, kc_cal)):
            for cb in ("offline", "online"):
                if cb == "online" and (name not in online_presets or tag == "k_centred"):
                    row[f"{tag}_{cb}"] = row[f"{tag}_{cb}_max"] = None
                    continue
                xh = qdq_layers(xs, cfg, cb == "online", samples, fit)
                if tag == "k_centred":  # error relative to the uncentred keys' energy
                    errs = [
                        float(((a - b) ** 2).sum() / (c * c).sum()) for a, b, c in zip(xs, xh, keys)
                    ]
                else:
                    errs = rel_mse(xs, xh)
                row[f"{tag}_{cb}"] = sum(errs) / len(errs)
                row[f"{tag}_{cb}_max"] = max(errs)
        real_kv[name] = row
        log(
            f"real K/V {name}: K off {fmt(row['k_offline'])} on {fmt(row['k_online'])} | "
            f"V off {fmt(row['v_offline'])} on {fmt(row['v_online'])} | centred K off "
            f"{fmt(row['k_centred_offline'])} on {fmt(row['k_centred_online'])}"
        )
    mean_energy = sum(
        float((k - m).pow(2).sum() / k.pow(2).sum())
        for k, m in zip(keys, [k.mean(-2, keepdim=True) for k in keys])
    ) / len(keys)
    log(
        f"real K/V section done ({time.perf_counter() - t:.1f}s); keys keep "
        f"{mean_energy:.3f} of their energy after per-head centring"
    )

    # -- 3. attention-level effect -------------------------------------------------------------
    variants = ["k", "v", "kv", "k_sink", "k_centred", "k_centred_sink"]
    acc: dict = {
        name: {cb: {v: [] for v in variants} for cb in ("offline", "online")} for name in presets
    }
    full = []
    pair_cache: dict = {}  # per window: dequantized offline K / V per preset for the pairing
    for w, start in enumerate(starts):
        t = time.perf_counter()
        sc = (
            scorers[w]
            if w < len(scorers)
            else Scorer(model, held[:, start : start + span], args.ctx, args.chunk)
        )
        if w >= len(scorers):
            scorers.append(sc)
        full.append(sc.ppl_full)
        mu = [k.mean(dim=-2, keepdim=True) for k in sc.keys]
        kcen = [k - m for k, m in zip(sc.keys, mu)]
        # variant: token 0 (the attention sink) kept exact, the mean taken over the rest
        mu1 = [k[:, :, 1:].mean(dim=-2, keepdim=True) for k in sc.keys]
        kcen1 = [k[:, :, 1:] - m for k, m in zip(sc.keys, mu1)]
        pc = pair_cache.setdefault(w, {})
        for name, cfg in cfgs.items():
            for cb in ("offline", "online"):
                online = cb == "online"
                if online and name not in online_presets:
                    continue
                kq = qdq_layers(sc.keys, cfg, online, samples)
                vq = qdq_layers(sc.values, cfg, online, samples)
                res = acc[name][cb]
                res["k"].append(sc.score(keys=kq))
                res["v"].append(sc.score(values=vq))
                res["kv"].append(sc.score(keys=kq, values=vq))
                msg = ""
                if not online:  # centring (offline codebooks), kept for the pairing
                    kcq = [a + m for a, m in zip(qdq_layers(kcen, cfg, False, samples), mu)]
                    kcsq = [
                        torch.cat([k[:, :, :1], a + m], dim=-2)
                        for k, a, m in zip(sc.keys, qdq_layers(kcen1, cfg, False, samples), mu1)
                    ]
                    pc[name] = (kq, vq, kcsq)
                    ksq = [
                        torch.cat([k[:, :, :1], a[:, :, 1:]], dim=-2) for k, a in zip(sc.keys, kq)
                    ]
                    res["k_sink"].append(sc.score(keys=ksq))
                    res["k_centred"].append(sc.score(keys=kcq))
                    res["k_centred_sink"].append(sc.score(keys=kcsq))
                    msg = (
                        f" | K token 0 exact {res['k_sink'][-1]['kl']:.4f}, centred K "
                        f"{res['k_centred'][-1]['kl']:.4f}, "
                        f"+ token 0 exact {res['k_centred_sink'][-1]['kl']:.4f}"
                    )
                log(
                    f"window {w} {name:10s} {cb:7s}: KL K {res['k'][-1]['kl']:.4f} "
                    f"V {res['v'][-1]['kl']:.4f} KV {res['kv'][-1]['kl']:.4f}{msg}"
                )
        log(f"window {w} done ({time.perf_counter() - t:.1f}s, full ppl {sc.ppl_full:.3f})")

    def mean(rs: list[dict]) -> dict:
        return {m: sum(r[m] for r in rs) / len(rs) for m in ("kl", "ppl")} if rs else {}

    attention = {
        name: dict(
            bpc=bpc[name],
            **{cb: {v: mean(acc[name][cb][v]) for v in variants} for cb in ("offline", "online")},
        )
        for name in presets
    }

    # -- 4. K/V pairing -----------------------------------------------------------------------
    t = time.perf_counter()
    pairing = {}
    for mode, ktag, kvtag, top in (
        ("plain", "k", "kv", args.pair_top),
        ("centred", "k_centred_sink", None, 1),
    ):
        pairs = []
        for kp in presets:
            for vp in presets:
                pred = attention[kp]["offline"][ktag]["kl"] + attention[vp]["offline"]["v"]["kl"]
                pairs.append(dict(key=kp, value=vp, avg_bpc=(bpc[kp] + bpc[vp]) / 2, kl_pred=pred))
        measured = {(kp, kp): attention[kp]["offline"][kvtag] for kp in presets if kvtag}
        todo = []
        for budget in PAIR_BUDGETS:
            ok = sorted(
                (p for p in pairs if p["avg_bpc"] <= budget + PAIR_SLACK),
                key=lambda p: p["kl_pred"],
            )
            for p in ok[:top]:
                kv = (p["key"], p["value"])
                if kv not in measured and kv not in todo:
                    todo.append(kv)
        log(
            f"pairing ({mode} keys): measuring {len(todo)} (key, value) pairs on "
            f"{len(starts)} windows"
        )
        kidx = 2 if mode == "centred" else 0
        for kp, vp in todo:
            rs = [
                sc.score(keys=pair_cache[w][kp][kidx], values=pair_cache[w][vp][1])
                for w, sc in enumerate(scorers)
            ]
            measured[(kp, vp)] = mean(rs)
            log(f"pair ({mode}) K={kp} V={vp}: KL {measured[(kp, vp)]['kl']:.4f}")
        for p in pairs:
            m = measured.get((p["key"], p["value"]))
            p["kl"] = m["kl"] if m else None
            p["ppl"] = m["ppl"] if m else None
        best = {}
        for budget in PAIR_BUDGETS:
            ok = [p for p in pairs if p["avg_bpc"] <= budget + PAIR_SLACK and p["kl"] is not None]
            if ok:
                best[f"{budget:g}"] = min(ok, key=lambda p: p["kl"])
        pairing[mode] = dict(pairs=pairs, best=best)
    log(f"pairing done ({time.perf_counter() - t:.1f}s)")
    return dict(
        head_dim=head_dim,
        windows=starts,
        ctx=args.ctx,
        chunk=args.chunk,
        online_samples=samples,
        ppl_full=sum(full) / len(full),
        ppl_full_windows=full,
        key_energy_after_centring=mean_energy,
        real_kv=real_kv,
        attention=attention,
        online_presets=online_presets,
        pairing=pairing,
        forwards=sum(s.forwards for s in scorers),
    )


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt(v, p=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{p}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{p}f}"
    return str(v)


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render(res: dict) -> str:
    meta = res["meta"]
    out = [
        "# PolarQuant distortion sweep",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; torch {meta['torch']}; transformers {meta.get('transformers')}; "
        f"Python {meta['python']}; {meta['threads']} CPU threads; run time "
        f"{meta['elapsed_s']:.0f} s.",
        "",
        "Bits/coord (b) are stored bits per coordinate at that head_dim: angle codes with byte "
        "padding plus fp16 block radii. Shannon bound: 4^-b. MSE = E||x - x_hat||^2 on unit "
        "vectors; IP err = d * E[(<q,x> - <q,x_hat>)^2] for random unit q (comparable to MSE); "
        "IP slope = E[<q,x><q,x_hat>] / E[<q,x>^2] (1 = unbiased). Offline codebooks.",
        "",
    ]
    for d, sec in res["unit"].items():
        out += [f"## Unit vectors, d = {d} (N = {sec['n']})", ""]
        rows = []
        for r in sec["rows"]:
            rows.append(
                [
                    r["kind"],
                    r["name"],
                    r["levels"],
                    str(tuple(r["bits"])),
                    r["bpc"],
                    r["mse_theory"],
                    r["mse"],
                    r["ip_err"],
                    r["ip_slope"],
                    r["ratio_shannon"],
                ]
            )
        for b, m in TURBOQUANT_MSE.items():
            rows.append(
                [
                    "reference",
                    f"TurboQuant {b}b (published)",
                    "-",
                    "-",
                    float(b),
                    m,
                    "-",
                    "-",
                    "-",
                    m / 4.0 ** (-b),
                ]
            )
        for b in (2.0, 3.0, 4.0):
            rows.append(
                ["reference", f"Shannon bound {b:g}b", "-", "-", b, 4.0 ** (-b), "-", "-", "-", 1.0]
            )
        out.append(
            table(
                [
                    "kind",
                    "name",
                    "L",
                    "bits",
                    "b/coord",
                    "MSE theory",
                    "MSE",
                    "IP err",
                    "IP slope",
                    "MSE/4^-b",
                ],
                rows,
            )
        )
        out += ["", f"Analytic frontier, best allocation under each budget (d = {d}):", ""]
        out.append(
            table(
                ["budget", "L", "bits", "b/coord", "MSE theory", "x 4^-b"],
                [
                    [
                        k,
                        v["levels"],
                        str(tuple(v["bits"])),
                        v["bpc"],
                        v["mse_theory"],
                        v["mse_theory"] / 4.0 ** (-v["bpc"]),
                    ]
                    for k, v in sec["suggested"].items()
                ],
            )
        )
        out.append("")
    m = res.get("model")
    if m:
        hd = m["head_dim"]
        out += [
            f"## SmolLM2-135M real K/V (head_dim {hd})",
            "",
            f"Relative MSE sum||x - x_hat||^2 / sum||x||^2, mean over 30 layers (max in "
            f"brackets). Context {m['ctx']} held-out tokens; online codebooks fitted per layer "
            f"on {m['ctx']} calibration-split tokens (at most {m['online_samples']} angles per "
            f"level), scored on held-out tokens. Centred K: keys minus the per-(layer, head) "
            f"calibration mean, error relative to the uncentred keys' energy. Per-head "
            f"centring removes {1 - m['key_energy_after_centring']:.1%} of the keys' energy.",
            "",
        ]
        rows = []
        for name, r in m["real_kv"].items():
            rows.append(
                [name, r["bpc"]]
                + [
                    f"{r[f'{t}_{cb}']:.4f} ({r[f'{t}_{cb}_max']:.3f})"
                    if r[f"{t}_{cb}"] is not None
                    else "-"
                    for t in ("k", "v", "k_centred")
                    for cb in ("offline", "online")
                ]
            )
        out.append(
            table(
                [
                    "preset",
                    f"b/coord @{hd}",
                    "K offline",
                    "K online",
                    "V offline",
                    "V online",
                    "centred K offline",
                    "centred K online",
                ],
                rows,
            )
        )
        out += [
            "",
            f"## Attention-level effect (SmolLM2, {len(m['windows'])} held-out windows)",
            "",
            f"Context {m['ctx']} tokens cached (quantized), next {m['chunk']} tokens scored. "
            f"Mean next-token KL(full || quantized) and perplexity (full-precision cache: ppl "
            f"{m['ppl_full']:.3f}). Centred: keys minus their per-(layer, head) mean over the "
            "context, quantized, mean added back (offline codebooks). Token 0 exact: the first "
            "context token's key (the attention sink) kept in full precision (+0.012 b/coord "
            "for a 1024-token context). Centred, token 0 exact: both, token 0 left out of the "
            "mean.",
            "",
        ]
        rows = []
        for name, r in m["attention"].items():
            for cb in ("offline", "online"):
                a = r[cb]
                if not a["k"]:
                    continue
                rows.append(
                    [name, r["bpc"], cb]
                    + [
                        f"{a[v]['kl']:.4f} / {a[v]['ppl']:.3f}" if a[v] else "-"
                        for v in ("k", "v", "kv", "k_sink", "k_centred", "k_centred_sink")
                    ]
                )
        out.append(
            table(
                [
                    "preset",
                    f"b/coord @{hd}",
                    "codebook",
                    "K only KL / ppl",
                    "V only",
                    "K+V",
                    "K only, token 0 exact",
                    "centred K only",
                    "centred K, token 0 exact",
                ],
                rows,
            )
        )
        for mode, title in (
            ("plain", "offline codebooks"),
            ("centred", "offline codebooks, keys centred per (layer, head), token 0 exact"),
        ):
            pr = m["pairing"][mode]
            out += [
                "",
                f"## Best key/value preset pair per average budget ({title})",
                "",
                f"Average of key and value bits/coord at head_dim {hd}, budget + "
                f"{PAIR_SLACK} allowed (presets are named by their bits at head_dim 128, "
                "where a radius costs 0.125 b less). Screened by KL_K-only + KL_V-only; "
                "the best candidates measured with both quantized.",
                "",
            ]
            rows = [
                [k, p["key"], p["value"], p["avg_bpc"], p["kl"], p["ppl"], p["kl_pred"]]
                for k, p in pr["best"].items()
            ]
            out.append(
                table(
                    [
                        "budget",
                        "key preset",
                        "value preset",
                        "avg b/coord",
                        "KL",
                        "ppl",
                        "KL_K + KL_V",
                    ],
                    rows,
                )
            )
            meas = sorted(
                (p for p in pr["pairs"] if p["kl"] is not None), key=lambda p: p["avg_bpc"]
            )
            out += ["", "All measured pairs:", ""]
            out.append(
                table(
                    ["key preset", "value preset", "avg b/coord", "KL", "ppl", "KL_K + KL_V"],
                    [
                        [p["key"], p["value"], p["avg_bpc"], p["kl"], p["ppl"], p["kl_pred"]]
                        for p in meas
                    ],
                )
            )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny unit-vector run (d 64, N 2000, max 6 bits/level), no model",
    )
    ap.add_argument("--unit-only", action="store_true", help="skip the SmolLM2 sections")
    ap.add_argument("--n", type=int, default=20000, help="random unit vectors per d")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--max-bits", type=int, default=MAX_BITS, help="bits per level searched")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ctx", type=int, default=1024, help="context tokens (quantized cache)")
    ap.add_argument("--chunk", type=int, default=256, help="tokens scored against the cache")
    ap.add_argument("--windows", type=int, default=3, help="held-out windows averaged")
    ap.add_argument("--presets", nargs="+", default=None, help="presets (default: all)")
    ap.add_argument(
        "--no-online",
        dest="online",
        action="store_false",
        help="model sections: offline codebooks only",
    )
    ap.add_argument(
        "--online-presets",
        nargs="+",
        default=ONLINE_PRESETS,
        help="presets also run with online codebooks",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 is fastest when other jobs share the CPU)",
    )
    ap.add_argument(
        "--online-samples",
        type=int,
        default=4096,
        help="angles sampled per level when fitting an online codebook",
    )
    ap.add_argument(
        "--pair-top", type=int, default=3, help="pairs measured per budget after screening"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "distortion")
    args = ap.parse_args(argv)
    if args.quick:
        args.unit_only, args.n, args.dims, args.max_bits = True, min(args.n, 2000), [64], 6
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    presets = args.presets or list(PRESETS)
    for p in presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r}; known: {sorted(PRESETS)}")

    res: dict = {"meta": {}, "unit": unit_section(args.dims, args.n, args.seed, args.max_bits)}
    res["turboquant_mse"] = TURBOQUANT_MSE
    res["presets"] = {k: dict(v) for k, v in PRESETS.items()}
    if not args.unit_only:
        res["model"] = model_section(args, presets)
    try:
        import transformers

        tv = transformers.__version__
    except ImportError:  # pragma: no cover
        tv = None
    res["meta"] = dict(
        command="python scripts/distortion.py"
        + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(argv or sys.argv[1:])),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch=torch.__version__,
        transformers=tv,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        elapsed_s=time.perf_counter() - _T0,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    md = render(res)
    (args.out / "distortion.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (args.out / "distortion.md").write_text(md)
    print(md)
    log(f"wrote {args.out / 'distortion.json'} and {args.out / 'distortion.md'}")
    return res


if __name__ == "__main__":
    main()
