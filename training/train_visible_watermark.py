"""Train the visible-watermark pixel CNN on synthetic overlays of Flickr8k photos (fixed seeds; CPU or a GPU).

    .venv/bin/python training/train_visible_watermark.py --exclude-photos '' --out /tmp/cnn.pt

reproduces the former detector's weights (the pixel CNN shipped until 2026-11-27, before the audit of photos with
real marks, which the trainer now leaves out by default; 56 min wall on the shared 2-core machine, 23 + 39 CPU-min);
adding `--generator layered --steps 1300 --min-visibility 0.002` fits ~15 min but gives a weaker model (see
bench/results/visible_watermark.md). Backgrounds: flickr8k-dev shards 00000-00003 (2,000 photos). Overlays:
training/overlays.py with the training fonts and strings only (held-out fonts/strings are for
training/eval_visible_watermark.py). Every example is generated from (seed, index), so a run is reproducible whatever
the number of data workers. One process trains (1 torch thread), one generates examples; each generated batch is
used twice (mirrored the 2nd time), since generating an example costs about as much as two training steps on it.

On a GPU machine (a one-off GPU script, since deleted): the photos and the training fonts travel as a pack made here
(`--pack DIR`: photos re-encoded at JPEG quality 88 and fonts subset to the characters the overlays draw, so that both
fit the machine's 64 MiB carry), examples come from many data workers, the model trains in bf16 autocast, and
`--fill-minutes M` sets --steps from a data-rate probe so the run fits M minutes. `--also-arch` trains more
architectures on the same batches (each its own optimizer), to choose between them on the evaluation's seen draw.
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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance.watermarks.visible import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    WatermarkNet,
    WatermarkNetConfig,
    resize_for_model,
)
from training import overlays  # noqa: E402
from training.visible_checkpoint import save_checkpoint  # noqa: E402

logger = logging.getLogger("train_visible_watermark")
DATA = REPO.parent / "shared" / "data"
TRAIN_SHARDS = ("00000", "00001", "00002", "00003")
REAL_MARKS = REPO / "training" / "data" / "real_marks.json"
# what the overlays can draw (strings, captions, ids, years, symbols): a font subset for the GPU pack keeps these
PACK_UNICODES = (
    *range(0x20, 0x250),
    *range(0x2000, 0x2070),
    *range(0x20A0, 0x20D0),
    *range(0x2100, 0x2150),
    *range(0x2190, 0x2200),
    *range(0x25A0, 0x2600),
)


def photo_name(shard: str, item_id: str) -> str:
    """A training photo's name as real_marks.json writes it: "shard/id.jpg"."""
    return f"{shard}/{item_id}.jpg"


def read_shards(
    shard_dir: Path, shards: tuple[str, ...], exclude: set[str] = frozenset()
) -> tuple[list[bytes], list[str], list[str]]:
    """JPEG bytes, first captions and names ("shard/id.jpg", as real_marks.json names them) of every photo in the
    given webdataset shards, in tar order, without the photos named in `exclude`. A photo that already carries a
    real mark (a photographer's signature, a copyright line) would make a wrong negative."""
    from provenance.corpus import read_webdataset

    photos, captions, names = [], [], []
    for s in shards:
        for it in read_webdataset(str(shard_dir / f"{s}.tar")):
            name = photo_name(s, it.id)
            if it.data and name not in exclude:
                photos.append(it.data)
                names.append(name)
                if it.caption:
                    captions.append(it.caption.strip())
    return photos, captions, names


def pack_for_gpu(
    out: Path,
    shard_dir: Path,
    shards: tuple[str, ...],
    exclude: set[str],
    fonts: list[str],
    font_root: str,
    quality: int = 88,
) -> dict:
    """Write the training photos (re-encoded at `quality`) as webdataset shards of the same names, and the training
    fonts subset to PACK_UNICODES under their paths relative to `font_root` (so that find_fonts/split_fonts pick
    the same faces in the same order), into `out`: what a GPU machine needs and can carry."""
    import tarfile

    from fontTools import subset

    from provenance.corpus import read_webdataset

    (out / "flickr8k-dev").mkdir(parents=True, exist_ok=True)
    n_photos = 0
    for s in shards:
        with tarfile.open(out / "flickr8k-dev" / f"{s}.tar", "w") as tar:
            for it in read_webdataset(str(shard_dir / f"{s}.tar")):
                if not it.data or photo_name(s, it.id) in exclude:
                    continue
                buf = io.BytesIO()
                Image.open(io.BytesIO(it.data)).convert("RGB").save(buf, "JPEG", quality=quality)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", (it.caption or "").encode())):
                    info = tarfile.TarInfo(f"{it.id}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                n_photos += 1
    options = subset.Options()
    options.layout_features = ["*"]
    options.name_IDs = ["*"]
    options.notdef_outline = True
    for f in fonts:
        target = out / "fonts" / Path(f).relative_to(font_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        font = subset.load_font(f, options)
        subsetter = subset.Subsetter(options)
        subsetter.populate(unicodes=PACK_UNICODES)
        subsetter.subset(font)
        subset.save_font(font, str(target), options)
    return {"photos": n_photos, "fonts": len(fonts), "jpeg_quality": quality}


class SyntheticPairs(torch.utils.data.Dataset):
    """Item i: two examples on the same photo from rng(seed, i): a stock watermark, and opaque text (60%) or the
    clean photo (40%). Pairs share the background, so the only evidence that separates them is the overlay.

    generator "canvas": the photo is cropped, upscaled to a 224-768 px canvas and unsharp-masked
    (overlays.random_canvas), marked there (overlays.overlay_example), then resized to the input like any photo.
    generator "layered": overlays are drawn on a 224-768 px canvas and composited, downscaled, onto the untouched
    224 px photo (overlays.layered_example): about twice as cheap, and backgrounds are never upscaled.
    generator "mixed": each pair is one or the other (even odds).
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
        generator = self.generator
        if generator == "mixed":  # half canvases, half the untouched photo at its own 224 px
            generator = "canvas" if rng.random() < 0.5 else "layered"
        if generator == "canvas":
            background = overlays.random_canvas(photo, rng)
            make = overlays.overlay_example
        else:
            if rng.random() < 0.5:
                photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            background = resize_for_model(photo, self.input_size)
            make = overlays.layered_example
        pair = overlays.overlay_pair(
            background,
            rng,
            self.fonts,
            self.wm_strings,
            self.text_strings,
            make=make,
            min_visibility=self.min_visibility,
        )
        # uint8 crosses the process boundary (4x less than float32); the training process normalises
        xs = [np.asarray(resize_for_model(im, self.input_size)) for im in pair]
        return torch.from_numpy(np.stack(xs)), torch.tensor([1.0, 0.0])


def to_model_input(x: torch.Tensor) -> torch.Tensor:
    """(n, s, s, 3) uint8 -> (n, 3, s, s) float32 on x's device, normalised as VisibleWatermarkDetector.preprocess
    does."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def parse_arch(spec: str) -> WatermarkNetConfig:
    """ "STEM:W1,W2,..." (a 4 x 4 patchify stem) -> a WatermarkNetConfig."""
    stem, _, widths = spec.partition(":")
    return WatermarkNetConfig(
        stem=int(stem), widths=tuple(int(w) for w in widths.split(",")), stem_patch=4, dropout=0.1
    )


def probe_data_rate(ds, args, seconds: float) -> float:
    """Pairs per second the data workers make (after their start-up), measured on items past the training range."""
    probe = torch.utils.data.Subset(ds, range(len(ds) - 100_000, len(ds)))
    dl = torch.utils.data.DataLoader(
        probe,
        batch_size=args.loader_pairs,
        num_workers=args.workers,
        worker_init_fn=_worker_init if args.workers else None,
    )
    t0, n, started = time.time(), 0, None
    for x, _ in dl:
        if started is None:  # the first batch pays the workers' start-up
            started, n = time.time(), 0
            continue
        n += x.shape[0]
        if time.time() - started >= seconds:
            break
    return n / max(time.time() - (started or t0), 1e-6)


def probe_step_seconds(configs: list[WatermarkNetConfig], args) -> float:
    """Seconds one training step (every architecture, --reuse passes each) takes on a random batch, on throwaway
    models."""
    use_amp = args.amp and str(args.device).startswith("cuda")
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=args.device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.arange(args.batch_size, device=args.device) % 2).float()
    models = [WatermarkNet(c).to(args.device).to(memory_format=torch.channels_last).train() for c in configs]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4) for m in models]

    def step():
        for m, opt in zip(models, opts, strict=False):
            for _ in range(args.reuse):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x).float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (kernel choice)
    t0 = time.time()
    for _ in range(3):
        step()
    return (time.time() - t0) / 3


class Trainee:
    """One architecture being trained: its model, optimizer, schedule and running stats."""

    def __init__(self, config: WatermarkNetConfig, out: str, args):
        self.config, self.out = config, out
        self.model = WatermarkNet(config).to(args.device).to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=1e-4)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=args.lr, total_steps=args.steps * args.reuse, pct_start=0.1
        )
        self.losses: list[float] = []
        self.run_loss, self.run_acc = 0.0, 0.5
        self.parameters = sum(p.numel() for p in self.model.parameters())


def _batches(dl, loader_batches_per_step: int):
    """Concatenate `loader_batches_per_step` loader batches into one step (small loader batches keep the shared
    memory between the data workers and the trainer small)."""
    xs, ys = [], []
    for x, y in dl:
        xs.append(x)
        ys.append(y)
        if len(xs) == loader_batches_per_step:
            yield torch.cat(xs), torch.cat(ys)
            xs, ys = [], []
    if xs:
        yield torch.cat(xs), torch.cat(ys)


def _train(args, dl, trainees: list[Trainee], loss_fn, t_start: float) -> int:
    """The training loop; returns the number of steps done. Every 100 steps each trainee's running loss is kept,
    and every --save-every steps its weights are saved (a run stopped by a machine's time limit keeps them)."""
    use_amp = args.amp and str(args.device).startswith("cuda")
    done = 0
    for step, (x, y) in enumerate(_batches(dl, args.batch_size // 2 // args.loader_pairs), start=1):
        # (pairs, 2, s, s, 3) uint8 -> (2 * pairs, 3, s, s): moved as uint8, normalised on the device
        x = x.flatten(0, 1).to(args.device, non_blocking=True)
        x = to_model_input(x).contiguous(memory_format=torch.channels_last)
        y = y.flatten().to(args.device)
        for t in trainees:
            # generating an example costs more than a training step on it: each batch is used `reuse` times,
            # mirrored every other time
            for r in range(args.reuse):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = t.model(x if r % 2 == 0 else torch.flip(x, dims=[3])).float()
                loss = loss_fn(logits, y)
                t.opt.zero_grad(set_to_none=True)
                loss.backward()
                t.opt.step()
                t.sched.step()
            acc = ((logits > 0).float() == y).float().mean().item()
            t.run_loss = 0.98 * t.run_loss + 0.02 * loss.item() if step > 1 else loss.item()
            t.run_acc = 0.98 * t.run_acc + 0.02 * acc if step > 1 else acc
        done = step
        if step % 100 == 0 or step == args.steps:
            for i, t in enumerate(trainees):
                t.losses.append(round(t.run_loss, 4))
                logger.info(
                    "[%d] step %d/%d loss %.4f acc %.3f lr %.2e %.0fs",
                    i,
                    step,
                    args.steps,
                    t.run_loss,
                    t.run_acc,
                    t.sched.get_last_lr()[0],
                    time.time() - t_start,
                )
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            for t in trainees:
                save_checkpoint(t.out, t.model, args.input_size, {"partial": True, "steps_done": step})
        if args.max_minutes and time.time() - t_start > 60 * args.max_minutes:
            logger.warning(
                "--max-minutes %.1f reached after %d of %d steps: stopping", args.max_minutes, step, args.steps
            )
            break
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "provenance" / "weights" / "visible_watermark.pt"))
    ap.add_argument("--data", default=str(DATA / "flickr8k-dev"), help="folder of the flickr8k-dev shards")
    ap.add_argument("--shards", default=",".join(TRAIN_SHARDS), help="training shards (never 00004: held out)")
    ap.add_argument("--fonts", default=overlays.FONT_ROOT, help="font folder (a --pack's fonts/ on a GPU machine)")
    ap.add_argument(
        "--exclude-photos",
        default=str(REAL_MARKS),
        help="JSON list of photos that already carry a real mark, left out ('' keeps all)",
    )
    ap.add_argument("--pack", type=Path, help="write the photos and fonts a GPU machine needs here, then exit")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument(
        "--fill-minutes",
        type=float,
        default=0.0,
        help="set --steps from a 20 s data-rate probe so that training takes about this long",
    )
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop (and save) after this long, whatever --steps")
    ap.add_argument("--save-every", type=int, default=0, help="save the weights every N steps (0: at the end only)")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per step (half as many pairs)")
    ap.add_argument(
        "--loader-pairs",
        type=int,
        default=0,
        help="pairs per data-worker batch (default: the whole step's); a step joins several",
    )
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--reuse", type=int, default=2, help="optimizer steps per generated batch (odd ones mirrored)")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--min-visibility", type=float, default=0.001)
    ap.add_argument("--generator", choices=("canvas", "layered", "mixed"), default="canvas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the model (the machine is shared)")
    ap.add_argument("--workers", type=int, default=1, help="data-generation processes")
    ap.add_argument("--stem", type=int, default=32)
    ap.add_argument("--stem-patch", type=int, default=4)
    ap.add_argument("--widths", default="64,128,192")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument(
        "--also-arch",
        action="append",
        default=[],
        metavar="STEM:WIDTHS=OUT",
        help="also train this architecture (4 x 4 patchify stem) on the same batches, saved to OUT",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    # 1. Seeds and threads
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    t_start = time.time()
    cpu_start = time.process_time()

    # 2. Data: training photos (those with a real mark left out), captions, fonts and strings only
    shards = tuple(s.strip() for s in args.shards.split(",") if s.strip())
    if not shards or not set(shards) <= set(TRAIN_SHARDS):
        ap.error(f"--shards must be among {','.join(TRAIN_SHARDS)} (shard 00004 is the held-out set)")
    exclude = set()
    if args.exclude_photos:
        exclude = {e["name"] for e in json.loads(Path(args.exclude_photos).read_text())["photos"]}
    train_fonts, heldout_fonts = overlays.split_fonts(overlays.find_fonts(args.fonts))
    if not train_fonts:
        ap.error(f"--fonts {args.fonts}: no training fonts there")
    if args.pack:
        info = pack_for_gpu(args.pack, Path(args.data), shards, exclude, train_fonts, args.fonts)
        logger.info("packed %s into %s", info, args.pack)
        return 0
    photos, captions, _names = read_shards(Path(args.data), shards, exclude)
    text_strings = overlays.TextStrings(
        phrases=overlays.TRAIN_TEXT_STRINGS.phrases + tuple(captions), words=overlays.TRAIN_TEXT_STRINGS.words
    )
    logger.info(
        "%d photos (%d with a real mark left out), %d captions, %d training fonts (%d held out)",
        len(photos),
        sum(n.split("/")[0] in shards for n in exclude),
        len(captions),
        len(train_fonts),
        len(heldout_fonts),
    )
    if args.batch_size % 2:
        ap.error("--batch-size must be even (examples come in pairs)")
    args.loader_pairs = args.loader_pairs or args.batch_size // 2
    if (args.batch_size // 2) % args.loader_pairs:
        ap.error("--loader-pairs must divide the pairs per step (--batch-size / 2)")

    def make_dataset(steps: int) -> SyntheticPairs:
        return SyntheticPairs(
            photos,
            train_fonts,
            overlays.TRAIN_WATERMARK_STRINGS,
            text_strings,
            args.input_size,
            args.seed,
            steps * args.batch_size // 2 + 100_000,
            args.min_visibility,
            args.generator,
        )

    main_config = WatermarkNetConfig(
        stem=args.stem,
        widths=tuple(int(w) for w in args.widths.split(",")),
        stem_patch=args.stem_patch,
        dropout=args.dropout,
    )
    archs = [(main_config, args.out)] + [(parse_arch(a.partition("=")[0]), a.partition("=")[2]) for a in args.also_arch]
    if any(not out for _, out in archs):
        ap.error("--also-arch needs STEM:WIDTHS=OUT")
    probe = None
    if args.fill_minutes:
        # the slower of making examples and training on them sets the pace
        data_rate = probe_data_rate(make_dataset(args.steps), args, 20.0)
        step_s = probe_step_seconds([c for c, _ in archs], args)
        rate = min(data_rate, (args.batch_size // 2) / step_s)
        args.steps = max(10, int(rate * 60 * args.fill_minutes / (args.batch_size // 2)))
        probe = {
            "data_pairs_per_s": round(data_rate, 1),
            "train_step_s": round(step_s, 4),
            "fill_minutes": args.fill_minutes,
            "steps": args.steps,
        }
        logger.info(
            "probe: data %.1f pairs/s, a training step %.3f s -> --steps %d for %.1f minutes",
            data_rate,
            step_s,
            args.steps,
            args.fill_minutes,
        )
    ds = torch.utils.data.Subset(make_dataset(args.steps), range(args.steps * args.batch_size // 2))
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=args.loader_pairs,
        shuffle=False,  # example i is already random: it is drawn from rng(seed, i)
        num_workers=args.workers,
        worker_init_fn=_worker_init if args.workers else None,
        prefetch_factor=4 if args.workers else None,
        persistent_workers=False,
        pin_memory=str(args.device).startswith("cuda"),
    )

    # 3. Models and schedules
    trainees = [Trainee(config, out, args) for config, out in archs]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for t in trainees:
        logger.info("WatermarkNet %s: %d parameters, input %d -> %s", t.config, t.parameters, args.input_size, t.out)

    # 4. Train
    for t in trainees:
        t.model.train()
    stopped_at = None
    try:
        done = _train(args, dl, trainees, loss_fn, t_start)
        if done < args.steps:
            stopped_at = done
    except KeyboardInterrupt:
        # a stopped run keeps its weights; the card says where it stopped (its schedule did not finish)
        stopped_at = len(trainees[0].losses) * 100
        logger.warning("interrupted: saving the weights after about %d of %d steps", stopped_at, args.steps)

    # 5. Save weights and the training cards
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    # the data workers have exited (persistent_workers=False), so their CPU time is in RUSAGE_CHILDREN
    worker_cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    for t in trainees:
        card = {
            "training_command": "training/train_visible_watermark.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "architecture": asdict(t.config),
            "seed": args.seed,
            "steps": args.steps,
            "steps_probe": probe,
            "reuse": args.reuse,
            "batch_size": args.batch_size,
            "input_size": args.input_size,
            "lr": args.lr,
            "amp_bf16": bool(args.amp and str(args.device).startswith("cuda")),
            "threads": args.threads,
            "workers": args.workers,
            "parameters": t.parameters,
            "data": {
                "backgrounds": f"flickr8k-dev shards {', '.join(shards)} ({len(photos)} photos, 224x224; "
                f"photos listed in {Path(args.exclude_photos).name if args.exclude_photos else '-'} "
                "left out)",
                "text_phrases": f"{len(overlays.TRAIN_TEXT_STRINGS.phrases)} built-in + {len(captions)} Flickr8k captions",
                "watermark_strings": "overlays.TRAIN_WATERMARK_STRINGS",
                "fonts": f"{len(train_fonts)} files under {args.fonts}, families in HELDOUT_FONT_KEYS excluded",
                "examples": args.steps * args.batch_size,
                "labels": "pairs on one photo: stock watermark + opaque text (60%) or clean (40%)",
                "generator": args.generator,
                "min_visibility": args.min_visibility,
            },
            "final_running_loss": t.losses[-1] if t.losses else None,
            "final_running_accuracy": round(t.run_acc, 4),
            "stopped_at_step": stopped_at,
            "loss_every_100_steps": t.losses,
            "train_wall_s": round(wall, 1),
            "train_main_process_cpu_s": round(cpu, 1),
            "train_worker_cpu_s": round(worker_cpu, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
            + (f", {torch.cuda.get_device_name()}" if str(args.device).startswith("cuda") else ""),
            "torch": str(torch.__version__),
        }
        save_checkpoint(t.out, t.model.cpu(), args.input_size, card)
        card_path = Path(t.out).with_suffix(".json")
        # the evaluation section is filled by training/eval_visible_watermark.py for these exact weights
        card_path.write_text(
            json.dumps({"weights": Path(t.out).name, "training": card, "evaluation": None}, indent=2) + "\n"
        )
        logger.info("wrote %s (%.1f KB) and %s", t.out, Path(t.out).stat().st_size / 1024, card_path)
    logger.info("%.0f s wall, %.0f s CPU (+ %.0f s in the data workers)", wall, cpu, worker_cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
