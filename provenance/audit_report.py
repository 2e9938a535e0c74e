"""Rendering an AuditResult as one self-contained offline HTML page (inline CSS and SVG, images as data URIs)."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provenance.audit import PAPER_SSCD, SCORE_BINS, AuditResult, Pair, PromptStat, Rate
from provenance.errors import ProvenanceError
from provenance.report import _CSS, _esc, _img_html, _kv_html, make_thumbnail

logger = logging.getLogger(__name__)

ThumbnailFn = Callable[[str], bytes | None]  # corpus id -> its thumbnail (JPEG bytes) or None
QueryThumbnailFn = Callable[[str], bytes | None]  # output path -> a thumbnail of it or None
MAX_ERRORS_SHOWN = 200  # the page stays readable with thousands of bad inputs; the JSON summary lists them all


def write_audit_html(
    result: AuditResult,
    path: str | Path,
    *,
    thumbnails: ThumbnailFn | None = None,
    query_thumbnails: QueryThumbnailFn = make_thumbnail,
    title: str = "Replication audit",
) -> None:
    """Write `render_audit_html(...)` to `path` (UTF-8)."""
    Path(path).write_text(
        render_audit_html(result, thumbnails=thumbnails, query_thumbnails=query_thumbnails, title=title),
        encoding="utf-8",
    )


def render_audit_html(
    result: AuditResult,
    *,
    thumbnails: ThumbnailFn | None = None,
    query_thumbnails: QueryThumbnailFn = make_thumbnail,
    title: str = "Replication audit",
) -> str:
    """The audit page: rates with intervals, the score histogram against the reference, the top pairs side
    by side (the matched region drawn when the match has one), the replicating captions with their
    memorization signals, and the unreadable inputs. Only the top pairs' images are read (thumbnails)."""
    e = _esc
    r = result
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        # The page must work offline and load nothing, even if a caption smuggles in a URL.
        (
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            "style-src 'unsafe-inline'\">"
        ),
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}{_AUDIT_CSS}</style></head><body>",
        f"<header><h1>{e(title)}</h1>",
        (
            f'<p class="muted">index {e(r.index)} · {r.outputs} outputs audited'
            f"{f' · {len(r.errors)} unreadable inputs not counted' if r.errors else ''}"
            f"{f' · {r.reference.images} reference photos' if r.reference else ' · no reference'} · generated {e(now)}</p>"
        ),
        _gate_html(r),
        _rates_html(r),
        "</header><main>",
        _distribution_html(r),
        _pairs_html(r.top_pairs, thumbnails, query_thumbnails),
        _captions_html(r),
        _errors_html(r),
        _method_html(r),
        "</main></body></html>\n",
    ]
    return "\n".join(p for p in parts if p)


# -- header -----------------------------------------------------------------------------------------------


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v * 100:.{digits}f}%"


def _rate_text(rate: Rate) -> str:
    if rate.rate is None:
        return "– (no outputs)"
    return (
        f'{_pct(rate.rate)} <span class="muted">({rate.count}/{rate.total}; {rate.confidence:.0%} CI '
        f"{_pct(rate.low)}–{_pct(rate.high)})</span>"
    )


def _gate_html(r: AuditResult) -> str:
    if r.gate is None:
        return '<p class="gate none">No gate set (<code>--max-replication-rate</code>).</p>'
    g = r.gate
    return (
        f'<p class="gate {"fail" if g.failed else "pass"}"><b>{"FAIL" if g.failed else "PASS"}</b> '
        f"{_esc(g.reason)} (gate on the {'point estimate' if g.on == 'point' else 'upper bound'}).</p>"
    )


def _rates_html(r: AuditResult) -> str:
    rows = [
        ("Replication rate (replica or exact)", _rate_text(r.replication)),
        ("replica", _rate_text(r.replica)),
        ("exact", _rate_text(r.exact)),
        ("similar (not counted as replication)", _rate_text(r.similar)),
        (f"top-1 SSCD > {PAPER_SSCD:g} (Somepalli et al. 2023's measure)", _rate_text(r.sscd_above_0_5)),
    ]
    if r.reference is not None:
        rows.append(
            ("Reference false-alarm rate (non-members called replica or exact)", _rate_text(r.reference.false_alarms))
        )
    cells = "".join(f"<dt>{_esc(k)}</dt><dd>{v}</dd>" for k, v in rows)
    return f'<dl class="rates">{cells}</dl>'


# -- the score distribution --------------------------------------------------------------------------------


def _distribution_html(r: AuditResult) -> str:
    t = r.thresholds
    lines: list[tuple[float, str, str]] = []
    for key, label, cls in (
        ("similar_sscd", "similar", "t-similar"),
        ("replica_sscd", "replica", "t-replica"),
        ("exact_sscd", "exact (with PDQ)", "t-exact"),
    ):
        if isinstance(t.get(key), (int, float)):
            lines.append((float(t[key]), f"{label} {t[key]:g}", cls))
    lines.append((PAPER_SSCD, f"SSCD {PAPER_SSCD:g} (papers)", "t-paper"))
    ref = r.reference
    ref_p99 = ref.scores.quantiles.get("p99") if ref is not None else None
    if ref_p99 is not None:
        lines.append((ref_p99, f"reference p99 {ref_p99:.2f}", "t-ref"))
    svg = distribution_svg(r.scores.bins, ref.scores.bins if ref else None, lines)
    q = r.scores.quantiles
    stats = [f"outputs: median {_num(q['p50'])}, p99 {_num(q['p99'])}, max {_num(q['max'])}"]
    if ref is None:
        note = (
            "No reference given (<code>--reference DIR</code>): the distribution is shown without one, and the "
            "lines are the calibrated verdict thresholds (BENCHMARKS.md, Calibration) and the papers' 0.5."
        )
    else:
        rq = ref.scores.quantiles
        stats.append(f"reference: median {_num(rq['p50'])}, p99 {_num(rq['p99'])}, max {_num(rq['max'])}")
        stats.append(
            f"outputs above the reference's p99: {_rate_text(ref.outputs_above_reference_p99)} "
            "(about 1% if the outputs copy no more than non-members look alike)"
        )
        if ref.ks_statistic is not None:
            stats.append(f"Kolmogorov–Smirnov D = {ref.ks_statistic:.3f}")
        note = (
            "Bars: the outputs' top-1 SSCD scores; line: the reference non-member photos scanned against the "
            "same index, both as shares of their images."
        )
        if ref.exact:
            note += (
                f' <span class="hit">{ref.exact} reference photo(s) are exact matches: they are in the index, '
                "so they are not non-members; choose photos the corpus does not hold.</span>"
            )
    items = "".join(f"<li>{s}</li>" for s in stats)
    return (
        f'<section class="card"><h2>Top-1 SSCD score distribution</h2>{svg}'
        f'<p class="muted">{note}</p><ul class="stats">{items}</ul></section>'
    )


def distribution_svg(
    bins: list[int],
    reference: list[int] | None,
    lines: list[tuple[float, str, str]],
    width: int = 720,
    height: int = 240,
) -> str:
    """Inline SVG: `bins` (SCORE_BINS counts over [0, 1]) as bars and `reference` as a step line, each as
    shares of its own total so sets of different sizes compare; `lines` are (x, label, css class) markers."""
    left, right, top, bottom = 44, 12, 22, 28
    pw, ph = width - left - right, height - top - bottom
    n_out, n_ref = sum(bins) or 1, sum(reference or []) or 1
    shares = [c / n_out for c in bins]
    ref_shares = [c / n_ref for c in reference] if reference else []
    peak = max(shares + ref_shares + [1e-9])
    bw = pw / SCORE_BINS

    def y(v: float) -> float:
        return top + ph - ph * v / peak

    out = [
        (
            f'<svg class="dist" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="Histogram of top-1 SSCD scores">'
        ),
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" class="axis"/>',
        f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak:.0%}</text>',
        f'<text x="{left - 6}" y="{top + ph}" text-anchor="end">0</text>',
    ]
    for i, (s, c) in enumerate(zip(shares, bins, strict=False)):
        lo = i / SCORE_BINS
        out.append(
            f'<rect class="out" x="{left + i * bw + 0.5:.1f}" y="{y(s):.1f}" width="{bw - 1:.1f}" '
            f'height="{top + ph - y(s):.1f}"><title>{lo:.2f}–{lo + 1 / SCORE_BINS:.2f}: {c} outputs</title>'
            "</rect>"
        )
    if reference:
        pts = []
        for i, s in enumerate(ref_shares):
            pts += [f"{left + i * bw:.1f},{y(s):.1f}", f"{left + (i + 1) * bw:.1f},{y(s):.1f}"]
        out.append(f'<polyline class="ref" points="{" ".join(pts)}"/>')
    for k, (x, label, cls) in enumerate(sorted(lines)):
        px = left + min(max(x, 0.0), 1.0) * pw
        # labels right of their line, or left of it near the right edge so they stay inside the plot
        tx, anchor = (px + 3, "start") if x < 0.8 else (px - 3, "end")
        out.append(
            f'<line class="mark {cls}" x1="{px:.1f}" y1="{top - 4}" x2="{px:.1f}" y2="{top + ph}"/>'
            f'<text class="mark {cls}" x="{tx:.1f}" y="{top + 6 + 11 * (k % 4)}" text-anchor="{anchor}">'
            f"{_esc(label)}</text>"
        )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<text x="{left + tick * pw:.1f}" y="{height - 8}" text-anchor="middle">{tick:g}</text>')
    if not sum(bins):
        out.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle">no SSCD scores</text>')
    out.append("</svg>")
    return "".join(out)


# -- top pairs ---------------------------------------------------------------------------------------------


def _pairs_html(pairs: list[Pair], thumbnails: ThumbnailFn | None, query_thumbnails: QueryThumbnailFn) -> str:
    if not pairs:
        return '<section class="card"><h2>Top pairs</h2><p class="muted">No output matched a corpus item.</p></section>'
    e = _esc
    cards = []
    for p in pairs:
        region = p.region or {}
        q = _framed(_safe(query_thumbnails, p.path), p.path, region.get("query"))
        c = _framed(_safe(thumbnails, p.corpus_id) if thumbnails else None, p.corpus_id, region.get("corpus"))
        prompt = f'<div class="prompt">prompt: {e(p.prompt)}</div>' if p.prompt else ""
        caption = f'<div class="caption">{e(p.corpus_caption)}</div>' if p.corpus_caption else ""
        where = "matched region drawn" if p.region else "whole image (no region recorded)"
        cards.append(
            f'<article class="pair v-{e(p.verdict)}"><div class="sides">'
            f'<figure>{q}<figcaption class="path">{e(p.path)}</figcaption></figure>'
            f'<figure>{c}<figcaption class="mid">{e(p.corpus_id)}</figcaption></figure></div>'
            f'<div class="head"><span class="badge v-{e(p.verdict)}">{e(p.verdict)}</span> '
            f'{e(p.descriptor)} {p.score:.3f} <span class="muted">· {where}</span></div>{prompt}{caption}</article>'
        )
    return (
        f'<section class="card"><h2>Top {len(pairs)} pairs by score (output left, corpus item right)</h2>'
        f'<div class="pairs">{"".join(cards)}</div></section>'
    )


def _framed(data: bytes | None, alt: str, box: list[float] | None) -> str:
    """A thumbnail with the relative box [x0, y0, x1, y1] drawn over it (an SVG in the same frame)."""
    img = _img_html(data, alt)
    if not data or not box:
        return f'<div class="frame">{img}</div>'
    x0, y0, x1, y1 = box
    # viewBox 0..1 stretched over the image (preserveAspectRatio none): the box lands on the same pixels
    svg = (
        f'<svg class="region" viewBox="0 0 1 1" preserveAspectRatio="none"><rect x="{x0:.4f}" y="{y0:.4f}" '
        f'width="{x1 - x0:.4f}" height="{y1 - y0:.4f}" vector-effect="non-scaling-stroke"/></svg>'
    )
    return f'<div class="frame">{img}{svg}</div>'


def _safe(fn: Callable[[str], bytes | None] | None, key: str) -> bytes | None:
    if fn is None:
        return None
    try:
        return fn(key)
    except (ProvenanceError, OSError, ValueError, KeyError) as err:
        logger.warning("no thumbnail for %s: %s", key, err)
        return None


# -- captions and memorization -----------------------------------------------------------------------------


def _captions_html(r: AuditResult) -> str:
    e = _esc
    if not r.prompts:
        return (
            '<section class="card"><h2>Captions that replicate most</h2><p class="muted">No output carries its '
            "prompt (our <code>provenance</code> PNG chunk, a sidecar <code>.json</code>, or another tool's "
            "parameters), so prompts cannot be ranked.</p></section>"
        )
    rows = []
    for s in r.captions:
        rows.append(
            f'<tr class="{"rep" if s.replicating else ""}"><td class="ptxt">{e(s.prompt)}</td><td>{s.images}</td>'
            f"<td>{s.replicating}{f' ({s.exact} exact)' if s.exact else ''}</td><td>{_pct(s.rate, 0)}</td>"
            f"<td>{_num(s.max_score)}</td><td>{e(s.best_corpus_id or '–')}"
            f"{' <b class=hit>= its caption</b>' if s.prompt_is_corpus_caption else ''}</td>"
            f"<td>{_memo_html(s)}</td></tr>"
        )
    m = r.memorization
    summary = (
        f"{r.prompts} distinct prompts over {r.outputs_with_prompt} outputs; {m['replicating_prompts']} "
        f"replicate at least once. Memorization signals recorded for {m['prompts_with_signals']} prompts: "
        f"{m['flagged']} flagged, of which {m['flagged_and_replicating']} replicate."
    )
    return (
        f'<section class="card"><h2>Captions that replicate most</h2><p class="muted">{e(summary)}</p>'
        '<table class="captions"><thead><tr><th>prompt</th><th>outputs</th><th>replicating</th><th>share</th>'
        "<th>best SSCD</th><th>best match</th><th>memorization signals</th></tr></thead><tbody>"
        f"{''.join(rows)}</tbody></table></section>"
    )


def _memo_html(s: PromptStat) -> str:
    m = s.memorization
    if not m:
        return '<span class="muted">not recorded</span>'
    shown: dict[str, Any] = {
        k: f"{m[k]:.3g}" if isinstance(m[k], float) else m[k]
        for k in ("noise_norm", "noise_norm_z", "pairwise_sscd")
        if m.get(k) is not None
    }
    flag = '<span class="badge flag">flagged</span> ' if m.get("flag") else ""
    why = f' <span class="muted">{_esc(m["flag_reason"])}</span>' if m.get("flag") and m.get("flag_reason") else ""
    return flag + (_kv_html(shown) if shown else '<span class="muted">no values</span>') + why


def _errors_html(r: AuditResult) -> str:
    groups = [("Unreadable outputs (not counted)", r.errors)]
    if r.reference is not None:
        groups.append(("Unreadable reference photos (not counted)", r.reference.errors))
    out = []
    for title, errors in groups:
        if errors:
            shown = errors[:MAX_ERRORS_SHOWN]
            items = "".join(f"<li><b>{_esc(x['path'])}</b>: {_esc(x['error'])}</li>" for x in shown)
            if len(errors) > MAX_ERRORS_SHOWN:
                items += f'<li class="muted">and {len(errors) - MAX_ERRORS_SHOWN} more (all in the JSON summary)</li>'
            out.append(
                f'<section class="card"><h2>{_esc(title)}: {len(errors)}</h2><ul class="errs">{items}</ul></section>'
            )
    return "\n".join(out)


def _method_html(r: AuditResult) -> str:
    return (
        '<section class="card muted small"><h2>How to read this</h2><p>An output is an input that could be '
        "read; unreadable inputs are listed above and count in no rate. The replication rate is the share of "
        "outputs whose verdict is <i>replica</i> or <i>exact</i> at the thresholds shown "
        f"({_esc(', '.join(f'{k} {v}' for k, v in r.thresholds.items()))}); intervals are 95% Wilson score "
        "intervals. A reference is a set of photos known not to be in the index, scanned against it: the share "
        "of them called replica is the false-alarm rate the outputs' rate should be read against. "
        f"JSON summary schema version {r.schema_version}.</p></section>"
    )


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


_AUDIT_CSS = """
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 18px}
.gate{font-size:15px;padding:8px 12px;border-radius:6px;margin:10px 0}.gate.pass{background:#dcfce7;color:#166534}
.gate.fail{background:#fee2e2;color:#991b1b}.gate.none{background:#f3f4f6;color:#374151}
.rates{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;margin:8px 0 0}.rates dt{color:var(--muted)}
.rates dd{margin:0;font-weight:600}.rates dd .muted{font-weight:400}
.dist rect.out{fill:#2563eb}.dist .ref{fill:none;stroke:#ea580c;stroke-width:2}.dist text{font-size:11px;fill:#6b7280}
.dist .axis{stroke:#9ca3af}.dist line.mark{stroke-width:1.5;stroke-dasharray:4 3}
.t-similar{stroke:#ca8a04;fill:#ca8a04}.t-replica{stroke:#dc2626;fill:#dc2626}.t-exact{stroke:#7f1d1d;fill:#7f1d1d}
.t-paper{stroke:#111827;fill:#111827}.t-ref{stroke:#ea580c;fill:#ea580c}
.dist text.mark{stroke:none}.stats{margin:6px 0 0;padding-left:18px}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:14px}
.pair{border:1px solid var(--line);border-left:5px solid #d1d5db;border-radius:8px;padding:10px}
.pair.v-exact{border-left-color:#dc2626}.pair.v-replica{border-left-color:#ea580c}.pair.v-similar{border-left-color:#ca8a04}
.sides{display:flex;gap:8px}.sides figure{margin:0;flex:1;min-width:0}
.frame{position:relative;display:inline-block;max-width:100%}.frame img{display:block;max-width:100%;height:auto;
max-height:192px;border-radius:4px}.frame .ph{width:150px;height:112px}
.region{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}
.region rect{fill:rgba(220,38,38,.12);stroke:#dc2626;stroke-width:2}
.sides figcaption{font-size:12px;word-break:break-all}.prompt{font-size:12px;margin-top:4px}
.pair .caption{font-size:12px}
table.captions{border-collapse:collapse;width:100%;font-size:13px}
.captions th,.captions td{border-bottom:1px solid var(--line);padding:5px 6px;text-align:left;vertical-align:top}
.captions tr.rep td{background:#fff7ed}.ptxt{max-width:420px}
.errs{margin:0;padding-left:18px;word-break:break-all}.small{font-size:12px}
"""
