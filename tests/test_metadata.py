"""Tests of provenance.watermarks.metadata on real PNG/JPEG files written the way generators write them."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from provenance.images import decode_image, load_image
from provenance.watermarks.metadata import MAX_TEXT_CHARS, parse_a1111_parameters, read_generation_metadata

A1111 = (
    "masterpiece, a photo of a man making pizzas in a kitchen, (detailed:1.2)\n"
    "warm light\n"
    "Negative prompt: lowres, bad anatomy,\nwatermark\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234567890, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "add_detail: 7c6bad76eb54, film: 0e1f", '
    "Denoising strength: 0.7, Version: v1.6.0"
)
COMFY_PROMPT = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 42,
            "steps": 20,
            "cfg": 8.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["10", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog on a skateboard", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "10": {"class_type": "LoraLoader", "inputs": {"lora_name": "pixel.safetensors", "model": ["4", 0]}},
}


@pytest.fixture(scope="module")
def photo(coco_dir) -> Image.Image:
    # Small, so each encode/decode takes milliseconds; the metadata does not depend on the size.
    return load_image(coco_dir / "000000397133.jpg").image.resize((160, 120))


def _png(im: Image.Image, **text: str) -> bytes:
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _meta(data: bytes) -> dict | None:
    return read_generation_metadata(decode_image(data, "test"))


def test_a1111_png_parameters(photo):
    m = _meta(_png(photo, parameters=A1111))
    assert m["generator"] == "automatic1111" and m["ai_generated"] is True
    p = m["parameters"]
    assert p["prompt"] == "masterpiece, a photo of a man making pizzas in a kitchen, (detailed:1.2)\nwarm light"
    assert p["negative_prompt"] == "lowres, bad anatomy,\nwatermark"
    assert p["steps"] == 30 and p["sampler"] == "DPM++ 2M Karras" and p["cfg_scale"] == 7.5
    assert p["seed"] == 1234567890 and (p["width"], p["height"]) == (512, 768)
    assert p["model"] == "v1-5-pruned-emaonly" and p["model_hash"] == "6ce0161689"
    assert p["lora_hashes"] == "add_detail: 7c6bad76eb54, film: 0e1f"  # quoted value kept whole
    assert p["denoising_strength"] == 0.7
    assert m["text_chunks"]["parameters"] == A1111


def test_forge_is_told_apart_and_prose_is_not_parameters():
    forge = parse_a1111_parameters("a cat\nSteps: 20, Sampler: Euler, CFG scale: 3.5, Version: f2.0.1v1.10.1-previous")
    assert forge["version"].startswith("f2") and forge["prompt"] == "a cat"
    assert parse_a1111_parameters("Holiday in Rome: the Colosseum at dusk") is None


def test_hostile_chunks_neither_crash_nor_stall():
    import time

    from provenance.images import DecodedImage

    im = Image.new("RGB", (8, 8))
    start = time.perf_counter()
    # A long line without colons made a findall-based parser quadratic (seconds at 20 kB).
    assert parse_a1111_parameters("a " * 30_000) is None
    assert parse_a1111_parameters("x\n" + "Steps: 1, " * 6000)["steps"] == 1
    assert time.perf_counter() - start < 1.0
    for info in ({"workflow": '{"nodes": 3}'}, {"prompt": '{"1": {"class_type": "KSampler", "inputs": [1]}}'},
                 {"prompt": "[" * 100_000}, {"exif": b"Exif\x00\x00garbage"}):  # fmt: skip
        m = read_generation_metadata(DecodedImage(im, "x", 8, 8, "PNG", b"", info))
        assert m is None or isinstance(m["parameters"], dict)


def test_comfyui_png_prompt_graph_is_summarised(photo):
    workflow = {"nodes": [{"id": i} for i in range(7)], "padding": "x" * 5000}
    m = _meta(_png(photo, prompt=json.dumps(COMFY_PROMPT), workflow=json.dumps(workflow)))
    assert m["generator"] == "comfyui" and m["ai_generated"] is True
    p = m["parameters"]
    assert p["prompt"] == "a dog on a skateboard" and p["negative_prompt"] == "blurry"
    assert (p["seed"], p["steps"], p["cfg_scale"], p["sampler"]) == (42, 20, 8.0, "euler")
    assert p["model"] == "sd_xl_base_1.0.safetensors" and p["loras"] == ["pixel.safetensors"]
    assert (p["width"], p["height"], p["node_count"]) == (1024, 1024, 6)
    # A big workflow is cut so it cannot bloat a report.
    assert len(m["text_chunks"]["workflow"]) < MAX_TEXT_CHARS + 50
    assert "more characters" in m["text_chunks"]["workflow"]


def test_our_own_provenance_chunk(photo):
    ours = {"run_id": "r-7", "prompt": "a red bicycle", "seed": 3, "model_id": "tiny-sd", "steps": 4}
    m = _meta(_png(photo, provenance=json.dumps(ours), Software="provenance-generator"))
    assert m["generator"] == "provenance" and m["ai_generated"] is True
    assert m["provenance"] == ours
    assert m["parameters"] == {"prompt": "a red bicycle", "seed": 3, "steps": 4, "model_id": "tiny-sd", "run_id": "r-7"}
    bad = _meta(_png(photo, provenance="{not json"))
    assert bad["generator"] == "provenance" and "parse_error" in bad["provenance"]


def test_novelai_software_and_comment(photo):
    comment = {"prompt": "1girl, cherry blossoms", "uc": "lowres", "steps": 28, "scale": 5, "seed": 99,
               "sampler": "k_euler_ancestral", "width": 832, "height": 1216}  # fmt: skip
    m = _meta(_png(photo, Software="NovelAI", Source="NovelAI Diffusion V3 7BCCAA2C",
                   Description="1girl, cherry blossoms", Comment=json.dumps(comment)))  # fmt: skip
    assert m["generator"] == "novelai" and m["ai_generated"] is True
    p = m["parameters"]
    assert p["prompt"] == "1girl, cherry blossoms" and p["negative_prompt"] == "lowres"
    assert (p["cfg_scale"], p["seed"], p["steps"]) == (5, 99, 28)
    assert p["model"].startswith("NovelAI Diffusion")


def test_jpeg_exif_software_and_description(photo):
    exif = Image.Exif()
    exif[0x0131] = "GIMP 2.10.34"
    exif[0x010E] = "Harbour at dawn"
    exif[0x8298] = "(c) Jane Doe"
    exif[0x010F] = "Canon"  # camera make: not generation-relevant, must not be reported
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif)
    m = _meta(buf.getvalue())
    assert m["generator"] == "exif" and m["ai_generated"] is False
    assert m["exif"] == {"Software": "GIMP 2.10.34", "ImageDescription": "Harbour at dawn", "Copyright": "(c) Jane Doe"}
    assert m["parameters"] == {}


def test_jpeg_a1111_usercomment_as_piexif_writes_it(photo):
    exif = Image.Exif()
    # piexif's UserComment.dump(..., encoding="unicode"): charset code then UTF-16 big-endian.
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111.encode("utf-16-be")
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif)
    m = _meta(buf.getvalue())
    assert m["generator"] == "automatic1111"
    assert m["parameters"]["seed"] == 1234567890 and m["exif"]["UserComment"] == A1111


def test_xmp_digital_source_type_marks_ai(photo):
    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="Adobe Firefly" '
        'xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" Iptc4xmpExt:DigitalSourceType='
        '"http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"/></rdf:RDF></x:xmpmeta>'
    )
    buf = io.BytesIO()
    photo.save(buf, "JPEG", xmp=xmp.encode())
    m = _meta(buf.getvalue())
    assert m["generator"] == "xmp" and m["ai_generated"] is True
    assert m["xmp"]["creator_tool"] == "Adobe Firefly"
    assert m["xmp"]["digital_source_type"].endswith("/trainedAlgorithmicMedia")


def test_plain_photos_give_none(coco_dir, photo):
    # COCO JPEGs carry JFIF, ICC, Photoshop IRBs and comments like "CREATOR: gd-jpeg v1.0" or
    # "AppleMark": none of that is generation metadata.
    paths = sorted(coco_dir.glob("*.jpg"))
    assert len(paths) >= 50
    assert [p.name for p in paths if read_generation_metadata(load_image(p)) is not None] == []
    assert _meta(_png(photo)) is None
    # Text chunks that say nothing about generation are ignored too.
    assert _meta(_png(photo, **{"date:create": "2024-01-01T00:00:00"})) is None
