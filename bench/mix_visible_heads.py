"""Weighted logit mixes of the columns saved by compare_visible_heads.py --save: AUC per set and the gate each mix
would get on the seen draw (the evaluation's separate draw: training fonts and strings on held-out photos, which is
where a mix's weights are chosen; the held-out sets only report).

    .venv/bin/python bench/mix_visible_heads.py /tmp/mix.pkl                 # every column alone, then a grid
    .venv/bin/python bench/mix_visible_heads.py /tmp/mix.pkl --use 0 3 1     # the grid over these columns only

The grid: weights in steps of --step over the chosen columns (summing to 1), ranked by AUC on the seen draw.
"""
from __future__ import annotations

import argparse
import itertools
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from eval_visible_watermark import load_real_marks, suggest_gate, summarise, without_photos  # noqa: E402

SETS = ("seen", "all", "native", "canvas", "coco")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("saved", type=Path, help="a compare_visible_heads.py --save file")
    ap.add_argument("--use", type=int, nargs="+", help="column indices to mix (default: all)")
    ap.add_argument("--step", type=float, default=0.05)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    with open(args.saved, "rb") as f:
        saved = pickle.load(f)
    columns, sets = saved["columns"], saved["sets"]
    marked = load_real_marks()

    def evaluate(weights: dict[int, float]) -> dict[str, tuple[float, float | None]]:
        out = {}
        for s in SETS:
            if s not in sets:
                continue
            z, meta = sets[s]
            mixed = sum(w * z[i] for i, w in weights.items())
            # float32 probabilities as the detector returns them (their ties at 1.0 are part of its AUC)
            p = torch.sigmoid(torch.from_numpy(np.asarray(mixed, dtype=np.float32))).numpy()
            r = summarise(*without_photos(p, [(None, k, f) for k, f in meta], marked), threshold=0.5)
            out[s] = (r["auc"], suggest_gate(r["flagged_at"]) if s == "seen" else None)
        return out

    def show(name: str, result: dict) -> None:
        print(f"{name:44s}", " | ".join(f"{s} {auc:.4f}" + (f" gate {g}" if s == "seen" else "")
                                        for s, (auc, g) in result.items()), flush=True)

    for i, c in enumerate(columns):
        show(f"[{i}] {c}", evaluate({i: 1.0}))
    use = args.use or list(range(len(columns)))
    steps = int(round(1 / args.step))
    grid = [ws for ws in itertools.product(range(steps + 1), repeat=len(use)) if sum(ws) == steps]
    ranked = []
    for ws in grid:
        weights = {i: w / steps for i, w in zip(use, ws) if w}
        if len(weights) > 1:
            ranked.append((evaluate(weights), weights))
    ranked.sort(key=lambda r: -r[0]["seen"][0] if "seen" in r[0] else -r[0]["all"][0])
    print(f"best {args.top} of {len(ranked)} mixes by {'seen draw' if 'seen' in sets else 'all'} AUC:")
    for result, weights in ranked[: args.top]:
        show(" + ".join(f"{w:.2f}x[{i}]" for i, w in weights.items()), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
