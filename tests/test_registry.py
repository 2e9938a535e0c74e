"""The do-not-train registry: content opt-outs follow edited copies across indexes, builds skip opted-out items,
`index remove --optouts` takes them out of a built index, scan/search mark them, the audit log is append-only."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from provenance.cli import app
from provenance.errors import InvalidOptoutError, OptoutForbiddenError
from provenance.indexer import BuildOptions, build
from provenance.registry import (
    NewOptout,
    Registry,
    content_print,
    covered_ids,
    normalise_domain,
    normalise_url,
)
from provenance.search import Searcher
from provenance.store import ProvenanceIndex

runner = CliRunner()


def _edit(src: Path, dst: Path, box: int = 20, scale: float = 0.75, quality: int = 70) -> Path:
    """A cropped, downscaled, re-encoded copy: other bytes and pixels, the same photo."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    im = im.crop((w // box, h // box, w - w // box, h - h // box)).resize((int(w * scale), int(h * scale)))
    im.save(dst, "JPEG", quality=quality)
    return dst


@pytest.fixture(scope="module")
def photos(coco_dir) -> list[Path]:
    return sorted(coco_dir.glob("*.jpg"))


@pytest.fixture(scope="module")
def two_indexes(photos, tmp_path_factory):
    """Index A holds photos 0-5 (the shared photo is #3, untouched); index B holds photos 6-11 and an edited copy
    of #3. The artwork is opted out with a third, differently edited copy."""
    root = tmp_path_factory.mktemp("reg")
    fa, fb = root / "a", root / "b"
    fa.mkdir(), fb.mkdir()
    for p in photos[:6]:
        shutil.copy(p, fa / p.name)
    for p in photos[6:12]:
        shutil.copy(p, fb / p.name)
    _edit(photos[3], fb / "edited-copy.jpg")
    opts = BuildOptions(descriptors=["sscd", "pdq"], batch_size=8, thumbnails=False)
    build(str(fa), root / "ia", opts)
    build(str(fb), root / "ib", opts)
    query = _edit(photos[3], root / "claim.jpg", box=10, scale=0.6, quality=60)
    return root, root / "ia", root / "ib", query


def test_normalising():
    assert normalise_url(" HTTPS://Art.Example.COM:443/a/B.jpg?x=1#frag") == "https://art.example.com/a/B.jpg?x=1"
    assert normalise_url("http://example.com:8080") == "http://example.com:8080/"
    assert normalise_domain("*.Example.com.") == "example.com"
    for bad in ("ftp://example.com/a", "not a url", "http:///nohost"):
        with pytest.raises(InvalidOptoutError):
            normalise_url(bad)
    for bad in ("localhost", "https://example.com", "exa mple.com", "-bad.com"):
        with pytest.raises(InvalidOptoutError):
            normalise_domain(bad)


def test_content_optout_covers_edited_copies_in_two_indexes(two_indexes, photos, tmp_path):
    _root, ia, ib, query = two_indexes
    reg = tmp_path / "reg.sqlite"
    r = runner.invoke(
        app,
        [
            "optout",
            "add",
            "--index",
            str(ia),
            "--registry",
            str(reg),
            "--image",
            str(query),
            "--claimant",
            "Jane Artist",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["covered"] == [photos[3].name] and res["optout"]["kind"] == "content"
    assert res["optout"]["ownership"] == "asserted" and res["optout"]["claimant"] == "Jane Artist"
    # the same registry against the other index: its edited copy, and nothing else
    with Registry(reg) as registry:
        assert [item for item in covered_ids(reg, ib)] == ["edited-copy.jpg"]
        assert covered_ids(reg, ia) == [photos[3].name]
        # an unrelated photo of either index is not covered
        s = Searcher.open(ib)
        other = content_print(photos[7].read_bytes(), s)
        assert not registry.reasons(
            [{"id": "x"}], {"sscd": other.sscd[None], "pdq": other.pdq[None]}, other.sscd_model
        )[0]


def test_scan_and_search_mark_opted_out_matches(two_indexes, photos, tmp_path):
    _root, ia, ib, query = two_indexes
    reg = tmp_path / "reg.sqlite"
    with Registry(reg) as registry:
        registry.add(NewOptout("content", content=content_print(query.read_bytes(), Searcher.open(ia))))
        registry.add(NewOptout("id", photos[1].name, claimant="owner of #1"))
    r = runner.invoke(app, ["scan", str(photos[3]), "--index", str(ib), "--registry", str(reg), "-f", "json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["records"][0]
    top = rec["matches"][0]
    assert top["id"] == "edited-copy.jpg" and top["opted_out"]["by"] == "content"
    assert top["opted_out"]["verdict"] in ("exact", "replica")
    assert all("opted_out" not in m for m in rec["matches"][1:])  # unrelated neighbours carry nothing
    r = runner.invoke(
        app, ["search", "--index", str(ia), "--image", str(photos[1]), "--registry", str(reg), "--json", "-k", "3"]
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows[0]["id"] == photos[1].name and rows[0]["opted_out"]["by"] == "id"
    assert rows[0]["opted_out"]["claimant"] == "owner of #1"
    for row in rows:  # photo #3 is in this index too: covered by the content opt-out; nothing else is covered
        assert (row.get("opted_out") or {}).get("by") == {photos[1].name: "id", photos[3].name: "content"}.get(
            row["id"]
        )
    # without the registry, no key at all (the contract is unchanged)
    r = runner.invoke(app, ["search", "--index", str(ia), "--image", str(photos[1]), "--json", "-k", "3"])
    assert all("opted_out" not in row for row in json.loads(r.stdout))


def test_append_after_an_optout_skips_the_item(two_indexes, photos, tmp_path):
    root, ia, _, _ = two_indexes
    folder, idx = tmp_path / "f", tmp_path / "idx"
    shutil.copytree(root / "a", folder)
    shutil.copytree(ia, idx)
    reg = tmp_path / "reg.sqlite"
    newcomer = photos[20]  # opted out (by an edited copy) before it is ever indexed
    claim = _edit(newcomer, tmp_path / "claim.jpg", box=12, scale=0.7)
    r = runner.invoke(app, ["optout", "add", "--index", str(idx), "--registry", str(reg), "--image", str(claim)])
    assert r.exit_code == 0 and "covers 0 indexed item(s)" in " ".join(r.output.split()), r.output
    for p in (newcomer, photos[21]):
        shutil.copy(p, folder / p.name)
    r = runner.invoke(
        app,
        ["index", "build", str(folder), "--index", str(idx), "--append", "--respect-optouts", "--registry", str(reg)],
    )
    assert r.exit_code == 0, r.output
    index = ProvenanceIndex.open(idx)
    assert index.find(photos[21].name) is not None and index.find(newcomer.name) is None
    c = index.describe()["counts"]
    assert c["indexed"] == 7 and c["skipped_by_reason"] == {"opted_out": 1}
    skip = [s for s in index.skipped() if s["reason_kind"] == "opted_out"]
    assert skip[0]["id"] == newcomer.name and '"by": "content"' in skip[0]["reason"]
    assert (
        "--registry"
        in runner.invoke(app, ["index", "build", str(folder), "--index", str(idx), "--respect-optouts"]).output
    )


def _shard(path: Path, photos: list[Path], urls: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, (p, url) in enumerate(zip(photos, urls, strict=False)):
            for name, data in (
                (f"{i:04d}.jpg", p.read_bytes()),
                (f"{i:04d}.json", json.dumps({"url": url, "caption": p.stem}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_id_url_domain_optouts_in_build_and_removal(photos, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    urls = [
        "https://art.example.com/gallery/a.jpg",
        "https://other.org/b.jpg",
        "https://other.org/c.jpg",
        "https://fine.net/d.jpg",
        "https://fine.net/e.jpg",
    ]
    _shard(shards / "00000.tar", photos[30:35], urls)
    reg = tmp_path / "reg.sqlite"
    with Registry(reg) as registry:
        registry.add_many(
            [NewOptout("domain", "Example.COM"), NewOptout("url", "HTTPS://other.org/b.jpg#x"), NewOptout("id", "0004")]
        )
    # a built index: remove what the registry covers
    idx = tmp_path / "idx"
    build(str(shards), idx, BuildOptions(descriptors=["sscd", "pdq"], thumbnails=False))
    r = runner.invoke(app, ["index", "remove", "--index", str(idx), "--optouts", str(reg)])
    assert r.exit_code == 0, r.output
    index = ProvenanceIndex.open(idx)
    assert sorted(index.ids) == ["0002", "0003"]
    assert all(m.id in ("0002", "0003") for m in index.search_vectors("pdq", index.vectors("pdq")[:1], 10)[0])
    # a fresh build that respects them skips the same three, by id, URL and (sub)domain
    idx2 = tmp_path / "idx2"
    res = build(str(shards), idx2, BuildOptions(descriptors=["sscd", "pdq"], thumbnails=False, registry=reg))
    assert res.skipped == 3 and res.manifest["counts"]["skipped_by_reason"] == {"opted_out": 3}
    by = {s["id"]: json.loads(s["reason"].split(": ", 1)[1])["by"] for s in ProvenanceIndex.open(idx2).skipped()}
    assert by == {"0000": "domain", "0001": "url", "0004": "id"}
    # the img2dataset blocklist: one URL a line, the index's covered sources included
    r = runner.invoke(app, ["optout", "export", "--registry", str(reg), "--format", "urls", "--index", str(idx2)])
    assert r.exit_code == 0 and r.stdout.splitlines() == ["https://other.org/b.jpg"]
    r = runner.invoke(app, ["optout", "export", "--registry", str(reg), "--format", "urls", "--index", str(idx)])
    assert r.stdout.splitlines() == ["https://other.org/b.jpg"]  # removed items are not listed
    out = tmp_path / "o.parquet"
    r = runner.invoke(app, ["optout", "export", "--registry", str(reg), "-f", "parquet", "-o", str(out)])
    import pyarrow.parquet as pq

    assert r.exit_code == 0 and sorted(pq.read_table(out).column("kind").to_pylist()) == ["domain", "id", "url"]


def test_audit_log_is_append_only_and_removal_is_owned(tmp_path):
    reg = Registry(tmp_path / "reg.sqlite")
    a = reg.add(NewOptout("url", "https://example.com/a.jpg", claimant="A"), key="k_alice")
    same = reg.add(NewOptout("url", "https://EXAMPLE.com/a.jpg"), key="k_bob")
    assert same.id == a.id and same.key_id == "k_alice"  # already registered: no second row, no audit line
    with pytest.raises(OptoutForbiddenError):
        reg.remove(a.id, key="k_bob")
    reg.remove(a.id, key="k_alice")
    b = reg.add(NewOptout("id", "x"), key="k_bob")
    reg.remove(b.id, key="k_admin", admin=True)
    log = reg.audit_log()
    assert [(e["action"], e["key_id"]) for e in reversed(log)] == [
        ("add", "k_alice"),
        ("remove", "k_alice"),
        ("add", "k_bob"),
        ("remove", "k_admin"),
    ]
    assert log[0]["detail"] == {"admin": True}
    db = sqlite3.connect(tmp_path / "reg.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit SET key_id = 'someone else'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM audit")
    db.rollback()
    db.close()
    # a batch with one bad value writes nothing
    with pytest.raises(InvalidOptoutError):
        reg.add_many([NewOptout("url", "https://fine.example/x.jpg"), NewOptout("domain", "not a domain")])
    assert reg.count() == 0 and len(reg.audit_log()) == 4
    r = runner.invoke(app, ["optout", "list", "--registry", str(tmp_path / "reg.sqlite"), "--audit", "--json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 4, r.output


def test_respecting_build_skips_files_whose_signals_reserve_training(photos, tmp_path):
    """A file's own IPTC/PLUS XMP `DMI-PROHIBITED-AIMLTRAINING` is a reservation: skipped as opted_out."""
    folder = tmp_path / "f"
    folder.mkdir()
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description rdf:about="" xmlns:plus="http://ns.useplus.org/ldf/xmp/1.0/" plus:DataMining='
        b'"http://ns.useplus.org/ldf/vocab/DMI-PROHIBITED-AIMLTRAINING"/></rdf:RDF></x:xmpmeta>'
    )
    Image.open(photos[40]).convert("RGB").save(folder / "reserved.jpg", "JPEG", xmp=xmp)
    shutil.copy(photos[41], folder / photos[41].name)
    Registry(tmp_path / "empty.sqlite").close()
    res = build(
        str(folder),
        tmp_path / "idx",
        BuildOptions(descriptors=["pdq"], thumbnails=False, registry=tmp_path / "empty.sqlite"),
    )
    assert res.manifest["counts"]["skipped_by_reason"] == {"opted_out": 1}
    skip = ProvenanceIndex.open(tmp_path / "idx").skipped()[0]
    assert skip["id"] == "reserved.jpg" and '"by": "consent_signal"' in skip["reason"]
    assert "iptc-plus" in skip["reason"]
