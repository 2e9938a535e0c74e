"""The replication audit on real photos: known replicas and non-members give the right rate, interval and gate."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance, PngImagePlugin
from typer.testing import CliRunner

from provenance.audit import (
    AUDIT_SCHEMA_VERSION,
    AuditOptions,
    Rate,
    audit_paths,
    audit_records,
    evaluate_gate,
    region_of,
    wilson_interval,
)
from provenance.audit_report import render_audit_html
from provenance.cli import EXIT_CLEAN, EXIT_FAIL_ON, EXIT_UNREADABLE, EXIT_USAGE, app
from provenance.indexer import BuildOptions, build
from provenance.scan import Scanner, ScanOptions
from provenance.store import ProvenanceIndex
from provenance.types import Match, ScanRecord, WatermarkEvidence

runner = CliRunner()
N_INDEXED = 30
REPLICAS = 6  # of 20 outputs: the rate is 0.30
# Wilson 95% interval of 6/20, from the closed form with z = 1.959964 (also in Brown, Cai & DasGupta 2001's tables)
WILSON_6_OF_20 = (0.14548, 0.51897)


@pytest.fixture(scope="module")
def index_dir(coco_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("audit-idx") / "coco30"
    build(str(coco_dir), d, BuildOptions(descriptors=["sscd", "pdq"], limit=N_INDEXED))
    return d


@pytest.fixture(scope="module")
def indexed(index_dir, coco_dir) -> list[Path]:
    ids = ProvenanceIndex.open(index_dir).ids
    assert len(ids) == N_INDEXED
    return [coco_dir / i for i in ids]


def _edit(im: Image.Image, k: int) -> Image.Image:
    """Crop to 90% of each side, a slight colour change (saturation and brightness), shifted per k."""
    w, h = im.size
    dx, dy = int(w * 0.1 * (k % 3) / 2), int(h * 0.1 * (k % 2))
    im = im.crop((dx, dy, dx + int(w * 0.9), dy + int(h * 0.9)))
    im = ImageEnhance.Color(im).enhance(1.15)
    return ImageEnhance.Brightness(im).enhance(0.95)


@pytest.fixture(scope="module")
def outputs(indexed, nonmember_dir, tmp_path_factory) -> Path:
    """20 outputs: 6 edited copies of indexed photos (JPEG q70, or PNG with a prompt chunk) and 14 non-members.
    Two replicas and one non-member carry the prompt "a kitchen" (PNG chunk or sidecar), with memorization signals."""
    d = tmp_path_factory.mktemp("outputs")
    memo = {
        "noise_norm": 1.2,
        "noise_norm_steps": 3,
        "pairwise_sscd": 0.62,
        "noise_norm_z": 4.1,
        "flag": True,
        "flag_reason": "pairwise SSCD 0.62 > 0.5",
    }
    for k, src in enumerate(indexed[:REPLICAS]):
        im = _edit(Image.open(src).convert("RGB"), k)
        if k == 0:  # our generator's PNG chunk
            info = PngImagePlugin.PngInfo()
            info.add_text("provenance", json.dumps({"prompt": "a kitchen", "seed": 1, "memorization": memo}))
            im.save(d / f"rep{k}.png", pnginfo=info)
        else:
            im.save(d / f"rep{k}.jpg", quality=70)
        if k == 1:  # a JPEG output: the prompt is in its sidecar
            (d / f"rep{k}.json").write_text(json.dumps({"prompt": "a kitchen", "seed": 2, "memorization": memo}))
    nonmembers = sorted(nonmember_dir.glob("*.jpg"))[: 20 - REPLICAS]
    for k, src in enumerate(nonmembers):
        (d / f"non{k:02d}.jpg").write_bytes(src.read_bytes())
    (d / "non00.json").write_text(json.dumps({"prompt": "a kitchen", "seed": 3}))
    return d


@pytest.fixture(scope="module")
def reference(nonmember_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reference")
    for src in sorted(nonmember_dir.glob("*.jpg"))[100:130]:  # other non-members than the outputs'
        (d / src.name).write_bytes(src.read_bytes())
    return d


@pytest.fixture(scope="module")
def scanner(index_dir) -> Scanner:
    return Scanner.open(index_dir, ScanOptions(k=5, visible=False, invisible=False, c2pa=False))


@pytest.fixture(scope="module")
def result(scanner, outputs, reference, tmp_path_factory):
    bad = tmp_path_factory.mktemp("bad") / "truncated.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    files = sorted(outputs.glob("*.jpg")) + sorted(outputs.glob("*.png")) + [bad]
    return audit_paths(scanner, files, sorted(reference.glob("*.jpg")), AuditOptions(max_replication_rate=0.35))


# -- pure parts -------------------------------------------------------------------------------------------


def test_wilson_interval_matches_the_closed_form_and_edges():
    assert wilson_interval(6, 20) == pytest.approx(WILSON_6_OF_20, abs=1e-5)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.16113, abs=1e-5)  # z^2 / (n + z^2)
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    assert Rate.of(0, 0).rate is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_gate_point_vs_upper_bound():
    rate = Rate.of(6, 20)
    assert not evaluate_gate(rate, 0.35, "point").failed  # 0.30 <= 0.35
    assert evaluate_gate(rate, 0.35, "upper").failed  # 0.519 > 0.35
    assert evaluate_gate(rate, 0.25, "point").failed
    assert not evaluate_gate(rate, 0.30, "point").failed  # "exceeds" is strict
    assert evaluate_gate(Rate.of(0, 0), 0.5).failed  # nothing readable: the gate cannot pass
    with pytest.raises(ValueError):
        evaluate_gate(rate, 1.5)


# -- the audit on real photos ---------------------------------------------------------------------------


def test_known_replicas_give_the_rate_and_its_interval(result, indexed):
    assert result.inputs == 21 and result.outputs == 20  # the broken file is listed, not counted
    assert [e["path"].endswith("truncated.png") for e in result.errors] == [True]
    r = result.replication
    assert (r.count, r.total, r.rate) == (REPLICAS, 20, 0.30), result.verdicts
    assert (r.low, r.high) == pytest.approx(WILSON_6_OF_20, abs=1e-5)
    assert result.replica.count + result.exact.count == REPLICAS
    # the top pairs are the replicas, each with the photo it was made from
    made_from = {f"rep{k}": indexed[k].name for k in range(REPLICAS)}
    top = result.top_pairs[:REPLICAS]
    assert {Path(p.path).stem: p.corpus_id for p in top} == made_from
    assert all(p.verdict in ("replica", "exact") and p.score > 0.45 and p.region is None for p in top)
    assert result.gate is not None and not result.gate.failed and result.gate.value == 0.30


def test_reference_distribution_and_false_alarms(result):
    ref = result.reference
    assert ref is not None and ref.images == 30 and ref.exact == 0
    assert ref.false_alarms.count == 0 and ref.false_alarms.high == pytest.approx(0.1135, abs=1e-3)
    assert sum(ref.scores.bins) == 30 and sum(result.scores.bins) == 20
    # the replicas sit above every non-member: 6 of 20 outputs above the reference's 99th percentile
    assert result.reference.outputs_above_reference_p99.count == REPLICAS
    assert result.scores.quantiles["max"] > ref.scores.quantiles["max"]
    assert 0.25 <= ref.ks_statistic <= 1.0


def test_captions_rank_by_replication_with_memorization_beside(result):
    assert result.prompts == 1 and result.outputs_with_prompt == 3  # PNG chunk, two sidecars
    top = result.captions[0]
    assert (top.prompt, top.images, top.replicating) == ("a kitchen", 3, 2)
    assert top.memorization is not None and top.memorization["flag"] is True
    assert result.memorization == {
        "prompts_with_signals": 1,
        "flagged": 1,
        "replicating_prompts": 1,
        "flagged_and_replicating": 1,
    }


def test_json_summary_has_the_fields(result):
    d = json.loads(json.dumps(result.to_dict()))
    assert d["schema_version"] == AUDIT_SCHEMA_VERSION
    assert set(d) >= {
        "index",
        "thresholds",
        "checks",
        "inputs",
        "outputs",
        "errors",
        "verdicts",
        "replication",
        "replica",
        "exact",
        "similar",
        "sscd_above_0_5",
        "scores",
        "reference",
        "top_pairs",
        "captions",
        "memorization",
        "gate",
    }
    assert set(d["replication"]) == {"count", "total", "rate", "low", "high", "confidence"}
    assert d["thresholds"]["replica_sscd"] == 0.45 and len(d["scores"]["bins"]) == 50
    assert d["checks"]["descriptors"] == ["sscd", "pdq"] and d["checks"]["visible"] is False
    assert d["errors"][0]["error_code"] and d["errors"][0]["path"].endswith("truncated.png")
    assert set(d["top_pairs"][0]) >= {"path", "corpus_id", "score", "verdict", "region", "prompt"}
    assert d["gate"]["on"] == "point" and d["gate"]["failed"] is False


def test_html_report_is_self_contained(result, index_dir):
    page = render_audit_html(result, thumbnails=ProvenanceIndex.open(index_dir).thumbnail)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert page.count('class="dist"') == 1 and 'class="ref"' in page  # the histogram with the reference line
    # each top pair shows both images: the output's thumbnail and the corpus item's stored one
    assert page.count("data:image/jpeg;base64,") >= 2 * len(result.top_pairs)
    assert "a kitchen" in page and "flagged" in page and "truncated.png" in page
    assert "30.0%" in page and "14.5%–51.9%" in page


def test_region_is_drawn_on_both_images_when_the_match_has_one(index_dir, indexed):
    @dataclass(frozen=True)
    class RegionMatch(Match):  # what issue 29's matches will carry
        region: dict | None = None

    box = {"query": [0.1, 0.2, 0.6, 0.9], "corpus": [0.0, 0.0, 0.5, 0.5]}
    m = RegionMatch(indexed[0].name, 0.8, "sscd", region=box)
    rec = ScanRecord(
        path=str(indexed[0]),
        sha256="0" * 64,
        verdict="replica",
        matches=[m],
        scores={"sscd": 0.8, "clip": None, "pdq_distance": None},
        watermarks=WatermarkEvidence(),
    )
    res = audit_records([rec], {"replica_sscd": 0.45})
    assert res.top_pairs[0].region == box and region_of(Match("x", 0.5, "sscd")) is None
    page = render_audit_html(res, thumbnails=ProvenanceIndex.open(index_dir).thumbnail)
    assert page.count('<svg class="region"') == 2
    assert '<rect x="0.1000" y="0.2000" width="0.5000" height="0.7000"' in page
    bad = RegionMatch("y", 0.8, "sscd", region={"query": [0.5, 0.5, 0.2, 0.9], "corpus": [0, 0, 1, 1]})
    assert region_of(bad) is None  # an inverted box is not drawn


# -- the command -------------------------------------------------------------------------------------------


def test_cli_gate_exit_codes_point_and_upper(index_dir, outputs, tmp_path):
    html, summary = tmp_path / "audit.html", tmp_path / "audit.json"
    args = ["audit", str(outputs), "--index", str(index_dir), "--max-replication-rate", "0.35"]
    r = runner.invoke(app, [*args, "--output", str(html), "--json", str(summary)])
    assert r.exit_code == EXIT_CLEAN, r.output
    d = json.loads(summary.read_text())
    assert d["replication"]["rate"] == 0.30 and d["reference"] is None and d["gate"]["failed"] is False
    page = html.read_text()
    assert "https://" not in page and "No reference given" in page
    assert d["checks"]["centre_view"] is False and d["checks"]["visible"] is False  # the audit's defaults
    # the scan flags are scan's own: --thorough turns the centre view on (not the invisible crops: marks are off)
    r = runner.invoke(app, [*args, "--gate-on", "upper", "--thorough", "--json", str(summary)])
    assert r.exit_code == EXIT_FAIL_ON, r.output
    assert "upper bound" in r.output
    d = json.loads(summary.read_text())
    assert d["checks"]["centre_view"] is True and d["checks"]["invisible_crops"] is False
    assert d["replication"]["count"] == REPLICAS and d["gate"]["on"] == "upper" and d["gate"]["failed"] is True


def test_cli_usage_errors_and_unreadable_only(index_dir, outputs, tmp_path):
    base = ["audit", str(outputs), "--index", str(index_dir)]
    for extra in (
        ["--gate-on", "median"],
        ["--max-replication-rate", "5"],
        ["--model", "tiny-random"],
        ["--reference", str(tmp_path / "nothing-here")],
        ["--invisible-crops"],  # a way of reading invisible marks, which the audit leaves off
        ["--json", str(tmp_path / "no-such-dir" / "a.json")],
    ):
        r = runner.invoke(app, [*base, *extra])
        assert r.exit_code == EXIT_USAGE, (extra, r.output)
    assert runner.invoke(app, ["audit", "--index", str(index_dir)]).exit_code == EXIT_USAGE
    assert runner.invoke(app, [*base[:2], "--index", str(tmp_path / "no-index")]).exit_code == EXIT_USAGE
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    r = runner.invoke(app, ["audit", str(bad), "--index", str(index_dir), "--max-replication-rate", "0.5"])
    assert r.exit_code == EXIT_UNREADABLE, r.output


@pytest.mark.slow  # importing diffusers and building the tiny pipeline: ~10-30 s on 2 shared cores
def test_cli_from_captions_generates_then_audits_with_prompts(index_dir, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.setenv("PROVENANCE_CACHE_DIR", str(tmp_path / "cache"))  # the tiny tokenizer is built there
    summary = tmp_path / "audit.json"
    r = runner.invoke(
        app,
        [
            "audit",
            "--index",
            str(index_dir),
            "--from-captions",
            "2",
            "--model",
            "tiny-random",
            "--steps",
            "2",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--gen-out",
            str(tmp_path / "gen"),
            "--json",
            str(summary),
            "--max-replication-rate",
            "0.5",
        ],
    )
    assert r.exit_code == EXIT_CLEAN, r.output  # the tiny model outputs noise: nothing replicates
    d = json.loads(summary.read_text())
    assert d["outputs"] == 2 and d["replication"]["count"] == 0 and len(list((tmp_path / "gen").glob("*.png"))) == 2
    captions = {c.strip() for c in ProvenanceIndex.open(index_dir).sample_captions(2, seed=3)}
    assert {c["prompt"] for c in d["captions"]} == captions  # each output's prompt read back from its PNG chunk
    assert all(c["memorization"] is not None for c in d["captions"])


def test_prompts_and_captions_are_escaped():
    evil = '<img src="https://evil.example/x.png" onerror="alert(1)">'
    md = {"provenance": {"prompt": evil, "memorization": None}}
    rec = ScanRecord(
        path="out/<b>.png",
        sha256="0" * 64,
        verdict="replica",
        matches=[Match("item<1>", 0.7, "sscd", caption=evil)],
        scores={"sscd": 0.7, "clip": None, "pdq_distance": None},
        watermarks=WatermarkEvidence(metadata=md),
    )
    page = render_audit_html(audit_records([rec], {"replica_sscd": 0.45}), query_thumbnails=lambda p: None)
    assert '<img src="https://' not in page and "&lt;img src=&quot;https://evil" in page
    assert "item&lt;1&gt;" in page and "out/&lt;b&gt;.png" in page
