"""HTML cards for Jupyter: ``Run._repr_html_`` and ``Neuron._repr_html_``.

Rendered with Jinja2 autoescaping: token strings, model specs and paths are untrusted text and
appear only as escaped text, never as markup. Styles are inline (a notebook has no stylesheet
of ours) and nothing is scripted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .neuron import Neuron
    from .run import Run

__all__ = ["run_html", "neuron_html"]

_STYLE = ("font-family: system-ui, sans-serif; font-size: 13px; line-height: 1.35; "
          "max-width: 980px")
_TD = "padding: 1px 8px; text-align: right"
_TH = "padding: 1px 8px; text-align: left"

_RUN = """
<div style="{{ style }}">
<b>Run</b> <code>{{ path }}</code><br>
{{ models|length }} model(s){% if ref %}, reference <code>{{ ref }}</code>{% endif %}
{% if tokens %}; {{ "{:,}".format(tokens) }} tokens{% endif %}
<table style="border-collapse: collapse; margin-top: 4px">
<tr><th style="{{ th }}">table</th><th style="{{ td }}">rows</th></tr>
{% for name, rows in tables %}<tr><td style="{{ th }}"><code>run.{{ name }}</code></td>
<td style="{{ td }}">{{ "{:,}".format(rows) }}</td></tr>{% endfor %}
</table>
{% if layers %}
<table style="border-collapse: collapse; margin-top: 4px">
<tr>{% for h in ["model", "layer", "neurons", "universal", "share", "mean excess ρ"] %}
<th style="{{ th }}">{{ h }}</th>{% endfor %}{% if calibrated %}<th style="{{ th }}">calibrated</th>{% endif %}</tr>
{% for r in layers %}<tr><td style="{{ th }}"><code>{{ r.model }}</code></td>
<td style="{{ td }}">L{{ r.layer }}</td><td style="{{ td }}">{{ r.neurons }}</td>
<td style="{{ td }}">{{ r.universal }}</td><td style="{{ td }}">{{ "%.1f%%"|format(100 * r.share) }}</td>
<td style="{{ td }}">{{ "%.3f"|format(r.excess) }}</td>
{% if calibrated %}<td style="{{ td }}">{{ r.calibrated }}</td>{% endif %}</tr>{% endfor %}
</table>
{% endif %}
</div>
"""

_NEURON = """
<div style="{{ style }}">
<div style="font-size: 15px"><b>{{ d.address }}</b> of <code>{{ d.model }}</code>
{% for k, v in d.universal.items() %}{% if v %}<span style="background: #2e7d32; color: white;
padding: 0 5px; border-radius: 3px; margin-left: 4px">{{ "universal" if k == "is_universal"
else "universal (calibrated)" }}</span>{% endif %}{% endfor %}</div>
<div>role <b>{{ d.role or "-" }}</b>{% if d.roles %} ({% for k, v in d.roles.items() %}{{ k }}: {{ v
}}{{ ", " if not loop.last }}{% endfor %}){% endif %} · family <b>{{ d.family or "-" }}</b>
{% if d.family_feature %}(<code>{{ d.family_feature }}</code>){% endif %}</div>
<div style="display: flex; gap: 24px; flex-wrap: wrap; margin-top: 4px">
{% if d.universality or d.stats %}<table style="border-collapse: collapse">
{% for label, v in d.universality + d.stats %}<tr><td style="{{ th }}">{{ label }}</td>
<td style="{{ td }}">{{ "%.4g"|format(v) }}</td></tr>{% endfor %}</table>{% endif %}
{% if d.matches %}<table style="border-collapse: collapse">
<tr><th style="{{ th }}">partner</th><th style="{{ th }}">match</th><th style="{{ td }}">ρ</th>
<th style="{{ td }}">baseline ρ</th><th style="{{ td }}">excess</th></tr>
{% for m in d.matches %}<tr><td style="{{ th }}"><code>{{ m.partner }}</code></td>
<td style="{{ th }}">{{ m.partner_address }}</td><td style="{{ td }}">{{ "%.3f"|format(m.max_corr) }}</td>
<td style="{{ td }}">{{ "%.3f"|format(m.baseline_corr) }}</td>
<td style="{{ td }}">{{ "%.3f"|format(m.excess) }}</td></tr>{% endfor %}</table>{% endif %}
{% if d.promoted %}<table style="border-collapse: collapse">
<tr><th style="{{ th }}">promoted</th><th style="{{ td }}">cos</th><th style="{{ th }}">suppressed</th>
<th style="{{ td }}">cos</th></tr>
{% for i in range([d.promoted|length, d.suppressed|length]|max) %}<tr>
{% if i < d.promoted|length %}<td style="{{ th }}"><code style="white-space: pre">{{ d.promoted[i][0] }}</code></td>
<td style="{{ td }}">{{ "%+.3f"|format(d.promoted[i][1]) }}</td>{% else %}<td></td><td></td>{% endif %}
{% if i < d.suppressed|length %}<td style="{{ th }}"><code style="white-space: pre">{{ d.suppressed[i][0] }}</code></td>
<td style="{{ td }}">{{ "%+.3f"|format(d.suppressed[i][1]) }}</td>{% else %}<td></td><td></td>{% endif %}
</tr>{% endfor %}</table>{% endif %}
</div>
{% if d.contexts %}<div style="margin-top: 6px"><b>top contexts</b>
{% for c in d.contexts %}<div style="font-family: monospace; white-space: pre-wrap; border-top: 1px solid #ddd">{#
#}<span style="color: #777">{{ "%.3g"|format(c.value) }}</span> {{ c.before }}{#
#}<mark style="background: #ffb74d">{{ c.token }}</mark>{{ c.after }}</div>{% endfor %}
</div>{% endif %}
{% if d.missing %}<div style="color: #777">not in this run: {{ d.missing|join(", ") }}</div>{% endif %}
</div>
"""


def _env() -> Any:
    from jinja2 import Environment

    return Environment(autoescape=True)


def _rows(path: Any) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def run_html(run: Run) -> str:
    """The run's summary card: models, tables (row counts from the parquet metadata, nothing
    read), universal neurons per layer when ``layers.parquet`` exists."""
    m = run.manifest
    tables = [(name, _rows(run.path / f"{name}.parquet")) for name in run.tables]
    layers, calibrated = [], False
    if run.has("layers"):
        lay = run.layers
        calibrated = "universal_calibrated" in lay.columns
        for r in lay.to_dict(orient="records"):
            layers.append({"model": r["model"], "layer": r["layer"], "neurons": r["neurons"],
                           "universal": r["universal"], "share": r["universal_share"],
                           "excess": r["mean_excess_corr"],
                           "calibrated": r.get("universal_calibrated", "")})
    try:
        ref = run.reference
    except Exception:  # noqa: BLE001 - a run without models still gets a card
        ref = None
    return _env().from_string(_RUN).render(
        style=_STYLE, th=_TH, td=_TD, path=str(run.path), models=run.models, ref=ref,
        tokens=(m.get("tokens") or {}).get("n_tokens"), tables=tables, layers=layers,
        calibrated=calibrated)


def neuron_html(neuron: Neuron, n_contexts: int = 5, n_tokens: int = 10) -> str:
    """The neuron's card (:meth:`Neuron.card_data`), the activating token of each top context
    highlighted."""
    return _env().from_string(_NEURON).render(style=_STYLE, th=_TH, td=_TD,
                                              d=neuron.card_data(n_contexts, n_tokens))
