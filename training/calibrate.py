"""Calibrate the scanner's verdict thresholds on edited copies of corpus photos (positives) and of non-members.

    .venv/bin/python training/calibrate.py [--positives 1000] [--negatives 1000] [--views hflip,rot90,rot180,rot270]

1. Index flickr8k-dev (2,500 photos; SSCD + PDQ), cached in bench/results/.cache/ and reused.
2. Plan edited queries (training/edits.py families) of members and of flickr8k-nonmember photos, deterministic
   for --seed; embed them as the scanner would (JPEG bytes -> decode_image -> SSCD / PDQ), plus query-side
   views (flips, rotations). Embeddings are cached per view, so re-tuning does not re-embed.
3. Score each query against the corpus, choose thresholds (replica at <= 1% FPR over all edited negatives,
   similar at <= 5%, exact so that no negative is exact), and compare improvements: SSCD score
   normalisation against a background half of the non-members (2-fold: each half is background for the
   other), centring, and multi-view queries.
4. Write bench/results/thresholds.json and bench/results/calibration.md.

With --clip-model (and --clip-pretrained: a hub tag or a local checkpoint), the corpus is also indexed with that
OpenCLIP model and `similar_clip` is chosen the same way as `similar_sscd` (CLIP top-1 cosine at <= 5% FPR on the
edited and on the untouched non-members); without it the default is kept, as on a machine with no CLIP weights.
A CLIP threshold belongs to its model: scan with the thresholds file written for the index's own CLIP model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance.corpus import detect_source, read_corpus  # noqa: E402
from provenance.images import decode_image  # noqa: E402
from provenance.models import ModelOptions  # noqa: E402
from provenance.scan import Thresholds, centre_crop, decide_verdict  # noqa: E402
from provenance.search import Searcher  # noqa: E402
from training.calibration import (  # noqa: E402
    ScoreNormalization,
    background_similarity,
    centre,
    corpus_margin,
    rates,
    threshold_at_fpr,
    topk,
)
from training.edits import FAMILY_NAMES, apply_edit  # noqa: E402

logger = logging.getLogger("calibrate")

DATA = Path(os.environ.get("PROVENANCE_SHARED_DATA", REPO.parent / "shared" / "data"))
CACHE = REPO / "bench" / "results" / ".cache"
RESULTS = REPO / "bench" / "results"
REPLICA_FPR = 0.01
SIMILAR_FPR = 0.05
UNTOUCHED = "untouched"  # the original file itself (positives: identical bytes; negatives: a plain photo)

# Query-side views: each is embedded separately and the best-scoring view wins (multi-view search).
VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "hflip": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "rot90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "rot180": lambda im: im.transpose(Image.Transpose.ROTATE_180),
    "rot270": lambda im: im.transpose(Image.Transpose.ROTATE_270),
    # A centred crop of 60% of each side: finds a photo shown smaller inside a screenshot or a frame.
    # the scanner's own centre view (scan --centre-view), so the harness measures what users get
    "centre60": centre_crop,
}


@dataclass
class Query:
    qid: int
    role: str  # "member" (positive) | "nonmember" (negative)
    source: str  # corpus id (members) or file name (non-members)
    family: str  # an edits.py family, or UNTOUCHED
    seed: int
    fold: int  # 0/1: which half of the non-members is this query's background (the other half)
    params: dict[str, Any] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)


# ------------------------------------------------------------------------------------------ index


def ensure_index(corpus: Path, cache: Path, clip: ModelOptions | None = None) -> Path:
    """The corpus indexed with SSCD + PDQ (and the CLIP model of `clip`), cached under `cache` per corpus and CLIP
    model."""
    from provenance.indexer import BuildOptions, build
    from provenance.store import ProvenanceIndex

    name = f"index-{corpus.name}"
    descriptors = ["sscd", "pdq"]
    if clip is not None:
        descriptors.append("clip")
        tag = hashlib.sha256(json.dumps([clip.clip_model, clip.clip_pretrained]).encode()).hexdigest()[:8]
        name += f"-clip-{tag}"
    index_dir = cache / name
    if (index_dir / "manifest.json").exists():
        n = len(ProvenanceIndex.open(index_dir))
        logger.info("reusing the index at %s (%d items)", index_dir, n)
        return index_dir
    logger.info("indexing %s into %s (%s)", corpus, index_dir, " + ".join(descriptors))
    r = build(str(corpus), index_dir, BuildOptions(descriptors=descriptors, models=clip or ModelOptions()))
    logger.info("indexed %d items (%d skipped) in %.0f s", r.added, r.skipped, r.seconds)
    return index_dir


# ------------------------------------------------------------------------------------------ plan


def plan_queries(
    member_ids: list[str], nonmembers: list[str], n_pos: int, n_neg: int, n_untouched_pos: int, seed: int
) -> list[Query]:
    """Positives: n_pos distinct members, families round-robin; a few untouched members; negatives: n_neg
    edits of the non-members (each photo about n_neg/len(nonmembers) times, different families) plus
    every non-member untouched. Non-members are split into two folds (halves) for background sets."""
    rng = np.random.default_rng(seed)
    families = list(FAMILY_NAMES)
    members = [member_ids[i] for i in rng.permutation(len(member_ids))]
    if n_pos + n_untouched_pos > len(members):
        raise ValueError(f"asked for {n_pos + n_untouched_pos} positives but the corpus has {len(members)} items")
    order = [nonmembers[i] for i in rng.permutation(len(nonmembers))]
    fold_of = {name: i % 2 for i, name in enumerate(order)}
    queries: list[Query] = []

    def add(role: str, source: str, family: str, fold: int) -> None:
        queries.append(Query(len(queries), role, source, family, seed * 1_000_003 + len(queries), fold))

    fam_order = [families[i] for i in rng.permutation(len(families))]
    for j in range(n_pos):
        add("member", members[j], fam_order[j % len(families)], j % 2)
    for j in range(n_untouched_pos):
        add("member", members[n_pos + j], UNTOUCHED, j % 2)
    for j in range(n_neg):
        # photo j % N gets families j, j+N, j+2N... (mod F): distinct families for the same photo.
        name = order[j % len(order)]
        add("nonmember", name, fam_order[j % len(families)], fold_of[name])
    for name in sorted(nonmembers):
        add("nonmember", name, UNTOUCHED, fold_of[name])
    return queries


def edits_fingerprint() -> str:
    """A digest of what the edit families output on a fixed synthetic image: it changes when edits.py, the
    overlays it borrows (another module) or Pillow change the pixels, and then the cached embeddings are stale."""
    rng = np.random.default_rng(0)
    probe = Image.fromarray(rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)).resize((256, 192))
    h = hashlib.sha256()
    for family in FAMILY_NAMES:
        for seed in (0, 1):
            h.update(apply_edit(probe, family, seed).image.tobytes())
    return h.hexdigest()


def plan_key(queries: list[Query], sscd_checksum: str) -> str:
    h = hashlib.sha256()
    h.update(b"views on untouched queries too")  # caches made before 2026-12-04 left those rows as the base view
    h.update((REPO / "training" / "edits.py").read_bytes())
    h.update(edits_fingerprint().encode())
    h.update(sscd_checksum.encode())
    h.update(json.dumps([(q.role, q.source, q.family, q.seed) for q in queries]).encode())
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------ embedding


class QueryImages:
    """Makes each query's image exactly as the scanner would see it: edited, saved as JPEG, decoded."""

    def __init__(self, corpus: Path, nonmember_dir: Path, needed_members: set[str]):
        self.nonmember_dir = nonmember_dir
        self.member_bytes = {
            it.id: it.data for it in read_corpus(detect_source(str(corpus))) if it.id in needed_members and it.data
        }

    def original_bytes(self, q: Query) -> bytes:
        if q.role == "member":
            return self.member_bytes[q.source]
        return (self.nonmember_dir / q.source).read_bytes()

    def image(self, q: Query) -> Image.Image:
        raw = self.original_bytes(q)
        if q.family == UNTOUCHED:
            return decode_image(raw, q.source).image
        edited = apply_edit(decode_image(raw, q.source).image, q.family, q.seed)
        q.params = edited.params
        return decode_image(edited.to_bytes(), f"{q.source}:{q.family}").image


def embed_queries(
    queries: list[Query],
    images: QueryImages,
    searcher: Searcher,
    views: list[str],
    qdir: Path,
    clip=None,
    batch: int = 32,
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None, dict[str, float]]:
    """SSCD vectors per view ("base" + `views`), PDQ hashes of the base view and, with a `clip` descriptor, its
    vectors of the base view (one view, as the scanner embeds them); cached in `qdir` (CLIP per model). Each query
    image is made once for whatever is missing."""
    qdir.mkdir(parents=True, exist_ok=True)
    sscd, pdq = searcher.model("sscd"), searcher.model("pdq")
    wanted = ["base", *views]
    missing = [v for v in wanted if not (qdir / f"sscd_{v}.npy").exists()]
    clip_path = qdir / f"clip_base-{clip.spec.checksum}.npy" if clip is not None else None
    clip_missing = clip_path is not None and not clip_path.exists()
    timing_path = qdir / "timing.json"
    timing: dict[str, float] = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    meta_path = qdir / "queries.json"
    if missing or clip_missing:
        logger.info("embedding %d queries x views %s%s", len(queries), missing, " + CLIP" if clip_missing else "")
        out = {v: np.zeros((len(queries), 512), np.float32) for v in missing}
        hashes = np.zeros((len(queries), 32), np.uint8)
        clip_out = np.zeros((len(queries), clip.spec.dim), np.float32) if clip_missing else None
        spent: Counter = Counter()
        started = time.perf_counter()
        for i in range(0, len(queries), batch):
            chunk = queries[i : i + batch]
            t0 = time.perf_counter()
            ims = [images.image(q) for q in chunk]
            spent["edit+decode"] += time.perf_counter() - t0
            for q, im in zip(chunk, ims, strict=False):
                q.size = im.size
            for v in missing:
                t0 = time.perf_counter()
                # every query gets every view, untouched ones too: a scanner with a view applies it to every image,
                # and an untouched non-member's centre may match another photo better than the whole does
                out[v][i : i + len(chunk)] = sscd.embed(ims if v == "base" else [VIEWS[v](im) for im in ims])
                spent[f"sscd_{v}"] += time.perf_counter() - t0
            if "base" in missing:
                t0 = time.perf_counter()
                hashes[i : i + len(chunk)] = pdq.embed(ims)
                spent["pdq"] += time.perf_counter() - t0
            if clip_out is not None:
                clip_out[i : i + len(chunk)] = clip.embed(ims)
            done = i + len(chunk)
            if done % (batch * 8) == 0 or done == len(queries):
                el = time.perf_counter() - started
                logger.info("  %d/%d queries, %.0f s", done, len(queries), el)
        for v in missing:
            np.save(qdir / f"sscd_{v}.npy", out[v])
            timing[f"sscd_{v}_s_per_img"] = spent[f"sscd_{v}"] / len(queries)
        if "base" in missing:
            np.save(qdir / "pdq_base.npy", hashes)
            timing["pdq_s_per_img"] = spent["pdq"] / len(queries)
            timing["edit_decode_s_per_img"] = spent["edit+decode"] / len(queries)
            meta_path.write_text(json.dumps([asdict(q) for q in queries]), encoding="utf-8")
        if clip_out is not None:
            np.save(clip_path, clip_out)
        timing_path.write_text(json.dumps(timing, indent=1), encoding="utf-8")
    meta = json.loads(meta_path.read_text())
    for q, m in zip(queries, meta, strict=False):
        q.params, q.size = m["params"], tuple(m["size"])
    vectors = {v: np.load(qdir / f"sscd_{v}.npy") for v in wanted}
    clip_vectors = np.load(clip_path) if clip_path is not None else None
    return vectors, np.load(qdir / "pdq_base.npy"), clip_vectors, timing


# ------------------------------------------------------------------------------------------ scoring


@dataclass
class Scored:
    """Top-1 per query under one scoring method."""

    name: str
    score: np.ndarray  # (n,) float32
    row: np.ndarray  # (n,) int64 corpus row
    n_views: int = 1  # SSCD embeddings per query
    key: bool = False  # shown in the per-family comparison


def score_method(
    vectors: dict[str, np.ndarray],
    views: list[str],
    xb: np.ndarray,
    xbg_by_fold: list[np.ndarray],
    fold: np.ndarray,
    norm: ScoreNormalization | None = None,
    centred: bool = False,
    margin: ScoreNormalization | None = None,
    name: str = "",
) -> Scored:
    """Max over `views` of each view's top-1 score, optionally centred / normalised with the query's
    background fold (the half of the non-members it is not drawn from) / less its corpus neighbours' mean."""
    n = len(fold)
    best = np.full(n, -np.inf, np.float32)
    best_row = np.zeros(n, np.int64)
    for v in views:
        xq = vectors[v]
        score = np.empty(n, np.float32)
        row = np.empty(n, np.int64)
        for f in (0, 1):
            idx = np.flatnonzero(fold == f)
            bg = xbg_by_fold[1 - f]
            q, b, g = xq[idx], xb, bg
            if centred:
                mu = bg.mean(axis=0)
                q, b, g = centre(q, mu), centre(xb, mu), centre(bg, mu)
            k = 1 + (margin.last if margin is not None else 0)
            sk, rk = topk(q, b, k)
            s, r = (corpus_margin(sk, margin) if margin is not None else sk[:, 0]), rk[:, 0]
            if norm is not None:
                s = s - norm.beta * background_similarity(q, g, norm)
            score[idx], row[idx] = s, r
        better = score > best
        best[better], best_row[better] = score[better], row[better]
    return Scored(name, best, best_row, len(views))


@dataclass
class Split:
    """Boolean masks over the queries."""

    pos: np.ndarray  # edited members
    neg: np.ndarray  # edited non-members
    pos_untouched: np.ndarray
    neg_untouched: np.ndarray


def pick_threshold(score: np.ndarray, split: Split, max_fpr: float) -> tuple[float, float, float]:
    """(chosen, edited-only, untouched-only): the lowest threshold with FPR <= max_fpr on the edited
    non-members AND on the untouched ones. Untouched photos matter because most images a scanner sees
    are new pictures, not edits, and their top-1 scores run higher than edited ones (edits blur every match)."""
    edited = threshold_at_fpr(score[split.neg], max_fpr)
    untouched = threshold_at_fpr(score[split.neg_untouched], max_fpr) if split.neg_untouched.any() else edited
    return max(edited, untouched), edited, untouched


def evaluate(s: Scored, correct: np.ndarray, split: Split) -> dict[str, Any]:
    thr, thr_edited, _ = pick_threshold(s.score, split, REPLICA_FPR)
    tpr, fpr = rates(s.score[split.pos], correct[split.pos], s.score[split.neg], thr)
    _, fpr_u = rates(s.score[split.pos], correct[split.pos], s.score[split.neg_untouched], thr)
    tpr_e, _ = rates(s.score[split.pos], correct[split.pos], s.score[split.neg], thr_edited)
    return {
        "method": s.name,
        "threshold": thr,
        "tpr": tpr,
        "fpr": fpr,
        "fpr_untouched": fpr_u,
        "threshold_edited": thr_edited,
        "tpr_edited": tpr_e,
        "n_views": s.n_views,
    }


# ------------------------------------------------------------------------------------------ main


@dataclass
class Run:
    """Everything the report needs from one calibration run."""

    args: argparse.Namespace
    views: list[str]
    queries: list[Query]
    ids: list[str]
    family: np.ndarray  # (n,) str
    split: Split
    src_row: np.ndarray  # (n,) corpus row of a member query's source, -1 for non-members
    base: Scored  # raw SSCD, one view: what the scanner does today
    correct: np.ndarray  # (n,) base top-1 is the source photo
    pdq_dist: np.ndarray  # (n,) PDQ Hamming distance to the closest corpus hash
    verdicts: np.ndarray  # (n,) decide_verdict with the chosen thresholds
    thresholds: Thresholds
    picks: dict[str, Any]  # how each threshold was chosen
    methods: list[Scored]
    results: list[dict[str, Any]]
    timing: dict[str, float]
    seconds_embed: float
    started: float
    clip: ClipCalibration | None = None


@dataclass
class ClipCalibration:
    """CLIP top-1 per query and the similar_clip threshold chosen on it."""

    model_id: str
    score: np.ndarray  # (n,) CLIP top-1 cosine
    correct: np.ndarray  # (n,) CLIP top-1 is the source photo
    threshold: float
    parts: tuple[float, float]  # (edited-only, untouched-only) thresholds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=DATA / "flickr8k-dev")
    ap.add_argument("--nonmembers", type=Path, default=DATA / "flickr8k-nonmember")
    ap.add_argument("--positives", type=int, default=1000)
    ap.add_argument("--negatives", type=int, default=1000)
    ap.add_argument("--untouched-positives", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--views",
        default="hflip,centre60",
        help=f"extra query views to evaluate, from {','.join(VIEWS)}; '' for none "
        "(each costs one more SSCD embedding per query on the first run)",
    )
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--clip-model", help="also calibrate similar_clip with this OpenCLIP model (e.g. ViT-B-32)")
    ap.add_argument("--clip-pretrained", help="its weights: an OpenCLIP hub tag or a local checkpoint path")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    views = [v for v in args.views.split(",") if v]
    for v in views:
        if v not in VIEWS:
            ap.error(f"unknown view {v!r}; choose from {', '.join(VIEWS)}")

    if args.clip_pretrained and not args.clip_model:
        ap.error("--clip-pretrained needs --clip-model")
    clip_options = (
        ModelOptions(clip_model=args.clip_model, clip_pretrained=args.clip_pretrained) if args.clip_model else None
    )

    # 1. Index
    index_dir = ensure_index(args.corpus, args.cache, clip_options)
    searcher = Searcher.open(index_dir, clip_options)
    index = searcher.index
    ids = list(index.ids)
    row_of = {item: r for r, item in enumerate(ids)}
    xb = np.asarray(index.vectors("sscd"), dtype=np.float32)  # (n_corpus, 512), stored as float16

    # 2. Queries, embedded (or read from the cache)
    nonmembers = sorted(p.name for p in args.nonmembers.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    queries = plan_queries(ids, nonmembers, args.positives, args.negatives, args.untouched_positives, args.seed)
    key = plan_key(queries, index.specs["sscd"].checksum)
    images = QueryImages(args.corpus, args.nonmembers, {q.source for q in queries if q.role == "member"})
    t_embed = time.perf_counter()
    vectors, hashes, clip_vectors, timing = embed_queries(
        queries,
        images,
        searcher,
        views,
        args.cache / f"queries-{key}",
        searcher.model("clip") if clip_options else None,
    )
    t_embed = time.perf_counter() - t_embed

    role = np.array([q.role for q in queries])
    family = np.array([q.family for q in queries])
    fold = np.array([q.fold for q in queries])
    src_row = np.array([row_of.get(q.source, -1) for q in queries])
    split = Split(
        pos=(role == "member") & (family != UNTOUCHED),
        neg=(role == "nonmember") & (family != UNTOUCHED),
        pos_untouched=(role == "member") & (family == UNTOUCHED),
        neg_untouched=(role == "nonmember") & (family == UNTOUCHED),
    )
    # Background per fold: that fold's untouched non-member photos; queries of fold f use fold 1-f.
    xbg_by_fold = [vectors["base"][split.neg_untouched & (fold == f)] for f in (0, 1)]

    # 3. Scores. PDQ through the index's own search; SSCD by exhaustive numpy search over the stored vectors,
    # checked against the index's search (the scanner's path) on a sample.
    base = score_method(vectors, ["base"], xb, xbg_by_fold, fold, name="raw SSCD (scanner today)")
    base.key = True
    found = searcher.search_vectors({"sscd": vectors["base"][:64]}, k=1)
    agree = np.mean([row_of[m["sscd"][0].id] == base.row[i] for i, m in enumerate(found)])
    if agree < 0.98:
        logger.warning("numpy top-1 agrees with the index search on only %.0f%% of queries", 100 * agree)
    pdq_found = searcher.search_vectors({"pdq": hashes}, k=1)
    pdq_dist = np.array([m["pdq"][0].distance for m in pdq_found])
    pdq_row = np.array([row_of[m["pdq"][0].id] for m in pdq_found])
    methods = compare_methods(vectors, views, xb, xbg_by_fold, fold, base)
    results = [evaluate(m, m.row == src_row, split) for m in methods]
    margin = ScoreNormalization(1.0, 1, 3)
    margin_thr = pick_threshold(
        next(m for m in methods if m.name.endswith(f"margin {margin}")).score, split, REPLICA_FPR
    )[0]
    dup_tpr = {}
    for copies in (1, 3):
        ms, mr = margin_with_duplicates(vectors["base"], xb, src_row, copies, margin)
        dup_tpr[copies] = rates(ms[split.pos], mr[split.pos] == src_row[split.pos], ms[split.neg], margin_thr)[0]
    for r in results:
        logger.info(
            "%-55s thr %.3f TPR %.3f FPR %.4f / %.4f",
            r["method"],
            r["threshold"],
            r["tpr"],
            r["fpr"],
            r["fpr_untouched"],
        )

    # 4. Thresholds for the scanner as it is today (raw SSCD top-1, one view).
    replica, *replica_parts = pick_threshold(base.score, split, REPLICA_FPR)
    similar, *similar_parts = pick_threshold(base.score, split, SIMILAR_FPR)
    exact_sscd, exact_bits, picks = choose_exact(base.score, pdq_dist, pdq_row, src_row, family, split)
    picks.update(
        replica_parts=replica_parts, similar_parts=similar_parts, margin_dup_tpr=dup_tpr, margin_thr=margin_thr
    )
    clip = None
    if clip_vectors is not None:
        # the CLIP similar band, chosen like SSCD's: <= 5% of edited and of untouched non-members reach it
        clip_score, clip_rows = topk(clip_vectors, np.asarray(index.vectors("clip"), dtype=np.float32), 1)
        clip_thr, *clip_parts = pick_threshold(clip_score[:, 0], split, SIMILAR_FPR)
        clip = ClipCalibration(
            index.specs["clip"].model_id,
            clip_score[:, 0],
            clip_rows[:, 0] == src_row,
            float(clip_thr),
            tuple(clip_parts),
        )
    chosen = Thresholds(
        exact_pdq_bits=exact_bits,
        exact_sscd=exact_sscd,
        replica_sscd=replica,
        similar_sscd=min(similar, replica),
        similar_clip=clip.threshold if clip else Thresholds().similar_clip,
    )
    (args.out / "thresholds.json").write_text(json.dumps(chosen.to_dict(), indent=2) + "\n", encoding="utf-8")

    # 5. Verdicts with those thresholds, through the scanner's own decide_verdict, and the report.
    verdicts = np.array(
        [
            decide_verdict(
                {
                    "sscd": float(base.score[i]),
                    "pdq_distance": int(pdq_dist[i]),
                    "clip": float(clip.score[i]) if clip else None,
                },
                chosen,
                same_bytes=q.role == "member" and q.family == UNTOUCHED,
            )
            for i, q in enumerate(queries)
        ]
    )
    run = Run(
        args,
        views,
        queries,
        ids,
        family,
        split,
        src_row,
        base,
        base.row == src_row,
        pdq_dist,
        verdicts,
        chosen,
        picks,
        methods,
        results,
        timing,
        t_embed,
        started,
        clip,
    )
    (args.out / "calibration.md").write_text(render_report(run), encoding="utf-8")
    logger.info(
        "wrote %s and %s in %.0f s",
        args.out / "thresholds.json",
        args.out / "calibration.md",
        time.perf_counter() - started,
    )
    return 0


def compare_methods(
    vectors: dict[str, np.ndarray],
    views: list[str],
    xb: np.ndarray,
    xbg_by_fold: list[np.ndarray],
    fold: np.ndarray,
    base: Scored,
) -> list[Scored]:
    """The raw scanner score and the candidate improvements, each scored on the same queries."""
    norm = ScoreNormalization()
    margin = ScoreNormalization(1.0, 1, 3)

    def one(name: str, key: bool = False, vs: list[str] | None = None, **kw: Any) -> Scored:
        s = score_method(vectors, vs or ["base"], xb, xbg_by_fold, fold, name=name, **kw)
        s.key = key
        return s

    methods = [base, one(f"score norm {norm}", key=True, norm=norm)]
    for extra in (ScoreNormalization(0.5, 0, 2), ScoreNormalization(1.0, 0, 9)):
        methods.append(one(f"score norm {extra}", norm=extra))
    for m in (margin, ScoreNormalization(0.5, 1, 3), ScoreNormalization(1.0, 4, 9)):
        methods.append(one(f"corpus-neighbour margin {m}", key=m == margin, margin=m))
    methods.append(one("centred", centred=True))
    methods.append(one(f"centred + score norm {norm}", centred=True, norm=norm))
    view_sets = [["base", *views]] if views else []
    view_sets += [["base", v] for v in views if len(views) > 1]
    # The per-family table shows the centre-crop view alone when it was run (the view that helps), else all.
    shown = ["base", "centre60"] if "centre60" in views else (view_sets[0] if view_sets else None)
    for vs in view_sets:
        label = "+".join(vs[1:])
        methods.append(one(f"multi-view (+{label})", key=vs == shown, vs=vs))
        methods.append(one(f"multi-view (+{label}) + score norm {norm}", key=vs == shown, vs=vs, norm=norm))
    return methods


def margin_with_duplicates(
    xq: np.ndarray, xb: np.ndarray, src_row: np.ndarray, copies: int, margin: ScoreNormalization
) -> tuple[np.ndarray, np.ndarray]:
    """Corpus-neighbour margin of each query if its source photo were in the corpus `copies` more times
    (training sets such as LAION hold many duplicates, and duplicated images are the ones models memorise).
    Returns (margin score, top-1 row); rows without a source (non-members) are unaffected."""
    sk, rk = topk(xq, xb, margin.last + 1)
    src_score = np.einsum("nd,nd->n", xq, xb[np.maximum(src_row, 0)])
    out = corpus_margin(sk, margin)
    for i in np.flatnonzero(src_row >= 0):
        # The duplicates score exactly what the source scores; merge them into the sorted top-k.
        merged = np.sort(np.concatenate([sk[i], np.full(copies, src_score[i])]))[::-1][: margin.last + 1]
        out[i] = corpus_margin(merged[None, :], margin)[0]
    return out, rk[:, 0]


def choose_exact(
    sscd: np.ndarray, pdq_dist: np.ndarray, pdq_row: np.ndarray, src_row: np.ndarray, family: np.ndarray, split: Split
) -> tuple[float, int, dict[str, Any]]:
    """exact = PDQ within `bits` AND SSCD >= `exact_sscd`. Both are set to just cover every re-encoded member
    (the same picture re-saved as JPEG q75-95), and must stay far from every non-member (edited or not):
    bits at most half the closest non-member's PDQ distance, SSCD at least 0.1 above the highest non-member."""
    neg = split.neg | split.neg_untouched
    neg_min_pdq = int(pdq_dist[neg].min())
    neg_max_sscd = float(sscd[neg].max())
    reenc = split.pos & (family == "reencode")
    if not reenc.any():
        raise ValueError("no re-encoded members among the queries: cannot calibrate `exact`")
    bits = int(min(int(pdq_dist[reenc].max()), neg_min_pdq // 2))
    exact_sscd = float(np.floor((float(sscd[reenc].min()) - 0.01) * 100) / 100)
    exact_sscd = max(exact_sscd, float(np.ceil((neg_max_sscd + 0.1) * 100) / 100))
    info = {
        "neg_min_pdq": neg_min_pdq,
        "neg_max_sscd": neg_max_sscd,
        "reencode_max_pdq": int(pdq_dist[reenc].max()),
        "reencode_min_sscd": float(sscd[reenc].min()),
        "reencode_pdq_right_row": float((pdq_row[reenc] == src_row[reenc]).mean()),
    }
    return exact_sscd, bits, info


# ------------------------------------------------------------------------------------------ report


def clip_report(r: Run) -> str:
    """What the CLIP similar band adds: its rates, and the edited members SSCD leaves novel that it catches."""
    c, sp, t = r.clip, r.split, r.thresholds
    tpr, fpr = rates(c.score[sp.pos], c.correct[sp.pos], c.score[sp.neg], t.similar_clip)
    _, fpru = rates(c.score[sp.pos], c.correct[sp.pos], c.score[sp.neg_untouched], t.similar_clip)
    sscd_novel = sp.pos & (r.base.score < t.similar_sscd)
    caught = sscd_novel & (c.score >= t.similar_clip) & c.correct
    lines = [
        f"### CLIP similar band ({c.model_id})\n",
        f"At similar_clip = {t.similar_clip:.4f}: {tpr:.3f} of edited members reach it with their own photo "
        f"as CLIP's top-1; {fpr:.3f} of edited and {fpru:.3f} of untouched non-members reach it. Of the "
        f"{int(sscd_novel.sum())} edited members below SSCD's similar band, CLIP puts {int(caught.sum())} in "
        "its similar band with the right id.\n",
        "| family | n | CLIP TPR (right id) | median CLIP top-1 |",
        "|---|---|---|---|",
    ]
    for fam in sorted(set(r.family[sp.pos])):
        m = sp.pos & (r.family == fam)
        hit = float(((c.score >= t.similar_clip) & c.correct)[m].mean())
        lines.append(f"| {fam} | {int(m.sum())} | {hit:.3f} | {float(np.median(c.score[m])):.3f} |")
    return "\n".join(lines) + "\n"


def describe_params(p: dict[str, Any]) -> str:
    if "steps" in p:
        return " + ".join(
            s["family"] + "(" + describe_params({k: v for k, v in s.items() if k != "family"}) + ")" for s in p["steps"]
        )
    keep = {k: v for k, v in p.items() if k not in ("box", "size", "canvas", "dark", "kinds")}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


def render_report(r: Run) -> str:
    t, sp, base, fam = r.thresholds, r.split, r.base, r.family
    n_pos, n_neg, n_negu = int(sp.pos.sum()), int(sp.neg.sum()), int(sp.neg_untouched.sum())
    L: list[str] = []
    add = L.append
    view_arg = ",".join(r.views) or "''"
    add("## Calibration of the verdict thresholds (training/calibrate.py)\n")
    add(
        f"```\n.venv/bin/python training/calibrate.py --positives {r.args.positives} --negatives {r.args.negatives} "
        f"--seed {r.args.seed} --views {view_arg}\n```\n"
    )
    add(
        f"Machine: 2-core x86_64 CPU, shared (other engineers' jobs running, load average 6-11). Corpus: "
        f"flickr8k-dev, {len(r.ids)} photos (224x224) indexed with SSCD (int8 ONNX, short side 288) + PDQ. "
        f"Queries: {n_pos} edited members (positives; distinct photos, about {n_pos // len(FAMILY_NAMES)} per "
        f"family), {int(sp.pos_untouched.sum())} untouched members, {n_neg} edited non-members (negatives: 2 "
        f"edits of each of the 500 flickr8k-nonmember photos, different families) and {n_negu} untouched "
        "non-members. Each edited copy is saved as JPEG (q92 unless the family sets the quality) and decoded "
        "with `decode_image`, as the scanner reads files. A positive counts only when its top-1 SSCD match is "
        "its own source photo (`wrong id` otherwise). Counts per family are in the per-family table.\n"
    )

    # -- chosen values
    rp, sp_ = r.picks["replica_parts"], r.picks["similar_parts"]
    add("### Chosen thresholds (bench/results/thresholds.json)\n")
    add("| field | value | how |")
    add("|---|---|---|")
    add(
        f"| replica_sscd | {t.replica_sscd:.2f} | lowest SSCD with FPR <= 1% on the edited non-members ({rp[0]:.2f}) "
        f"AND on the untouched ones ({rp[1]:.2f}); the larger wins |"
    )
    add(
        f"| similar_sscd | {t.similar_sscd:.2f} | the same at FPR <= 5% ({sp_[0]:.2f} edited, {sp_[1]:.2f} untouched) |"
    )
    add(
        f"| exact_pdq_bits | {t.exact_pdq_bits} | the largest PDQ distance of a re-encoded member (JPEG q75-95), "
        f"capped at half the closest non-member ({r.picks['neg_min_pdq']} bits) |"
    )
    add(
        f"| exact_sscd | {t.exact_sscd:.2f} | just under the lowest SSCD of a re-encoded member "
        f"({r.picks['reencode_min_sscd']:.3f}); the highest non-member is {r.picks['neg_max_sscd']:.3f} |"
    )
    if r.clip is None:
        add(
            f"| similar_clip | {t.similar_clip} | not calibrated: no CLIP weights on this machine; default kept "
            "(`--clip-model` calibrates it) |\n"
        )
    else:
        cp = r.clip.parts
        add(
            f"| similar_clip | {t.similar_clip:.4f} | CLIP ({r.clip.model_id}) top-1 at FPR <= 5% ({cp[0]:.4f} "
            f"edited, {cp[1]:.4f} untouched); the larger wins. For this CLIP model only |\n"
        )
    tpr, fpr = rates(base.score[sp.pos], r.correct[sp.pos], base.score[sp.neg], t.replica_sscd)
    _, fpru = rates(base.score[sp.pos], r.correct[sp.pos], base.score[sp.neg_untouched], t.replica_sscd)
    met = tpr >= 0.97 and fpr <= 0.01 and fpru <= 0.01
    add(
        f"**At replica_sscd = {t.replica_sscd:.2f}: TPR {tpr:.3f} over {n_pos} edited members; FPR {fpr:.3f} over "
        f"{n_neg} edited non-members and {fpru:.3f} over {n_negu} untouched ones** (target TPR >= 0.97 at "
        f"FPR <= 1%: {'met' if met else 'NOT met'}).\n"
    )

    add(recommendation(r))
    if r.clip is not None:
        add(clip_report(r))

    # -- sweep
    add("### Threshold sweep (raw SSCD top-1, one view)\n")
    add("| SSCD threshold | TPR (right id) | FPR edited non-members | FPR untouched non-members |")
    add("|---|---|---|---|")
    for thr in (0.3, 0.35, 0.39, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.9):
        a, b = rates(base.score[sp.pos], r.correct[sp.pos], base.score[sp.neg], thr)
        _, c = rates(base.score[sp.pos], r.correct[sp.pos], base.score[sp.neg_untouched], thr)
        add(f"| {thr:.2f} | {a:.3f} | {b:.3f} | {c:.3f} |")
    add("")
    qn = np.quantile(base.score[sp.neg], [0.5, 0.95, 0.99, 1.0])
    qu = np.quantile(base.score[sp.neg_untouched], [0.5, 0.95, 0.99, 1.0])
    qp = np.quantile(base.score[sp.pos & r.correct], [0.01, 0.05, 0.5])
    add(
        f"Top-1 SSCD of edited non-members: median {qn[0]:.3f}, p95 {qn[1]:.3f}, p99 {qn[2]:.3f}, max {qn[3]:.3f}; "
        f"untouched non-members: median {qu[0]:.3f}, p95 {qu[1]:.3f}, p99 {qu[2]:.3f}, max {qu[3]:.3f}; edited "
        f"members (right id): p1 {qp[0]:.3f}, p5 {qp[1]:.3f}, median {qp[2]:.3f}.\n"
    )
    a50 = rates(base.score[sp.pos], r.correct[sp.pos], base.score[sp.neg | sp.neg_untouched], 0.5)
    a75 = rates(base.score[sp.pos], r.correct[sp.pos], base.score[sp.neg | sp.neg_untouched], 0.75)
    add(
        f"Anchors: at Somepalli et al.'s 0.5 (replication) this model and preprocessing give TPR {a50[0]:.3f} at "
        f"FPR {a50[1]:.3f} over all {n_neg + n_negu} non-members; at the SSCD paper's 0.75 (a copy at about 90% "
        f"precision on DISC2021) TPR {a75[0]:.3f} at FPR {a75[1]:.3f}: far too strict for edited copies here. "
        "The 1%-FPR point sits below 0.5 because unrelated photos rarely exceed 0.3 against this corpus; it "
        "will rise with a larger corpus (more chances for a close unrelated photo), so re-run this harness on "
        "the real index (`--corpus`) before trusting these numbers there.\n"
    )

    # -- per family
    add("### Per edit family at the chosen thresholds (raw SSCD, one view)\n")
    add(
        "Positives: `TPR` = exact, or replica with the right id; `exact` = PDQ/SSCD exact rule met (or identical "
        "bytes); `similar` = right id in the similar band; `wrong id` = top-1 is another photo and >= similar; "
        "`missed` = below similar. Negatives: `FPR` = share >= replica (any id); `sim.` = share in the similar band.\n"
    )
    add(
        "| family | pos n | TPR | exact | similar | wrong id | missed | median SSCD | median PDQ bits | neg n | FPR "
        "| sim. |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in [*FAMILY_NAMES, UNTOUCHED]:
        p = (fam == f) & (sp.pos | sp.pos_untouched)
        ng = (fam == f) & (sp.neg | sp.neg_untouched)
        ex = p & (r.verdicts == "exact")
        hit = ex | (p & r.correct & (r.verdicts == "replica"))
        sim = p & r.correct & (r.verdicts == "similar")
        wrong = p & ~hit & ~r.correct & (base.score >= t.similar_sscd)
        missed = p & ~hit & ~sim & ~wrong
        fp = ng & (base.score >= t.replica_sscd)
        nsim = ng & (base.score >= t.similar_sscd) & (base.score < t.replica_sscd)
        a, b = int(p.sum()), int(ng.sum())
        add(
            f"| {f} | {a} | {hit.sum() / a:.3f} | {int(ex.sum())} | {int(sim.sum())} | {int(wrong.sum())} | "
            f"{int(missed.sum())} | {np.median(base.score[p]):.3f} | {np.median(r.pdq_dist[p]):.0f} | {b} | "
            f"{fp.sum() / b:.3f} | {nsim.sum() / b:.3f} |"
        )
    add("")

    # -- exact
    neg_all = sp.neg | sp.neg_untouched
    add("### Exact\n")
    add(
        f"Re-encoded members (JPEG q75-95): PDQ <= {r.picks['reencode_max_pdq']} bits, SSCD >= "
        f"{r.picks['reencode_min_sscd']:.3f}, PDQ top-1 is the source for {r.picks['reencode_pdq_right_row']:.0%}. "
        f"The closest non-member is {r.picks['neg_min_pdq']} bits away (random 256-bit hashes differ by about 128; "
        f"the nearest of 2,500 by about 90-100), so PDQ alone already separates them; exact_sscd guards against "
        f"flat or blank images whose hashes collide. Non-members called exact: "
        f"{int((neg_all & (r.verdicts == 'exact')).sum())} of {int(neg_all.sum())}."
    )
    ex_by_fam = Counter(fam[(r.verdicts == "exact") & sp.pos])
    add(
        "Edited members called exact besides re-encodes (PDQ ignores colour, and low-frequency edits keep the hash): "
        + (", ".join(f"{k} {v}" for k, v in ex_by_fam.most_common() if k != "reencode") or "none")
        + ".\n"
    )

    # -- improvements
    add(
        "### Improvements (same queries; each method's threshold re-chosen the same way: FPR <= 1% on edited "
        "AND on untouched non-members)\n"
    )
    add(
        "Score normalisation (SSCD paper eq. 8: s - beta * mean similarity to the query's [first..last] nearest "
        "background images) and centring use a background of 250 untouched non-member photos: each half of the "
        "non-members is the background for queries drawn from the other half (members alternate), so no "
        "negative is normalised against itself or its own edits. `corpus-neighbour margin` uses the query's own "
        "2nd..4th corpus neighbours as the background (no extra data; the scanner already fetches the top 10). "
        "Multi-view = max over the views' top-1 scores (every query, untouched ones too, gets every view). `edited-only` "
        "columns: the threshold and TPR if only the edited non-members set it (the brief's definition).\n"
    )
    add(
        "| method | threshold | TPR | FPR edited | FPR untouched | edited-only thr | TPR at it "
        "| SSCD embeddings per query |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for x in r.results:
        add(
            f"| {x['method']} | {x['threshold']:.2f} | {x['tpr']:.3f} | {x['fpr']:.3f} | {x['fpr_untouched']:.3f} | "
            f"{x['threshold_edited']:.2f} | {x['tpr_edited']:.3f} | {x['n_views']} |"
        )
    add("")
    d = r.picks["margin_dup_tpr"]
    add(
        f"The corpus-neighbour margin's gain comes with a failure mode: if the source photo were in the corpus "
        f"twice (simulated: its vector duplicated), the margin method's TPR at its threshold "
        f"({r.picks['margin_thr']:.2f}) would fall to {d[1]:.3f}; with 3 extra copies to {d[3]:.3f}. Web-scale "
        "training sets hold many duplicates, and duplicated images are the ones generators memorise, so this "
        "method must not be used as is.\n"
    )
    key = [m for m in r.methods if m.key]
    add("TPR per family (right id) for the main methods, each at its own threshold:\n")
    add("| family | " + " | ".join(m.name for m in key) + " |")
    add("|---|" + "---|" * len(key))
    for f, row in per_family_methods(key, r.src_row, fam, sp).items():
        add(f"| {f} | " + " | ".join(row) + " |")
    add("")
    per_img = r.timing.get("sscd_base_s_per_img")
    if per_img:
        add(
            f"Throughput on this loaded machine (SSCD embedding only, batches of 32): {1 / per_img:.1f} img/s for "
            "the base view"
            + "".join(
                f"; {v} view {1 / r.timing[f'sscd_{v}_s_per_img']:.1f} img/s"
                for v in r.views
                if f"sscd_{v}_s_per_img" in r.timing
            )
            + f". A query with k views costs k SSCD embeddings, so scanning throughput drops to about 1/k "
            f"(edit + decode {r.timing.get('edit_decode_s_per_img', 0) * 1000:.0f} ms/img and PDQ "
            f"{r.timing.get('pdq_s_per_img', 0) * 1000:.0f} ms/img are small next to SSCD's "
            f"{per_img * 1000:.0f} ms/img here). Score normalisation and centring cost one 512 x background "
            "matrix product per query (microseconds).\n"
        )

    # -- misses
    add("### Misses (edited members not exact and not found as replica with the right id; raw SSCD)\n")
    add(
        "Seen on the images (seed 0): meme-style captions covering most of the frame, desktop-window screenshots "
        "where the photo fills under a quarter of the canvas, and chains of two or three strong edits "
        "(perspective + blur + crop, JPEG q8-25 + text). All but a few still land in the `similar` band with "
        "the right id.\n"
    )
    miss = sp.pos & ~(r.correct & (base.score >= t.replica_sscd)) & (r.verdicts != "exact")
    by_fam: dict[str, list[int]] = defaultdict(list)
    for i in np.flatnonzero(miss):
        by_fam[str(fam[i])].append(int(i))
    for f in sorted(by_fam, key=lambda f: -len(by_fam[f])):
        items = by_fam[f]
        add(f"- **{f}** ({len(items)} of {int(((fam == f) & sp.pos).sum())}):")
        for i in sorted(items, key=lambda i: base.score[i])[:6]:
            q = r.queries[i]
            who = "right id" if r.correct[i] else f"wrong id {r.ids[base.row[i]]}"
            add(
                f"  - SSCD {base.score[i]:.3f} ({who}, verdict {r.verdicts[i]}), {q.size[0]}x{q.size[1]}: "
                f"{describe_params(q.params)}"
            )
    add("")
    add("### Highest-scoring non-members (raw SSCD)\n")
    top = np.flatnonzero(neg_all)
    top = top[np.argsort(-base.score[top])][:8]
    for i in top:
        q = r.queries[i]
        add(
            f"- {base.score[i]:.3f}: {q.source} ({q.family}{': ' + describe_params(q.params) if q.params else ''}) "
            f"-> corpus {r.ids[base.row[i]]}"
        )
    add(
        "\nOn inspection (seed 0) these are not copies but other shots of the same scene: 745880539 and corpus "
        "000010357 (Flickr 746787916) are a burst of the same dog leaving the same agility tunnel; the 0.48-0.49 "
        "pairs are other moments of the same karate bout, rodeo, football game and street dance. Flickr8k holds "
        "several photos per photographer and event, so these hard negatives set the 1% point.\n"
    )
    add(
        f"Run time: {time.perf_counter() - r.started:.0f} s in all, of which embedding {r.seconds_embed:.0f} s "
        "(index and query embeddings are cached under bench/results/.cache/; a first run here took about 8.5 min "
        "to index, 10 min to embed the base queries and about 7 min per extra view).\n"
    )
    return "\n".join(L)


def recommendation(r: Run) -> str:
    """The advice for the scanner, with this run's numbers (methods missing from the run are left out)."""
    by = {x["method"]: x for x in r.results}
    raw = by["raw SSCD (scanner today)"]
    lines = [
        "### Recommendation for the scanner\n",
        f"1. Ship thresholds.json (raw SSCD top-1, one view): TPR {raw['tpr']:.3f} at FPR {raw['fpr']:.3f} "
        f"(edited) / {raw['fpr_untouched']:.3f} (untouched). No view or normalisation is needed to meet the "
        "target on this data; differences below are a handful of queries out of 1,000, so treat anything "
        "under about 0.005 as noise.",
    ]
    centre_view = by.get("multi-view (+centre60)")
    if centre_view:
        # `scan --centre-view` keeps the one-view replica threshold: its rates there are what users get
        m = next(x for x in r.methods if x.name == "multi-view (+centre60)")
        ok, sp, thr = m.row == r.src_row, r.split, r.thresholds.replica_sscd
        tpr, fpr = rates(m.score[sp.pos], ok[sp.pos], m.score[sp.neg], thr)
        _, fpru = rates(m.score[sp.pos], ok[sp.pos], m.score[sp.neg_untouched], thr)
        lines.append(
            f"2. `scan --centre-view` (opt-in): add one centre-crop view (centre 60% of each side; every image, "
            f"untouched ones too) and keep the best view. At the shipped replica threshold {thr:.2f}: TPR {tpr:.3f}, "
            f"FPR {fpr:.3f} (edited) / {fpru:.3f} (untouched); its own 1%-FPR threshold would be "
            f"{centre_view['threshold']:.2f} (TPR {centre_view['tpr']:.3f}). It recovers small photos inside "
            "screenshots and some combined edits (per-family table). It doubles SSCD work (throughput halves), "
            "so not by default. A horizontal-flip view adds nothing (flipped copies already score high), and "
            "rotation views were not needed: the rotate90 family is found by one view."
        )
    norm = by.get("score norm 1.00[0,2]")
    if norm:
        lines.append(
            f"3. SSCD score normalisation (beta 1, neighbours 1-3 of a background set): TPR {norm['tpr']:.3f} at "
            f"FPR {norm['fpr']:.3f} / {norm['fpr_untouched']:.3f}; with the centre view "
            f"{by.get('multi-view (+centre60) + score norm 1.00[0,2]', norm)['tpr']:.3f}. A real but small gain; "
            "it needs background vectors shipped with the index (non-member photos of the corpus's kind) and a "
            "threshold on the adjusted scale. Worth adding when calibration on the real corpus shows a gap."
        )
    lines.append(
        "4. Do not adopt the corpus-neighbour margin despite its numbers: it fails on duplicated "
        "corpus images (below). Centring alone changes nothing here.\n"
    )
    return "\n".join(lines)


def per_family_methods(
    methods: list[Scored], src_row: np.ndarray, family: np.ndarray, split: Split
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    thrs = [pick_threshold(m.score, split, REPLICA_FPR)[0] for m in methods]

    def tpr(m: Scored, thr: float, p: np.ndarray) -> float:
        return float(((m.score[p] >= thr) & (m.row[p] == src_row[p])).mean())

    for f in FAMILY_NAMES:
        p = split.pos & (family == f)
        if p.any():
            out[f] = [f"{tpr(m, thr, p):.2f}" for m, thr in zip(methods, thrs, strict=False)]
    out["**all: TPR**"] = [f"{tpr(m, thr, split.pos):.3f}" for m, thr in zip(methods, thrs, strict=False)]
    out["**FPR edited / untouched**"] = [
        f"{(m.score[split.neg] >= thr).mean():.3f} / {(m.score[split.neg_untouched] >= thr).mean():.3f}"
        for m, thr in zip(methods, thrs, strict=False)
    ]
    return out


if __name__ == "__main__":
    from provenance.errors import ProvenanceError

    try:
        raise SystemExit(main())
    except ProvenanceError as e:  # a model or corpus that cannot be read: its message, without a traceback
        print(f"calibrate: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
