"""Tests of provenance.report: every format rendered from hand-built scan records over real COCO photos."""

from __future__ import annotations

import csv
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from provenance.report import CSV_COLUMNS, make_thumbnail, render_html, write_report
from provenance.types import SCAN_SCHEMA_VERSION, InvisibleMark, Match, ScanRecord, WatermarkEvidence


@pytest.fixture(scope="module")
def photos(coco_dir) -> list[Path]:
    return sorted(coco_dir.glob("*.jpg"))[:6]


@pytest.fixture(scope="module")
def records(photos, tmp_path_factory) -> list[ScanRecord]:
    q = photos
    missing = tmp_path_factory.mktemp("gone") / "deleted.jpg"
    return [
        ScanRecord(
            path=str(q[0]),
            sha256="a" * 64,
            width=640,
            height=480,
            verdict="exact",
            matches=[
                Match(q[0].name, 0.991, "sscd", caption="A man <b>making</b> pizzas", source="coco"),
                Match(q[1].name, 0.62, "clip", caption='=HYPERLINK("http://evil.example/x")'),
                Match("no-thumb-item", 0.55, "sscd", caption="see http://example.com/img.jpg"),
            ],
            scores={"sscd": 0.991, "clip": 0.97, "pdq_distance": 2},
            watermarks=WatermarkEvidence(
                visible={"probability": 0.93, "flagged": True, "threshold": 0.9},
                invisible=[InvisibleMark("sd-v1", 0.98, 1e-12), InvisibleMark("provenance", 1.0, 1e-15, "run-7")],
                c2pa={
                    "ai_generated": True,
                    "claim_generator": "provenance-generator/0.1",
                    "digital_source_type": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia",
                    "training_opt_out": True,
                    "validation_state": "Valid",
                },
                metadata={"generator": "comfyui", "ai_generated": True, "parameters": {"prompt": "<script>x</script>"}},
            ),
            extra={"memorization": {"noise_norm": 0.12, "pairwise_sscd": 0.91, "flag": True}},
        ),
        ScanRecord(
            path=str(q[2]),
            sha256="b" * 64,
            width=500,
            height=375,
            verdict="similar",
            matches=[Match(q[3].name, 0.71, "sscd", caption="Two dogs"), Match(q[4].name, 0.97, "pdq", distance=8)],
            scores={"sscd": 0.71, "clip": 0.8, "pdq_distance": 8},
            watermarks=WatermarkEvidence(visible={"probability": 0.61, "flagged": False, "threshold": 0.9}),
            extra={"memorization": {"noise_norm": 0.5, "pairwise_sscd": 0.2, "flag": False}, "sscd_view": "centre"},
        ),
        ScanRecord(
            path=str(q[5]),
            sha256="c" * 64,
            width=640,
            height=427,
            verdict="novel",
            scores={"sscd": 0.21, "clip": 0.3, "pdq_distance": 120},
        ),
        ScanRecord.failed(str(missing), f"{missing}: file not found <unreadable>"),
    ]


@pytest.fixture(scope="module")
def thumbnails(photos):
    by_name = {p.name: p for p in photos}

    def thumb(corpus_id: str) -> bytes | None:
        p = by_name.get(corpus_id)
        return make_thumbnail(p, 96) if p else None

    return thumb


class _Resources(HTMLParser):
    """Collects every attribute that could make a browser load something."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action", "xlink:href"):
                self.urls.append(value or "")


def test_html_is_self_contained_and_shows_everything(records, thumbnails):
    page = render_html(records, thumbnails=thumbnails)
    parser = _Resources()
    parser.feed(page)
    # 3 readable queries + 4 matches with a thumbnail (not "no-thumb-item"); the deleted file and
    # the thumbnail-less match get a placeholder instead.
    jpeg_imgs = re.findall(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]+"', page)
    assert len(jpeg_imgs) == 3 + 4
    assert page.count('class="ph"') == 2
    # Nothing is loaded from anywhere: every resource attribute is a data URI, no CSS url(), and
    # the CSP forbids loads even if some text slipped through.
    assert parser.urls and all(u.startswith("data:image/") for u in parser.urls)
    assert "url(" not in page and "@import" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "default-src 'none'" in page
    assert not {"script", "link", "iframe", "object"} & set(parser.tags)
    # Text is escaped, never interpreted.
    assert "<script>x</script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    assert "A man &lt;b&gt;making&lt;/b&gt; pizzas" in page
    # The error, the histogram, the counts, the evidence and the memorization flag are shown.
    assert "file not found &lt;unreadable&gt;" in page
    assert page.count('<svg class="histogram"') == 1 and page.count("<rect ") == 20
    assert "0.95–1.00: 1 images" in page and "0.20–0.25: 1 images" in page
    for verdict, n in (("exact", 1), ("replica", 0), ("similar", 1), ("novel", 1), ("error", 1)):
        assert f'<span class="badge v-{verdict}">{verdict} <b>{n}</b></span>' in page
    assert "memorization flagged <b>1</b>" in page
    assert page.count('class="record v-exact flagged"') == 1 and page.count('flagged"') == 1
    # the visible mark is highlighted by the detector's own flag, not by p >= 0.5
    assert '<span class="hit">93% probability</span> (flagged at 90%)' in page
    assert '<span class="">61% probability</span>' in page
    assert "sd-v1" in page and "payload run-7" in page
    assert "AI-generated (trainedAlgorithmicMedia)" in page and "training opt-out" in page
    assert "pairwise_sscd" in page and "8 bits" in page
    assert page.count("(sscd from the image's centre)") == 1  # scan --centre-view's top match


def test_html_without_thumbnail_source_or_scores(records):
    page = render_html(records[3:])  # only the error record: no thumbnails, no SSCD score
    assert "<img " not in page and "no SSCD scores" in page


def test_csv_parses_back(records):
    buf = io.StringIO()
    write_report(records, "csv", buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert tuple(rows[0].keys()) == CSV_COLUMNS and len(rows) == 4
    first, err = rows[0], rows[3]
    assert first["path"] == records[0].path and first["verdict"] == "exact"
    assert first["top_match_id"] == records[0].matches[0].id and float(first["top_match_score"]) == 0.991
    assert first["top_match_descriptor"] == "sscd" and first["top_match_caption"] == "A man <b>making</b> pizzas"
    assert (float(first["sscd"]), float(first["clip"]), int(first["pdq_distance"])) == (0.991, 0.97, 2)
    assert float(first["visible_probability"]) == 0.93 and first["invisible_schemes"] == "sd-v1;provenance"
    assert (first["visible_flagged"], rows[1]["visible_flagged"], rows[2]["visible_flagged"]) == ("True", "False", "")
    assert first["c2pa_ai_generated"] == "True" and first["c2pa_claim_generator"] == "provenance-generator/0.1"
    assert first["memorization_flag"] == "True" and first["error"] == ""
    assert rows[2]["top_match_id"] == "" and rows[2]["c2pa_ai_generated"] == ""
    assert err["verdict"] == "error" and "file not found" in err["error"] and err["sha256"] == ""


def test_csv_defuses_spreadsheet_formulas(records):
    buf = io.StringIO()
    write_report([ScanRecord(path="=cmd|' /C calc'!A0", matches=[records[0].matches[1]])], "csv", buf)
    row = next(csv.DictReader(io.StringIO(buf.getvalue())))
    assert row["path"].startswith("'=") and row["top_match_caption"].startswith("'=HYPERLINK")


def test_jsonl_and_json_round_trip(records):
    buf = io.StringIO()
    write_report(records, "jsonl", buf)
    lines = buf.getvalue().splitlines()
    # each line is the record with the version of its shape; the JSON report carries it once, beside the records
    assert [json.loads(line) for line in lines] == [
        {"schema_version": SCAN_SCHEMA_VERSION, **r.to_dict()} for r in records
    ]
    buf = io.StringIO()
    write_report(records, "json", buf)
    assert json.loads(buf.getvalue()) == {
        "schema_version": SCAN_SCHEMA_VERSION,
        "records": [r.to_dict() for r in records],
    }


def test_table_lists_rows_and_counts(records):
    buf = io.StringIO()
    write_report(records, "table", buf)
    text = buf.getvalue()
    assert records[0].matches[0].id in text and "MEMORIZATION" in text
    assert "4 images: exact 1, replica 0, similar 1, novel 1, error 1" in text
    assert "\x1b[" not in text  # no colour codes in a file


def test_write_report_to_path_and_rejects_unknown_format(records, thumbnails, tmp_path):
    out = tmp_path / "report.html"
    write_report(records, "html", out, thumbnails=thumbnails)
    assert out.read_text(encoding="utf-8").count("data:image/jpeg;base64,") == 7
    with pytest.raises(ValueError, match="unknown report format 'pdf'"):
        write_report(records, "pdf", tmp_path / "r.pdf")


def test_make_thumbnail(photos, tmp_path):
    thumb = Image.open(io.BytesIO(make_thumbnail(photos[0])))
    assert thumb.format == "JPEG" and max(thumb.size) == 192
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    assert make_thumbnail(bad) is None and make_thumbnail(tmp_path / "nope.png") is None


def test_html_draws_the_matched_region_on_both_images(photos, thumbnails):
    region = {"query": [0.5, 0.25, 0.9, 0.75], "corpus": [0.0, 0.0, 1.0, 1.0]}
    rec = ScanRecord(
        path=str(photos[2]),
        sha256="d" * 64,
        width=500,
        height=375,
        verdict="replica",
        matches=[Match(photos[3].name, 0.31, "sscd", region=region), Match(photos[4].name, 0.2, "sscd")],
        scores={"sscd": 0.31, "clip": None, "pdq_distance": None},
    )
    page = render_html([rec], thumbnails=thumbnails)
    rects = re.findall(
        r'<svg class="region"[^>]*><rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', page
    )
    # one box on the query thumbnail, one on the matched corpus item's; none on the other match
    assert rects == [("0.5000", "0.2500", "0.4000", "0.5000"), ("0.0000", "0.0000", "1.0000", "1.0000")]
    assert json.loads(json.dumps(rec.to_dict()))["matches"][0]["region"] == region
    assert "region" not in rec.to_dict()["matches"][1]
