"""Region proposals on real photos: an inset's rectangle, a contact sheet's cells, plain photos left alone."""

from __future__ import annotations

import numpy as np
import pytest
from copydet_helpers import contact_sheet, inset, iou
from PIL import Image

from provenance.regions import RegionOptions, find_grid, find_rectangles, propose_regions, region_views


@pytest.fixture(scope="module")
def nonmember_photos(nonmember_dir) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(nonmember_dir.glob("*.jpg"))[:12]]


def test_an_inset_photo_is_found_as_a_rectangle(nonmember_photos):
    query, truth = inset(nonmember_photos[0], nonmember_photos[1], 0.38, (0.35, 0.2))
    boxes = [b for b, _ in find_rectangles(query)]
    assert boxes and max(iou(b, truth) for b in boxes) > 0.75, (truth, boxes[:5])
    assert max(iou(b, truth) for b in propose_regions(query)) > 0.75


@pytest.mark.parametrize("n", [2, 3])
def test_a_contact_sheet_gives_its_cells(nonmember_photos, n):
    cells = find_grid(contact_sheet(nonmember_photos, n))
    assert len(cells) == n * n
    assert cells[0] == (0.0, 0.0, round(1 / n, 4), round(1 / n, 4))
    assert len(propose_regions(contact_sheet(nonmember_photos, n))) == n * n


def test_plain_photos_are_not_contact_sheets(nonmember_photos):
    # a horizon or a table edge may look like one cut (2 cells), never like a 3x3 sheet
    assert all(len(find_grid(p)) <= 4 for p in nonmember_photos)
    assert all(len(propose_regions(p)) <= RegionOptions().max_cells for p in nonmember_photos)


def test_region_views_are_one_batchable_shape(nonmember_photos):
    views = region_views(nonmember_photos[0], [(0, 0, 0.5, 0.5), (0.2, 0.1, 0.9, 0.6)], 160)
    assert [v.shape for v in views] == [(160, 160, 3)] * 2 and views[0].dtype == np.uint8


def test_bad_region_options_are_refused():
    with pytest.raises(ValueError, match="view_side"):
        RegionOptions(view_side=8)
