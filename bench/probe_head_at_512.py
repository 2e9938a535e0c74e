"""Probe (2026-11-28, not a shipped recipe): fine-tune a copy of the shipped visible-watermark head on SSCD maps of
512 px inputs, then score the first 150 held-out photos at 288 px (shipped head), at 512 px (shipped head, as
`scan --visible-thorough` reads them) and at 512 px with the tuned copy.

    .venv/bin/python bench/probe_head_at_512.py [--pairs 2000]
    .venv/bin/python bench/probe_head_at_512.py --tuned provenance/weights/visible_watermark_512.pt   # no training

The probe that led to the shipped 512 px head (`scan --visible-thorough`, made by bench/train_visible_watermark_head.py
--input-size 512 --init ...); --tuned scores that head (or another) in the tuned head's place, on the same subset.

Training pairs: drawn as bench/train_visible_watermark_head.py draws them (training photos, fonts and strings;
square canvases 224-768 px) but from another seed (5), so none is an example the head was trained on; each canvas
is resized to short side 512 and run through SSCD cut after the stride-16 map (SSCDDescriptor.tap_maps). The copy
trains 3 epochs at lr 3e-4 (AdamW), BatchNorm folded as shipped. Prints held-out AUCs (audited photos left out, as in
bench/eval_visible_watermark.py); ~12 min on the 2-core machine, ~4 GB of RAM for 2,000 pairs' maps.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from eval_visible_watermark import (  # noqa: E402
    VisibleWatermarkDetector, heldout_photos, heldout_streams, load_real_marks, overlays, summarise, without_photos)
from train_visible_watermark import DATA as TDATA, TRAIN_SHARDS, read_shards  # noqa: E402
from train_visible_watermark_head import SquarePairs, _identity  # noqa: E402
from provenance.descriptors.sscd import resize_short_side  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--pairs", type=int, default=2000)
ap.add_argument("--side", type=int, default=512)
ap.add_argument("--photos", type=int, default=150, help="held-out photos scored")
ap.add_argument("--tuned", default=None, help="a head checkpoint read at --side to score instead of training one")
cli = ap.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
PAIRS, SIDE = cli.pairs, cli.side
det = VisibleWatermarkDetector.load()
sscd = det.backbone
fonts, heldout_fonts = overlays.split_fonts(overlays.find_fonts())


def fine_tune():
    photos, _, _ = read_shards(Path(TDATA) / "flickr8k-dev", TRAIN_SHARDS)
    dl = torch.utils.data.DataLoader(SquarePairs(photos, fonts, 5, 0, PAIRS, side=SIDE), batch_size=None, num_workers=1,
                                     prefetch_factor=8, collate_fn=_identity)
    X = np.empty((2 * PAIRS, 1024, -(-SIDE // 16), -(-SIDE // 16)), np.uint8)
    t0 = time.time()
    for j, pair in enumerate(dl):
        m = sscd.tap_maps(list(pair), ("stride16",))
        X[2 * j], X[2 * j + 1] = m[0]["stride16"], m[1]["stride16"]
        if j % 500 == 0: print("pair", j, time.time() - t0, flush=True)
    print("examples", time.time() - t0, flush=True)
    head = copy.deepcopy(det.model).train()
    labels = torch.tensor([1.0, 0.0]).repeat(PAIRS)
    opt = torch.optim.AdamW(head.parameters(), 3e-4, weight_decay=0.05)
    for epoch in range(3):
        order = np.random.default_rng(epoch).permutation(PAIRS); tot = 0
        for s in range(PAIRS // 32):
            pairs = order[s * 32:(s + 1) * 32]
            rows = np.sort(np.concatenate([2 * pairs, 2 * pairs + 1]))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head({"stride16": torch.from_numpy(X[rows])}), labels[rows])
            opt.zero_grad(); loss.backward(); opt.step(); tot += loss.item()
        print("epoch", epoch, tot / (PAIRS // 32), time.time() - t0, flush=True)
    head.eval()
    del X
    return head


if cli.tuned:
    tuned = VisibleWatermarkDetector.load(cli.tuned)
    assert tuned.config.input_size == SIDE, f"{cli.tuned} reads {tuned.config.input_size} px, not --side {SIDE}"
else:
    tuned = VisibleWatermarkDetector(fine_tune(), det.config, "cpu", sscd)
phot = heldout_photos()[:cli.photos]
streams = heldout_streams(phot, heldout_fonts, 1234)
L = {"s288": [], "s512": [], "t512": []}; meta = []
with torch.inference_mode():
    for stream in ("native", "canvas"):
        for im, kind, facts in streams[stream]:
            meta.append((None, kind, facts))
            L["s288"].append(det.logits_from_taps(sscd.embed_batch_with_taps([sscd.preprocess(im)])[1])[0])
            m = sscd.tap_maps([np.asarray(resize_short_side(im.convert("RGB"), SIDE))], ("stride16",))
            L["s512"].append(det.logits_from_taps(m)[0]); L["t512"].append(tuned.logits_from_taps(m)[0])
L = {k: np.array(v) for k, v in L.items()}
marked = load_real_marks()
def rep(name, s):
    pp, ex = without_photos(s, meta, marked)
    r = summarise(1 / (1 + np.exp(-pp)), ex, 0.9); print(f"{name:28s} {r['auc']:.4f} clean {r['auc_vs_clean']:.4f} text {r['auc_vs_text']:.4f}", flush=True)
rep("288", L["s288"]); rep("512 shipped", L["s512"]); rep("512 tuned", L["t512"])
rep("288+512 shipped", (L["s288"] + L["s512"]) / 2); rep("288+512 tuned", (L["s288"] + L["t512"]) / 2)
