"""Does decoding JPEGs at reduced size (`Image.draft`, libjpeg's DCT scaling) pay, and does it change the answers?

Run:  .venv/bin/python bench/bench_draft.py [--min-side 512]

For every JPEG of ../shared/data/openimages-hires (large photos) and coco-cc (640x480): the time of
`decode_image` at full size and with `min_side` (the short side kept >= it: SSCD and the default visible head
read 288 px, the thorough head 512, the centre view 288 / 0.6 = 480), median of 3; and how far the copy
descriptors move: SSCD cosine and PDQ Hamming distance between the two decodes of the same file (a corpus
photo uploaded as is must stay an exact match: PDQ <= 10 bits and SSCD >= 0.92, BENCHMARKS.md). Invisible
marks need every pixel, so the scanner can only draft when that check is off. Results: bench/results/draft.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "bench" / "results" / "draft.md"


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-side", type=int, default=512)
    args = ap.parse_args()

    from provenance.descriptors.pdq import PDQDescriptor  # noqa: F401 - imported for its side effects below
    from provenance.images import decode_image
    from provenance.models import load_descriptor

    sscd, pdq = load_descriptor("sscd"), load_descriptor("pdq")
    lines = [
        "# JPEG draft decoding",
        "",
        (
            f"{time.strftime('%Y-%m-%d')}, `python bench/bench_draft.py --min-side {args.min_side}`, "
            f"{platform.machine()}, {os.cpu_count()} cores shared, no GPU. Median of 3 decodes per file."
        ),
        "",
        (
            "| photos | n | mean size | decode full ms | decode draft ms | ratio | SSCD cosine min / median "
            "| PDQ bits max / median |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, folder in (("openimages-hires", DATA / "openimages-hires"), ("coco-cc", DATA / "coco-cc")):
        full_t, draft_t, cos, bits, sizes = [], [], [], [], []
        for path in sorted(folder.glob("*.jpg")):
            data = path.read_bytes()
            tf, full = timed(lambda data=data, name=path.name: decode_image(data, name))
            td, small = timed(lambda data=data, name=path.name: decode_image(data, name, min_side=args.min_side))
            assert (small.width, small.height) == (full.width, full.height)
            full_t.append(tf)
            draft_t.append(td)
            sizes.append(full.width * full.height)
            e = sscd.embed_batch([sscd.preprocess(full.image), sscd.preprocess(small.image)]).astype(np.float32)
            cos.append(float(e[0] @ e[1]))
            h = pdq.embed_batch([pdq.preprocess(full.image), pdq.preprocess(small.image)])
            bits.append(int(np.unpackbits(h[0] ^ h[1]).sum()))
        ft, dt = sum(full_t) / len(full_t) * 1000, sum(draft_t) / len(draft_t) * 1000
        lines.append(
            f"| {label} | {len(full_t)} | {np.mean(sizes) / 1e6:.1f} MP | {ft:.1f} | {dt:.1f} | "
            f"x{dt / ft:.2f} | {min(cos):.4f} / {statistics.median(cos):.4f} | "
            f"{max(bits)} / {statistics.median(bits):.0f} |"
        )
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
