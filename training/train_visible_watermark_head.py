"""Train the visible-watermark head on SSCD's intermediate features (CPU, fixed seeds).

    .venv/bin/python training/train_visible_watermark_head.py --cache /tmp/wm-head-cache \\
        --out provenance/weights/visible_watermark.pt

Step 1, examples (cached under --cache, in chunks of --chunk pairs; a later run with more --pairs reuses them):
pair i comes from rng(seed, i): a Flickr8k-dev photo (shards 00000-00003) on a square canvas of 224-768 px
(overlays.random_canvas, cropped square so every example has one shape), carrying a stock watermark, and the same
canvas with opaque text (60%) or clean (40%) (overlays.overlay_example; training fonts and strings only). Both
run through the int8 SSCD model, whose stride-8 and stride-16 activation maps (descriptors.sscd.FEATURE_TAPS)
are stored as uint8 memory maps. SSCD is frozen: only the head learns, which is what makes training on two CPU
cores feasible. Step 2 trains visible.TapHead on the cached maps and writes the checkpoint and its JSON card.

On the shared 2-core machine the shipped 12,000 pairs took about 20 min to make (~100 s per 1,000 pairs, 8 GB of
cache) and 12 min to train (6 epochs); then run training/eval_visible_watermark.py --seen for the held-out numbers.

The 512 px head (read by `scan --visible-thorough`'s mix) is the shipped one fine-tuned in five stages of 8,000
fresh pairs each, read at 512 px; the second to fifth draw half their pairs on photos at their own 224 px
(--native-share), the first head's weakest held-out set:

    .venv/bin/python training/train_visible_watermark_head.py --cache /tmp/wm512-cache --input-size 512 \
        --init provenance/weights/visible_watermark.pt --seed 5 --pairs 8000 --epochs 3 --lr 3e-4 \
        --out /tmp/stage1.pt
    .venv/bin/python training/train_visible_watermark_head.py --cache /tmp/wm512n-cache --input-size 512 \
        --init /tmp/stage1.pt --seed 6 --native-share 0.5 --pairs 8000 --epochs 3 --lr 3e-4 --out /tmp/stage2.pt
    .venv/bin/python training/train_visible_watermark_head.py --cache /tmp/wm512n7-cache --input-size 512 \
        --init /tmp/stage2.pt --seed 7 --native-share 0.5 --pairs 8000 --epochs 3 --lr 3e-4 --out /tmp/stage3.pt
    .venv/bin/python training/train_visible_watermark_head.py --cache /tmp/wm512n8-cache --input-size 512 \
        --init /tmp/stage3.pt --seed 8 --native-share 0.5 --pairs 8000 --epochs 3 --lr 3e-4 --out /tmp/stage4.pt
    .venv/bin/python training/train_visible_watermark_head.py --cache /tmp/wm512n9-cache --input-size 512 \
        --init /tmp/stage4.pt --seed 9 --native-share 0.5 --pairs 8000 --epochs 3 --lr 3e-4 --out /tmp/stage5.pt

(~140-180 s per 1,000 pairs and 2 GB of cache each, ~12 min of training per stage; each card records its --init's
checksum; the cards' commands name the file each stage then read, the stage before it). Then copy the last stage
to provenance/weights/visible_watermark_512.pt (and its .json) and give it its own gate with --set-flag-threshold.
The mix (provenance/weights/visible_watermark_thorough.json) was chosen on the evaluation's separate draw by a
grid over logit weights (docs/experiments/2026-12-04-visible-head-mixes.md; the one-off scripts were deleted), then
eval_visible_watermark.py --seen --weights provenance/weights/visible_watermark_thorough.json records the held-out
numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from provenance.descriptors.base import file_checksum  # noqa: E402
from provenance.descriptors.sscd import FEATURE_TAPS, SSCD_SHORT_SIDE, SSCDDescriptor, resize_short_side  # noqa: E402
from provenance.watermarks.visible import (  # noqa: E402
    DEFAULT_FLAG_THRESHOLD,
    TapHead,
    TapHeadConfig,
    tap_head_from_checkpoint,
)
from training import overlays  # noqa: E402
from training.eval_visible_watermark import REAL_MARKS, load_real_marks  # noqa: E402
from training.train_visible_watermark import DATA, TRAIN_SHARDS, read_shards  # noqa: E402
from training.visible_checkpoint import save_checkpoint  # noqa: E402

logger = logging.getLogger("train_visible_watermark_head")
TAP_CHANNELS_STRIDES = {"stride8": (512, 8), "stride16": (1024, 16)}


def tap_shape(tap: str, side: int) -> tuple[int, int, int]:
    """(channels, h, w) of one tap's map for a side x side input (SSCD pads odd sizes up: 288 -> 18, 512 -> 32)."""
    channels, stride = TAP_CHANNELS_STRIDES[tap]
    return channels, -(-side // stride), -(-side // stride)


class SquarePairs(torch.utils.data.Dataset):
    """Pair i -> (2, side, side, 3) uint8: [stock watermark, opaque text or clean] on one square canvas, resized to
    the short side SSCD sees (288 px; a 512 px probe asked for 512)."""

    def __init__(
        self,
        photos: list[bytes],
        fonts: list[str],
        seed: int,
        start: int,
        stop: int,
        side: int = SSCD_SHORT_SIDE,
        native_share: float = 0.0,
    ):
        self.photos, self.fonts, self.seed, self.start, self.stop, self.side = photos, fonts, seed, start, stop, side
        self.native_share = native_share

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.start + j])
        photo = Image.open(io.BytesIO(self.photos[int(rng.integers(0, len(self.photos)))])).convert("RGB")
        # the draw for native_share happens only when it is set, so that seeds without it keep their pairs
        if self.native_share and rng.random() < self.native_share:
            canvas = native_square(photo, rng)
        else:
            side = round(float(np.exp(rng.uniform(np.log(224), np.log(768)))))
            canvas = overlays.random_canvas(photo, rng, side)
            canvas = canvas.crop((0, 0, min(canvas.size), min(canvas.size)))
        pair = overlays.overlay_pair(canvas, rng, self.fonts, min_visibility=0.001)  # training strings
        xs = [np.asarray(resize_short_side(im, self.side)) for im in pair]
        return np.stack(xs)


def native_square(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A square crop of `photo` at its own resolution (Flickr8k: 224 px), maybe mirrored: no resize and no
    sharpening, as small web images come. random_canvas always resizes, so its smallest canvases are still
    upscaled crops; marks drawn at a photo's native 224 px were the 512 px head's weakest held-out set."""
    w, h = photo.size
    s = min(w, h)
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    im = photo.crop((x, y, x + s, y + s))
    return im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def _identity(x):
    return x


def make_chunk(
    cache: Path,
    chunk: int,
    size: int,
    seed: int,
    photos,
    fonts,
    sscd: SSCDDescriptor,
    taps: tuple[str, ...],
    workers: int = 1,
    side: int = SSCD_SHORT_SIDE,
    native_share: float = 0.0,
) -> None:
    """Examples of pairs [chunk*size, (chunk+1)*size) -> cache/{tap}_{chunk}.npy (written whole, then renamed)."""
    start, stop = chunk * size, (chunk + 1) * size
    pairs = SquarePairs(photos, fonts, seed, start, stop, side=side, native_share=native_share)
    dl = torch.utils.data.DataLoader(
        pairs, batch_size=None, num_workers=workers, prefetch_factor=8, collate_fn=_identity
    )
    tmp = {t: cache / f"{t}_{chunk}.tmp.npy" for t in taps}
    maps = {t: np.lib.format.open_memmap(tmp[t], "w+", np.uint8, (2 * size, *tap_shape(t, side))) for t in taps}
    t0 = time.time()
    for j, pair in enumerate(dl):
        # SSCD cut after the deepest tap: the same maps as a full pass (tests/test_sscd checks), without its tail
        pair_taps = sscd.tap_maps(list(pair), taps)
        for t in taps:
            maps[t][2 * j : 2 * j + 2] = np.stack([pair_taps[0][t], pair_taps[1][t]])
    for t in taps:
        maps[t].flush()
        del maps[t]
        os.replace(tmp[t], cache / f"{t}_{chunk}.npy")
    logger.info("chunk %d (pairs %d-%d): %.0f s", chunk, start, stop, time.time() - t0)


class CachedRows:
    """The chunks of one tap as one row-indexable array, left memory-mapped: rows are gathered on demand, so the
    page cache holds them once however many trainings read them (24,000 pairs are 16 GB of stride-16 maps)."""

    def __init__(self, chunks: list[np.ndarray]):
        self.chunks = chunks
        self.starts = np.cumsum([0] + [len(c) for c in chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.chunks[0].shape[1:]), dtype=self.chunks[0].dtype)
        for c in np.unique(which):
            sel = which == c
            out[sel] = self.chunks[c][rows[sel] - self.starts[c]]
        return out


def load_cache(cache: Path, chunks: int, taps: tuple[str, ...]) -> dict[str, CachedRows]:
    """All chunks' maps: {tap: (2 * pairs, c, h, w) uint8 rows}; rows alternate label 1, 0."""
    return {t: CachedRows([np.load(cache / f"{t}_{c}.npy", mmap_mode="r") for c in range(chunks)]) for t in taps}


def photo_names(shard_dir: Path, shards: tuple[str, ...]) -> list[str]:
    """ "shard/id.jpg" of every photo read_shards returns, in the same order (the names real_marks.json uses)."""
    return read_shards(shard_dir, shards)[2]


def pair_photos(pairs: int, photos: int, seed: int) -> np.ndarray:
    """The photo index of each pair: the first draw of rng(seed, i), as SquarePairs makes it."""
    return np.array([np.random.default_rng([seed, i]).integers(0, photos) for i in range(pairs)])


def pairs_to_keep(names: list[str], pairs: int, seed: int, exclude: set[str]) -> np.ndarray:
    """Indexes of the pairs whose photo is not in exclude. A photo that already carries a real mark (a
    photographer's signature, a copyright line) makes a wrong negative: its "clean" or opaque-text half has a mark."""
    drop = np.array([n in exclude for n in names], dtype=bool)
    return np.flatnonzero(~drop[pair_photos(pairs, len(names), seed)])


def train(
    maps: dict[str, CachedRows],
    config: TapHeadConfig,
    epochs: int,
    batch_pairs: int,
    lr: float,
    seed: int,
    keep: np.ndarray | None = None,
    init: TapHead | None = None,
) -> tuple[TapHead, list[float]]:
    """keep: indexes of the pairs to train on (default all). init: a trained head to fine-tune (its input scale
    and BatchNorm statistics stay as they are; its weights all train)."""
    torch.manual_seed(seed)
    n = len(next(iter(maps.values())))
    keep = np.arange(n // 2) if keep is None else np.asarray(keep)
    labels = torch.tensor([1.0, 0.0]).repeat(n // 2)
    if init is None:
        head = TapHead(config)
        sample = np.random.default_rng(seed).choice(n, min(n, 1000), replace=False)
        head.set_input_scale({t: m[np.sort(sample)].mean(axis=(0, 2, 3)) for t, m in maps.items()})
    else:
        head = init
    opt = torch.optim.AdamW(head.parameters(), lr, weight_decay=0.05)
    steps_per_epoch = len(keep) // batch_pairs
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(keep)} pairs to train on: fewer than one batch of {batch_pairs}")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    losses = []
    for epoch in range(epochs):
        head.train()
        if init is not None:
            # frozen statistics: a fine-tune on a few thousand pairs keeps the normalisation the head learned on
            # 12,000, as a 512 px probe measured it (there with BatchNorm folded into the convs)
            for m in head.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        order = keep[np.random.default_rng([seed, epoch]).permutation(len(keep))]
        total = 0.0
        for s in range(steps_per_epoch):
            pairs = order[s * batch_pairs : (s + 1) * batch_pairs]
            rows = np.sort(np.concatenate([2 * pairs, 2 * pairs + 1]))  # both halves of each pair together
            x = {t: torch.from_numpy(m[rows]) for t, m in maps.items()}
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(x), labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        losses.append(round(total / steps_per_epoch, 4))
        logger.info("epoch %d: loss %.4f", epoch, losses[-1])
    return head.eval(), losses


def load_head(path: Path) -> tuple[TapHead, dict]:
    """The TapHead in a provenance checkpoint, BatchNorm layers kept, for fine-tuning; and what the new card says
    of it: its file and checksum, and its own training command and init, so a head made in stages carries its
    whole recipe."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("kind") != "sscd-taps":
        raise SystemExit(f"{path}: not a head on SSCD features (kind {ckpt.get('kind')!r})")
    card = ckpt.get("card") or {}
    record = {
        "file": path.name,
        "checksum": file_checksum(str(path)),
        "training_command": card.get("training_command"),
        "init": card.get("init"),
    }
    return tap_head_from_checkpoint(ckpt, path), record


def set_flag_threshold(path: Path, value: float) -> None:
    """Rewrite the flag threshold in a trained checkpoint's card (the .pt, which scans read, and its .json)."""
    if not 0.0 < value < 1.0:
        raise SystemExit(f"--set-flag-threshold {value}: not a probability in (0, 1)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["card"]["flag_threshold"] = value
    torch.save(ckpt, path)
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["training"]["flag_threshold"] = value
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    logger.info("%s now flags at %s", path, value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--cache",
        help="folder for the cached SSCD maps (0.66 GB per 1,000 pairs for stride16 at 288 px, "
        "2 GB at 512 px; 1.3 GB more for stride8); needed to train",
    )
    ap.add_argument("--data", default=str(DATA), help="folder holding flickr8k-dev/")
    ap.add_argument("--pairs", type=int, default=12000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-pairs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--width", type=int, default=TapHeadConfig().width)
    ap.add_argument("--depth", type=int, default=TapHeadConfig().depth, help="3x3 convs per tap")
    ap.add_argument("--taps", default=",".join(TapHeadConfig().taps), help=f"of {','.join(FEATURE_TAPS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes drawing overlays (pair i depends only on the seed and i, not on this)",
    )
    ap.add_argument(
        "--flag-threshold",
        type=float,
        default=DEFAULT_FLAG_THRESHOLD,
        help="p at which scans flag an image (stored in the card); choose it with eval_visible_watermark.py",
    )
    ap.add_argument(
        "--input-size",
        type=int,
        default=SSCD_SHORT_SIDE,
        help="short side (px) the head reads images at: 288 is SSCD's own, so a scan gets the maps from "
        "its SSCD pass; larger sizes keep small marks legible and cost one more SSCD pass per image",
    )
    ap.add_argument(
        "--native-share",
        type=float,
        default=0.0,
        help="share of pairs drawn on a square crop of the photo at its own 224 px instead of a "
        "resized canvas (a cache holds one value: use a fresh --cache for another)",
    )
    ap.add_argument(
        "--init",
        default=None,
        help="a head checkpoint to fine-tune (its architecture; --width/--depth/--taps are ignored)",
    )
    ap.add_argument("--examples-only", action="store_true", help="make the cached examples, do not train")
    ap.add_argument(
        "--set-flag-threshold",
        type=float,
        default=None,
        metavar="P",
        help="do not train: write P as the flag threshold of the checkpoint at --out (the gate "
        "eval_visible_watermark.py --seen suggests), in the .pt and its JSON card",
    )
    ap.add_argument(
        "--exclude-photos",
        default=str(REAL_MARKS),
        help="JSON audit ({'photos': [{'name': 'shard/id.jpg', ...}]}) of photos that already carry a "
        "real mark: their pairs are left out of training ('' keeps all)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.set_flag_threshold is not None:
        set_flag_threshold(Path(args.out), args.set_flag_threshold)
        return 0
    if not args.cache:
        ap.error("--cache is needed to make examples and train")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    chunks = args.pairs // args.chunk
    t0 = time.time()
    sscd = SSCDDescriptor.load(threads=args.threads)
    init, init_record = load_head(Path(args.init)) if args.init else (None, None)
    config = (
        init.config
        if init is not None
        else TapHeadConfig(
            width=args.width,
            taps=tuple(args.taps.split(",")),
            depth=args.depth,
            channels=tuple(TAP_CHANNELS_STRIDES[t][0] for t in args.taps.split(",")),
        )
    )
    missing = [c for c in range(chunks) if not all((cache / f"{t}_{c}.npy").exists() for t in config.taps)]
    if missing:
        photos, _, _ = read_shards(Path(args.data) / "flickr8k-dev", TRAIN_SHARDS)
        fonts, _ = overlays.split_fonts(overlays.find_fonts())
        for c in missing:
            make_chunk(
                cache,
                c,
                args.chunk,
                args.seed,
                photos,
                fonts,
                sscd,
                config.taps,
                args.workers,
                args.input_size,
                args.native_share,
            )
    t_data = time.time() - t0
    if args.examples_only:
        return 0
    exclude = set(load_real_marks(Path(args.exclude_photos))) if args.exclude_photos else set()
    names = photo_names(Path(args.data) / "flickr8k-dev", TRAIN_SHARDS)
    keep = pairs_to_keep(names, chunks * args.chunk, args.seed, exclude)
    listed = len(exclude & set(names))
    logger.info("training on %d of %d pairs (%d training photos excluded)", len(keep), chunks * args.chunk, listed)
    head, losses = train(
        load_cache(cache, chunks, config.taps), config, args.epochs, args.batch_pairs, args.lr, args.seed, keep, init
    )
    card = {
        "training_command": "training/train_visible_watermark_head.py "
        + " ".join(a for a in (argv if argv is not None else sys.argv[1:])),
        "seed": args.seed,
        "pairs": chunks * args.chunk,
        "pairs_trained": len(keep),
        "excluded_photos": {
            "file": Path(args.exclude_photos).name if args.exclude_photos else None,
            "training_photos_listed": listed,
        },
        "epochs": args.epochs,
        "batch_pairs": args.batch_pairs,
        "lr": args.lr,
        "parameters": sum(p.numel() for p in head.parameters()),
        "flag_threshold": args.flag_threshold,
        "input_short_side": args.input_size,
        "init": init_record,
        "backbone": {
            "model": sscd.spec.model_id,
            "checksum": sscd.spec.checksum,
            "taps": list(config.taps),
            "frozen": True,
        },
        "data": {
            "backgrounds": "flickr8k-dev shards 00000-00003 (2000 photos), square canvases 224-768 px",
            "native_share": args.native_share,
            "fonts": "training fonts (overlays.split_fonts), families in HELDOUT_FONT_KEYS excluded",
            "strings": "overlays.TRAIN_WATERMARK_STRINGS, overlays.TRAIN_TEXT_STRINGS",
            "labels": "pairs on one canvas: a stock watermark + opaque text (60%) or clean (40%)",
            "min_visibility": 0.001,
        },
        "loss_per_epoch": losses,
        "examples_wall_s": round(t_data, 1),
        "train_wall_s": round(time.time() - t0 - t_data, 1),
        "machine": platform.machine(),
        "torch": str(torch.__version__),
    }
    save_checkpoint(args.out, head, card=card, backbone=sscd.spec)
    Path(args.out).with_suffix(".json").write_text(
        json.dumps({"weights": Path(args.out).name, "training": card}, indent=2) + "\n"
    )
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
