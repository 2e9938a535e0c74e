"""The offline demo: index the built-in sample corpus, search it, and scan edited copies and marked images."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent / "sample" / "coco-cc"


def add_tiled_watermark(image: Image.Image, text: str, opacity: float = 0.4, angle: float = 30.0) -> Image.Image:
    """`text` in white, rotated by `angle` and tiled over `image` at `opacity`: the commonest stock-photo mark.

    Drawn with Pillow's built-in scalable font, so it needs no system fonts (the detector was trained on marks
    drawn with many typefaces; training/overlays.py draws those)."""
    base = image.convert("RGBA")
    font = ImageFont.load_default(size=max(12, min(base.size) // 12))
    x0, y0, x1, y1 = font.getbbox(text)
    tile = Image.new("RGBA", (int(x1 - x0 + 8), int(y1 - y0 + 8)), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text(
        (4 - x0, 4 - y0),
        text,
        font=font,
        fill=(255, 255, 255, round(255 * opacity)),
        stroke_width=1,
        stroke_fill=(40, 40, 40, round(255 * opacity)),
    )
    tile = tile.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    for j, y in enumerate(range(-tile.height // 2, base.height, tile.height)):
        for x in range(-tile.width // 2 + (tile.width // 2) * (j % 2), base.width, tile.width):
            layer.alpha_composite(tile, (max(0, x), max(0, y)), (max(0, -x), max(0, -y)))
    return Image.alpha_composite(base, layer).convert("RGB")


def make_demo_inputs(out_dir: Path) -> list[Path]:
    """A small batch a model builder might scan: edited copies of corpus photos, a marked image, a novel one."""
    from provenance.watermarks.invisible import embed_provenance_mark

    out_dir.mkdir(parents=True, exist_ok=True)
    photos = sorted(SAMPLE_DIR.glob("*.jpg"))
    a, b, c = (Image.open(photos[i]).convert("RGB") for i in (0, 7, 20))
    paths = []

    w, h = a.size  # a cropped (60% of each side), recompressed copy
    crop = a.crop((int(w * 0.2), int(h * 0.15), int(w * 0.8), int(h * 0.75)))
    paths.append(out_dir / "cropped-copy.jpg")
    crop.save(paths[-1], quality=60)

    edited = ImageEnhance.Contrast(b.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).enhance(1.4)
    ImageDraw.Draw(edited).text((10, 10), "my new artwork", fill=(255, 255, 0))
    paths.append(out_dir / "flipped-contrast-caption.png")
    edited.save(paths[-1])

    # a stock-photo style mark: semi-transparent agency text tiled across the photo
    paths.append(out_dir / "stock-watermarked.jpg")
    add_tiled_watermark(c, "shutterstock", opacity=0.4).save(paths[-1], quality=90)

    novel = Image.new("RGB", (512, 512), (30, 60, 90))
    draw = ImageDraw.Draw(novel)
    for i in range(12):
        draw.ellipse(
            (20 + 35 * i, 40 + 20 * i, 120 + 30 * i, 140 + 25 * i), outline=(250 - 15 * i, 120, 40 + 15 * i), width=6
        )
    novel = novel.filter(ImageFilter.GaussianBlur(1))
    paths.append(out_dir / "novel-generated.png")
    embed_provenance_mark(novel, run_id=0xC0FFEE).save(paths[-1])

    paths.append(out_dir / "corrupt.jpg")
    paths[-1].write_bytes(photos[1].read_bytes()[:2000])  # a truncated download
    return paths


def run_demo(index_dir: Path, report: Path, console: Console) -> None:
    from provenance.images import load_image
    from provenance.indexer import BuildOptions, build
    from provenance.report import write_report
    from provenance.scan import Scanner
    from provenance.search import Searcher

    console.rule("[bold]1. Index the built-in sample corpus")
    console.print(f"corpus: {SAMPLE_DIR} (51 COCO photos, CC BY / CC BY-SA; see ATTRIBUTION.md there)")
    result = build(str(SAMPLE_DIR), index_dir, BuildOptions(descriptors=["sscd", "pdq"], batch_size=16))
    console.print(f"indexed {result.manifest['counts']['indexed']} items into {index_dir} in {result.seconds:.1f}s")
    searcher = Searcher.open(index_dir)
    for name, d in searcher.index.describe()["descriptors"].items():
        plan = d.get("ann") or {}
        console.print(
            f"  {name}: {d['model_id']} dim {d['dim']}, FAISS {plan.get('factory', '-')} "
            f"({plan.get('reason', 'empty index')})"
        )

    console.rule("[bold]2. Search by image: a corpus photo finds itself")
    probe = sorted(SAMPLE_DIR.glob("*.jpg"))[3]
    hits = searcher.search_image(load_image(probe).image, k=3)["sscd"]
    _print_matches(console, f"query {probe.name}", [(h.id, h.score, h.caption) for h in hits])

    console.rule("[bold]3. Search captions (full text), e.g. for a name or a word")
    for words in ("pizza", "skateb*"):
        caps = searcher.search_caption(words, k=3)
        _print_matches(console, f"captions matching {words!r}", [(c.id, c.score, c.caption) for c in caps])

    console.rule("[bold]4. Scan a batch: edited copies, a stock watermark, our own mark, a corrupt file")
    inputs = make_demo_inputs(report.parent / "demo-inputs")
    scanner = Scanner(searcher)
    records = scanner.scan_paths(inputs)
    write_report(records, "table", console.file)
    report.parent.mkdir(parents=True, exist_ok=True)
    write_report(records, "html", report, thumbnails=scanner.index.thumbnail)
    console.print(f"HTML report: {report}")


def _print_matches(console: Console, title: str, rows: list[tuple[str, float, str | None]]) -> None:
    t = Table(title=title)
    t.add_column("id")
    t.add_column("score", justify="right")
    t.add_column("caption")
    for id_, score, cap in rows:
        t.add_row(id_, f"{score:.3f}", (cap or "")[:80])
    console.print(t)
