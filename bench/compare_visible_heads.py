"""Score several visible-watermark heads on the held-out examples of bench/eval_visible_watermark.py, sharing one
SSCD pass per example and input size, and their mean logit. Pixel CNNs (WatermarkNet checkpoints) score beside them.

    .venv/bin/python bench/compare_visible_heads.py provenance/weights/visible_watermark_512.pt /tmp/other.pt

Heads may read different input sizes (one SSCD pass per size); --flip also scores each head on the mirrored image
(test-time augmentation), and --save keeps every logit column with the examples' kinds for weighing mixes offline.

For choosing between candidate heads before one full evaluation: the same examples (held-out fonts, strings and
photos; audited photos left out) as the evaluation's Flickr native, canvas and COCO rows, at the cost of one
evaluation whatever the number of heads. Prints AUCs (all, vs clean, vs opaque text) per set and head.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from eval_visible_watermark import (  # noqa: E402
    VisibleWatermarkDetector,
    heldout_photos,
    heldout_streams,
    load_real_marks,
    overlays,
    seen_examples,
    suggest_gate,
    summarise,
    without_photos,
)
from provenance.watermarks.visible import mirror_input  # noqa: E402


@torch.inference_mode()
def logits_per_head(dets: list[VisibleWatermarkDetector], examples, batch_size: int = 32, flip: bool = False):
    """(columns, n) logits of a stream of examples, each run through SSCD once per input size (and once more
    mirrored with flip: columns are then each head, then each head on the mirrored image); and (kind, facts) per
    example."""
    by_size: dict[int, list[int]] = {}
    pixel = [i for i, d in enumerate(dets) if d.backbone is None]  # pixel CNNs: their own input, no SSCD pass
    for i, d in enumerate(dets):
        if d.backbone is not None:
            by_size.setdefault(d.config.input_size, []).append(i)
    out, meta, batch = [], [], []

    def flush():
        cols: list[np.ndarray] = []
        # the mirrored view flips the resized input, as VisibleHeadMix does
        for mirrored in [False, True] if flip else [False]:
            z = np.empty((len(dets), len(batch)), dtype=np.float32)
            for idx in by_size.values():
                taps = tuple(sorted({t for i in idx for t in dets[i].model.config.taps}))
                inputs = [dets[idx[0]].preprocess(im) for im in batch]
                if mirrored:
                    inputs = [mirror_input(x) for x in inputs]
                maps = dets[idx[0]].backbone.tap_maps(inputs, taps)
                for i in idx:
                    z[i] = dets[i].logits_from_taps(maps)
            for i in pixel:
                inputs = [dets[i].preprocess(im) for im in batch]  # (3, s, s): mirrored along the last axis
                z[i] = dets[i].logits_batch([np.ascontiguousarray(x[:, :, ::-1]) if mirrored else x for x in inputs])
            cols.append(z)
        out.append(np.concatenate(cols))
        batch.clear()

    for im, kind, facts in examples:
        batch.append(im)
        meta.append((None, kind, facts))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return np.concatenate(out, axis=1), meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", nargs="+", help="head checkpoints on SSCD maps (any input sizes) or pixel CNNs")
    ap.add_argument("--limit", type=int, default=0, help="only the first N held-out photos")
    ap.add_argument("--seed", type=int, default=1234, help="the evaluation's seed (the same examples)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seen", action="store_true",
                    help="also score the evaluation's separate draw and print the gate it would choose per head")
    ap.add_argument("--seen-only", action="store_true", help="score only that draw (minutes): the gates")
    ap.add_argument("--flip", action="store_true", help="also score each head on the mirrored image")
    ap.add_argument("--save", type=Path, help="write every logit column and the examples' kinds here (.pkl)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dets = [VisibleWatermarkDetector.load(w) for w in args.weights]
    if any(d.backbone is None and d.config.output != "logit" for d in dets):
        ap.error("a pixel model must give one logit (a provenance WatermarkNet checkpoint)")
    train_fonts, heldout_fonts = overlays.split_fonts(overlays.find_fonts())
    photos = heldout_photos()[: args.limit or None]
    marked = load_real_marks()
    t0 = time.time()
    sets = {}
    if not args.seen_only:
        streams = heldout_streams(photos, heldout_fonts, args.seed)
        sets["native"] = logits_per_head(dets, streams["native"], flip=args.flip)
        sets["canvas"] = logits_per_head(dets, streams["canvas"], flip=args.flip)
        sets["all"] = (np.concatenate([sets["native"][0], sets["canvas"][0]], axis=1),
                       sets["native"][1] + sets["canvas"][1])
        sets["coco"] = logits_per_head(dets, streams["coco"], flip=args.flip)
    if args.seen or args.seen_only:
        native_seen, canvas_seen = seen_examples(photos, train_fonts, args.seed)
        (z1, m1), (z2, m2) = (logits_per_head(dets, native_seen, flip=args.flip),
                              logits_per_head(dets, canvas_seen, flip=args.flip))
        sets["seen"] = (np.concatenate([z1, z2], axis=1), m1 + m2)
    columns = [Path(w).name for w in args.weights]
    columns += [f"{c} (mirrored)" for c in columns] if args.flip else []
    if args.save:
        with open(args.save, "wb") as f:
            pickle.dump({"columns": columns, "sets": {k: (z, [(kind, facts) for _, kind, facts in m])
                                                      for k, (z, m) in sets.items()}}, f)
    names = columns + (["mean logit"] if len(columns) > 1 else [])
    rows, gates = {}, {}
    for set_name, (logits, meta) in sets.items():
        scored = list(logits) + ([logits.mean(axis=0)] if len(columns) > 1 else [])
        for name, z in zip(names, scored):
            # float32 probabilities as the detector returns them (their ties at 1.0 are part of its AUC)
            p = torch.sigmoid(torch.from_numpy(np.asarray(z, dtype=np.float32))).numpy()
            r = summarise(*without_photos(p, meta, marked), threshold=0.5)
            rows.setdefault(name, {})[set_name] = (r["auc"], r["auc_vs_clean"], r["auc_vs_text"])
            if set_name == "seen":
                gates[name] = suggest_gate(r["flagged_at"])
    print(json.dumps({"seconds": round(time.time() - t0), "weights": args.weights, "auc_all_clean_text": rows,
                      "suggested_flag_threshold": gates}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
