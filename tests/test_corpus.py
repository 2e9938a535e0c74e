"""Corpus readers on real data: an image folder with metadata.jsonl, img2dataset shards, a HF dataset."""

from __future__ import annotations

import json
import shutil

import pytest

from provenance.corpus import detect_source, read_corpus
from provenance.errors import CorpusError


def test_image_folder_with_metadata_jsonl(coco_dir):
    src = detect_source(str(coco_dir))
    assert src.kind == "folder"
    items = list(read_corpus(src))
    assert len(items) == 51
    first = next(i for i in items if i.id == "000000397133.jpg")
    assert first.caption == "A man is in a kitchen making pizzas."
    assert first.license == "Attribution License"
    assert first.extra["flickr_url"].startswith("http")
    assert len(first.extra["captions"]) == 5
    assert all(i.data and i.error is None for i in items)


def test_folder_ids_are_relative_paths_and_stable(coco_dir, tmp_path):
    root = tmp_path / "corpus"
    (root / "a" / "b").mkdir(parents=True)
    for p in sorted(coco_dir.glob("*.jpg"))[:2]:
        shutil.copy(p, root / "a" / "b" / p.name)
    (root / "metadata.csv").write_text(
        f"file_name,caption,artist\na/b/{sorted(coco_dir.glob('*.jpg'))[0].name},hello world,Jane Doe\n"
    )
    (root / "a" / "missing-listed.jpg").write_text("")  # zero bytes: passed on, the indexer skips it
    ids1 = [i.id for i in read_corpus(detect_source(str(root)))]
    ids2 = [i.id for i in read_corpus(detect_source(str(root)))]
    assert ids1 == ids2 and all("/" in i for i in ids1)
    row = next(i for i in read_corpus(detect_source(str(root))) if i.caption)
    assert row.caption == "hello world" and row.extra["artist"] == "Jane Doe"


def test_metadata_row_without_file_is_reported(coco_dir, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    shutil.copy(sorted(coco_dir.glob("*.jpg"))[0], root / "x.jpg")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.jpg", "caption": "lost"}) + "\n")
    items = {i.id: i for i in read_corpus(detect_source(str(root)))}
    assert items["gone.jpg"].error and items["gone.jpg"].data is None
    assert items["x.jpg"].data


def test_webdataset_shard(flickr_shards_dir):
    src = detect_source(str(flickr_shards_dir / "00001.tar"))
    assert src.kind == "webdataset"
    items = list(read_corpus(src, limit=600))
    assert len(items) == 500  # one shard
    it = items[0]
    assert it.id == "000010000" and it.data[:2] == b"\xff\xd8"
    assert it.caption and it.extra["original_file"].endswith(".jpg") and it.extra["shard"] == "00001.tar"
    assert len({i.id for i in items}) == 500


def test_webdataset_glob_and_limit(flickr_shards_dir):
    items = list(read_corpus(detect_source(str(flickr_shards_dir / "0000[01].tar")), limit=7))
    assert [i.id for i in items] == [f"{n:09d}" for n in range(7)]


def test_truncated_shard_yields_what_it_can(flickr_shards_dir, tmp_path):
    data = (flickr_shards_dir / "00000.tar").read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[: len(data) // 10])
    items = list(read_corpus(detect_source(str(bad))))
    assert 10 < len(items) < 500  # everything before the cut, no exception


def test_hf_dataset_saved_to_disk(coco_dir, tmp_path):
    import datasets

    files = sorted(coco_dir.glob("*.jpg"))[:4]
    ds = datasets.Dataset.from_dict(
        {
            "image": [str(f) for f in files],
            "text": [f"caption {i}" for i in range(4)],
            "uid": [f"u{i}" for i in range(4)],
        }
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(tmp_path / "ds")
    items = list(read_corpus(detect_source(str(tmp_path / "ds"), id_column="uid")))
    assert [i.id for i in items] == ["u0", "u1", "u2", "u3"]
    assert items[2].caption == "caption 2" and items[2].data[:2] == b"\xff\xd8"


def test_hf_url_column_is_refused(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"url": ["https://example.com/a.jpg"], "caption": ["x"]}).save_to_disk(tmp_path / "u")
    with pytest.raises(CorpusError, match="URLs"):
        list(read_corpus(detect_source(str(tmp_path / "u"), image_column="url")))


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="no such"):
        detect_source(str(tmp_path / "nothing-here"))


def test_a_range_of_a_folder_or_dataset_is_that_slice_of_the_whole(coco_dir, tmp_path):
    """The Ray engine's units: items [start, stop) of the reading order, only their images read."""
    import datasets

    from provenance.corpus import count_items, read_corpus_range

    folder = detect_source(str(coco_dir))
    whole = [i.id for i in read_corpus(folder)]
    assert count_items(folder) == len(whole)
    assert [i.id for i in read_corpus_range(folder, 10, 25)] == whole[10:25]
    assert [i.id for i in read_corpus_range(folder, len(whole) - 3, len(whole) + 5)] == whole[-3:]
    files = sorted(coco_dir.glob("*.jpg"))[:5]
    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files], "text": ["c"] * 5})
    ds.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "ds")
    hf = detect_source(str(tmp_path / "ds"))
    assert count_items(hf) == 5
    part = list(read_corpus_range(hf, 2, 4))
    assert [i.id for i in part] == ["train/2", "train/3"]  # ids keep their row numbers
    assert [i.data for i in part] == [i.data for i in list(read_corpus(hf))[2:4]]
