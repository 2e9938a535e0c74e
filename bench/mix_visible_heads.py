"""Weighted logit mixes of the columns saved by compare_visible_heads.py --save (columns: 512 px head, 288 px head,
the same two on the mirrored image): AUC per set and the gate each mix would get on the seen draw.

    .venv/bin/python bench/mix_visible_heads.py /tmp/mix.pkl
"""
import pickle, sys
import numpy as np, torch
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from eval_visible_watermark import summarise, without_photos, load_real_marks, suggest_gate
d = pickle.load(open(sys.argv[1], "rb"))
print(d["columns"])
marked = load_real_marks()
def ev(z, meta, raw=False):
    p = z.astype(np.float64) if raw else torch.sigmoid(torch.from_numpy(z.astype(np.float32))).numpy()
    return summarise(*without_photos(p, [(None, k, f) for k, f in meta], marked), threshold=0.5)
S = d["sets"]
def row(name, mix, raw=False):
    out = []
    for s in ("seen", "all", "native", "canvas", "coco"):
        if s not in S: continue
        z, meta = S[s]
        r = ev(sum(w * z[i] for i, w in mix.items()), meta, raw)
        out.append(f"{s} {r['auc']:.4f}" + (f" g{suggest_gate(r['flagged_at'])}" if s == "seen" else ""))
    print(f"{name:22s}", " | ".join(out), flush=True)
row("512", {0: 1}); row("512 raw logits", {0: 1}, raw=True); row("288", {1: 1}); row("512 flip", {2: 1})
row("512 + flip", {0: .5, 2: .5})
for w in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5):
    row(f"512 + {w} 288", {0: 1 - w, 1: w})
for w in (0.1, 0.2, 0.3):
    row(f"512f + {w} 288", {0: (1 - w) / 2, 2: (1 - w) / 2, 1: w})
    row(f"512f + {w} 288f", {0: (1 - w) / 2, 2: (1 - w) / 2, 1: w / 2, 3: w / 2})
