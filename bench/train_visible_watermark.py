"""Train the small visible-watermark CNN on synthetic overlays of Flickr8k photos (CPU, fixed seeds).

    .venv/bin/python bench/train_visible_watermark.py --out provenance/weights/visible_watermark.pt

reproduces the shipped weights (56 min wall on the shared 2-core machine, 23 + 39 CPU-min); adding
`--generator layered --steps 1300 --min-visibility 0.002` fits ~15 min but gives a weaker model (see
bench/results/visible_watermark.md). Backgrounds: flickr8k-dev shards 00000-00003 (2,000 photos). Overlays:
provenance.watermarks.overlays with the training fonts and strings only (held-out fonts/strings are for
bench/eval_visible_watermark.py). Every example is generated from (seed, index), so a run is reproducible whatever
the number of data workers. One process trains (1 torch thread), one generates examples; each generated batch is
used twice (mirrored the 2nd time), since generating an example costs about as much as two training steps on it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance.watermarks import overlays  # noqa: E402
from provenance.watermarks.visible import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    WatermarkNet,
    WatermarkNetConfig,
    resize_for_model,
    save_checkpoint,
)

logger = logging.getLogger("train_visible_watermark")
DATA = REPO.parent / "shared" / "data"
TRAIN_SHARDS = ("00000", "00001", "00002", "00003")


def read_shards(shard_dir: Path, shards: tuple[str, ...]) -> tuple[list[bytes], list[str]]:
    """JPEG bytes and first captions of every photo in the given webdataset shards, in tar order."""
    from provenance.corpus import read_webdataset

    items = [it for s in shards for it in read_webdataset(str(shard_dir / f"{s}.tar")) if it.data]
    return [it.data for it in items], [it.caption.strip() for it in items if it.caption]


class SyntheticPairs(torch.utils.data.Dataset):
    """Item i: two examples on the same photo from rng(seed, i): a stock watermark, and opaque text (60%) or the
    clean photo (40%). Pairs share the background, so the only evidence that separates them is the overlay.

    generator "canvas": the photo is cropped, upscaled to a 224-768 px canvas and unsharp-masked
    (overlays.random_canvas), marked there (overlays.overlay_example), then resized to the input like any photo.
    generator "layered": overlays are drawn on a 224-768 px canvas and composited, downscaled, onto the untouched
    224 px photo (overlays.layered_example): about twice as cheap, and backgrounds are never upscaled.
    Returns ((2, s, s, 3) uint8, (2,) float32 labels).
    """

    def __init__(
        self,
        photos,
        fonts,
        wm_strings,
        text_strings,
        input_size: int,
        seed: int,
        length: int,
        min_visibility: float,
        generator: str = "canvas",
    ):
        self.photos, self.fonts = photos, fonts
        self.wm_strings, self.text_strings = wm_strings, text_strings
        self.input_size, self.seed, self.length = input_size, seed, length
        self.min_visibility, self.generator = min_visibility, generator

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        photo = Image.open(io.BytesIO(self.photos[int(rng.integers(0, len(self.photos)))])).convert("RGB")
        if self.generator == "canvas":
            background = overlays.random_canvas(photo, rng)
            make = overlays.overlay_example
        else:
            if rng.random() < 0.5:
                photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            background = resize_for_model(photo, self.input_size)
            make = overlays.layered_example
        pair = overlays.overlay_pair(background, rng, self.fonts, self.wm_strings, self.text_strings, make=make,
                                     min_visibility=self.min_visibility)
        # uint8 crosses the process boundary (4x less than float32); the main process normalises
        xs = [np.asarray(resize_for_model(im, self.input_size)) for im in pair]
        return torch.from_numpy(np.stack(xs)), torch.tensor([1.0, 0.0])


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """(n, s, s, 3) uint8 -> (n, 3, s, s) float32, normalised as VisibleWatermarkDetector.preprocess does."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _train(args, dl, model, opt, sched, loss_fn, losses: list, t_start: float) -> None:
    """The training loop; appends the running loss every 100 steps to `losses`."""
    run_loss, run_acc = 0.0, 0.0
    for step, (x, y) in enumerate(dl, start=1):
        # (pairs, 2, s, s, 3) -> (2 * pairs, 3, s, s)
        x = to_model_input(x.flatten(0, 1)).to(args.device).contiguous(memory_format=torch.channels_last)
        y = y.flatten().to(args.device)
        # generating an example costs more than a training step on it: each batch is used `reuse` times,
        # mirrored every other time
        for r in range(args.reuse):
            logits = model(x if r % 2 == 0 else torch.flip(x, dims=[3]))
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        run_loss = 0.98 * run_loss + 0.02 * loss.item() if step > 1 else loss.item()
        run_acc = 0.98 * run_acc + 0.02 * ((logits > 0).float() == y).float().mean().item() if step > 1 else 0.5
        if step % 100 == 0 or step == args.steps:
            losses.append(round(run_loss, 4))
            logger.info(
                "step %d/%d loss %.4f acc %.3f lr %.2e %.0fs",
                step, args.steps, run_loss, run_acc, sched.get_last_lr()[0], time.time() - t_start,
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "provenance" / "weights" / "visible_watermark.pt"))
    ap.add_argument("--data", default=str(DATA / "flickr8k-dev"), help="folder of the flickr8k-dev shards")
    ap.add_argument("--shards", default=",".join(TRAIN_SHARDS), help="training shards (never 00004: held out)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch-size", type=int, default=32, help="examples per step (half as many pairs)")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--reuse", type=int, default=2, help="optimizer steps per generated batch (odd ones mirrored)")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--min-visibility", type=float, default=0.001)
    ap.add_argument("--generator", choices=("canvas", "layered"), default="canvas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the model (the machine is shared)")
    ap.add_argument("--workers", type=int, default=1, help="data-generation processes")
    ap.add_argument("--stem", type=int, default=32)
    ap.add_argument("--stem-patch", type=int, default=4)
    ap.add_argument("--widths", default="64,128,192")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    # 1. Seeds and threads
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    cpu_start = time.process_time()

    # 2. Data: training photos, captions, fonts and strings only
    shards = tuple(s.strip() for s in args.shards.split(",") if s.strip())
    if not shards or not set(shards) <= set(TRAIN_SHARDS):
        ap.error(f"--shards must be among {','.join(TRAIN_SHARDS)} (shard 00004 is the held-out set)")
    photos, captions = read_shards(Path(args.data), shards)
    train_fonts, heldout_fonts = overlays.split_fonts(overlays.find_fonts())
    text_strings = overlays.TextStrings(
        phrases=overlays.TRAIN_TEXT_STRINGS.phrases + tuple(captions), words=overlays.TRAIN_TEXT_STRINGS.words
    )
    logger.info(
        "%d photos, %d captions, %d training fonts (%d held out)",
        len(photos), len(captions), len(train_fonts), len(heldout_fonts),
    )
    if args.batch_size % 2:
        ap.error("--batch-size must be even (examples come in pairs)")
    ds = SyntheticPairs(
        photos,
        train_fonts,
        overlays.TRAIN_WATERMARK_STRINGS,
        text_strings,
        args.input_size,
        args.seed,
        args.steps * args.batch_size // 2,
        args.min_visibility,
        args.generator,
    )
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size // 2,
        shuffle=False,  # example i is already random: it is drawn from rng(seed, i)
        num_workers=args.workers,
        worker_init_fn=_worker_init if args.workers else None,
        prefetch_factor=4 if args.workers else None,
        persistent_workers=False,
    )

    # 3. Model and schedule
    config = WatermarkNetConfig(
        stem=args.stem,
        widths=tuple(int(w) for w in args.widths.split(",")),
        stem_patch=args.stem_patch,
        dropout=args.dropout,
    )
    model = WatermarkNet(config).to(args.device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps * args.reuse, pct_start=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("WatermarkNet %s: %d parameters, input %d", config, n_params, args.input_size)

    # 4. Train
    model.train()
    losses: list[float] = []
    stopped_at = None
    try:
        _train(args, dl, model, opt, sched, loss_fn, losses, t_start)
    except KeyboardInterrupt:
        # a stopped run keeps its weights; the card says where it stopped (its schedule did not finish)
        stopped_at = len(losses) * 100
        logger.warning("interrupted: saving the weights after about %d of %d steps", stopped_at, args.steps)
    run_loss = losses[-1] if losses else float("nan")

    # 5. Save weights and the training card
    # 5. Save weights and the training card
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    # the data workers have exited (persistent_workers=False), so their CPU time is in RUSAGE_CHILDREN
    worker_cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    card = {
        "training_command": "bench/train_visible_watermark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "steps": args.steps,
        "reuse": args.reuse,
        "batch_size": args.batch_size,
        "input_size": args.input_size,
        "lr": args.lr,
        "threads": args.threads,
        "workers": args.workers,
        "parameters": n_params,
        "data": {
            "backgrounds": f"flickr8k-dev shards {', '.join(shards)} ({len(photos)} photos, 224x224)",
            "text_phrases": f"{len(overlays.TRAIN_TEXT_STRINGS.phrases)} built-in + {len(captions)} Flickr8k captions",
            "watermark_strings": "overlays.TRAIN_WATERMARK_STRINGS",
            "fonts": f"{len(train_fonts)} files under /usr/share/fonts, families in HELDOUT_FONT_KEYS excluded",
            "examples": args.steps * args.batch_size,
            "labels": "pairs on one photo: stock watermark + opaque text (60%) or clean (40%)",
            "generator": args.generator,
            "min_visibility": args.min_visibility,
        },
        "final_running_loss": round(run_loss, 4),
        "stopped_at_step": stopped_at,
        "loss_every_100_steps": losses,
        "train_wall_s": round(wall, 1),
        "train_main_process_cpu_s": round(cpu, 1),
        "train_worker_cpu_s": round(worker_cpu, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": str(torch.__version__),
    }
    save_checkpoint(args.out, model.cpu(), args.input_size, card)
    card_path = Path(args.out).with_suffix(".json")
    # the evaluation section is filled by bench/eval_visible_watermark.py for these exact weights
    card_json = {"weights": Path(args.out).name, "training": card, "evaluation": None}
    card_path.write_text(json.dumps(card_json, indent=2) + "\n")
    logger.info(
        "wrote %s (%.1f KB) and %s in %.0f s wall, %.0f s CPU (+ %.0f s in the data worker)",
        args.out, Path(args.out).stat().st_size / 1024, card_path, wall, cpu, worker_cpu,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
