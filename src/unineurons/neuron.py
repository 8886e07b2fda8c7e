"""One neuron of a run: its statistics, its matches in every seed, its top contexts and its
vocabulary effects, from the run's tables; its activations and whole-vocabulary cosines from
the model (loaded on demand, checked against the run's weight hash)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .errors import UnineuronsError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .run import Run

__all__ = ["Neuron", "STAT_COLUMNS", "parse_address"]

#: neurons.parquet columns a card shows when the run has them: (column, label).
STAT_COLUMNS: list[tuple[str, str]] = [
    ("act_mean", "activation mean"), ("act_var", "activation variance"),
    ("act_skew", "activation skew"), ("act_kurt", "activation kurtosis"),
    ("act_max", "activation max"), ("act_freq", "activation frequency"),
    ("vocab_mean", "vocab cos mean"), ("vocab_var", "vocab cos variance"),
    ("vocab_skew", "vocab cos skew"), ("vocab_kurt", "vocab cos kurtosis"),
    ("w_in_norm", "|w_in|"), ("w_out_norm", "|w_out|"), ("in_out_cos", "cos(w_in, w_out)"),
    ("null_frac", "W_U null-space share"), ("entropy_effect", "entropy effect (nats)"),
    ("attn_max_z", "attention score z"), ("position_score", "position score"),
]

#: Universality columns a card shows when the run has them: (column, label).
UNIVERSALITY_COLUMNS: list[tuple[str, str]] = [
    ("excess_corr", "excess correlation ϱ"), ("max_corr", "mean max ρ"),
    ("baseline_corr", "mean baseline ρ"), ("ceiling_corr", "ceiling ρ"),
    ("excess_norm", "excess / (1 − ceiling)"), ("p_value", "p-value"), ("q_value", "q-value"),
]

_ADDRESS = re.compile(r"^\s*[lL](\d+)\.[nN](\d+)\s*$")


def parse_address(address: str) -> tuple[int, int]:
    """``L{layer}.N{index}`` as ``(layer, index)``.

    Raises:
        UnineuronsError: not of that form.
    """
    m = _ADDRESS.match(str(address))
    if m is None:
        raise UnineuronsError(f"neuron address {address!r} is not of the form "
                              "L{layer}.N{index}, e.g. L3.N1021")
    return int(m.group(1)), int(m.group(2))


def _show(tok: Any) -> str:
    """A token string as displayed in one line: newlines and tabs made visible."""
    return "" if tok is None else str(tok).replace("\n", "⏎").replace("\t", "⇥")


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _figure_class() -> type:
    """A matplotlib Figure that Jupyter shows as a PNG without pyplot (the inline backend
    renders only figures pyplot made, until its formatter is configured)."""
    import io

    from matplotlib.figure import Figure

    class NeuronFigure(Figure):
        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100)
            return buf.getvalue()

    return NeuronFigure


class Neuron:
    """Neuron ``L{layer}.N{index}`` of one model of a run (see :meth:`Run.neuron`).

    Attributes:
        run: the :class:`~unineurons.run.Run`.
        model: the model spec, as the run records it.
        layer, index: the neuron's layer and index in the layer (0-based).
    """

    def __init__(self, run: Run, address: str, model: str):
        self.run = run
        self.model = model
        self.layer, self.index = parse_address(address)
        n = run.neurons
        hit = n[(n["model"] == model) & (n["layer"] == self.layer) & (n["neuron"] == self.index)]
        if hit.empty:
            sub = n[n["model"] == model]
            size = (f"{sub['layer'].max() + 1} layers x {sub['neuron'].max() + 1} neurons"
                    if len(sub) else "no rows in neurons.parquet")
            raise UnineuronsError(f"{self.address} is not a neuron of {model} ({size}); "
                                  "addresses are L{layer}.N{index}, both from 0")
        self._row = hit.iloc[0]

    @property
    def address(self) -> str:
        """``L{layer}.N{index}``."""
        return f"L{self.layer}.N{self.index}"

    # ---- from the tables -----------------------------------------------------------------
    @property
    def stats(self) -> pd.Series:
        """The neuron's row of ``neurons.parquet``: every column any stage wrote."""
        return self._row

    def _get(self, col: str) -> Any:
        v = self._row.get(col)
        return None if v is None or (not isinstance(v, str) and pd.isna(v)) else v

    @property
    def is_universal(self) -> bool | None:
        """Universal by the paper's criterion (ϱ above the threshold); None without
        correlations."""
        v = self._get("is_universal")
        return None if v is None else bool(v)

    @property
    def is_universal_calibrated(self) -> bool | None:
        """Universal by the calibrated criterion (BH q below the run's FDR against the neuron's
        rotation null; a significance test: read it with ``excess_corr``); None where the run
        has no calibrated criterion."""
        v = self._get("is_universal_calibrated")
        return None if v is None else bool(v)

    @property
    def role(self) -> str | None:
        """Functional role (prediction, suppression, partition, entropy, attention, none)."""
        return self._get("role")

    @property
    def family(self) -> str | None:
        """Neuron family (unigram, previous, alphabet, class, position, none)."""
        return self._get("family")

    def _rows(self, table: str) -> pd.DataFrame:
        df = self.run.table(table)
        return df[(df["model"] == self.model) & (df["layer"] == self.layer)
                  & (df["neuron"] == self.index)]

    @property
    def matches(self) -> pd.DataFrame:
        """Best match in every partner seed: one row per partner with ``partner``,
        ``partner_address``, ``max_corr`` (Pearson ρ with the best partner neuron),
        ``baseline_corr`` (ρ against the partner's randomly rotated layer, Gurnee et al.
        eq. 2), ``excess`` (their difference), ``argmax_layer``, ``argmax_neuron``, then any
        column other stages added to ``matches.parquet`` (e.g. ``mutual_best``).

        Raises:
            UnineuronsError: the run has no ``matches.parquet`` (run correlate).
        """
        m = self._rows("matches").copy()
        ok = m["argmax_layer"] >= 0
        m["partner_address"] = np.where(ok, "L" + m["argmax_layer"].astype(str) + ".N"
                                        + m["argmax_neuron"].astype(str), "-")
        m["excess"] = m["max_corr"] - m["baseline_corr"]
        cols = ["partner", "partner_address", "max_corr", "baseline_corr", "excess",
                "argmax_layer", "argmax_neuron"]
        # columns other stages add (one-to-one matching: assigned_neuron, mutual_best, ...)
        cols += [c for c in m.columns if c not in cols and c not in ("model", "layer", "neuron")]
        return m[cols].reset_index(drop=True)

    @property
    def contexts(self) -> pd.DataFrame:
        """Top activating contexts (``top_contexts.parquet``), rank 0 first: ``rank``, ``value``
        (the activation at the token), ``row`` / ``position`` (in the token store),
        ``token`` (the activating token's string), ``before`` / ``after`` (the window's text
        around it), ``tokens`` (the window's token strings) and ``focus`` (index of the
        activating token in ``tokens``). Token strings are untrusted corpus text.

        Raises:
            UnineuronsError: the run has no ``top_contexts.parquet`` (run analyze).
        """
        tc = self._rows("top_contexts").sort_values("rank")
        rows = []
        for r in tc.itertuples():
            toks = [str(t) for t in r.window_tokens]
            f = int(r.position - r.window_start)
            rows.append({"rank": int(r.rank), "value": float(r.value), "row": int(r.row),
                         "position": int(r.position), "token": toks[f] if 0 <= f < len(toks) else "",
                         "before": "".join(toks[:f]), "after": "".join(toks[f + 1:]),
                         "tokens": toks, "focus": f})
        cols = ["rank", "value", "row", "position", "token", "before", "after", "tokens", "focus"]
        return pd.DataFrame(rows, columns=cols)

    def vocabulary(self, side: str = "out") -> pd.DataFrame:
        """``vocab.parquet`` rows of the neuron on one side (``out``: cos(w_out, unembedding);
        ``in``: cos(w_in, embedding)): ``direction`` (top / bottom), ``rank``, ``token_id``,
        ``token``, ``cosine``.

        Raises:
            UnineuronsError: the run has no ``vocab.parquet`` (run analyze), or a bad side.
        """
        if side not in ("out", "in"):
            raise UnineuronsError(f"side {side!r} is not one of: out, in")
        v = self._rows("vocab")
        v = v[v["side"] == side].sort_values(["direction", "rank"], ascending=[False, True])
        return v[["direction", "rank", "token_id", "token", "cosine"]].reset_index(drop=True)

    @property
    def promoted(self) -> pd.DataFrame:
        """Tokens whose logits the neuron raises most: highest cos(w_out, W_U column)."""
        v = self.vocabulary("out")
        return v[v["direction"] == "top"].drop(columns="direction").reset_index(drop=True)

    @property
    def suppressed(self) -> pd.DataFrame:
        """Tokens whose logits the neuron lowers most: lowest cos(w_out, W_U column)."""
        v = self.vocabulary("out")
        return v[v["direction"] == "bottom"].drop(columns="direction").reset_index(drop=True)

    def card_data(self, n_contexts: int = 5, n_tokens: int = 10) -> dict[str, Any]:
        """What a neuron card shows, as plain values (the HTML card and ``unineurons show``
        render this): header, universality, statistics, matches, tokens and contexts; a part
        whose table the run lacks is left out and named in ``missing``."""
        r = self.run
        d: dict[str, Any] = {"address": self.address, "model": self.model, "layer": self.layer,
                             "index": self.index, "missing": []}
        d["universal"] = {k: bool(self._get(k)) for k in ("is_universal",
                                                          "is_universal_calibrated")
                          if self._get(k) is not None}
        d["universality"] = [(label, _num(self._row[c])) for c, label in UNIVERSALITY_COLUMNS
                             if c in self._row.index and _num(self._row[c]) is not None]
        d["role"], d["family"] = self.role, self.family
        # both role rules when the run has them (role is the one --role-thresholds picked)
        d["roles"] = {k: self._get(f"role_{k}") for k in ("paper", "calibrated")
                      if self._get(f"role_{k}") is not None}
        d["family_feature"] = self._get("family_feature")
        d["stats"] = [(label, _num(self._row[c])) for c, label in STAT_COLUMNS
                      if c in self._row.index and _num(self._row[c]) is not None]
        d["matches"] = (self.matches.to_dict(orient="records") if r.has("matches") else [])
        if not r.has("matches"):
            d["missing"].append("matches (unineurons correlate)")
        elif not d["matches"]:
            d["missing"].append("matches (this model was not a correlate reference; "
                                "--pairs all correlates every model)")
        if r.has("vocab"):
            d["promoted"] = [(_show(t), float(c)) for t, c in
                             self.promoted[["token", "cosine"]].head(n_tokens).itertuples(index=False)]
            d["suppressed"] = [(_show(t), float(c)) for t, c in
                               self.suppressed[["token", "cosine"]].head(n_tokens).itertuples(index=False)]
        else:
            d["promoted"] = d["suppressed"] = []
            d["missing"].append("vocabulary (unineurons analyze)")
        d["contexts"] = []
        if r.has("top_contexts"):
            for c in self.contexts.head(n_contexts).itertuples():
                d["contexts"].append({"rank": c.rank, "value": c.value, "before": _show(c.before),
                                      "token": _show(c.token), "after": _show(c.after)})
        else:
            d["missing"].append("top contexts (unineurons analyze)")
        return d

    # ---- from the model ------------------------------------------------------------------
    def activations(self, n_tokens: int | None = 16_384, device: str = "cpu",
                    batch_size: int = 8) -> np.ndarray:
        """The neuron's activation (input of the MLP output projection) on the kept positions
        of the run's token store (BOS / EOS / pad / newline dropped as the run's correlate
        stage did): ``float32 [n_kept]``, over the first ``ceil(n_tokens / ctx)`` contexts
        (at most the whole store; None: the run's token count).

        Raises:
            UnineuronsError: the model or the token store does not load, or changed since the
                run was made.
        """
        import torch

        from .analyses.interventions import run_contexts
        from .stream import MaskConfig, token_mask
        from .tokens import TokenStore

        m = self.run.loaded_model(self.model, device)
        info = self.run.manifest.get("tokens") or {}
        if n_tokens is not None and info.get("path"):  # at most the whole store
            store = TokenStore.open(info["path"], verify=False)
            n_tokens = min(n_tokens, store.n_contexts * store.ctx)
        contexts, special, _ = run_contexts(self.run._rd, None, n_tokens)
        c = (self.run.manifest.get("correlate") or {}).get("config") or {}
        mask_cfg = MaskConfig(**{k: bool(c[k]) for k in ("drop_bos", "drop_eos", "drop_pad",
                                                         "drop_newline") if k in c})
        dev = next(m.model.parameters()).device
        out = []
        with torch.inference_mode():
            for b0 in range(0, contexts.shape[0], batch_size):
                x = torch.from_numpy(np.asarray(contexts[b0:b0 + batch_size]).astype(np.int64))
                with m.adapter.capture(layers=[self.layer]) as store:
                    m.model(input_ids=x.to(dev), use_cache=False)
                act = store[self.layer][..., self.index].float().cpu()  # [B, T]
                out.append(act[token_mask(x, special, mask_cfg)].numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def vocab_cosines(self, device: str = "cpu") -> np.ndarray:
        """cos(w_out, W_U column) for every token (folded, centred as ``vocab.parquet``):
        ``float32 [vocab]``, from the model.

        Raises:
            UnineuronsError: the model does not load or changed since the run was made.
        """
        from .analyses.vocab import vocab_cosines

        m = self.run.loaded_model(self.model, device)
        return vocab_cosines(m, self.layer)[self.index].float().cpu().numpy()

    def plot(self, n_tokens: int | None = 16_384, device: str = "cpu") -> Figure:
        """Two panels: the histogram of the neuron's cosine with every token's unembedding
        (its vocabulary effect, Gurnee et al. sec. 5) with the most promoted and
        suppressed tokens named, and the distribution of its activation over the run's tokens.
        Both come from the model; when it does not load, the vocabulary panel shows the
        extremes of ``vocab.parquet`` and the activation panel says why it is empty.

        Returns:
            The matplotlib Figure (not shown or saved: Jupyter displays it).
        """
        fig = _figure_class()(figsize=(10, 3.4), layout="constrained")
        ax_v, ax_a = fig.subplots(1, 2)
        try:
            cos: np.ndarray | None = self.vocab_cosines(device)
            acts: np.ndarray | str = self.activations(n_tokens, device)
        except (UnineuronsError, OSError) as e:
            cos, acts = None, f"not drawn: {e}"
        self._plot_vocab(ax_v, cos)
        if isinstance(acts, str) or acts.size == 0:
            msg = acts if isinstance(acts, str) else "no kept positions"
            ax_a.text(0.5, 0.5, msg[:300], ha="center", va="center", wrap=True, fontsize=8,
                      transform=ax_a.transAxes)
            ax_a.set_axis_off()
        else:
            ax_a.hist(acts, bins=80, color="#4c72b0")
            ax_a.set_yscale("log")
            ax_a.set_xlabel("activation (input of the MLP output projection)")
            ax_a.set_ylabel("tokens")
            ax_a.set_title(f"activations on {acts.size:,} tokens: mean {acts.mean():.3g}, "
                           f"max {acts.max():.3g}", fontsize=9)
        fig.suptitle(f"{self.address} of {self.model}", fontsize=10)
        return fig

    def _plot_vocab(self, ax: Any, cos: np.ndarray | None) -> None:
        have = self.run.has("vocab")
        top = self.promoted.head(5) if have else None
        bot = self.suppressed.head(5) if have else None
        if cos is not None:
            ax.hist(cos, bins=80, color="#55a868")
            ax.set_yscale("log")
            ax.set_ylabel("tokens")
            ax.set_ylim(top=ax.get_ylim()[1] * 30)  # head room for the token lists
            for rows, x, ha, head in ((bot, 0.02, "left", "suppressed"),
                                      (top, 0.98, "right", "promoted")):
                if rows is None:
                    continue
                text = "\n".join([head] + [f"{_show(t)!r} {c:+.3f}" for t, c in
                                           rows[["token", "cosine"]].itertuples(index=False)])
                ax.text(x, 0.97, text, transform=ax.transAxes, ha=ha, va="top", fontsize=7,
                        family="monospace")
        elif have:
            both = pd.concat([bot.iloc[::-1], top])
            ax.barh(range(len(both)), both["cosine"],
                    color=["#c44e52" if c < 0 else "#55a868" for c in both["cosine"]])
            ax.set_yticks(range(len(both)), [repr(_show(t)) for t in both["token"]], fontsize=7)
        else:
            ax.text(0.5, 0.5, "no vocabulary: the model does not load and the run has no "
                    "vocab.parquet", ha="center", va="center", fontsize=8, wrap=True,
                    transform=ax.transAxes)
            ax.set_axis_off()
            return
        ax.set_xlabel("cos(w_out, unembedding column)")
        ax.set_title("vocabulary effect", fontsize=9)

    # ---- display -------------------------------------------------------------------------
    def __repr__(self) -> str:
        parts = [f"{self.address} of {self.model}"]
        ex = _num(self._row.get("excess_corr"))
        if ex is not None:
            parts.append(f"excess ρ {ex:.3f}" + (" (universal)" if self.is_universal else ""))
        if self.role:
            parts.append(f"role {self.role}")
        if self.family:
            parts.append(f"family {self.family}")
        return f"Neuron({', '.join(parts)})"

    def _repr_html_(self) -> str:
        from .cards import neuron_html

        return neuron_html(self)
