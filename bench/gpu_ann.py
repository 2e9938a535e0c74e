"""GPU check of the ANN layer: build and search 1M x 512 vectors on a GPU (Flat, IVF), report JSON."""

# Run on the GPU machine (one short script, ~3-5 minutes on an H100/H200):
#
#     python bench/gpu_ann.py [--n 1000000] [--wheels DIR] [--out $OUT/gpu_ann.json]
#
# With a faiss that has GPU support it measures GpuIndexFlatIP, GpuIndexIVFFlat (IVF4096) and
# GpuIndexIVFPQ (IVF4096,PQ64): build time (copy + train + add), QPS at batch 1 and 1024,
# recall@10 against exact search. Without one (the project installs faiss-cpu) it says so on
# stderr, records "faiss_gpu": false, exits 2, and measures exact search with torch on the GPU
# instead. Either way it then times the project's own path, provenance.ann.build_index(use_gpu)
# for the plan plan_index picks at 1M (k-means on the GPU, in faiss or torch; fast-scan PQ codes
# on the CPU), and that index's recall.
#
# faiss GPU wheels (findings of 2026-11): all need CUDA 12's cuBLAS (nvidia-cublas-cu12: a 581 MB
# wheel) which a CUDA 13 image lacks; faiss-gpu-cu12 1.14.1.post1 (48 MB) + nvidia-cuda-runtime-cu12
# (3.5 MB) fit a 60 MB carry, and the 16 kB forwarder below (libcublas.so.12 -> the image's
# libcublas.so.13, the 8 cuBLAS calls faiss makes) lets it load, but its kernels are built for
# sm_70 and sm_80 only (no PTX): they cannot run on Hopper (H100/H200, sm_90). --wheels DIR
# installs such wheels into a temp folder and re-runs this script on them, for a future wheel
# or an older GPU; a GPU Flat search is checked against numpy before anything else.
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DIM = 512

SHIM_C = r"""
/* libcublas.so.12 -> libcublas.so.13 forwarder for the 8 cuBLAS calls of faiss-gpu-cu12. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
typedef int st; typedef void* H;
static void* lib13(void) {
  static void* h = 0;
  if (!h) { h = dlopen("libcublas.so.13", RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "cublas shim: %s\n", dlerror()); abort(); } }
  return h;
}
#define FWD(ret, name, params, args) \
  ret name params { static ret (*f) params = 0; \
    if (!f) { f = (ret (*) params) dlsym(lib13(), #name); \
      if (!f) { fprintf(stderr, "cublas shim: no %s\n", #name); abort(); } } \
    return f args; }
FWD(st, cublasCreate_v2, (H* h), (h))
FWD(st, cublasDestroy_v2, (H h), (h))
FWD(st, cublasSetStream_v2, (H h, void* s), (h, s))
FWD(st, cublasGetMathMode, (H h, int* m), (h, m))
FWD(st, cublasSetMathMode, (H h, int m), (h, m))
FWD(st, cublasSgemmEx, (H h, int ta, int tb, int m, int n, int k, const float* al, const void* A, int At, int lda,
    const void* B, int Bt, int ldb, const float* be, void* C, int Ct, int ldc),
    (h, ta, tb, m, n, k, al, A, At, lda, B, Bt, ldb, be, C, Ct, ldc))
FWD(st, cublasGemmEx, (H h, int ta, int tb, int m, int n, int k, const void* al, const void* A, int At, int lda,
    const void* B, int Bt, int ldb, const void* be, void* C, int Ct, int ldc, int ct, int algo),
    (h, ta, tb, m, n, k, al, A, At, lda, B, Bt, ldb, be, C, Ct, ldc, ct, algo))
FWD(st, cublasGemmStridedBatchedEx, (H h, int ta, int tb, int m, int n, int k, const void* al, const void* A,
    int At, int lda, long long sA, const void* B, int Bt, int ldb, long long sB, const void* be, void* C, int Ct,
    int ldc, long long sC, int bc, int ct, int algo),
    (h, ta, tb, m, n, k, al, A, At, lda, sA, B, Bt, ldb, sB, be, C, Ct, ldc, sC, bc, ct, algo))
"""


def log(msg: str) -> None:
    print(f"[gpu_ann {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- getting a faiss GPU
def build_shim(out_dir: Path) -> Path:
    """Compile libcublas.so.12 (forwarder) and an empty libcublasLt.so.12 into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "cublas12_shim.c"
    src.write_text(SHIM_C)
    (out_dir / "v.map").write_text("libcublas.so.12 { global: cublas*; local: *; };\n")
    (out_dir / "lt.c").write_text("int cublaslt12_shim;\n")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-o", str(out_dir / "libcublas.so.12"), str(src),
         f"-Wl,--version-script={out_dir / 'v.map'}", "-Wl,-soname,libcublas.so.12", "-ldl"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-o", str(out_dir / "libcublasLt.so.12"), str(out_dir / "lt.c"),
         "-Wl,-soname,libcublasLt.so.12"],
        check=True,
    )  # fmt: skip
    return out_dir


def find_cublas13() -> str | None:
    """The folder of the image's libcublas.so.13 (torch's nvidia wheels, or a system CUDA 13)."""
    cands = []
    for p in sys.path:
        cands += glob.glob(os.path.join(p, "nvidia", "cu13", "lib", "libcublas.so.13"))
        cands += glob.glob(os.path.join(p, "nvidia", "cublas", "lib", "libcublas.so.13"))
        cands += glob.glob(os.path.join(p, "torch", "lib", "libcublas.so.13"))
    cands += glob.glob("/usr/local/cuda*/lib64/libcublas.so.13") + glob.glob(
        "/usr/lib/x86_64-linux-gnu/libcublas.so.13"
    )
    return os.path.dirname(cands[0]) if cands else None


def reexec_with_wheels(wheels: Path, argv: list[str]) -> int | None:
    """Install the carried faiss-gpu wheels into a temp dir and re-run this script on them."""
    fw = sorted(wheels.glob("faiss_gpu*.whl"))
    rt = sorted(wheels.glob("nvidia_cuda_runtime_cu12*.whl"))
    if not fw:
        log(f"no faiss_gpu*.whl in {wheels}")
        return None
    target = Path(tempfile.mkdtemp(prefix="faissgpu_"))
    log(f"installing {[w.name for w in fw + rt]} into {target}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
        + [str(w) for w in fw + rt],
        check=True,
    )
    libdirs = [str(p) for p in target.glob("nvidia/*/lib")]
    shim = wheels if (wheels / "libcublas.so.12").exists() else None
    if shim is None:
        try:
            shim = build_shim(target / "shim")
        except (OSError, subprocess.CalledProcessError) as e:
            log(f"cannot build the cuBLAS 12 -> 13 shim ({e}); faiss-gpu-cu12 will not load")
            return None
    cublas13 = find_cublas13()
    if cublas13 is None:
        log("no libcublas.so.13 found (torch's nvidia/cu13/lib, /usr/local/cuda): cannot use the shim")
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(REPO), env.get("PYTHONPATH", "")])
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(shim), *libdirs, cublas13, env.get("LD_LIBRARY_PATH", "")])
    env["_FAISS_WHEEL_DISABLE_CUDA_PRELOAD"] = "1"  # its loader wants nvidia-cublas-cu12; we give the shim
    env["GPU_ANN_REEXEC"] = "1"
    log(f"re-running with faiss from {target}, cuBLAS 13 from {cublas13}")
    return subprocess.run([sys.executable, __file__, *argv], env=env).returncode


# ----------------------------------------------------------------------------- data
def make_data(n: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SSCD-like vectors as bench_index.py makes them: real embeddings (when cached) or random
    parents, plus per-row noise with cos(row, parent) ~ U(0.30, 0.55); queries are copies of
    random rows (cos ~0.8). Returns xb (n, 512) float32, xq (nq, 512) float32, src (nq,)."""
    rng = np.random.default_rng(seed)
    cache = REPO / "bench" / "results" / ".cache" / "ann" / "real.npz"
    if cache.exists():
        parents = np.load(cache)["corpus"].astype(np.float32)
    else:
        parents = rng.standard_normal((3000, DIM)).astype(np.float32)
        parents /= np.linalg.norm(parents, axis=1, keepdims=True)
    xb = np.empty((n, DIM), np.float32)
    for s in range(0, n, 1 << 17):
        e = min(n, s + (1 << 17))
        rho = rng.uniform(0.30, 0.55, e - s).astype(np.float32)  # as bench_index.py
        sig = np.sqrt((1 / rho**2 - 1) / DIM)[:, None]
        x = parents[rng.integers(0, len(parents), e - s)] + sig * rng.standard_normal((e - s, DIM), dtype=np.float32)
        xb[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, nq, replace=False)
    sig = np.sqrt((1 / 0.8**2 - 1) / DIM)
    xq = xb[src] + sig * rng.standard_normal((nq, DIM), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return xb, xq.astype(np.float32), src


def recall10(ids: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, gt, strict=False)]))


def qps(search, xq: np.ndarray, batch: int, budget_s: float = 10.0) -> float:
    """Queries per second at a batch size, over at most `budget_s` seconds (after one warm-up)."""
    batch = min(batch, len(xq))
    search(xq[:batch])
    done, t0 = 0, time.perf_counter()
    while done + batch <= len(xq) and time.perf_counter() - t0 < budget_s:
        search(xq[done : done + batch])
        done += batch
    return done / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- the checks
def faiss_gpu_checks(xb, xq, src, res: dict) -> np.ndarray:
    import faiss

    gres = faiss.StandardGpuResources()
    n = xb.shape[0]
    # 0. sanity: a small GPU search must agree with numpy (catches a broken cuBLAS shim early)
    small = faiss.GpuIndexFlatIP(gres, DIM)
    small.add(xb[:4096])
    D, _I = small.search(xq[:64], 5)
    expect = np.sort(xq[:64] @ xb[:4096].T, axis=1)[:, ::-1][:, :5]
    res["sanity_max_abs_err"] = float(np.abs(D - expect).max())
    if not np.allclose(D, expect, atol=1e-3):
        raise RuntimeError(f"GPU Flat search disagrees with numpy (max error {res['sanity_max_abs_err']:.3g})")
    del small

    def timed_build(key: str, train: bool):
        t = time.perf_counter()
        cpu = faiss.index_factory(DIM, key, faiss.METRIC_INNER_PRODUCT)
        co = faiss.GpuClonerOptions()
        co.useFloat16 = key.endswith("PQ64")  # GPU IVFPQ lookup tables in float16 (needed for 64 sub-quantizers)
        index = faiss.index_cpu_to_gpu(gres, 0, cpu, co)
        if train:
            index.train(xb[np.random.default_rng(1).choice(n, min(n, 64 * 4096), replace=False)])
        index.add(xb)
        return index, time.perf_counter() - t

    flat, build_s = timed_build("Flat", False)
    t = time.perf_counter()
    _, gt = flat.search(xq, 10)
    res["gt_search_s"] = time.perf_counter() - t
    res["Flat"] = {
        "build_s": build_s,
        "qps_batch1": qps(lambda q, flat=flat: flat.search(q, 10), xq, 1),
        "qps_batch1024": qps(lambda q, flat=flat: flat.search(q, 10), xq, 1024),
        "copy_top1": float((gt[:, 0] == src).mean()),
    }
    # exactness of GPU Flat vs CPU brute force on 100 queries
    s = xq[:100] @ xb.T  # (100, n)
    cpu_gt = np.argpartition(-s, 10, axis=1)[:, :10]  # top-10 as a set: recall ignores order
    res["Flat"]["recall10_vs_cpu_exact"] = recall10(gt[:100], cpu_gt)
    log(f"Flat: {res['Flat']}")
    del flat

    for key in ("IVF4096,Flat", "IVF4096,PQ64"):
        index, build_s = timed_build(key, True)
        out = {"build_s": build_s, "nprobe": {}}
        for nprobe in (16, 32, 64, 128):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            _, ids = index.search(xq, 10)
            out["nprobe"][nprobe] = {
                "recall10": recall10(ids, gt),
                "copy_top1": float((ids[:, 0] == src).mean()),
                "qps_batch1": qps(lambda q, index=index: index.search(q, 10), xq, 1, 5.0),
                "qps_batch1024": qps(lambda q, index=index: index.search(q, 10), xq, 1024, 5.0),
            }
        res[key] = out
        log(f"{key}: {out}")
        del index
    return gt


def library_check(xb, xq, gt, res: dict) -> None:
    """The project's own path: plan_index(1M) + build_index(use_gpu=True), searched on the CPU."""
    from provenance import ann

    plan = ann.plan_index(xb.shape[0], DIM)
    xb16 = xb.astype(np.float16)
    t = time.perf_counter()
    index = ann.build_index(xb16, plan, use_gpu=ann.gpu_available())
    build_s = time.perf_counter() - t
    got = ann.search(index, xq[:2000], 10, plan, rerank_vectors=xb16)
    res["library"] = {
        "gpu_build": ("faiss" if ann._faiss_gpus() else "torch") if ann.gpu_available() else "none (CPU)",
        "factory": plan.factory,
        "params": plan.params,
        "build_s": build_s,
        "recall10": recall10(got.ids, gt[:2000]),
    }
    log(f"library: {res['library']}")


def torch_fallback(xb, xq, src, res: dict, device: str = "cuda") -> np.ndarray | None:
    """Exact search with torch on the GPU (fp32 matmul + topk), when faiss has no GPU."""
    try:
        import torch
    except ImportError:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        log("torch sees no GPU either: nothing measured on a GPU")
        return None
    t = time.perf_counter()
    B = torch.from_numpy(xb).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t

    def search(q: np.ndarray) -> np.ndarray:
        s = torch.from_numpy(q).to(device) @ B.T
        return s.topk(10, dim=1).indices.cpu().numpy()

    gt = np.concatenate([search(xq[i : i + 1024]) for i in range(0, len(xq), 1024)])
    res["torch_flat"] = {
        "build_s": build_s,
        "qps_batch1": qps(search, xq, 1),
        "qps_batch1024": qps(search, xq, 1024),
        "copy_top1": float((gt[:, 0] == src).mean()),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else device,
    }
    log(f"torch flat: {res['torch_flat']}")
    return gt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nq", type=int, default=10_000)
    ap.add_argument("--wheels", type=Path, default=None, help="folder with faiss_gpu_cu12 + cuda runtime wheels")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_ann.json")
    ap.add_argument("--build-shim", type=Path, default=None, help="only compile the cuBLAS 12->13 shim into DIR")
    ap.add_argument("--torch-device", default="cuda", help="device of the torch fallback (cpu: smoke test)")
    args = ap.parse_args()
    if args.build_shim:
        log(f"shim built in {build_shim(args.build_shim)}")
        return 0

    import faiss

    res: dict = {"faiss_version": faiss.__version__, "faiss_file": faiss.__file__, "n": args.n, "nq": args.nq}
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu == 0 and args.wheels and not os.environ.get("GPU_ANN_REEXEC"):
        rc = reexec_with_wheels(args.wheels, sys.argv[1:])
        if rc is not None and rc >= 0:
            return rc
        if rc is not None:  # killed by a signal: the shim or the wheel does not work on this machine
            log(f"faiss-gpu run died with signal {-rc}: falling back to what this faiss and torch can do")
    res["faiss_gpu"] = ngpu > 0
    if ngpu == 0:
        log(
            f"FAISS HAS NO GPU here (faiss {faiss.__version__} from {faiss.__file__}, get_num_gpus()=0): "
            "faiss GPU indexes NOT measured; see --wheels. Measuring torch exact search instead."
        )

    t = time.perf_counter()
    xb, xq, src = make_data(args.n, args.nq)
    res["data_s"] = time.perf_counter() - t
    log(f"data {xb.shape} in {res['data_s']:.1f} s")
    gt = None
    if ngpu:
        try:
            gt = faiss_gpu_checks(xb, xq, src, res)
        except Exception as e:  # e.g. "no kernel image is available": record it, go on with torch
            res["error"] = f"faiss GPU: {type(e).__name__}: {e}"
            log(f"FAILED: {res['error']}")
    try:
        if gt is None:
            gt = torch_fallback(xb, xq, src, res, args.torch_device)
        if gt is not None:
            library_check(xb, xq, gt, res)
    except Exception as e:  # report what was measured before the failure, then fail loudly
        res["error"] = (res.get("error", "") + f"; {type(e).__name__}: {e}").lstrip("; ")
        log(f"FAILED: {type(e).__name__}: {e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))
    return 1 if "error" in res else (0 if ngpu else 2)


if __name__ == "__main__":
    sys.exit(main())
