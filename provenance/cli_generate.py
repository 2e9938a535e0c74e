"""The `provenance generate` command: parses arguments, calls provenance.generator, prints a summary."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from provenance.cli_options import progress_bar
from provenance.errors import ProvenanceError

if TYPE_CHECKING:
    from provenance.generator import GeneratedImage
    from provenance.memorization import MemorizationSignals

console = Console(stderr=True)
out = Console(soft_wrap=True)
EXIT_USAGE = 2  # the main CLI's code for bad input
EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT


def _fail(e: Exception) -> None:
    console.print(f"[bold red]error:[/] {e}")
    raise typer.Exit(EXIT_USAGE)


def generate_command(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts, one per argument (quote each).")] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hub id, local diffusers folder, or tiny-random (offline test model).")
    ] = "",
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts-file", help="One prompt per line; blank lines skipped.")
    ] = None,
    from_captions: Annotated[
        Optional[Path], typer.Option("--from-captions", help="Index directory: use N of its captions as prompts.")
    ] = None,
    n: Annotated[int, typer.Option("--n", min=1, help="With --from-captions: how many captions.")] = 10,
    num_images: Annotated[
        int, typer.Option("--num-images", min=1, help="Images per prompt (>= 4 adds pairwise SSCD).")
    ] = 1,
    steps: Annotated[int, typer.Option(min=1)] = 25,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale.")] = 7.5,
    seed: Annotated[
        Optional[int], typer.Option(min=0, help="Image j of each prompt uses seed + j (default: random, recorded).")
    ] = None,
    height: Annotated[Optional[int], typer.Option(min=8, help="Multiple of 8 (default: the model's).")] = None,
    width: Annotated[Optional[int], typer.Option(min=8, help="Multiple of 8 (default: the model's).")] = None,
    scheduler: Annotated[
        Optional[str], typer.Option(help="euler, euler-a, dpm++, ddim, unipc, lcm, ... or a diffusers class name.")
    ] = None,
    negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt")] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).")] = Path(
        "out/generated"
    ),
    scan_index: Annotated[
        Optional[Path],
        typer.Option("--scan-index", help="Scan the outputs against this index; writes scan.html and scan.jsonl."),
    ] = None,
    watermark: Annotated[
        bool, typer.Option("--watermark/--no-watermark", help="Embed the invisible provenance mark.")
    ] = True,
    memorization: Annotated[
        bool, typer.Option("--memorization/--no-memorization", help="Compute memorization signals.")
    ] = True,
    batch_size: Annotated[
        Optional[int], typer.Option(min=1, help="Images per pipeline call (default: 4 on CUDA, else 1).")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N, mps.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Generate images with a diffusers pipeline, recording provenance (PNG chunks, sidecar JSON, invisible
    mark) and memorization signals; optionally scan them against an index."""
    from provenance import generator as g

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not model:
        _fail(typer.BadParameter("--model is required (a hub id, a local diffusers folder, or tiny-random)"))
    config = g.GenerationConfig(
        model=model, num_images=num_images, steps=steps, guidance=guidance, seed=seed, height=height, width=width,
        scheduler=scheduler, negative_prompt=negative_prompt, batch_size=batch_size, watermark=watermark,
        memorization=memorization, device=device,
    )  # fmt: skip
    written: list[g.GeneratedImage] = []
    try:
        # everything that can fail fails here, before the model loads
        config.check()
        all_prompts = list(prompts or [])
        if prompts_file is not None:
            all_prompts += g.read_prompts_file(prompts_file)
        if from_captions is not None:
            all_prompts += g.captions_as_prompts(from_captions, n, seed=seed or 0)
        all_prompts = [p for p in all_prompts if p.strip()]
        if not all_prompts:
            _fail(typer.BadParameter("no prompts: give PROMPT arguments, --prompts-file or --from-captions"))
        folder = g.check_output_dir(out_dir)
        scanner = g.open_scanner(scan_index) if scan_index is not None else None
        with console.status(f"loading {model}..."):
            pipeline = g.load_pipeline(model, device)
        total = len(all_prompts) * num_images
        with progress_bar("generating", console, transient=False) as bar:
            task = bar.add_task("generate", total=total)

            def on_image(image: g.GeneratedImage, done: int, total: int) -> None:
                written.append(image)
                bar.update(task, completed=done)

            images = g.generate(config, all_prompts, folder, pipeline=pipeline, on_image=on_image)
    except ProvenanceError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/] {len(written)} finished image(s) and their metadata kept in {out_dir}")
        raise typer.Exit(EXIT_INTERRUPTED) from None

    _print_summary(images, folder)
    if scanner is not None:
        try:
            with console.status("scanning the outputs..."):
                records = g.scan_outputs(scanner, images, folder)
        except ProvenanceError as e:
            _fail(e)
        verdicts: dict[str, int] = {}
        for r in records:
            verdicts[r.verdict] = verdicts.get(r.verdict, 0) + 1
        console.print(
            f"scan: {', '.join(f'{v} {k}' for k, v in verdicts.items())}; "
            f"report in {folder / 'scan.html'} and {folder / 'scan.jsonl'}"
        )


def _print_summary(images: list[GeneratedImage], folder: Path) -> None:
    seen: dict[int, GeneratedImage] = {}
    for im in images:
        seen.setdefault(im.prompt_index, im)
    t = Table("#", "prompt", "images", "noise norm", "z", "pairwise SSCD", "memorization flag")
    for p, im in seen.items():
        m = im.memorization
        count = sum(1 for x in images if x.prompt_index == p)
        t.add_row(
            str(p), im.prompt[:60], str(count),
            f"{m.noise_norm:.4f}" if m and m.noise_norm is not None else "-",
            f"{m.noise_norm_z:.2f}" if m and m.noise_norm_z is not None else "-",
            f"{m.pairwise_sscd:.3f}" if m and m.pairwise_sscd is not None else "-",
            _flag_cell(m),
        )  # fmt: skip
    out.print(t)
    run = f"{images[0].run_id:08x}" if images else "-"
    console.print(f"[green]wrote[/] {len(images)} image(s) with provenance (run {run}) to {folder}")
    if any(im.memorization is not None and im.memorization.flag for im in images):
        console.print(
            "[yellow]flagged prompts may reproduce training images; the reasons are in each image's "
            "metadata (memorization.flag_reason)[/]"
        )


def _flag_cell(m: MemorizationSignals | None) -> str:
    if m is None or not m.flag:
        return "no"
    why = [w for w, on in (("pairwise SSCD", m.pairwise_sscd is not None and "pairwise" in (m.flag_reason or "")),
                           ("noise-norm z", "z-score" in (m.flag_reason or ""))) if on]  # fmt: skip
    return f"[red]yes[/] ({', '.join(why)})"


def register(app: typer.Typer) -> None:
    """Add the `generate` command to the main CLI."""
    app.command("generate")(generate_command)
