"""Effects with uncertainty: a paired bootstrap over contexts, and the spread over random draws.

An ablation or intervention changes the mean next-token loss by
``delta = (sum_c L1_c - sum_c L0_c) / sum_c n_c``, summed over the evaluated contexts c (``L0_c``,
``L1_c``: the context's summed loss without and with the patch, ``n_c``: its scored predictions;
:func:`per_context`). Predictions within a context
are not independent, so the unit of resampling is the context, and the clean and patched
losses of a context stay together (paired): replicate b draws C contexts with replacement
(``numpy.random.default_rng(seed).integers(0, C, size=(B, C))``, in blocks of
:data:`BLOCK` replicates, which draws the same numbers as one call) and recomputes the ratio.
Every configuration of one evaluation pass uses the same resampled contexts, so replicate b of
two configurations can be subtracted (paired across configurations too). The interval is the
percentile interval at :data:`CI_LEVEL` (``numpy.quantile``, linear).

Random sets add a second source: which neurons were drawn. :func:`draw_mean_replicates`
resamples the draws as well (hierarchical bootstrap: per replicate, D draws with replacement,
each at that replicate's contexts), so an interval over a mean of draws covers both; the
spread over draws is also reported on its own.

:func:`headline` states, per model, method and target set (``universal``, or any set other
than ``random`` / ``non-universal``, e.g. ``universal-calibrated``), the target set's effect,
the same-size random sets' effect, their difference and how many random neurons match the
target, each with its interval, or that the difference is not distinguishable at the token
count evaluated. Nandan et al. (2025) section 4 report the point values only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..errors import UnineuronsError

__all__ = ["CI_LEVEL", "BLOCK", "bootstrap_replicates", "interval", "paired_delta_replicates",
           "patch_intervals", "per_context",
           "draw_mean_replicates", "group_interval", "match_size", "headline", "BOOT_COLUMN"]

#: Level of every interval.
CI_LEVEL = 0.95
#: Replicates drawn per block (memory: BLOCK x contexts int64 indices at a time).
BLOCK = 64
#: ablations.parquet column holding each row's bootstrap replicates of delta_loss.
BOOT_COLUMN = "delta_loss_boot"
_DRAW_SEED = 7  #: seed of the draw resampling (summaries, headline): any fixed value


def bootstrap_replicates(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, P]`` float64: ``sum(num[idx]) / sum(den[idx])`` per column of ``num [C, P]``,
    for ``n_boot`` resamples ``idx`` of the C rows (contexts) with replacement (module
    docstring). Raises :class:`UnineuronsError` when C is 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    if num.ndim == 1:
        num = num[:, None]
    c = num.shape[0]
    if c == 0:
        raise UnineuronsError("bootstrap over contexts: no context had a scored prediction; "
                              "evaluate on more tokens (--n-tokens)")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, num.shape[1]))
    for b0 in range(0, n_boot, BLOCK):
        b = min(BLOCK, n_boot - b0)
        idx = rng.integers(0, c, size=(b, c))  # [b, C]
        counts = np.bincount((idx + c * np.arange(b)[:, None]).ravel(),
                             minlength=b * c).reshape(b, c).astype(np.float64)  # [b, C]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[b0:b0 + b] = (counts @ num) / (counts @ den)[:, None]
    return out


def interval(reps: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 of ``reps`` (NaN replicates ignored; NaN when none)."""
    a = (1 - level) / 2
    reps = np.asarray(reps, dtype=np.float64)
    ok = np.isfinite(reps).any(axis=0)
    lo = np.full(reps.shape[1:], np.nan)
    hi = np.full(reps.shape[1:], np.nan)
    if np.any(ok):
        sub = reps[:, ok] if reps.ndim > 1 else reps
        q = np.nanquantile(sub, [a, 1 - a], axis=0)
        if reps.ndim > 1:
            lo[ok], hi[ok] = q[0], q[1]
        else:
            lo, hi = q[0], q[1]
    return lo, hi


def paired_delta_replicates(clean: tuple[np.ndarray, np.ndarray],
                            patched: Sequence[tuple[np.ndarray, np.ndarray] | None],
                            columns: Sequence[int], n_boot: int, seed: int) -> np.ndarray:
    """``[len(columns), n_boot, P]`` replicates of patched minus clean means.

    ``clean`` and each of ``patched``: ``(ids [C], sums [C, 4])`` of
    :func:`per_context`; ``columns`` index the
    sums (1 = loss, 2 = entropy); the denominator is column 0 (scored predictions). A patch
    without per-context sums (None) gets NaN replicates. Raises :class:`UnineuronsError` when a
    patch saw other contexts or counts than the clean model (not paired)."""
    ids, base = clean
    out = np.full((len(columns), n_boot, len(patched)), np.nan)
    keep = [i for i, p in enumerate(patched) if p is not None]
    if not keep:
        return out
    for i in keep:
        pid, psum = patched[i]  # type: ignore[misc]
        if not (np.array_equal(pid, ids) and np.array_equal(psum[:, 0], base[:, 0])):
            raise UnineuronsError("paired bootstrap: a configuration was scored on other "
                                  "contexts than the clean model; evaluate them in one pass")
    for j, col in enumerate(columns):
        num = np.stack([patched[i][1][:, col] - base[:, col] for i in keep], 1)  # type: ignore[index]
        out[j][:, keep] = bootstrap_replicates(num, base[:, 0], n_boot, seed)
    return out


def per_context(acc) -> tuple[np.ndarray, np.ndarray] | None:
    """``(ids [m] int64 sorted, sums [m, 4] float64)`` of an
    :class:`~unineurons.analyses.interventions.LMMetrics`: per context, the scored predictions
    and the sums of loss, entropy and KL; None when some rows came without context ids (the
    sums would not add up to the totals)."""
    ids, sums = acc.contexts.result()
    if round(float(sums[:, 0].sum())) != round(float(acc.n)):
        return None
    return ids.cpu().numpy(), sums.cpu().numpy()


def patch_intervals(clean, accs: Sequence, n_boot: int, seed: int, replicates: bool = False
                    ) -> list[dict]:
    """Per patch: ``delta_loss_lo, delta_loss_hi, delta_entropy_lo, delta_entropy_hi``, the
    95 % paired-bootstrap intervals over contexts (``n_boot`` resamples seeded with ``seed``,
    the same for every patch), NaN when the
    :class:`~unineurons.analyses.interventions.LMMetrics` ``clean`` / ``accs`` kept no
    per-context sums or ``n_boot`` is 0; with ``replicates`` also ``delta_loss_boot``
    (``[n_boot]`` float64 replicates; empty without intervals)."""
    ctx = per_context(clean) if n_boot > 0 else None
    reps = None
    if ctx is not None and len(ctx[0]) and len(accs):
        reps = paired_delta_replicates(ctx, [per_context(a) for a in accs], [1, 2], n_boot,
                                       seed)  # [2, B, P]: loss, entropy
    out = []
    for i in range(len(accs)):
        r: dict = {}
        for j, k in enumerate(("delta_loss", "delta_entropy")):
            lo, hi = interval(reps[j][:, i]) if reps is not None else (np.nan, np.nan)
            r[f"{k}_lo"], r[f"{k}_hi"] = float(lo), float(hi)
        if replicates:
            r[BOOT_COLUMN] = reps[0][:, i].copy() if reps is not None else np.zeros(0)
        out.append(r)
    return out


def draw_mean_replicates(reps: np.ndarray, seed: int = _DRAW_SEED) -> np.ndarray:
    """``reps [D, B]`` (D draws' replicates, paired over contexts) -> ``[B]``: per replicate,
    the mean over D draws picked with replacement (one draw: its replicates)."""
    reps = np.asarray(reps, dtype=np.float64)
    d, b = reps.shape
    if d == 1:
        return reps[0]
    pick = np.random.default_rng([seed, d, b]).integers(0, d, size=(b, d))  # [B, D]
    return reps[pick, np.arange(b)[:, None]].mean(1)


def _draws(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per draw, by draw ("all" and a number can name the same sets)."""
    return rows.sort_values("draw", kind="stable").drop_duplicates("draw")


def _boot(rows: pd.DataFrame) -> np.ndarray | None:
    """``[rows, B]`` replicates of ``rows`` (sorted by draw), None when any row lacks them."""
    if BOOT_COLUMN not in rows.columns:
        return None
    vals = [None if v is None or (np.ndim(v) == 0) else np.asarray(v, dtype=np.float64)
            for v in rows[BOOT_COLUMN]]
    if not vals or any(v is None or v.size == 0 for v in vals):
        return None
    if len({v.size for v in vals}) != 1:
        return None
    return np.stack(vals)  # type: ignore[arg-type]


def group_interval(rows: pd.DataFrame) -> tuple[float, float]:
    """95 % interval of the mean ``delta_loss`` over ``rows`` (the draws of one set and size):
    contexts and draws resampled (:func:`draw_mean_replicates`); NaN without replicates."""
    reps = _boot(_draws(rows))
    if reps is None:
        return float("nan"), float("nan")
    lo, hi = interval(draw_mean_replicates(reps))
    return float(lo), float(hi)


def match_size(xs: np.ndarray, ys: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Neurons on the curve ``(xs [S], ys [..., S])`` (both starting at (0, 0)) where it first
    reaches ``target [...]``, linearly interpolated; 0 when ``target <= 0``, ``inf`` when the
    curve never reaches it."""
    ys = np.asarray(ys, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    hit = ys >= target[..., None]  # [..., S]
    first = np.argmax(hit, axis=-1)
    reached = hit.any(axis=-1)
    i = np.maximum(first, 1)
    y0 = np.take_along_axis(ys, (i - 1)[..., None], -1)[..., 0]
    y1 = np.take_along_axis(ys, i[..., None], -1)[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        n = xs[i - 1] + (target - y0) * (xs[i] - xs[i - 1]) / (y1 - y0)
    n = np.where(first == 0, 0.0, n)
    return np.where(reached, n, np.inf)


def _fmt(lo: float, hi: float, digits: str = "+.4f") -> str:
    return f"95% interval {lo:{digits}} to {hi:{digits}}"


def _covers0(lo: float, hi: float) -> bool:
    return bool(lo <= 0 <= hi)


def _count(n: float, xmax: float) -> str:
    return f"more than {xmax:.0f}" if np.isinf(n) else f"{n:.3g}"


def _target_line(model: str, method: str, name: str, g: pd.DataFrame, rnd: pd.DataFrame,
                 tokens: str) -> str:
    """The headline of one target set (module docstring)."""
    # the largest set; of capped ties the smallest size asked (random sets of that size match)
    top = g.sort_values(["n_ablated", "n_requested"], ascending=[False, True], kind="stable").iloc[0]
    n_u, target = int(top["n_ablated"]), float(top["delta_loss"])
    t_reps = _boot(g.loc[[top.name]])
    head = (f"{model} ({method}): ablating the top {n_u} {name} neurons changes loss by "
            f"{target:+.4f} nats")
    if t_reps is not None:
        lo, hi = interval(t_reps[0])
        head += f" ({_fmt(float(lo), float(hi))})"
        if _covers0(float(lo), float(hi)):
            return head + f": not distinguishable from zero at this token count ({tokens})"
    if rnd.empty:
        return head + "; no random sets to compare"
    parts = [head]
    same = _draws(rnd[rnd["n_requested"] == top["n_requested"]])
    r_reps = _boot(same) if len(same) else None
    if len(same):
        y = float(same["delta_loss"].mean())
        s = (f"{len(same)} draw(s) of {same['n_ablated'].mean():.0f} layer-matched random "
             f"neurons: {y:+.4f}")
        if r_reps is not None and t_reps is not None:
            diff = t_reps[0] - draw_mean_replicates(r_reps)
            lo, hi = interval(diff)
            s += f", difference {target - y:+.4f} ({_fmt(float(lo), float(hi))})"
            if _covers0(float(lo), float(hi)):
                s += f": not distinguishable at this token count ({tokens})"
        parts.append(s)
    if not target > 0:
        return "; ".join(parts) + "; no loss increase for random neurons to match"
    curve = rnd.groupby(["n_requested", "draw"], sort=True)[["n_ablated", "delta_loss"]].first()
    sizes = sorted(set(curve.index.get_level_values(0)),
                   key=lambda k: curve.loc[k, "n_ablated"].mean())
    draws = sorted(set(curve.index.get_level_values(1)))
    full = [k for k in sizes if set(curve.loc[k].index) == set(draws)]  # every draw ran it
    xs = np.concatenate([[0.0], [curve.loc[k, "n_ablated"].mean() for k in full]])
    ys_d = np.stack([np.concatenate([[0.0], [curve.loc[(k, d), "delta_loss"] for k in full]])
                     for d in draws])  # [D, S]
    n_r = float(match_size(xs, ys_d.mean(0), np.array(target)))
    xmax = xs[-1]
    need = (f"more than {xmax:.0f} (> {xmax / n_u:.3g}x)" if np.isinf(n_r)
            else f"about {n_r:.3g} ({n_r / n_u:.3g}x)")
    s = (f"layer-matched random neurons (mean of {len(draws)} draw(s)) need {need} for the same "
         "increase")
    reps = [_boot(_draws(rnd[rnd["n_requested"] == k])) for k in full]
    if t_reps is not None and all(r is not None for r in reps):
        b = t_reps.shape[1]
        pick = np.random.default_rng([_DRAW_SEED, len(draws), b]).integers(
            0, len(draws), size=(b, len(draws)))  # the same draws at every size (nested sets)
        ys = np.stack([np.zeros(b)] + [r[pick, np.arange(b)[:, None]].mean(1)  # type: ignore[index]
                                       for r in reps], 1)  # [B, S]
        n_b = match_size(xs, ys, t_reps[0])
        q = np.quantile(n_b, [(1 - CI_LEVEL) / 2, (1 + CI_LEVEL) / 2], method="inverted_cdf")
        if np.isinf(q[0]):
            s += (f" (more than {xmax:.0f} in at least {100 * (1 + CI_LEVEL) / 2:g}% of "
                  "resamples over contexts and draws")
        else:
            s += (f" (95% interval {_count(q[0], xmax)} to {_count(q[1], xmax)} over contexts "
                  "and draws")
        if len(draws) > 1:
            per = match_size(xs, ys_d, np.full(len(draws), target))
            s += (f"; every single draw more than {xmax:.0f}" if np.isinf(per.min()) else
                  f"; single draws {_count(per.min(), xmax)} to {_count(per.max(), xmax)}")
        s += ")"
        if q[0] <= n_u <= q[1]:
            s += f": not distinguishable from {n_u} at this token count ({tokens})"
    parts.append(s)
    return "; ".join(parts)


def headline(df: pd.DataFrame, sets: Sequence[str] | None = None) -> str:
    """One line per model, method and target set: its effect, the same-size random sets'
    effect and the difference, and how many random neurons match it, with 95 % intervals
    (module docstring). ``sets``: target sets; default every set but ``random`` and
    ``non-universal``. Rows without replicates (older tables) get point values only."""
    lines = []
    whole = df[(df["layer"] == -1) & (df["n_ablated"] > 0)]
    for (model, method), g in whole.groupby(["model", "method"], sort=False):
        names = [s for s in pd.unique(df.loc[(df["model"] == model), "set"])
                 if s not in ("random", "non-universal")] if sets is None else list(sets)
        if not names and sets is None:
            names = ["universal"]
        rnd = g[g["set"] == "random"]
        n_pred = g["n_targets"].max() if "n_targets" in g.columns else float("nan")
        tokens = (f"{n_pred:.0f} scored predictions" if np.isfinite(n_pred)
                  else "the tokens evaluated")
        for name in names:
            tg = g[g["set"] == name]
            if tg.empty:
                lines.append(f"{model} ({method}): no {name} neurons were ablated "
                             "(none above the threshold? try --rank-all)")
                continue
            lines.append(_target_line(str(model), str(method), str(name), tg, rnd, tokens))
    return "\n".join(lines) if lines else "no ablations to summarise"
