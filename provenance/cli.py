"""The `provenance` command line: parses arguments, calls the library, prints results. No logic of its own."""

from __future__ import annotations

import enum
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from provenance.cli_options import progress_bar, with_scan_options
from provenance.errors import ProvenanceError

app = typer.Typer(
    help="Training-data provenance checker: find training images an image copies, and its provenance marks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
index_app = typer.Typer(help="Build and inspect indexes of image-caption corpora.", no_args_is_help=True)
app.add_typer(index_app, name="index")
RegistryPath = Annotated[Optional[Path], typer.Option("--registry", help="Do-not-train registry (provenance optout).")]
console = Console(stderr=True)
out = Console(soft_wrap=True)

EXIT_CLEAN, EXIT_FAIL_ON, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _fail(e: Exception, code: int = EXIT_USAGE) -> None:
    console.print(f"[bold red]error:[/] {escape(str(e))}")  # escaped: "provenance[ray]" is not rich markup
    raise typer.Exit(code)


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
IndexDir = Annotated[Path, typer.Option("--index", "-i", help="Index directory (e.g. indexes/coco).")]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait", min=0, help="Seconds to wait for another writer of the index to finish (default: refuse at once)."
    ),
]


def _fetch_options(cache: Path | None, allow_private_addresses: bool):
    from provenance.consent import FetchOptions

    return FetchOptions(cache_path=cache, allow_private_addresses=allow_private_addresses)


def _model_options(sscd_model, clip_model, clip_pretrained, device=None):
    from provenance.models import ModelOptions

    return ModelOptions(sscd_model=sscd_model, clip_model=clip_model, clip_pretrained=clip_pretrained, device=device)


# ------------------------------------------------------------------------------------- index


class Engine(enum.StrEnum):
    """Where `index build` embeds: this process, or a Ray cluster."""

    local = "local"
    ray = "ray"


@index_app.command("build")
def index_build(
    source: Annotated[
        str,
        typer.Argument(
            help="Image folder, .tar shards (folder or glob), or HF dataset (name, hf://name or saved dir)."
        ),
    ],
    index: IndexDir,
    descriptors: Annotated[str, typer.Option(help="Comma-separated: sscd,pdq,clip.")] = "sscd,pdq",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Index at most N items.")] = None,
    append: Annotated[
        bool, typer.Option(help="Add new items to an existing index without re-embedding old ones.")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="Local engine: decode threads. Ray engine: embedding actors (each gets its share of the CPUs)."
        ),
    ] = 2,
    engine: Annotated[
        Engine,
        typer.Option(
            help="Where to embed: this process (local), or a Ray cluster (ray; needs provenance[ray]). One part per shard either way.",
        ),
    ] = Engine.local,
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            help="Ray engine: the cluster to join ('auto': the one `ray start` runs here; default: RAY_ADDRESS or a new local one)."
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float,
        typer.Option(min=0.0, help="Ray engine: GPUs per actor (> 0: models on CUDA; 0.5 puts two actors on a GPU)."),
    ] = 0.0,
    image_column: Annotated[Optional[str], typer.Option(help="HF dataset: image column.")] = None,
    caption_column: Annotated[Optional[str], typer.Option(help="HF dataset: caption column.")] = None,
    id_column: Annotated[Optional[str], typer.Option(help="HF dataset: column of stable item ids.")] = None,
    split: Annotated[Optional[str], typer.Option(help="HF dataset split.")] = None,
    sscd_model: Annotated[
        Optional[str], typer.Option(help="sscd_disc_*.torchscript.pt or .onnx (default: bundled int8 ONNX).")
    ] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="OpenCLIP architecture (default ViT-B-32).")] = None,
    clip_pretrained: Annotated[
        Optional[str], typer.Option(help="OpenCLIP hub tag or local checkpoint (default laion2b_s34b_b79k).")
    ] = None,
    memory_budget_mb: Annotated[
        int, typer.Option(help="RAM budget for each FAISS index; picks the index type.")
    ] = 1024,
    thumbnails: Annotated[bool, typer.Option(help="Store small thumbnails for reports and the web page.")] = True,
    part_size: Annotated[
        int,
        typer.Option(min=1, help="Items per part of a folder or dataset (shards: one part each); the unit of resume."),
    ] = 10_000,
    wait: WaitOpt = 0.0,
    read_url_signals: Annotated[
        bool,
        typer.Option(
            "--read-url-signals",
            help="Also record each URL source's do-not-train signals (TDMRep, X-Robots-Tag, ai.txt, robots.txt), fetched politely and cached; needs [consent]. Signals inside the files are always read.",
        ),
    ] = False,
    consent_cache: Annotated[
        Optional[Path],
        typer.Option(help="SQLite cache of fetched signals for --read-url-signals (default: the user cache)."),
    ] = None,
    allow_private_addresses: Annotated[
        bool,
        typer.Option(
            "--allow-private-addresses",
            help="Let --read-url-signals fetch from private and loopback addresses (off: a guard against request forgery).",
        ),
    ] = False,
    respect_optouts: Annotated[
        bool,
        typer.Option(
            "--respect-optouts",
            help="Skip items the --registry opts out (by id, URL, domain or content), counted as opted_out.",
        ),
    ] = False,
    registry: RegistryPath = None,
    verbose: Verbose = False,
) -> None:
    """Embed a corpus into FAISS indexes (SSCD, PDQ, OpenCLIP) with metadata and caption search.

    The index is written in parts (one per shard, or per --part-size items); a killed build keeps its complete
    parts and the same command resumes. --append adds parts and leaves the existing ones untouched."""
    from provenance.indexer import BuildOptions, build

    _setup_logging(verbose)
    if respect_optouts != (registry is not None):
        _fail(typer.BadParameter("--respect-optouts and --registry go together"))
    if engine is Engine.local and (ray_address is not None or gpus_per_worker):
        _fail(typer.BadParameter("--ray-address and --gpus-per-worker need --engine ray"))
    ray_options = None
    if engine is Engine.ray:
        from provenance.ray_engine import RayOptions

        ray_options = RayOptions(address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
    opts = BuildOptions(
        descriptors=descriptors.split(","),
        batch_size=batch_size,
        limit=limit,
        append=append,
        workers=workers,
        models=_model_options(sscd_model, clip_model, clip_pretrained),
        memory_budget_bytes=memory_budget_mb << 20,
        thumbnails=thumbnails,
        part_size=part_size,
        wait=wait,
        read_url_signals=read_url_signals,
        url_fetch=_fetch_options(consent_cache, allow_private_addresses) if read_url_signals else None,
        registry=registry,
        engine=engine.value,
        ray=ray_options,
    )
    src_opts = {"image_column": image_column, "caption_column": caption_column, "id_column": id_column, "split": split}
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]indexing"),
            BarColumn(),
            TextColumn("{task.fields[done]} embedded"),
            TextColumn("[yellow]{task.fields[skipped]} skipped"),
            TextColumn("{task.fields[rate]:.1f} images/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as bar:
            progress = _BuildProgress(bar, bar.add_task("index", total=limit, done=0, skipped=0, rate=0.0))
            result = build(source, index, opts, progress=progress, source_options=src_opts)
    except ProvenanceError as e:
        _fail(e, _index_error_code(e))
    counts = result.manifest["counts"]
    console.print(
        f"[green]built[/] {index}: {counts['indexed']} items indexed ({result.added} new"
        f"{f', {result.resumed} resumed' if result.resumed else ''}{f', {result.reused} kept' if result.reused else ''}), "
        f"{result.skipped} skipped this run, {result.parts} new parts, {result.seconds:.1f}s"
    )
    for reason, n in counts["skipped_by_reason"].items():
        console.print(f"  skipped ({reason}): {n}")
    if engine is Engine.ray:  # each shard's summary (the local engine logs them as it goes)
        for p in result.manifest["parts"][-result.parts :] if result.parts else []:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(p.get("skipped_by_reason", {}).items())) or "none skipped"
            console.print(f"  {p.get('unit') or p['name']}: {p['n']} indexed, {reasons}")


class _BuildProgress:
    """The build's progress callback: items embedded and skipped, images/s, and (once known) the ETA."""

    def __init__(self, bar: Progress, task: TaskID):
        self.bar, self.task = bar, task
        self.started = time.perf_counter()

    def __call__(self, done: int, skipped: int) -> None:
        rate = (done + skipped) / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(self.task, completed=done + skipped, done=done, skipped=skipped, rate=rate)

    def set_total(self, total: int) -> None:
        """The expected item count (the Ray engine estimates it from the units done), for the ETA."""
        self.bar.update(self.task, total=total)


@index_app.command("info")
def index_info(
    index_dir: Annotated[Path, typer.Argument(help="Index directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Show what an index holds: counts, descriptors, models, and which FAISS index was chosen and why."""
    from provenance.store import ProvenanceIndex

    try:
        idx = ProvenanceIndex.open(index_dir)
        m = idx.describe()
    except ProvenanceError as e:
        _fail(e, _index_error_code(e))
    if as_json:
        out.print_json(json.dumps(m, default=str))
        return
    c = m["counts"]
    out.print(
        f"[bold]{index_dir}[/]  built {m['built_at']} by provenance {m['tool_version']}  (format {m['format_version']})"
    )
    source = m.get("source") or {}
    out.print(f"source: {source.get('kind', '-')} {source.get('location', '')}")
    removed = f", {c['removed']} removed (index compact drops them)" if c.get("removed") else ""
    by_reason = f" {c['skipped_by_reason']}" if c["skipped_by_reason"] else ""
    out.print(f"items: {c['indexed']} indexed, {c['skipped']} skipped{by_reason}{removed}; {len(m['parts'])} parts")
    # the factory string ("IVF4096(SQ8),PQ256x4fs,Refine(SQ8)") has no spaces: fold it, not "…"
    t = Table(
        "descriptor", "model", "dim", "metric", Column("FAISS index", overflow="fold"), Column("why", overflow="fold")
    )
    for name, d in m["descriptors"].items():
        plan = d.get("ann") or {}
        others = {f: n for f, n in (d.get("ann_parts") or {}).items() if f != plan.get("factory")}
        why = plan.get("reason", "empty index") + (
            f" (largest part; other parts: {', '.join(f'{f} x{n}' for f, n in others.items())})" if others else ""
        )
        t.add_row(
            name, f"{d['model_id']} ({d['checksum'] or '-'})", str(d["dim"]), d["metric"], plan.get("factory", "-"), why
        )
    out.print(t)


EXIT_BROKEN_INDEX = 4  # an index file is missing, truncated or corrupt (2 is the usage error)


def _index_error_code(e: Exception) -> int:
    from provenance.errors import IndexFormatError

    return EXIT_BROKEN_INDEX if isinstance(e, IndexFormatError) else EXIT_USAGE


@index_app.command("remove")
def index_remove(
    index: IndexDir,
    ids: Annotated[Optional[list[str]], typer.Option("--id", help="Item id to remove (repeatable).")] = None,
    ids_file: Annotated[
        Optional[Path], typer.Option("--ids-file", help="File of item ids, one per line ('-': stdin).")
    ] = None,
    optouts: Annotated[
        Optional[Path], typer.Option("--optouts", help="Remove every item this do-not-train registry covers.")
    ] = None,
    wait: WaitOpt = 0.0,
    verbose: Verbose = False,
) -> None:
    """Remove items (takedowns, opt-outs): they stop appearing in searches, scans and the API at once.

    Parts are immutable: removal writes a tombstone list; `provenance index compact` drops the rows from disk."""
    from provenance.store import remove_items

    _setup_logging(verbose)
    wanted = list(ids or [])
    if ids_file is not None:
        try:
            text = sys.stdin.read() if str(ids_file) == "-" else ids_file.read_text(encoding="utf-8")
        except OSError as e:
            _fail(typer.BadParameter(f"--ids-file {ids_file}: {e.strerror or e}"))
        wanted += [line.strip() for line in text.splitlines() if line.strip()]
    if optouts is not None:
        from provenance.registry import covered_ids

        try:
            found = covered_ids(optouts, index)
        except ProvenanceError as e:
            _fail(e, _index_error_code(e))
        console.print(f"the registry {optouts} covers {len(found)} item(s) of {index}")
        if not found and not wanted:
            return
        wanted += found
    if not wanted:
        _fail(typer.BadParameter("give the items to remove with --id ID (repeatable), --ids-file FILE or --optouts R"))
    try:
        res = remove_items(index, wanted, wait=wait)
    except ProvenanceError as e:
        _fail(e, _index_error_code(e))
    console.print(
        f"[green]removed[/] {len(res.removed)} item(s) from {index}"
        + (f"; {len(res.already_removed)} already removed" if res.already_removed else "")
    )
    if res.not_found:
        shown = ", ".join(res.not_found[:10]) + (" ..." if len(res.not_found) > 10 else "")
        console.print(f"[yellow]{len(res.not_found)} id(s) not in the index:[/] {shown}")
        raise typer.Exit(EXIT_FAIL_ON)


@index_app.command("compact")
def index_compact(
    index: IndexDir,
    wait: WaitOpt = 0.0,
    memory_budget_mb: Annotated[int, typer.Option(help="RAM budget for each rewritten part's FAISS index.")] = 1024,
    verbose: Verbose = False,
) -> None:
    """Rewrite the parts that hold removed items without them, and clear the tombstones.

    A server that had the index open must be restarted afterwards (the old parts are deleted)."""
    from provenance.store import compact

    _setup_logging(verbose)
    try:
        res = compact(index, wait=wait, memory_budget_bytes=memory_budget_mb << 20)
    except ProvenanceError as e:
        _fail(e, _index_error_code(e))
    console.print(
        f"[green]compacted[/] {index}: {res['parts_rewritten']} part(s) rewritten, "
        f"{res['rows_dropped']} removed row(s) dropped, {res['items']} items"
    )


@index_app.command("verify")
def index_verify(
    index_dir: Annotated[Path, typer.Argument(help="Index directory.")],
    quick: Annotated[bool, typer.Option("--quick", help="Check sizes only, not checksums.")] = False,
) -> None:
    """Check every file of an index against the sizes and sha256 checksums its manifest and part markers record.

    Exit 0 when all is well, 4 (naming each broken file) otherwise."""
    from provenance.store import verify

    problems = verify(index_dir, checksums=not quick)
    if not problems:
        console.print(
            f"[green]ok[/] {index_dir}: every file has its recorded size" + ("" if quick else " and checksum")
        )
        return
    for p in problems:
        console.print(f"[bold red]broken:[/] {p.path}: {p.problem}")
    console.print(
        f"{len(problems)} problem(s): rebuild the index (`provenance index build SOURCE --index {index_dir}`); "
        "a build with the same source rewrites only what is missing once the broken parts are deleted"
    )
    raise typer.Exit(EXIT_BROKEN_INDEX)


@index_app.command("upgrade")
def index_upgrade(
    index_dir: Annotated[Path, typer.Argument(help="A format-1 index directory, converted in place.")],
    part_size: Annotated[int, typer.Option(min=1, help="Rows per part.")] = 10_000,
    wait: WaitOpt = 0.0,
    verbose: Verbose = False,
) -> None:
    """Convert an index of format 1 (before parts) to the current format, keeping every vector (no re-embedding)."""
    from provenance.store import upgrade

    _setup_logging(verbose)
    try:
        m = upgrade(index_dir, wait=wait, part_size=part_size)
    except ProvenanceError as e:
        _fail(e, _index_error_code(e))
    console.print(
        f"[green]upgraded[/] {index_dir}: format {m['format_version']}, {m['counts']['indexed']} items "
        f"in {len(m['parts'])} part(s)"
    )


# ------------------------------------------------------------------------------------ search


@app.command("search")
def search(
    index: IndexDir,
    image: Annotated[Optional[Path], typer.Option("--image", help="Find corpus images like this image.")] = None,
    text: Annotated[
        Optional[str], typer.Option("--text", help="Find corpus images matching this text (OpenCLIP).")
    ] = None,
    caption: Annotated[
        Optional[str], typer.Option("--caption", help="Full-text search of captions, e.g. an artist's name.")
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000)] = 10,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    registry: RegistryPath = None,
    verbose: Verbose = False,
) -> None:
    """Search an index by image, by text, or by caption words. Scores: higher = more similar."""
    from provenance.descriptors.pdq import PDQ_MATCH_THRESHOLD
    from provenance.images import load_image
    from provenance.search import Searcher, drop_far_pdq

    _setup_logging(verbose)
    hidden = 0
    if sum(x is not None for x in (image, text, caption)) != 1:
        _fail(typer.BadParameter("give exactly one of --image, --text, --caption"))
    try:
        searcher = Searcher.open(index)
        if image is not None:
            per = searcher.search_image(load_image(image).image, k)
            close = drop_far_pdq(per)
            hidden = len(per.get("pdq", [])) - len(close.get("pdq", []))
            rows = [dict(m.to_dict()) for name in close for m in close[name]]
        elif text is not None:
            rows = [m.to_dict() for m in searcher.search_text(text, k)]
        else:
            rows = [h.to_dict() for h in searcher.search_caption(caption or "", k)]
        if registry is not None:
            from provenance.registry import Registry, reasons_for_ids

            with Registry(registry, create=False) as reg:
                why = reasons_for_ids(reg, searcher.index, [r["id"] for r in rows])
            for r in rows:
                if r["id"] in why:
                    r["opted_out"] = why[r["id"]]
    except ProvenanceError as e:
        _fail(e, _index_error_code(e))
    if as_json:
        out.print_json(json.dumps(rows))
        return
    t = Table("rank", "id", "score", "descriptor", "caption", "source", "training")
    for i, r in enumerate(rows, 1):
        t.add_row(
            str(i),
            r["id"] + (f" [red](opted out: {r['opted_out']['by']})[/]" if r.get("opted_out") else ""),
            f"{r['score']:.3f}" + (f" ({r['distance']} bits)" if r.get("distance") is not None else ""),
            r.get("descriptor", "caption"),
            (r.get("caption") or "")[:70],
            (r.get("source") or "")[:50],
            (r.get("consent") or {}).get("training", ""),
        )
    out.print(t)
    if not rows:
        console.print("no results")
    if hidden:
        console.print(
            f"{hidden} PDQ neighbour(s) beyond {PDQ_MATCH_THRESHOLD} bits not shown: at that distance a hash match is noise"
        )


# -------------------------------------------------------------------------------------- scan


@app.command("scan")
@with_scan_options()
def scan(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs.")],
    index: IndexDir,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | jsonl | json | csv | html")] = "table",
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write the report here (default: stdout).")
    ] = None,
    fail_on: Annotated[
        Optional[list[str]],
        typer.Option("--fail-on", help="exact | replica | similar | watermark (repeatable); exit 1 if met."),
    ] = None,
    thresholds: Annotated[
        Optional[Path], typer.Option(help="JSON file of verdict thresholds (default: calibrated).")
    ] = None,
    registry: RegistryPath = None,
    verbose: Verbose = False,
    scan_options: dict | None = None,  # the ScanOptions flags (provenance.cli_options), e.g. --thorough
) -> None:
    """Scan images for replicas of corpus images and for watermark/provenance evidence."""
    from provenance.images import iter_image_paths
    from provenance.options import ScanOptions
    from provenance.report import write_report
    from provenance.scan import Scanner, fail_on_met, load_thresholds

    _setup_logging(verbose)
    formats = ("table", "jsonl", "json", "csv", "html")
    if fmt not in formats:
        _fail(typer.BadParameter(f"--format must be one of {', '.join(formats)}, not {fmt!r}"))
    conditions = [c.strip() for cond in (fail_on or []) for c in cond.split(",") if c.strip()]
    bad = [c for c in conditions if c not in ("exact", "replica", "similar", "watermark")]
    if bad:
        _fail(typer.BadParameter(f"--fail-on: unknown condition(s) {bad}; use exact, replica, similar, watermark"))
    if fmt == "html" and output is None:
        _fail(typer.BadParameter("--format html needs --output FILE"))
    try:
        opts = ScanOptions.build(**(scan_options or {}), thresholds=load_thresholds(thresholds))
    except ProvenanceError as e:  # a broken rule of the options (InvalidOptionsError) or an unreadable thresholds file
        _fail(e)
    files = iter_image_paths(paths)
    if not files:
        _fail(typer.BadParameter(f"no images found in {' '.join(paths)}"))
    try:
        scanner = Scanner.open(index, opts)
        if registry is not None:
            from provenance.registry import Registry

            scanner.registry = Registry(registry, create=False)
        with progress_bar("scanning", console, transient=True) as bar:
            task = bar.add_task("scan", total=len(files))
            records = scanner.scan_paths(files, progress=lambda r: bar.advance(task))
    except ProvenanceError as e:
        _fail(e, _index_error_code(e))  # a broken index file: 4
    write_report(records, fmt, output, thumbnails=scanner.index.thumbnail)  # output None = stdout
    if output is not None:
        console.print(f"wrote {fmt} report for {len(records)} images to {output}")
    errors = sum(r.verdict == "error" for r in records)
    if conditions and fail_on_met(records, conditions):
        raise typer.Exit(EXIT_FAIL_ON)
    if errors:
        console.print(f"[yellow]{errors} input(s) could not be read[/]")
        raise typer.Exit(EXIT_UNREADABLE)


# -------------------------------------------------------------------------------------- demo


@app.command("demo")
def demo(
    index: Annotated[Path, typer.Option("--index", help="Where to build the sample index.")] = Path("indexes/sample"),
    report: Annotated[Path, typer.Option(help="Where to write the demo scan report.")] = Path("out/demo-report.html"),
    verbose: Verbose = False,
) -> None:
    """Index the built-in sample corpus (51 CC-licensed COCO photos), search it, and scan edited copies."""
    from provenance.demo import run_demo

    _setup_logging(verbose)
    try:
        run_demo(index, report, out)
    except ProvenanceError as e:
        _fail(e)


def _register_optional_commands() -> None:
    """Commands that live in their own modules (generator, server)."""
    for module in (
        "provenance.cli_generate",
        "provenance.cli_serve",
        "provenance.cli_audit",
        "provenance.cli_consent",
        "provenance.cli_optout",
    ):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(app)


_register_optional_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
