"""The `provenance audit` command: parses arguments, optionally generates from captions, audits, gates."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, cast

import typer
from rich.console import Console
from rich.table import Table

from provenance.cli_options import progress_bar, with_scan_options
from provenance.errors import ProvenanceError

if TYPE_CHECKING:
    from provenance.audit import AuditResult, GateOn, Rate

console = Console(stderr=True)
# the main CLI's codes: 0 gate passed (or none set), 1 gate failed, 2 usage error, 3 nothing could be read
EXIT_CLEAN, EXIT_GATE, EXIT_USAGE, EXIT_UNREADABLE = 0, 1, 2, 3
EXIT_INTERRUPTED = 130
# the audit checks copies, not marks: the watermark detectors are off unless asked for (`scan` reports marks); the
# generation metadata stays on, it carries the prompts and memorization signals; 5 matches are plenty for a pair
AUDIT_SCAN_DEFAULTS = {"k": 5, "visible": False, "invisible": False, "c2pa": False, "metadata": True}

_REFERENCE_HELP = (
    "Non-member photos (folder, files or glob: photos known NOT to be in the index, ideally of the same kind as the "
    "outputs) scanned against the same index: the report plots the outputs' scores against theirs and gives their "
    "false-alarm rate. Default: none; the distribution is then shown without a reference and the lines are the "
    "calibrated verdict thresholds (the bundled sample is not a default: it is usually in the index)."
)


def _fail(e: Exception | str, code: int = EXIT_USAGE) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(code)


@with_scan_options(unset_default=True)
def audit_command(  # noqa: C901 - a typer command: its options are checked one by one before the run
    index: Annotated[Path, typer.Option("--index", "-i", help="Index directory of the training corpus.")],
    images: Annotated[
        Optional[list[str]], typer.Argument(help="Generated images: files, folders (recursive) or globs.")
    ] = None,
    reference: Annotated[Optional[list[str]], typer.Option("--reference", help=_REFERENCE_HELP)] = None,
    max_replication_rate: Annotated[
        Optional[float],
        typer.Option(
            "--max-replication-rate",
            help="CI gate: exit 1 when the replication rate (replica or exact share of readable outputs) exceeds this share, e.g. 0.01.",
        ),
    ] = None,
    gate_on: Annotated[
        str,
        typer.Option(
            "--gate-on",
            help="point: gate on the rate itself; upper: on the upper bound of its 95% Wilson interval (stricter on few outputs).",
        ),
    ] = "point",
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write the self-contained HTML report here.")
    ] = None,
    json_out: Annotated[
        Optional[Path], typer.Option("--json", help="Write the JSON summary here ('-' for stdout).")
    ] = None,
    top_pairs: Annotated[int, typer.Option(min=0, help="Pairs shown side by side in the report.")] = 12,
    top_captions: Annotated[int, typer.Option(min=0, help="Prompts listed, most replicating first.")] = 20,
    thresholds: Annotated[
        Optional[Path], typer.Option(help="JSON file of verdict thresholds (default: calibrated).")
    ] = None,
    from_captions: Annotated[
        Optional[int],
        typer.Option(
            "--from-captions",
            min=1,
            help="First generate from N captions of the index (generate --from-captions), then audit those outputs too.",
        ),
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="With --from-captions: hub id, local diffusers folder or tiny-random.")
    ] = "",
    num_images: Annotated[
        int,
        typer.Option("--num-images", min=1, help="With --from-captions: images per caption (>= 4 adds pairwise SSCD)."),
    ] = 1,
    steps: Annotated[int, typer.Option(min=1, help="With --from-captions: denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(min=0.0, help="With --from-captions: guidance scale.")] = 7.5,
    seed: Annotated[
        Optional[int], typer.Option(min=0, help="With --from-captions: caption sample and image seeds.")
    ] = None,
    height: Annotated[Optional[int], typer.Option(min=8, help="With --from-captions: multiple of 8.")] = None,
    width: Annotated[Optional[int], typer.Option(min=8, help="With --from-captions: multiple of 8.")] = None,
    device: Annotated[Optional[str], typer.Option(help="With --from-captions: auto, cpu, cuda, mps.")] = None,
    gen_out: Annotated[
        Path, typer.Option("--gen-out", help="With --from-captions: where the generated images go.")
    ] = Path("out/audit-generated"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
    scan_options: dict[str, Any] | None = None,  # the ScanOptions flags given (provenance.cli_options), e.g. --thorough
) -> None:
    """Audit a model release for replication: the share of its outputs that copy a training image (95% Wilson
    interval), their score distribution against non-member photos, the top pairs, the captions that replicate
    most and their memorization signals. Exit 0 clean, 1 the --max-replication-rate gate failed, 2 usage error,
    3 no input could be read. Unreadable inputs are listed and do not count as outputs. The scan flags are
    scan's (e.g. --thorough); watermark checks are off unless turned on, since the audit is about copies."""
    from provenance.audit import GATE_ON, AuditOptions, audit_paths
    from provenance.images import iter_image_paths
    from provenance.options import ScanOptions
    from provenance.scan import Scanner, load_thresholds

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # 1. Check inputs, before any model loads
    if gate_on not in GATE_ON:
        _fail(typer.BadParameter(f"--gate-on must be one of {', '.join(GATE_ON)}, not {gate_on!r}"))
    if max_replication_rate is not None and not 0.0 <= max_replication_rate <= 1.0:
        _fail(
            typer.BadParameter(
                f"--max-replication-rate is a share in [0, 1] (e.g. 0.01 for 1%), not {max_replication_rate}"
            )
        )
    if from_captions is None and model:
        _fail(typer.BadParameter("--model only applies with --from-captions N"))
    if from_captions is not None and not model:
        _fail(typer.BadParameter("--from-captions needs --model (a hub id, a local diffusers folder, or tiny-random)"))
    files = iter_image_paths(images) if images else []
    if images and not files:
        _fail(typer.BadParameter(f"no images found in {' '.join(images)}"))
    if not files and from_captions is None:
        _fail(typer.BadParameter("nothing to audit: give IMAGES, or --from-captions N --model M"))
    missing = [r for r in reference or [] if not any(ch in r for ch in "*?[") and not Path(r).exists()]
    if missing:
        _fail(typer.BadParameter(f"--reference: not found: {', '.join(missing)}"))
    ref_files = iter_image_paths(reference) if reference else []
    if reference and not ref_files:
        _fail(typer.BadParameter(f"--reference: no images found in {' '.join(reference)}"))
    for flag, path in (("--output", output), ("--json", json_out)):
        # found out now, not after an hour of scanning
        if path is not None and str(path) != "-" and not (path.parent.is_dir() and not path.is_dir()):
            _fail(typer.BadParameter(f"{flag}: cannot write {path} (its folder does not exist, or it is a folder)"))
    options = AuditOptions(
        top_pairs=top_pairs,
        top_captions=top_captions,
        max_replication_rate=max_replication_rate,
        gate_on=cast("GateOn", gate_on),  # checked against GATE_ON above
    )
    given = {k: v for k, v in (scan_options or {}).items() if v is not None}
    try:
        scan_opts = ScanOptions.build(**{**AUDIT_SCAN_DEFAULTS, **given}, thresholds=load_thresholds(thresholds))
    except ProvenanceError as e:  # a broken rule of the options or an unreadable thresholds file
        _fail(e)
    try:
        scanner = Scanner.open(index, scan_opts)  # a bad index fails before any generation
    except ProvenanceError as e:
        _fail(e)

    # 2. Generate from the index's captions first, when asked
    if from_captions is not None:
        files = files + _generate(
            index, from_captions, model, num_images, steps, guidance, seed, height, width, device, gen_out
        )

    # 3. Scan and audit, streaming
    try:
        with progress_bar("auditing", console, transient=True) as bar:
            task = bar.add_task("audit", total=len(files) + len(ref_files))
            result = audit_paths(scanner, files, ref_files, options, progress=lambda r: bar.advance(task))
    except ProvenanceError as e:
        _fail(e)

    # 4. Write and print
    if output is not None:
        from provenance.audit_report import write_audit_html

        write_audit_html(result, output, thumbnails=scanner.index.thumbnail)
        console.print(f"wrote the audit report to {output}")
    if json_out is not None:
        text = json.dumps(result.to_dict(), ensure_ascii=False, indent=2)
        if str(json_out) == "-":
            typer.echo(text)
        else:
            json_out.write_text(text + "\n", encoding="utf-8")
            console.print(f"wrote the JSON summary to {json_out}")
    _print_summary(result)
    if result.outputs == 0:
        console.print("[red]no input could be read: nothing was audited[/]")
        raise typer.Exit(EXIT_UNREADABLE)
    if result.gate is not None and result.gate.failed:
        raise typer.Exit(EXIT_GATE)


def _generate(
    index: Path,
    n: int,
    model: str,
    num_images: int,
    steps: int,
    guidance: float,
    seed: int | None,
    height: int | None,
    width: int | None,
    device: str | None,
    gen_out: Path,
) -> list[Path]:
    """`generate --from-captions INDEX --n N` with provenance recorded; the written PNGs."""
    from provenance import generator as g

    config = g.GenerationConfig(
        model=model,
        num_images=num_images,
        steps=steps,
        guidance=guidance,
        seed=seed,
        height=height,
        width=width,
        device=device,
    )
    written: list[Path] = []
    try:
        config.check()
        prompts = g.captions_as_prompts(index, n, seed=seed or 0)
        folder = g.check_output_dir(gen_out)
        with console.status(f"loading {model}..."):
            pipeline = g.load_pipeline(model, device)
        with progress_bar("generating", console, transient=True) as bar:
            task = bar.add_task("generate", total=len(prompts) * num_images)

            def on_image(image: g.GeneratedImage, done: int, total: int) -> None:
                written.append(image.path)
                bar.update(task, completed=done)

            images = g.generate(config, prompts, folder, pipeline=pipeline, on_image=on_image)
    except ProvenanceError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/] {len(written)} finished image(s) kept in {gen_out}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(f"generated {len(images)} image(s) from {len(prompts)} caption(s) into {folder}")
    return [im.path for im in images]


def _print_summary(result: AuditResult) -> None:
    def fmt(rate: Rate) -> str:
        if rate.rate is None:
            return "-"
        return f"{rate.rate:.2%}  [{rate.low:.2%}, {rate.high:.2%}]  ({rate.count}/{rate.total})"

    t = Table("measure", "share  [95% Wilson interval]  (count/outputs)", title="Replication audit")
    t.add_row("replication (replica or exact)", fmt(result.replication))
    t.add_row("  replica", fmt(result.replica))
    t.add_row("  exact", fmt(result.exact))
    t.add_row("top-1 SSCD > 0.5", fmt(result.sscd_above_0_5))
    if result.reference is not None:
        t.add_row("reference false alarms", fmt(result.reference.false_alarms))
    console.print(t)
    console.print(
        f"{result.outputs} outputs audited"
        + (f", {len(result.errors)} unreadable input(s) listed and not counted" if result.errors else "")
    )
    if result.reference is not None and result.reference.exact:
        console.print(
            f"[yellow]{result.reference.exact} reference photo(s) are in the index (exact): they are not non-members[/]"
        )
    if result.gate is not None:
        colour = "red" if result.gate.failed else "green"
        console.print(f"[{colour}]gate {'FAILED' if result.gate.failed else 'passed'}:[/] {result.gate.reason}")


def register(app: typer.Typer) -> None:
    """Add the `audit` command to the main CLI."""
    app.command("audit")(audit_command)
