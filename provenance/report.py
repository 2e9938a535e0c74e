"""Rendering scan records as a terminal table, JSON/JSONL, CSV, or one self-contained offline HTML page."""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime
import html
import io
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from PIL import Image

from provenance.errors import ProvenanceError
from provenance.images import load_image
from provenance.types import SCAN_SCHEMA_VERSION, VERDICT_ORDER, ScanRecord

logger = logging.getLogger(__name__)

FORMATS = ("table", "jsonl", "json", "csv", "html")
THUMBNAIL_PX = 192  # longest side of the query thumbnails in the HTML report
HISTOGRAM_BINS = 20  # over SSCD cosine [0, 1]: 0.05 wide, fine enough to see a 0.5-0.6 threshold
CSV_COLUMNS = (
    "path", "sha256", "width", "height", "verdict",
    "top_match_id", "top_match_score", "top_match_descriptor", "top_match_caption",
    "sscd", "clip", "pdq_distance",
    "visible_probability", "visible_flagged", "invisible_schemes", "c2pa_ai_generated", "c2pa_claim_generator",
    "metadata_generator", "memorization_flag", "error",
)  # fmt: skip

ThumbnailFn = Callable[[str], bytes | None]


def write_report(
    records: list[ScanRecord],
    fmt: str,
    out: str | Path | IO[str] | None = None,
    *,
    thumbnails: ThumbnailFn | None = None,
    title: str = "Provenance scan report",
    max_matches: int = 5,
) -> None:
    """Write `records` as `fmt` (one of FORMATS) to a file path, an open text stream, or stdout (None).

    `thumbnails(corpus_id)` returns a corpus item's thumbnail (JPEG bytes) or None; only the HTML
    report uses it, to show each match beside its query. `max_matches` caps matches per image in
    the HTML report.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with _open_out(out) as stream:
        # JSON carries the record shape's version (the next issues add keys): on every JSONL line, and at the
        # top of the JSON report beside its records
        if fmt == "jsonl":
            for r in records:
                stream.write(
                    json.dumps({"schema_version": SCAN_SCHEMA_VERSION, **r.to_dict()}, ensure_ascii=False) + "\n"
                )
        elif fmt == "json":
            json.dump(
                {"schema_version": SCAN_SCHEMA_VERSION, "records": [r.to_dict() for r in records]},
                stream,
                ensure_ascii=False,
                indent=2,
            )
            stream.write("\n")
        elif fmt == "csv":
            write_csv(records, stream)
        elif fmt == "html":
            stream.write(render_html(records, thumbnails=thumbnails, title=title, max_matches=max_matches))
        else:
            write_table(records, stream, title=title)


@contextlib.contextmanager
def _open_out(out: str | Path | IO[str] | None) -> Iterator[IO[str]]:
    if out is None:
        yield sys.stdout
    elif isinstance(out, (str, Path)):
        # newline="": the csv module writes its own \r\n; other formats only write \n.
        with open(out, "w", encoding="utf-8", newline="") as f:
            yield f
    else:
        yield out


def verdict_counts(records: list[ScanRecord]) -> dict[str, int]:
    """{verdict: count} in VERDICT_ORDER, every verdict present (zeros included)."""
    c = Counter(r.verdict for r in records)
    return {v: c.get(v, 0) for v in VERDICT_ORDER}


def _memorization(r: ScanRecord) -> dict[str, Any] | None:
    m = r.extra.get("memorization") if r.extra else None
    return m if isinstance(m, dict) else None


# -- CSV --------------------------------------------------------------------------------------------


def csv_row(r: ScanRecord) -> dict[str, Any]:
    """One CSV row (CSV_COLUMNS) for a record: the top match, the scores and a watermark digest."""
    top = r.matches[0] if r.matches else None
    wm = r.watermarks
    c2pa = wm.c2pa or {}
    mem = _memorization(r)
    return {
        "path": r.path,
        "sha256": r.sha256,
        "width": r.width,
        "height": r.height,
        "verdict": r.verdict,
        "top_match_id": top.id if top else None,
        "top_match_score": top.score if top else None,
        "top_match_descriptor": top.descriptor if top else None,
        "top_match_caption": top.caption if top else None,
        "sscd": r.scores.get("sscd"),
        "clip": r.scores.get("clip"),
        "pdq_distance": r.scores.get("pdq_distance"),
        "visible_probability": (wm.visible or {}).get("probability"),
        "visible_flagged": (wm.visible or {}).get("flagged"),
        "invisible_schemes": ";".join(m.scheme for m in wm.invisible),
        "c2pa_ai_generated": c2pa.get("ai_generated") if wm.c2pa else None,
        "c2pa_claim_generator": c2pa.get("claim_generator"),
        "metadata_generator": (wm.metadata or {}).get("generator"),
        "memorization_flag": mem.get("flag") if mem else None,
        "error": r.error,
    }


def write_csv(records: list[ScanRecord], stream: IO[str]) -> None:
    writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in records:
        writer.writerow({k: _csv_cell(v) for k, v in csv_row(r).items()})


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    # Captions and paths come from other people's data: a leading =, +, @ would run as a formula
    # when the CSV is opened in a spreadsheet, so quote it (OWASP "CSV injection").
    if isinstance(v, str) and (v[:1] in ("=", "+", "@", "\t", "\r") or (v[:1] == "-" and not _is_number(v))):
        return "'" + v
    return v


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# -- terminal table -----------------------------------------------------------------------------------

_VERDICT_STYLE = {"exact": "bold red", "replica": "red", "similar": "yellow", "novel": "green", "error": "dim"}


def write_table(records: list[ScanRecord], stream: IO[str], *, title: str = "Provenance scan report") -> None:
    """A rich table, one row per image, then the counts per verdict."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # A file or pipe gets a wide, colourless console; a terminal keeps its own width and colours.
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    console = Console(file=stream, width=None if is_tty else 160, no_color=not is_tty, highlight=False)
    table = Table(title=title, show_lines=False)
    for name, kw in (
        ("image", {"overflow": "fold", "max_width": 48}), ("verdict", {}), ("top match", {"overflow": "fold"}),
        ("score", {"justify": "right"}), ("sscd", {"justify": "right"}), ("clip", {"justify": "right"}),
        ("pdq", {"justify": "right"}), ("marks", {"overflow": "fold"}), ("error", {"overflow": "fold"}),
    ):  # fmt: skip
        table.add_column(name, **kw)
    for r in records:
        top = r.matches[0] if r.matches else None
        table.add_row(
            Text(r.path),
            Text(r.verdict, style=_VERDICT_STYLE.get(r.verdict, "")),
            Text(f"{top.id} ({top.descriptor})" + _consent_note(top.consent) if top else "–"),
            _num(top.score if top else None),
            _num(r.scores.get("sscd")),
            _num(r.scores.get("clip")),
            _num(r.scores.get("pdq_distance")),
            Text(_marks_digest(r)),
            Text(r.error or ""),
        )
    console.print(table)
    counts = verdict_counts(records)
    console.print(f"{len(records)} images: " + ", ".join(f"{v} {n}" for v, n in counts.items()))


def _consent_note(consent: dict[str, Any] | None) -> str:
    """' [training not_allowed]' when the matched item's recorded signals reserve it, else ''."""
    training = (consent or {}).get("training")
    return f" [training {training}]" if training in ("not_allowed", "constrained") else ""


def _marks_digest(r: ScanRecord) -> str:
    """A one-line summary of the provenance marks: 'visible 0.91; sd-v1; C2PA AI; meta comfyui'."""
    wm = r.watermarks
    parts = []
    if wm.visible and wm.visible.get("probability") is not None:
        flag = " flagged" if wm.visible.get("flagged") else ""
        parts.append(f"visible {wm.visible['probability']:.2f}{flag}")
    parts += [m.scheme for m in wm.invisible]
    if wm.c2pa:
        parts.append("C2PA error" if "error" in wm.c2pa else ("C2PA AI" if wm.c2pa.get("ai_generated") else "C2PA"))
    if wm.metadata and wm.metadata.get("generator"):
        parts.append(f"meta {wm.metadata['generator']}")
    mem = _memorization(r)
    if mem and mem.get("flag"):
        parts.append("MEMORIZATION")
    return "; ".join(parts)


def _num(v: float | int | None) -> str:
    if v is None:
        return "–"
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else f"{v:.3f}"


# -- HTML ---------------------------------------------------------------------------------------------


def shrink_jpeg(data: bytes | None, size: int) -> bytes | None:
    """The image re-encoded as a JPEG of at most `size` px on its longest side; smaller images (and None)
    come back unchanged, and so do bytes PIL cannot read (the page shows what it can)."""
    if not data:
        return data
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) <= size:
                return data
            im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale
            small = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return data
    small.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def make_thumbnail(path: str | Path, size: int = THUMBNAIL_PX) -> bytes | None:
    """JPEG bytes of `path` shrunk to `size` px on its longest side, or None when it cannot be read."""
    try:
        im = load_image(path).image
    except ProvenanceError as e:
        logger.debug("no thumbnail for %s: %s", path, e)
        return None
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return buf.getvalue()


def render_html(
    records: list[ScanRecord],
    *,
    thumbnails: ThumbnailFn | None = None,
    title: str = "Provenance scan report",
    max_matches: int = 5,
) -> str:
    """One self-contained HTML page: inline CSS and SVG, images as data URIs, nothing fetched."""
    cache: dict[str, bytes | None] = {}

    def match_thumb(corpus_id: str) -> bytes | None:
        # The same corpus item often matches many queries; fetch its thumbnail once.
        if thumbnails is None:
            return None
        if corpus_id not in cache:
            try:
                # the index stores thumbnails large enough to verify copies on (256 px): the page shows 192 px
                cache[corpus_id] = shrink_jpeg(thumbnails(corpus_id), THUMBNAIL_PX)
            except (ProvenanceError, OSError, ValueError, KeyError) as e:
                logger.warning("no thumbnail for corpus item %s: %s", corpus_id, e)
                cache[corpus_id] = None
        return cache[corpus_id]

    counts = verdict_counts(records)
    flagged = sum(1 for r in records if (_memorization(r) or {}).get("flag"))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    e = _esc
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        # The page must work offline and load nothing, even if some text smuggles in a URL.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f'<header><h1>{e(title)}</h1><p class="muted">{len(records)} images · generated {e(now)}</p>',
        '<div class="counts">',
        *(f'<span class="badge v-{v}">{e(v)} <b>{n}</b></span>' for v, n in counts.items()),
        (f'<span class="badge flag">memorization flagged <b>{flagged}</b></span>' if flagged else ""),
        "</div>",
        '<section class="hist"><h2>Top-1 SSCD score across the batch</h2>',
        _histogram_svg([r.scores.get("sscd") for r in records]),
        "</section></header><main>",
    ]
    for r in records:
        parts.append(_record_html(r, match_thumb, max_matches))
    parts.append("</main></body></html>\n")
    return "\n".join(p for p in parts if p)


def _record_html(r: ScanRecord, match_thumb: Callable[[str], bytes | None], max_matches: int) -> str:
    e = _esc
    mem = _memorization(r)
    classes = f"record v-{e(r.verdict)}" + (" flagged" if mem and mem.get("flag") else "")
    facts = []
    if r.width and r.height:
        facts.append(f"{r.width}×{r.height}")
    if r.sha256:
        facts.append(f'<span title="{e(r.sha256)}">sha256 {e(r.sha256[:12])}…</span>')
    scores = " · ".join(
        f"{name} {e(_num(r.scores.get(key)))}"
        for name, key in (("sscd", "sscd"), ("clip", "clip"), ("pdq bits", "pdq_distance"))
        if r.scores.get(key) is not None
    )
    if r.extra.get("sscd_view") == "centre":
        scores += " (sscd from the image's centre)"
    # the matched region of a verified copy (scan --thorough) is drawn on the query and on its corpus item
    region = next((m.region for m in r.matches if m.region), None)
    out = [
        f'<article class="{classes}">',
        f'<div class="query">{_framed(make_thumbnail(r.path), r.path, (region or {}).get("query"))}',
        f'<div class="path">{e(r.path)}</div><div class="muted">{" · ".join(facts)}</div></div>',
        '<div class="body"><div class="head">',
        f'<span class="badge v-{e(r.verdict)}">{e(r.verdict)}</span>',
        ('<span class="badge flag">memorization flag</span>' if mem and mem.get("flag") else ""),
        f'<span class="scores">{scores}</span></div>',
    ]
    if r.error:
        out.append(f'<div class="error">Error: {e(r.error)}</div>')
    if r.matches:
        out.append('<div class="matches">')
        for m in r.matches[:max_matches]:
            caption = f'<div class="caption">{e(m.caption)}</div>' if m.caption else ""
            dist = f" · {m.distance} bits" if m.distance is not None else ""
            note = _consent_note(m.consent).strip(" []")
            consent = f'<div class="badge flag">{e(note)}</div>' if note else ""
            out.append(
                f'<figure class="match">{_framed(match_thumb(m.id), m.id, (m.region or {}).get("corpus"))}<figcaption>'
                f'<div class="mid">{e(m.id)}</div><div>{e(_num(m.score))} · {e(m.descriptor)}{e(dist)}</div>'
                f"{caption}{consent}</figcaption></figure>"
            )
        if len(r.matches) > max_matches:
            out.append(f'<div class="muted more">+{len(r.matches) - max_matches} more matches</div>')
        out.append("</div>")
    elif not r.error:
        out.append('<div class="muted">No corpus match above the thresholds.</div>')
    out.append(_evidence_html(r))
    if mem:
        out.append(f'<div class="memo"><b>Memorization</b> {_kv_html(mem)}</div>')
    out.append("</div></article>")
    return "\n".join(p for p in out if p)


def _evidence_html(r: ScanRecord) -> str:
    e = _esc
    wm = r.watermarks
    rows: list[tuple[str, str]] = []
    if wm.visible and wm.visible.get("probability") is not None:
        p, flagged = float(wm.visible["probability"]), bool(wm.visible.get("flagged"))
        gate = f" (flagged at {wm.visible['threshold']:.0%})" if flagged and "threshold" in wm.visible else ""
        rows.append(("Visible watermark", f'<span class="{"hit" if flagged else ""}">{p:.0%} probability</span>{gate}'))
    for m in wm.invisible:
        payload = f", payload {e(m.payload)}" if m.payload else ""
        rows.append(
            ("Invisible mark", f'<span class="hit">{e(m.scheme)}</span> (bit accuracy {m.bit_accuracy:.2f}, '
             f"p = {m.p_value:.1e}{payload})")
        )  # fmt: skip
    if wm.c2pa:
        rows.append(("C2PA", _c2pa_html(wm.c2pa)))
    if wm.metadata:
        md = wm.metadata
        head = e(md.get("generator") or "metadata")
        if md.get("ai_generated"):
            head = f'<span class="hit">{head} (AI)</span>'
        params = {k: v for k, v in (md.get("parameters") or {}).items() if v not in (None, "")}
        fields = params or md.get("exif") or md.get("text_chunks") or {}
        rows.append(("Metadata", f"{head} {_kv_html(fields)}"))
    if not rows:
        return '<div class="muted evidence">No watermark, C2PA or generation metadata found.</div>'
    return '<dl class="evidence">' + "".join(f"<dt>{e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def _c2pa_html(c: dict[str, Any]) -> str:
    e = _esc
    if "error" in c:
        return f'<span class="err">{e(c["error"])}</span>'
    bits = []
    if c.get("ai_generated"):
        dst = str(c.get("digital_source_type") or "").rsplit("/", 1)[-1]
        bits.append(f'<span class="hit">AI-generated ({e(dst)})</span>')
    elif c.get("digital_source_type"):
        bits.append(e(str(c["digital_source_type"]).rsplit("/", 1)[-1]))
    for label, key in (("by", "claim_generator"), ("signed by", "signature_issuer"), ("title", "title")):
        if c.get(key):
            bits.append(f"{label} {e(c[key])}")
    if c.get("training_opt_out"):
        bits.append('<span class="hit">training opt-out</span>')
    if c.get("validation_state"):
        codes = ", ".join(str(x) for x in c.get("validation_status") or [])
        bits.append(f"validation {e(c['validation_state'])}" + (f" ({e(codes)})" if codes else ""))
    return " · ".join(bits) or "manifest present"


def _kv_html(d: dict[str, Any], limit: int = 300) -> str:
    items = []
    for k, v in d.items():
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        if len(text) > limit:
            text = text[:limit] + "…"
        items.append(f'<span class="kv"><i>{_esc(k)}</i> {_esc(text)}</span>')
    return " ".join(items)


def _img_html(data: bytes | None, alt: str) -> str:
    if not data:
        return f'<div class="ph" title="{_esc(alt)}">no preview</div>'
    return f'<img src="data:{_mime(data)};base64,{base64.b64encode(data).decode("ascii")}" alt="{_esc(alt)}">'


def _framed(data: bytes | None, alt: str, box: list[float] | None) -> str:
    """The image with a relative box [x0, y0, x1, y1] (0..1) drawn over it, as an SVG in the same frame."""
    img = _img_html(data, alt)
    if not data or not box:
        return img
    x0, y0, x1, y1 = (min(1.0, max(0.0, float(v))) for v in box)
    # viewBox 0..1 stretched over the image (preserveAspectRatio none): the box lands on the same pixels
    svg = (
        f'<svg class="region" viewBox="0 0 1 1" preserveAspectRatio="none"><rect x="{x0:.4f}" y="{y0:.4f}" '
        f'width="{max(0.0, x1 - x0):.4f}" height="{max(0.0, y1 - y0):.4f}" vector-effect="non-scaling-stroke"/>'
        "</svg>"
    )
    return f'<div class="frame">{img}{svg}</div>'


def _mime(data: bytes) -> str:
    # Thumbnails are JPEG by contract; sniff anyway so a PNG/WebP one still displays.
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/jpeg"


def _histogram_svg(scores: list[float | int | None], width: int = 560, height: int = 180) -> str:
    """An inline SVG bar chart of scores in [0, 1] (out-of-range values land in the end bins)."""
    values = [float(s) for s in scores if s is not None]
    counts = [0] * HISTOGRAM_BINS
    for v in values:
        counts[min(HISTOGRAM_BINS - 1, max(0, int(v * HISTOGRAM_BINS)))] += 1
    left, bottom, top = 36, 24, 10
    plot_w, plot_h = width - left - 8, height - bottom - top
    peak = max(counts) or 1
    bar_w = plot_w / HISTOGRAM_BINS
    out = [
        f'<svg class="histogram" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="Histogram of top-1 SSCD scores of {len(values)} images">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for i, n in enumerate(counts):
        h = plot_h * n / peak
        lo = i / HISTOGRAM_BINS
        out.append(
            f'<rect x="{left + i * bar_w + 1:.1f}" y="{top + plot_h - h:.1f}" width="{bar_w - 2:.1f}" '
            f'height="{h:.1f}"><title>{lo:.2f}–{lo + 1 / HISTOGRAM_BINS:.2f}: {n} images</title></rect>'
        )
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + tick * plot_w
        out.append(f'<text x="{x:.1f}" y="{height - 6}" text-anchor="middle">{tick:g}</text>')
    if not values:
        out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle">no SSCD scores</text>')
    out.append("</svg>")
    return "".join(out)


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


_CSS = """
:root{--fg:#1d2330;--muted:#6b7280;--line:#e5e7eb;--bg:#f7f7f8;--card:#fff}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header{padding:20px 28px;background:var(--card);border-bottom:1px solid var(--line)}
h1{margin:0 0 4px;font-size:22px}h2{font-size:14px;margin:16px 0 6px;color:var(--muted);font-weight:600}
main{padding:18px 28px;display:flex;flex-direction:column;gap:14px}.muted{color:var(--muted)}
.counts{display:flex;gap:8px;flex-wrap:wrap;margin-top:10px}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:600;
background:#e5e7eb;color:#374151}
.badge.v-exact{background:#fee2e2;color:#991b1b}.badge.v-replica{background:#ffedd5;color:#9a3412}
.badge.v-similar{background:#fef9c3;color:#854d0e}.badge.v-novel{background:#dcfce7;color:#166534}
.badge.v-error{background:#e5e7eb;color:#374151}.badge.flag{background:#7c3aed;color:#fff}
.record{display:flex;gap:18px;background:var(--card);border:1px solid var(--line);border-left:5px solid #d1d5db;
border-radius:8px;padding:14px}
.record.v-exact{border-left-color:#dc2626}.record.v-replica{border-left-color:#ea580c}
.record.v-similar{border-left-color:#ca8a04}.record.v-novel{border-left-color:#16a34a}
.record.flagged{outline:3px solid #7c3aed;background:#faf5ff}
.query{width:200px;flex:none}.query img,.ph{max-width:192px;max-height:192px;border-radius:6px;display:block}
.ph{width:192px;height:144px;background:repeating-linear-gradient(45deg,#eee,#eee 8px,#f8f8f8 8px,#f8f8f8 16px);
display:flex;align-items:center;justify-content:center;color:var(--muted)}
.path{word-break:break-all;font-weight:600;margin-top:6px}
.body{flex:1;min-width:0}.head{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.scores{color:var(--muted)}
.matches{display:flex;gap:12px;flex-wrap:wrap;margin:10px 0}
.frame{position:relative;display:inline-block;line-height:0}
.region{position:absolute;left:0;top:0;width:100%;height:100%;pointer-events:none}
.region rect{fill:rgba(220,38,38,.12);stroke:#dc2626;stroke-width:2}
.match{margin:0;width:140px}.match img,.match .ph{width:140px;height:auto;max-height:140px;object-fit:cover}
.match .ph{height:105px}.match figcaption{font-size:12px;overflow-wrap:anywhere}
.mid{font-weight:600;word-break:break-all}
.caption{color:var(--muted)}.more{align-self:center}
.error{background:#fef2f2;color:#991b1b;border:1px solid #fecaca;border-radius:6px;padding:6px 10px;margin:8px 0}
.evidence{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:8px 0 0}
.evidence dt{color:var(--muted)}.evidence dd{margin:0}.hit{color:#b91c1c;font-weight:600}.err{color:#991b1b}
.kv{display:inline-block;margin-right:10px}.kv i{color:var(--muted);font-style:normal}
.memo{margin-top:8px;padding:6px 10px;border-radius:6px;background:#f5f3ff}
.histogram rect{fill:#2563eb}.histogram text{font-size:11px;fill:#6b7280}.histogram .axis{stroke:#9ca3af}
@media (max-width:700px){.record{flex-direction:column}}
"""
