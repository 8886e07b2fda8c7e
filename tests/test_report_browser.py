"""The report in a real browser: the system Chromium driven by Playwright, from ``file://``.

Skipped only where Chromium (or Playwright) is missing and the environment variable ``CI`` is
not set; under CI a missing browser is a failure. Chromium is ``/usr/bin/chromium`` (Debian's
``chromium`` package; Playwright never downloads one) or ``$UNINEURONS_CHROMIUM``. Screenshots are written to
``tests/artifacts/`` (the report's figures page, the table, a neuron page) for a person to look
at. The run directory is the one tests/test_report.py builds (shared within the session).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_report import XSS, report_run

CHROMIUM = os.environ.get("UNINEURONS_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
#: The machine may have no network: without these Chromium tries to reach Google services.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _need_browser():
    """The playwright module, or a skip (a failure under CI) naming what is missing."""
    why = None
    try:
        from playwright import sync_api
    except ImportError:
        sync_api, why = None, "playwright is not installed (pip install playwright)"
    if why is None and not Path(CHROMIUM).is_file():
        why = f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {why}")
        pytest.skip(why)
    return sync_api


@pytest.fixture(scope="module")
def browser():
    sync_api = _need_browser()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_tokenizer, tiny_store) -> Path:
    return report_run(tmp_path_factory, tiny_tokenizer, tiny_store) / "report" / "index.html"


class Page:
    """A page with every console error, page error, dialog and non-file request recorded."""

    def __init__(self, browser, url: str):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport={"width": 1300, "height": 900})
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda r: r.url.startswith("file://") or
                     self.requests.append(r.url))
        self.page.goto(url)

    def _dialog(self, d) -> None:
        self.dialogs.append(d.message)
        d.dismiss()

    def count(self) -> int:
        text = self.page.text_content("#row-count")  # "N of M neurons"
        return int(text.split()[0])

    def clean(self) -> None:
        assert self.errors == [] and self.dialogs == [] and self.requests == []


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_figures_page_loads_offline_without_errors(browser, report):
    p = Page(browser, report.as_uri())
    pg = p.page
    pg.wait_for_load_state("load")
    imgs = pg.query_selector_all("figure.fig img")
    assert len(imgs) >= 10
    for img in imgs:
        img.scroll_into_view_if_needed()
        pg.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img)
    assert pg.is_visible("#view-figures") and not pg.is_visible("#view-neurons")
    assert "excess correlation" in pg.text_content("#fig-correlation_by_layer figcaption")
    assert pg.is_visible("#skip-dynamics_ablations")  # a missing table is noted
    pg.evaluate("() => window.scrollTo(0, 0)")
    _shot(pg, "report_figures.png")
    p.clean()


def test_table_filters_sorts_and_searches(browser, report):
    p = Page(browser, report.as_uri() + "#/neurons")
    pg = p.page
    pg.wait_for_selector("#neuron-table tbody tr")
    total = p.count()
    assert total == 3 * 2 * 64
    assert len(pg.query_selector_all("#neuron-table tbody tr")) == 50  # one page is built
    pg.select_option("#f-model", "0")
    assert p.count() == 128
    pg.select_option("#f-layer", "1")
    assert p.count() == 64
    pg.select_option("#f-universal", "1")
    n_univ = p.count()
    assert 0 < n_univ < 64
    assert all(t == "yes" for t in pg.eval_on_selector_all(
        "#neuron-table tbody td.yes", "els => els.map(e => e.textContent)"))
    # sort by excess correlation: descending first, then ascending
    head = pg.locator("#neuron-table thead th", has_text="excess_corr")
    head.click()
    col = [h.text_content().split(" ")[0] for h in pg.query_selector_all("#neuron-table thead th")]
    k = col.index("excess_corr")

    def column() -> list[float]:
        return [float(r.query_selector_all("td")[k].text_content())
                for r in pg.query_selector_all("#neuron-table tbody tr")]

    desc = column()
    assert desc == sorted(desc, reverse=True) and len(desc) == n_univ
    pg.locator("#neuron-table thead th", has_text="excess_corr").click()
    asc = column()
    assert asc == sorted(asc)
    pg.click("#f-reset")  # filters cleared, the sort kept
    assert p.count() == total
    pg.locator("#neuron-table thead th", has_text="excess_corr").click()
    assert column()[:3] == sorted(column(), reverse=True)[:3]
    _shot(pg, "report_table.png")
    pg.fill("#f-search", "L1.N3")
    assert p.count() == 3  # that address in each seed
    assert {r.text_content() for r in pg.query_selector_all("#neuron-table tbody td a")} == {"L1.N3"}
    p.clean()


def test_neuron_page_shows_contexts_of_every_seed(browser, report, tmp_path_factory,
                                                   tiny_tokenizer, tiny_store):
    import pandas as pd

    run = report_run(tmp_path_factory, tiny_tokenizer, tiny_store)
    n = pd.read_parquet(run / "neurons.parquet")
    ref = n[n["is_universal"].fillna(False).astype(bool)].sort_values("excess_corr").iloc[-1]
    m = pd.read_parquet(run / "matches.parquet")
    mine = m[(m["layer"] == ref.layer) & (m["neuron"] == ref.neuron)]
    p = Page(browser, report.as_uri() + f"#/neuron/0/L{ref.layer}.N{ref.neuron}")
    pg = p.page
    pg.wait_for_selector(".ctx-col")
    cols = pg.query_selector_all(".ctx-col")
    assert len(cols) == 3  # this neuron and its best match in each partner seed
    heads = [c.query_selector(".ctx-head").text_content() for c in cols]
    assert heads[0].startswith(f"L{ref.layer}.N{ref.neuron} in seed0")
    for c, r in zip(cols[1:], mine.itertuples(), strict=True):
        assert f"L{r.argmax_layer}.N{r.argmax_neuron}" in c.query_selector(".ctx-head").text_content()
    for c in cols:
        assert len(c.query_selector_all(".ctx")) == 5  # top-k of each seed
        assert len(c.query_selector_all(".tok.top-tok")) == 5
    shaded = pg.eval_on_selector_all(".ctx-col .tok", "els => els.filter(e => e.style.backgroundColor).length")
    assert shaded > 15  # per-token activations, not only the top token
    assert "universal" in pg.text_content(".badges")
    links = pg.query_selector_all("table.matches a")
    assert len(links) == len(mine)
    links[0].click()  # to the partner's neuron: it is matched by this one
    pg.wait_for_function("() => location.hash.startsWith('#/neuron/1/')")
    assert "matches this neuron" in pg.text_content("table.matches")
    p.clean()


def test_untrusted_text_renders_inert(browser, report, tmp_path_factory, tiny_tokenizer,
                                      tiny_store):
    import pandas as pd

    run = report_run(tmp_path_factory, tiny_tokenizer, tiny_store)
    n = pd.read_parquet(run / "neurons.parquet")
    ref = n[n["is_universal"].fillna(False).astype(bool)].sort_values("excess_corr").iloc[-1]
    p = Page(browser, report.as_uri() + f"#/neuron/0/L{ref.layer}.N{ref.neuron}")
    pg = p.page
    pg.wait_for_selector(".ctx-col")
    pg.wait_for_timeout(300)  # time for any injected handler to fire
    assert pg.evaluate("() => window.__xss") is None
    assert p.dialogs == []
    # nothing was injected: only the page's own elements exist
    injected = "img, b, textarea, script, iframe, object, svg"
    assert pg.evaluate(f"() => document.querySelectorAll('#view-neuron :is({injected})').length") == 0
    assert len(pg.query_selector_all("script")) == 2
    text = pg.text_content("#view-neuron")
    for payload in XSS:
        assert payload in text  # shown literally (contexts, vocabulary, family feature)
    badge = pg.text_content(".badges")
    assert XSS[1] in badge
    _shot(pg, "report_neuron.png")
    # the table shows the same strings as text
    pg.goto(report.as_uri() + "#/neurons")
    pg.fill("#f-search", "onerror")
    assert p.count() == 1
    assert XSS[1] in pg.text_content("#neuron-table tbody")
    assert pg.evaluate(f"() => document.querySelectorAll('#neuron-table :is({injected})').length") == 0
    assert pg.evaluate("() => window.__xss") is None
    p.clean()


def test_report_copied_elsewhere_still_opens(browser, report, tmp_path):
    # static: the run folder can be moved; the page needs nothing outside it
    copy = tmp_path / "moved"
    shutil.copytree(report.parent.parent, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    p = Page(browser, (copy / "report" / "index.html").as_uri() + "#/neurons")
    p.page.wait_for_selector("#neuron-table tbody tr")
    assert p.count() == 384
    p.clean()


def test_large_table_stays_responsive(browser, tmp_path):
    """50,000 neurons: the page builds one page of rows; filtering and sorting take well under
    a second each (bounds are generous for a loaded CI machine)."""
    import time

    import numpy as np
    import pandas as pd

    from unineurons.report import ReportConfig, build_report
    from unineurons.rundir import RunDir

    rng = np.random.default_rng(0)
    n_models, n_layers, d = 2, 25, 1000
    rows = n_models * n_layers * d
    run = RunDir.create(tmp_path / "big")
    specs = [f"org/big-seed{i}" for i in range(n_models)]
    run.update_manifest(models=[{"spec": s, "n_layers": n_layers, "d_mlp": d} for s in specs])
    excess = rng.normal(0.2, 0.2, rows)
    run.write_table("neurons", pd.DataFrame({
        "model": np.repeat(specs, n_layers * d),
        "layer": np.tile(np.repeat(np.arange(n_layers), d), n_models),
        "neuron": np.tile(np.arange(d), n_models * n_layers),
        "max_corr": excess + 0.3, "baseline_corr": np.full(rows, 0.3), "excess_corr": excess,
        "is_universal": excess > 0.5, "act_kurt": rng.gamma(2, 2, rows),
        "role": rng.choice(["none", "prediction", "suppression", "partition"], rows),
        "family": rng.choice(["none", "unigram", "position"], rows)}))
    res = build_report(run.path, ReportConfig(figures=False, models=False))
    assert res.n_neurons == rows
    p = Page(browser, res.index.as_uri() + "#/neurons")
    pg = p.page
    pg.wait_for_selector("#neuron-table tbody tr")
    assert p.count() == rows
    assert len(pg.query_selector_all("#neuron-table tbody tr")) == 50
    t0 = time.perf_counter()
    pg.select_option("#f-role", "prediction")
    n_pred = p.count()
    pg.locator("#neuron-table thead th", has_text="excess_corr").click()
    pg.wait_for_selector("#neuron-table thead th:has-text('excess_corr \u25bc')")
    elapsed = time.perf_counter() - t0
    assert 0 < n_pred < rows and elapsed < 5, elapsed
    assert len(pg.query_selector_all("#neuron-table tbody tr")) == 50
    pg.click("#f-reset")
    pg.fill("#f-search", "L24.N999")
    assert p.count() == 2
    pg.click("#neuron-table tbody a")
    pg.wait_for_selector("#view-neuron .ctx-col")
    assert "No top contexts stored" in pg.text_content("#view-neuron")
    p.clean()
