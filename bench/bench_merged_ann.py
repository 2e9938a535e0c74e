"""The merged on-disk ANN over parts (provenance.merged_ann): full build vs an append of ~10% more rows, both
from pre-computed float16 vectors, then 1,000 single queries against the merged lists (1 thread).

Data: the synthetic SSCD-like corpus of bench/bench_index.py (`corpus_<n>.f16`, made there), cut into parts of
--part-size rows written as the part files the indexer writes (`<part>/sscd.npy`, float16). The first
(1 - append share) of the parts are the "build"; the rest are appended to it (no k-means: the template is
reused, the new parts' codes are encoded and merged with the old lists into a new file).

Queries: bench_index's headline set (real edited copies, synthetic copies, novel COCO photos) plus its held-out
rows; recall@10 against an exact search over the same float16 rows. Latency: CPU thread time per query, in a
fresh process that opens the merged index (lists memory-mapped) and re-ranks from the parts' files by pread.
Memory: RssAnon and RssFile from /proc/self/status after the queries (page cache warm: the files were just
written; nothing is dropped, the machine being shared).

    python bench/bench_merged_ann.py --n 1000000 --part-size 10000 --append-share 0.1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

logger = logging.getLogger("bench_merged_ann")
RESULTS = REPO / "bench" / "results" / "index.md"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _mem() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out


def write_parts(corpus: np.ndarray, root: Path, part_size: int) -> list[Path]:
    paths = []
    for i, start in enumerate(range(0, len(corpus), part_size)):
        p = root / f"{i + 1:06d}-items" / "sscd.npy"
        paths.append(p)
        if p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        np.save(p.with_suffix(".tmp.npy"), np.asarray(corpus[start : start + part_size]))
        os.replace(p.with_suffix(".tmp.npy"), p)
    return paths


class Stages:
    """Wall and CPU seconds of each finished stage, kept in a JSON file: a killed run resumes at the first
    unfinished stage (a part's codes file is a finished stage of its own) and reports the sum of every run's
    stage times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, list[float]] = json.loads(path.read_text()) if path.exists() else {}

    def add(self, key: str, wall: float, cpu: float) -> None:
        w, c = self.done.get(key, [0.0, 0.0])
        self.done[key] = [w + wall, c + cpu]
        self.done.setdefault("load", []).append([key, round(os.getloadavg()[0], 1)])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.done))
        os.replace(tmp, self.path)

    def get(self, key: str) -> tuple[float, float]:
        w, c = self.done.get(key, [0.0, 0.0])
        return w, c


def _add_parts(paths: list[Path], first_seq: int, template: Path, out: Path, stages: Stages, key: str) -> list[Path]:
    from provenance import merged_ann as ma

    codes = []
    for seq, p in enumerate(paths, first_seq):
        codes.append(out / f"codes.{seq}.faiss")
        if codes[-1].exists():  # finished by an earlier (killed) run
            continue
        t, c = time.perf_counter(), _cpu()
        ma.add_part_codes(template, p, seq, codes[-1])
        stages.add(key, time.perf_counter() - t, _cpu() - c)
        if seq % 50 == 0:
            logger.info("%s: part %d of %d", key, seq - first_seq + 1, len(paths))
    return codes


def build(paths: list[Path], out: Path, nprobe: int | None, nlist: int | None, stages: Stages) -> dict:
    from provenance import merged_ann as ma

    out.mkdir(parents=True, exist_ok=True)
    arrays = [np.load(p, mmap_mode="r") for p in paths]
    n = sum(len(a) for a in arrays)
    plan = ma.plan_merged(n, arrays[0].shape[1], "ip", nprobe, nlist)
    if not (out / "template.faiss").exists():
        t, c = time.perf_counter(), _cpu()
        ma.train_template(arrays, plan, out / "template.faiss")
        stages.add("train", time.perf_counter() - t, _cpu() - c)
        logger.info("trained %s", plan.factory)
    codes = _add_parts(paths, 1, out / "template.faiss", out, stages, "add")
    if not (out / "merged.faiss").exists():
        t, c = time.perf_counter(), _cpu()
        ma.merge_lists(out / "template.faiss", codes, out / "merged.faiss", out / "merged.ivfdata")
        stages.add("merge", time.perf_counter() - t, _cpu() - c)
    ma.remove_files(codes)
    (tr, trc), (ad, adc), (me, mec) = stages.get("train"), stages.get("add"), stages.get("merge")
    return {
        "n": n,
        "plan": plan.to_dict(),
        "train_s": tr,
        "add_s": ad,
        "merge_s": me,
        "build_s": tr + ad + me,
        "build_cpu_s": trc + adc + mec,
    }


def append(paths: list[Path], first_seq: int, out: Path, new: Path, stages: Stages) -> dict:
    from provenance import merged_ann as ma

    new.mkdir(parents=True, exist_ok=True)
    codes = _add_parts(paths, first_seq, out / "template.faiss", new, stages, "append_add")
    if not (new / "template.faiss").exists():
        os.link(out / "template.faiss", new / "template.faiss")
    if not (new / "merged.faiss").exists():
        t, c = time.perf_counter(), _cpu()
        ma.merge_lists(
            new / "template.faiss", [out / "merged.faiss", *codes], new / "merged.faiss", new / "merged.ivfdata"
        )
        stages.add("append_merge", time.perf_counter() - t, _cpu() - c)
    ma.remove_files(codes)
    (ad, adc), (me, mec) = stages.get("append_add"), stages.get("append_merge")
    return {
        "n_added": sum(len(np.load(p, mmap_mode="r")) for p in paths),
        "add_s": ad,
        "merge_s": me,
        "append_s": ad + me,
        "append_cpu_s": adc + mec,
    }


def query_child(args) -> None:
    import faiss

    from provenance import merged_ann as ma
    from provenance.parts import RowReader

    faiss.omp_set_num_threads(1)
    mem0 = _mem()
    plan = ma.MergedPlan.from_dict(json.loads(Path(args.plan).read_text()))
    if args.nprobe and args.nprobe[0]:
        plan = ma.MergedPlan(**{**plan.to_dict(), "nprobe": args.nprobe[0]})
    t = time.perf_counter()
    index = ma.load_merged(Path(args.index), plan)
    readers = {seq: RowReader.from_npy(p) for seq, p in enumerate(json.loads(Path(args.parts).read_text()), 1)}
    open_s = time.perf_counter() - t

    def read_rows(ids: np.ndarray) -> np.ndarray:
        seq, row = ma.split_id(ids)
        out = np.empty((len(ids), plan.dim), np.float16)
        for s in np.unique(seq):
            sel = seq == s
            out[sel] = readers[int(s)].read_rows(row[sel])
        return out

    xq = np.load(args.queries)
    for i in range(20):
        ma.search_merged(index, plan, xq[i : i + 1], 10, None, read_rows)
    cpu, wall, ids = np.empty(len(xq)), np.empty(len(xq)), np.empty((len(xq), 10), np.int64)
    for i in range(len(xq)):
        t, c = time.perf_counter(), time.thread_time()
        _, _, got = ma.search_merged(index, plan, xq[i : i + 1], 10, None, read_rows)
        cpu[i], wall[i] = time.thread_time() - c, time.perf_counter() - t
        seq, row = ma.split_id(got[0])
        ids[i] = np.where(got[0] < 0, -1, (seq - 1) * args.part_size + row)
    np.save(args.out_ids, ids)
    Path(args.out).write_text(
        json.dumps(
            {
                "open_s": open_s,
                "cpu_p50_ms": float(np.percentile(cpu, 50) * 1e3),
                "cpu_p99_ms": float(np.percentile(cpu, 99) * 1e3),
                "p50_ms": float(np.percentile(wall, 50) * 1e3),
                "p99_ms": float(np.percentile(wall, 99) * 1e3),
                "rss_anon_mb": _mem()["RssAnon"],
                "rss_file_mb": _mem()["RssFile"],
                "rss_anon_start_mb": mem0["RssAnon"],
                "load": os.getloadavg()[0],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--part-size", type=int, default=10_000)
    ap.add_argument("--append-share", type=float, default=0.1, help="appended rows / built rows")
    ap.add_argument("--dir", default="/tmp/bench-merged-ann")
    ap.add_argument("--nprobe", type=int, nargs="*", default=[0], help="0: the plan's default")
    ap.add_argument("--threads", type=int, default=2, help="faiss threads for the build")
    ap.add_argument("--reuse", action="store_true", help="query the indexes an earlier run built (its build times)")
    ap.add_argument("--nlist", type=int, default=0, help="0: the plan's rule (ann._nlist)")
    ap.add_argument("--cache", default="", help="folder for the synthetic corpus (default: bench_index's cache)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    for a in ("--index", "--plan", "--parts", "--queries", "--out", "--out-ids"):
        ap.add_argument(a)
    args = ap.parse_args()
    if args._child:
        return query_child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import bench_index as bi
    import faiss

    from training import ann_eval

    faiss.omp_set_num_threads(args.threads)
    real = bi.real_embeddings()
    if args.cache:
        bi.CACHE = Path(args.cache)  # 10M rows are 10 GB of float16: not inside the repository
        bi.CACHE.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    corpus = bi.synthesise(real["corpus"], args.n)
    logger.info("corpus ready (%.0f s)", time.perf_counter() - t)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = write_parts(corpus, root / "parts", args.part_size)
    logger.info("parts ready (%.0f s)", time.perf_counter() - t)
    stages = Stages(root / "stages.json")
    n_build_parts = round(len(paths) / (1 + args.append_share))
    base, extra = paths[:n_build_parts], paths[n_build_parts:]
    done = root / "build_append.json"
    if args.reuse and done.exists() and (root / "ann-000001" / "merged.faiss").exists():
        b, a = json.loads(done.read_text())  # measured by an earlier run of this command
    else:
        b = build(base, root / "ann-000000", None, args.nlist or None, stages)
        logger.info("build: %s", b)
        a = append(extra, n_build_parts + 1, root / "ann-000000", root / "ann-000001", stages)
        logger.info("append: %s", a)
        done.write_text(json.dumps([b, a]))
    n_all = b["n"] + a["n_added"]
    # queries and exact ground truth over every row (build + append)
    # the headline set of bench_index: 600 real copies, 349 synthetic copies, 51 novel photos; + 1,000 held-out rows
    qs = bi.make_queries(real, corpus[:n_all], 349, 1000)
    xq, qkind = qs["xq"], qs["kind"]
    gt_path = root / f"gt_{n_all}_{len(xq)}.npz"
    if gt_path.exists():
        gt = np.load(gt_path)["I"]
    else:
        t = time.perf_counter()
        gt = ann_eval.exact_search(xq, corpus[:n_all], 10)[1]
        np.savez(gt_path, I=gt)
        logger.info("exact top-10 of %d queries over %d rows: %.0f s", len(xq), n_all, time.perf_counter() - t)
    np.save(root / "queries.npy", xq)
    (root / "plan.json").write_text(json.dumps(b["plan"]))
    (root / "parts.json").write_text(json.dumps([str(p) for p in paths]))
    rows = []
    for nprobe in args.nprobe:
        cmd = [
            sys.executable,
            __file__,
            "--_child",
            "--index",
            str(root / "ann-000001" / "merged.faiss"),
            "--plan",
            str(root / "plan.json"),
            "--parts",
            str(root / "parts.json"),
            "--queries",
            str(root / "queries.npy"),
            "--out",
            str(root / "res.json"),
            "--out-ids",
            str(root / "ids.npy"),
            "--part-size",
            str(args.part_size),
            "--nprobe",
            str(nprobe),
        ]
        subprocess.run(cmd, check=True)
        res = json.loads((root / "res.json").read_text())
        ids = np.load(root / "ids.npy")
        head = qkind != bi.KIND_HELD_OUT
        standard = (qkind == bi.KIND_HELD_OUT) | (qkind == bi.KIND_REAL_COPY)  # as bench_index's "standard"
        res.update(
            nprobe=nprobe or b["plan"]["nprobe"],
            recall10=ann_eval.recall_at_k(ids[head], gt[head], 10),
            recall10_held_out=ann_eval.recall_at_k(ids[~head], gt[~head], 10),
            recall10_standard=ann_eval.recall_at_k(ids[standard], gt[standard], 10),
            **{
                f"recall10_{name}": ann_eval.recall_at_k(ids[qkind == kd], gt[qkind == kd], 10)
                for name, kd in (("real", bi.KIND_REAL_COPY), ("synth", bi.KIND_SYNTH_COPY), ("novel", bi.KIND_NOVEL))
            },
        )
        logger.info("query: %s", res)
        rows.append(res)
    out = {
        "n": args.n,
        "part_size": args.part_size,
        "build": b,
        "append": a,
        "queries": rows,
        "disk_mb": {f.name: f.stat().st_size / 2**20 for f in (root / "ann-000001").iterdir()},
        "load": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cmd": "python bench/bench_merged_ann.py " + " ".join(sys.argv[1:]),
    }
    (root / f"result_{args.n}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
