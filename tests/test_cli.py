"""The CLI surface: index build/info, search, scan exit codes and report formats, demo inputs."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from provenance.cli import EXIT_CLEAN, EXIT_FAIL_ON, EXIT_UNREADABLE, EXIT_USAGE, app
from provenance.types import SCAN_SCHEMA_VERSION

runner = CliRunner()


@pytest.fixture(scope="module")
def index_dir(coco_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli") / "idx"
    r = runner.invoke(app, ["index", "build", str(coco_dir), "--index", str(d), "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def edited_copy(coco_dir, tmp_path_factory) -> Path:
    p = sorted(coco_dir.glob("*.jpg"))[17]
    im = Image.open(p).convert("RGB")
    w, h = im.size
    out = tmp_path_factory.mktemp("edited") / "copy.jpg"
    im.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(out, quality=50)
    return out


def test_index_info_json(index_dir):
    r = runner.invoke(app, ["index", "info", str(index_dir), "--json"])
    assert r.exit_code == 0
    m = json.loads(r.stdout)
    assert m["counts"]["indexed"] == 51 and set(m["descriptors"]) == {"sscd", "pdq"}
    r = runner.invoke(app, ["index", "info", str(index_dir)])
    assert "Flat" in r.stdout and "sscd" in r.stdout


def test_index_info_explains_an_ivf_pq_fast_scan_plan(tmp_path):
    # a 3,000-row index under a 4 MiB budget gets the 1M plan's shape: IVF-PQ fast-scan + exact re-rank
    import faiss
    import numpy as np

    from provenance.descriptors.base import DescriptorSpec
    from provenance.store import IndexContents, write_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 512)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    rows = [{"id": f"r{i}", "caption": None} for i in range(len(x))]
    contents = IndexContents(
        rows, {"sscd": x}, {"sscd": DescriptorSpec("sscd", "m", "", 512, "cosine")}, {}, [None] * len(x), []
    )
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # tiny trainings: OpenMP barriers cost more than they save here
    try:
        write_index(
            tmp_path / "idx",
            contents,
            {"source": {"kind": "test", "location": "synthetic"}},
            memory_budget_bytes=4 << 20,
            use_gpu=False,
        )
    finally:
        faiss.omp_set_num_threads(threads)
    r = runner.invoke(app, ["index", "info", str(tmp_path / "idx"), "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)["descriptors"]["sscd"]["ann"]
    assert plan["factory"] == "IVF64(SQfp16),PQ256x4fs" and plan["params"]["rerank_k"] == 100
    assert "fast-scan" in plan["reason"] and "exact cosines" in plan["reason"]
    r = runner.invoke(app, ["index", "info", str(tmp_path / "idx")])
    assert r.exit_code == 0 and "IVF64(SQfp16)" in r.stdout  # folded, not cut with "…"


def test_search_by_image_and_caption_json(index_dir, coco_dir):
    p = sorted(coco_dir.glob("*.jpg"))[5]
    r = runner.invoke(app, ["search", "--index", str(index_dir), "--image", str(p), "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows[0]["id"] == p.name and rows[0]["score"] > 0.99 and {"caption", "source"} <= set(rows[0])
    # PDQ lists only hashes within matching range: the photo itself, not the far (random) neighbours of a hash
    pdq = [r for r in rows if r["descriptor"] == "pdq"]
    assert [r["id"] for r in pdq] == [p.name] and pdq[0]["distance"] == 0
    assert len([r for r in rows if r["descriptor"] == "sscd"]) == 3
    r = runner.invoke(app, ["search", "--index", str(index_dir), "--caption", "pizza", "--json"])
    assert r.exit_code == 0 and all("id" in h for h in json.loads(r.stdout))


def test_search_needs_exactly_one_query(index_dir):
    r = runner.invoke(app, ["search", "--index", str(index_dir)])
    assert r.exit_code == EXIT_USAGE


def test_scan_exit_codes(index_dir, edited_copy, coco_dir, nonmember_dir, tmp_path):
    clean = sorted(nonmember_dir.glob("*.jpg"))[0]
    r = runner.invoke(app, ["scan", str(clean), "--index", str(index_dir), "--format", "jsonl", "--fail-on", "replica"])
    assert r.exit_code == EXIT_CLEAN, r.output
    r = runner.invoke(
        app, ["scan", str(edited_copy), "--index", str(index_dir), "--format", "jsonl", "--fail-on", "replica"]
    )
    assert r.exit_code == EXIT_FAIL_ON
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["verdict"] == "replica" and rec["matches"][0]["id"] == sorted(coco_dir.glob("*.jpg"))[17].name
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    r = runner.invoke(app, ["scan", str(clean), str(bad), "--index", str(index_dir), "--format", "jsonl"])
    assert r.exit_code == EXIT_UNREADABLE
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert [x["verdict"] for x in lines][1] == "error" and lines[0]["verdict"] != "error"
    # every JSONL line carries the record shape's version; a corrupt file its error code beside its message
    assert all(x["schema_version"] == SCAN_SCHEMA_VERSION for x in lines)
    assert lines[1]["error_code"] == "not_an_image" and lines[0]["error_code"] is None
    assert lines[0]["checks"]["visible"] is True and lines[0]["checks"]["centre_view"] is False
    r = runner.invoke(app, ["scan", str(clean), str(bad), "--index", str(index_dir), "--format", "json"])
    report = json.loads(r.stdout)
    assert report["schema_version"] == SCAN_SCHEMA_VERSION and [x["error_code"] for x in report["records"]] == [
        None,
        "not_an_image",
    ]
    r = runner.invoke(app, ["scan", str(clean), "--index", str(index_dir), "--format", "yaml"])
    assert r.exit_code == EXIT_USAGE
    r = runner.invoke(app, ["scan", str(clean), "--index", str(index_dir), "--fail-on", "sometimes"])
    assert r.exit_code == EXIT_USAGE
    r = runner.invoke(app, ["scan", str(clean), "--index", str(tmp_path / "no-index")])
    assert r.exit_code == EXIT_USAGE and "no index" in r.output


def test_scan_centre_view_gates_on_a_photo_shown_small_in_a_screenshot(
    index_dir, coco_dir, tmp_path, window_screenshot
):
    photo = sorted(coco_dir.glob("*.jpg"))[25]
    shot = tmp_path / "shot.jpg"
    window_screenshot(Image.open(photo).convert("RGB"), 0.4).save(shot, quality=85)
    args = ["scan", str(shot), "--index", str(index_dir), "--format", "jsonl", "--fail-on", "replica", "--no-visible"]
    assert runner.invoke(app, args).exit_code == EXIT_CLEAN  # the whole window: the photo is too small to match
    r = runner.invoke(app, [*args, "--centre-view"])
    assert r.exit_code == EXIT_FAIL_ON, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["matches"][0]["id"] == photo.name and rec["extra"]["sscd_view"] == "centre"


def test_scan_takes_other_visible_watermark_weights(index_dir, edited_copy, tmp_path):
    import torch

    from provenance.watermarks.visible import WatermarkNet, WatermarkNetConfig
    from training.visible_checkpoint import save_checkpoint

    torch.manual_seed(0)
    cnn = tmp_path / "cnn.pt"  # a version-1 style pixel CNN, as training/train_visible_watermark.py writes
    save_checkpoint(cnn, WatermarkNet(WatermarkNetConfig(stem=8, widths=(16,))), 64, {})
    args = ["scan", str(edited_copy), "--index", str(index_dir), "--format", "jsonl"]
    shipped = json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    r = runner.invoke(app, [*args, "--visible-model", str(cnn)])
    assert r.exit_code == EXIT_CLEAN, r.output
    other = json.loads(r.stdout.strip().splitlines()[-1])
    assert other["watermarks"]["visible"]["probability"] != shipped["watermarks"]["visible"]["probability"]
    assert other["verdict"] == shipped["verdict"] == "replica"
    r = runner.invoke(app, [*args, "--visible-model", str(tmp_path / "missing.pt")])
    assert r.exit_code == EXIT_USAGE and "missing.pt" in r.output.replace("\n", "")  # named weights must load
    r = runner.invoke(app, [*args, "--laion-watermark-model", str(tmp_path / "laion.pt")])
    assert r.exit_code == EXIT_USAGE and "laion.pt" in r.output.replace("\n", "")
    # --visible-thorough: the shipped head mixed with one tuned at 512 px; the record says which input sizes its p
    # comes from
    assert shipped["watermarks"]["visible"]["input_sizes"] == [288]
    r = runner.invoke(app, [*args, "--visible-thorough"])
    assert r.exit_code == EXIT_CLEAN, r.output
    thorough = json.loads(r.stdout.strip().splitlines()[-1])
    assert thorough["watermarks"]["visible"]["input_sizes"] == [288, 512] and thorough["verdict"] == "replica"
    assert thorough["watermarks"]["visible"]["probability"] != shipped["watermarks"]["visible"]["probability"]
    assert thorough["scores"] == shipped["scores"]  # copy detection is the same scan either way
    for other_model in (["--visible-model", str(cnn)], ["--no-visible"]):  # it picks the weights itself
        r = runner.invoke(app, [*args, "--visible-thorough", *other_model])
        assert r.exit_code == EXIT_USAGE and "invalid scan options: visible_thorough" in r.output.replace("\n", ""), (
            r.output
        )


def test_scan_html_and_csv_reports(index_dir, edited_copy, coco_dir, tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "copy.jpg").write_bytes(edited_copy.read_bytes())
    (folder / "broken.png").write_bytes(b"")
    html = tmp_path / "report.html"
    r = runner.invoke(app, ["scan", str(folder), "--index", str(index_dir), "--format", "html", "--output", str(html)])
    assert r.exit_code == EXIT_UNREADABLE
    page = html.read_text()
    thumbs = re.findall(r'<img[^>]+src="data:image/jpeg;base64,', page)
    assert len(thumbs) >= 2  # the scanned copy and at least its top match, inline
    assert "empty file" in page and not re.search(r'src="https?://', page)
    out_csv = tmp_path / "report.csv"
    runner.invoke(app, ["scan", str(folder), "--index", str(index_dir), "--format", "csv", "--output", str(out_csv)])
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert {r["verdict"] for r in rows} == {"replica", "error"}


def test_build_reports_skips(tmp_path, coco_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(sorted(coco_dir.glob("*.jpg"))[0].read_bytes())
    (src / "b.jpg").write_bytes(b"")
    r = runner.invoke(app, ["index", "build", str(src), "--index", str(tmp_path / "i")])
    text = " ".join(r.output.split())  # rich wraps lines at the terminal width, which long tmp paths reach
    assert r.exit_code == 0 and "1 items indexed" in text and "unreadable" in text


def test_scan_invisible_crops_finds_our_mark_in_a_cropped_generation(index_dir, coco_dir, tmp_path):
    from provenance.watermarks.invisible import embed_provenance_mark

    generated = Image.open(sorted(coco_dir.glob("*.jpg"))[3]).convert("RGB").resize((512, 512))
    cropped = tmp_path / "cropped.jpg"
    embed_provenance_mark(generated, 0xABCD1234).crop((11, 30, 430, 470)).save(cropped, quality=85)
    args = [
        "scan",
        str(cropped),
        "--index",
        str(index_dir),
        "--format",
        "jsonl",
        "--fail-on",
        "watermark",
        "--no-visible",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == EXIT_CLEAN, r.output  # the crop moved the block grid: the plain reading finds nothing
    assert json.loads(r.stdout.strip().splitlines()[-1])["watermarks"]["invisible"] == []
    r = runner.invoke(app, [*args, "--invisible-crops"])
    assert r.exit_code == EXIT_FAIL_ON, r.output
    (mark,) = json.loads(r.stdout.strip().splitlines()[-1])["watermarks"]["invisible"]
    assert mark["scheme"] == "provenance" and mark["payload"] == "abcd1234" and mark["p_value"] <= 1e-6
    r = runner.invoke(app, [*args, "--invisible-crops", "--no-invisible"])
    assert r.exit_code == EXIT_USAGE  # refused by ScanOptions, naming both options
    assert "invisible_crops is a way of running the invisible check" in " ".join(r.output.split())
    # --thorough: the slower checks that do better on real inputs, the crop search among them; the record says so
    r = runner.invoke(app, [*args, "--thorough"])
    assert r.exit_code == EXIT_FAIL_ON, r.output
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["watermarks"]["invisible"] == [mark]
    assert rec["checks"]["invisible_crops"] and rec["checks"]["centre_view"] and not rec["checks"]["visible"]
    assert not rec["checks"]["visible_thorough"]  # the thorough visible mix is not part of --thorough
    assert rec["checks"]["region_search"]  # copies in parts of the image (provenance.regions, provenance.verify)


def test_scan_flags_come_from_the_options_type():
    from provenance.options import ScanOptions

    # every boolean scan option is a flag of `scan` and `serve`, with its description as its help text
    for command in ("scan", "serve"):
        text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output.split())
        for name, f in ScanOptions.model_fields.items():
            if f.annotation is bool:
                assert f"--{name.replace('_', '-')}" in text, (command, name)
        assert " ".join(ScanOptions.model_fields["thorough"].description.split()[:6]) in text
