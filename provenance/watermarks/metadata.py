"""Reading generation metadata: the prompts and settings that generators write into PNG text, EXIF and XMP.

What counts as "generation-relevant" (anything else, e.g. camera make, DPI, ICC profiles, a JPEG
comment such as "CREATOR: gd-jpeg", is ignored, so a plain photo gives None):
- PNG text chunks written by generators (A1111/Forge `parameters`, ComfyUI `prompt`/`workflow`,
  NovelAI `Software`/`Comment`, InvokeAI, our own `provenance` chunk) and the descriptive ones they
  use (`Software`, `Title`, `Description`, `Source`, `Author`, `Copyright`, ...);
- EXIF Software, ImageDescription, Artist, Copyright, UserComment, XPComment: these say which tool
  wrote the file and who claims it, and A1111 stores its parameters in UserComment for JPEG/WebP;
- XMP CreatorTool and IPTC DigitalSourceType;
- a JPEG/GIF comment only when it parses as generation parameters.
Text values are cut to MAX_TEXT_CHARS so a 1 MB ComfyUI workflow cannot bloat a report.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from PIL import Image

from provenance.images import DecodedImage
from provenance.watermarks.c2pa import AI_SOURCE_TYPES

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2000
# PNG text keys worth reporting (lower-cased). Others (e.g. ImageMagick's "date:create") say nothing
# about generation.
RELEVANT_TEXT_KEYS = frozenset(
    {
        "parameters", "prompt", "workflow", "provenance", "software", "comment", "description", "source",
        "title", "author", "copyright", "disclaimer", "warning", "generation time", "invokeai_metadata",
        "sd-metadata", "dream", "fooocus_scheme",
    }
)  # fmt: skip
# Tools whose name in Software/CreatorTool means the image is (or may be) generated.
_AI_SOFTWARE = re.compile(
    r"midjourney|dall[\s\-·]?e|stable[\s\-]?diffusion|firefly|novelai|comfyui|imagen|flux|leonardo|"
    r"invokeai|fooocus|automatic1111|stable-diffusion-webui|sdxl|ideogram|gpt-image",
    re.IGNORECASE,
)
AI_GENERATORS = frozenset({"provenance", "comfyui", "automatic1111", "forge", "novelai", "invokeai", "fooocus"})

# EXIF tags (IFD0 unless noted): why each is here is in the module docstring.
_EXIF_IFD0 = {0x0131: "Software", 0x010E: "ImageDescription", 0x013B: "Artist", 0x8298: "Copyright"}
_EXIF_XPCOMMENT = 0x9C9C  # Windows XP comment, UTF-16LE
_EXIF_IFD_POINTER = 0x8769
_EXIF_USERCOMMENT = 0x9286  # in the Exif sub-IFD

# One "Key: value" pair of an A1111 parameters line; values may be quoted and contain commas.
_A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_MAX_SETTINGS_LINE = 65536  # A1111 lines are a few kB even with many LoRA hashes
_XMP_FIELDS = {
    "creator_tool": re.compile(r'CreatorTool(?:\s*=\s*"([^"]*)"|\s*>([^<]*)<)'),
    "digital_source_type": re.compile(
        r'DigitalSourceType(?:\s*=\s*"([^"]*)"|\s+rdf:resource\s*=\s*"([^"]*)"|\s*>([^<]*)<)'
    ),
}
_XMP_SCAN_BYTES = 1 << 20  # XMP packets are small; never regex-scan megabytes of it


def read_generation_metadata(decoded: DecodedImage) -> dict[str, Any] | None:
    """Generation metadata found in `decoded`'s file, or None when it carries none.

    Returns {"generator": str | None, "ai_generated": bool, "parameters": {...},
    "text_chunks": {...}, "exif": {...}, "xmp": {...}} plus "provenance" (our generator's own
    chunk, parsed) when present. `generator` names the tool whose format was recognised
    ("provenance", "comfyui", "automatic1111", "forge", "novelai", "invokeai", "fooocus"), or else
    where the facts came from ("png-text", "exif", "xmp", "comment").
    """
    info = decoded.info or {}
    text = _text_chunks(info)
    exif = _exif_fields(info.get("exif"))
    xmp = _xmp_fields(info.get("xmp") or info.get("XML:com.adobe.xmp"))
    comment = _comment(info.get("comment"))

    try:
        generator, parameters, own = _recognise(text, exif, comment)
    except (TypeError, AttributeError, ValueError, KeyError) as e:
        # The JSON in these chunks is whatever the file's author wrote; an odd shape must not
        # fail the scan, and the raw text is still reported below.
        logger.info("unrecognised generation metadata layout: %s", e)
        generator, parameters, own = None, {"parse_error": str(e)}, None
    problems = list(getattr(decoded, "warnings", ()))  # metadata the decoder could not read (images.py)
    if not (text or exif or xmp or parameters):
        return {"error": "; ".join(problems)} if problems else None
    if generator is None:
        generator = "png-text" if text else "exif" if exif else "xmp" if xmp else "comment"

    software = " ".join(filter(None, [text.get("Software"), exif.get("Software"), xmp.get("creator_tool")]))
    dst = xmp.get("digital_source_type") or ""
    ai = (
        generator in AI_GENERATORS
        or dst.rstrip("/").rsplit("/", 1)[-1] in AI_SOURCE_TYPES
        or bool(_AI_SOFTWARE.search(software))
    )
    out: dict[str, Any] = {
        "generator": generator,
        "ai_generated": ai,
        "parameters": parameters,
        "text_chunks": {k: _clip(v) for k, v in text.items()},
        "exif": {k: _clip(v) for k, v in exif.items()},
        "xmp": xmp,
    }
    if own is not None:
        out["provenance"] = own
    if problems:
        out["error"] = "; ".join(problems)
    return out


def parse_a1111_parameters(text: str) -> dict[str, Any] | None:
    """Parse an A1111/Forge "parameters" string; None when it does not look like one.

    The format is: prompt lines, an optional "Negative prompt: ..." block, then one line of
    "Key: value, Key: value, ..." settings. Keys come back snake_cased, numbers as numbers,
    Size split into width/height.
    """
    lines = text.strip().replace("\r\n", "\n").split("\n")
    if len(lines[-1]) > _MAX_SETTINGS_LINE:
        return None
    settings = _settings_pairs(lines[-1])
    # The same test A1111 uses: a settings line has at least 3 pairs (Steps, Sampler, CFG scale...).
    if len(settings) < 3:
        return None
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    for key, value in settings:
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        out[_snake(key)] = _number(value)
    size = out.get("size")
    if isinstance(size, str) and re.fullmatch(r"\d+x\d+", size):
        out["width"], out["height"] = (int(v) for v in size.split("x"))
    return out


def _settings_pairs(line: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a settings line, skipping segments that are not pairs.

    Matched pair by pair from the left rather than with findall: findall retries at every
    character, which is quadratic on a long line without colons (seconds for a 20 kB chunk).
    """
    pairs: list[tuple[str, str]] = []
    pos = 0
    while pos < len(line):
        m = _A1111_PARAM.match(line, pos)
        if m:
            pairs.append((m.group(1), m.group(2)))
            pos = m.end()
        else:
            comma = line.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
    return pairs


def parse_comfyui_prompt(prompt: dict[str, Any]) -> dict[str, Any]:  # noqa: C901 - one case per node kind
    """Summarise a ComfyUI API-format graph ({node_id: {"class_type", "inputs"}}) into settings.

    Takes the first sampler node (by id) and follows its positive/negative links to the text
    encoders; the whole graph is not kept (it can be megabytes).
    """
    nodes = {str(k): v for k, v in prompt.items() if isinstance(v, dict)}
    out: dict[str, Any] = {"node_count": len(nodes)}
    loras: list[str] = []

    def literal(node: dict[str, Any], key: str) -> Any:
        inputs = node.get("inputs")
        v = inputs.get(key) if isinstance(inputs, dict) else None
        return None if isinstance(v, (list, dict)) else v  # lists are links to other nodes

    def text_of(link: Any) -> str | None:
        if not (isinstance(link, list) and link):
            return None
        node = nodes.get(str(link[0])) or {}
        for key in ("text", "text_g", "prompt"):
            t = literal(node, key)
            if isinstance(t, str):
                return t
        return None

    sampler = None
    for node_id in sorted(nodes, key=lambda s: (len(s), s)):
        node = nodes[node_id]
        cls = str(node.get("class_type", ""))
        if sampler is None and ("KSampler" in cls or cls.startswith("SamplerCustom")):
            sampler = node
        elif cls.startswith("CheckpointLoader") and literal(node, "ckpt_name"):
            out.setdefault("model", literal(node, "ckpt_name"))
        elif cls == "UNETLoader" and literal(node, "unet_name"):
            out.setdefault("model", literal(node, "unet_name"))
        elif cls.startswith("LoraLoader") and literal(node, "lora_name"):
            loras.append(str(literal(node, "lora_name")))
        elif cls.startswith("EmptyLatentImage") or cls.startswith("EmptySD3LatentImage"):
            for key in ("width", "height", "batch_size"):
                if literal(node, key) is not None:
                    out.setdefault(key, literal(node, key))
    if sampler is not None:
        inputs = sampler.get("inputs")
        inputs = inputs if isinstance(inputs, dict) else {}
        for key in ("positive", "negative"):
            t = text_of(inputs.get(key))
            if t is not None:
                out["prompt" if key == "positive" else "negative_prompt"] = t
        for src, dst in (
            ("seed", "seed"), ("noise_seed", "seed"), ("steps", "steps"), ("cfg", "cfg_scale"),
            ("sampler_name", "sampler"), ("scheduler", "scheduler"), ("denoise", "denoise"),
        ):  # fmt: skip
            v = literal(sampler, src)
            if v is not None:
                out.setdefault(dst, v)
    if loras:
        out["loras"] = loras
    return out


# -- recognising generators ---------------------------------------------------------------------


def _recognise(  # noqa: C901 - one case per generator's format, tried in order
    text: dict[str, str], exif: dict[str, str], comment: str | None
) -> tuple[str | None, dict[str, Any], dict[str, Any] | None]:
    """(generator, parameters, our own provenance dict) from the relevant fields, most specific first."""
    own = None
    if "provenance" in text:
        own = _json(text["provenance"])
        if not isinstance(own, dict):
            own = {"raw": _clip(text["provenance"]), "parse_error": "provenance chunk is not a JSON object"}
        keys = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "cfg_scale", "model", "model_id",
                "width", "height", "run_id")  # fmt: skip
        return "provenance", {k: own[k] for k in keys if k in own}, own

    if "prompt" in text or "workflow" in text:
        graph = _json(text.get("prompt", ""))
        if isinstance(graph, dict):
            return "comfyui", parse_comfyui_prompt(graph), None
        workflow = _json(text.get("workflow", ""))
        if isinstance(workflow, dict):
            nodes = workflow.get("nodes")
            return "comfyui", {"node_count": len(nodes) if isinstance(nodes, list) else 0}, None

    if "parameters" in text:
        params = parse_a1111_parameters(text["parameters"])
        if params is not None:
            return _a1111_flavour(params), params, None
        data = _json(text["parameters"])
        if isinstance(data, dict):  # Fooocus writes JSON parameters
            return ("fooocus" if "fooocus_scheme" in text else None), _scalars(data), None

    if "invokeai_metadata" in text or "sd-metadata" in text:
        data = _json(text.get("invokeai_metadata") or text.get("sd-metadata", ""))
        if isinstance(data, dict):
            return "invokeai", _invokeai(data), None

    if text.get("Software", "").strip().lower().startswith("novelai"):
        data = _json(text.get("Comment", ""))
        params = {}
        if isinstance(data, dict):
            params = {
                "prompt": data.get("prompt", text.get("Description")),
                "negative_prompt": data.get("uc"),
                **{k: data[k] for k in ("steps", "sampler", "seed", "width", "height", "strength") if k in data},
            }
            if "scale" in data:
                params["cfg_scale"] = data["scale"]
        elif "Description" in text:
            params = {"prompt": text["Description"]}
        if "Source" in text:
            params["model"] = text["Source"]
        return "novelai", params, None

    # A1111 writes JPEG/WebP parameters into EXIF UserComment; some tools use ImageDescription.
    for field in ("UserComment", "ImageDescription", "XPComment"):
        if field in exif:
            params = parse_a1111_parameters(exif[field])
            if params is not None:
                return _a1111_flavour(params), params, None
    if comment:
        params = parse_a1111_parameters(comment)
        if params is not None:
            return _a1111_flavour(params), params, None
    return None, {}, None


def _a1111_flavour(params: dict[str, Any]) -> str:
    # Forge's version strings start with "f" ("f2.0.1v1.10.1-..."); A1111's with "v".
    version = str(params.get("version", ""))
    return "forge" if re.match(r"f\d", version) else "automatic1111"


def _invokeai(data: dict[str, Any]) -> dict[str, Any]:
    model = data.get("model")
    out = {
        "prompt": data.get("positive_prompt") or data.get("prompt"),
        "negative_prompt": data.get("negative_prompt"),
        "model": model.get("name") if isinstance(model, dict) else model,
    }
    for src, dst in (("seed", "seed"), ("steps", "steps"), ("cfg_scale", "cfg_scale"), ("scheduler", "sampler"),
                     ("width", "width"), ("height", "height")):  # fmt: skip
        if src in data:
            out[dst] = data[src]
    return {k: v for k, v in out.items() if v is not None}


# -- reading the raw fields -----------------------------------------------------------------------


def _text_chunks(info: dict[str | tuple[int, int], Any]) -> dict[str, str]:
    """The relevant PNG tEXt/iTXt/zTXt chunks: PIL puts them in info as str values."""
    out: dict[str, str] = {}
    for key, value in info.items():
        if isinstance(key, str) and isinstance(value, str) and key.lower() in RELEVANT_TEXT_KEYS:
            out[key] = str(value)
    return out


def _exif_fields(raw: Any) -> dict[str, str]:
    if not isinstance(raw, (bytes, bytearray)) or not raw:
        return {}
    try:
        exif = Image.Exif()
        exif.load(bytes(raw))
        out: dict[str, str] = {}
        for tag, name in _EXIF_IFD0.items():
            v = _exif_text(exif.get(tag))
            if v:
                out[name] = v
        xp = exif.get(_EXIF_XPCOMMENT)
        if xp is not None:
            b = bytes(xp) if isinstance(xp, (bytes, tuple, list)) else str(xp).encode()
            v = b.decode("utf-16-le", errors="replace").rstrip("\x00").strip()
            if v:
                out["XPComment"] = v
        user = _user_comment(exif.get_ifd(_EXIF_IFD_POINTER).get(_EXIF_USERCOMMENT))
        if user:
            out["UserComment"] = user
        return out
    except Exception as e:  # a broken EXIF block is the file's problem; skip it
        logger.debug("unreadable EXIF block: %s", e)
        return {}


def _exif_text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", errors="replace")
    return str(v).replace("\x00", "").strip() or None


def _user_comment(v: Any) -> str | None:
    """Decode EXIF UserComment: an 8-byte charset code (ASCII, UNICODE, JIS, undefined), then text."""
    if v is None:
        return None
    if isinstance(v, str):
        return v.replace("\x00", "").strip() or None
    b = bytes(v)
    code, body = b[:8], b[8:]
    if code.startswith(b"UNICODE"):
        # The spec leaves the byte order to the writer: piexif (A1111) writes big-endian, others
        # little-endian. ASCII text has its zero bytes first in BE, so count zero bytes at even offsets.
        be = body[0::2].count(0) >= body[1::2].count(0)
        text = body.decode("utf-16-be" if be else "utf-16-le", errors="replace")
    elif code.startswith((b"ASCII", b"JIS")) or code == b"\x00" * 8:
        text = body.decode("utf-8", errors="replace")
    else:  # no charset code at all: some writers store bare text
        text = b.decode("utf-8", errors="replace")
    return text.replace("\x00", "").strip() or None


def _xmp_fields(raw: Any) -> dict[str, str]:
    if not raw:
        return {}
    if isinstance(raw, bytes):
        text = raw[:_XMP_SCAN_BYTES].decode("utf-8", errors="replace")
    else:
        text = str(raw)[:_XMP_SCAN_BYTES]
    out: dict[str, str] = {}
    for name, pattern in _XMP_FIELDS.items():
        m = pattern.search(text)
        if m:
            value = next((g for g in m.groups() if g), "").strip()
            if value:
                out[name] = value
    return out


def _comment(raw: Any) -> str | None:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return raw if isinstance(raw, str) and raw.strip() else None


# -- small helpers ---------------------------------------------------------------------------------


def _json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON from a hostile file
        return None


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {_snake(k): v for k, v in d.items() if isinstance(v, (str, int, float, bool)) or v is None}


def _snake(key: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", key.strip().lower()).strip("_")


def _number(value: str) -> Any:
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if re.fullmatch(r"-?\d*\.\d+(?:[eE]-?\d+)?", value):
        return float(value)
    return value


def _clip(value: str) -> str:
    if len(value) <= MAX_TEXT_CHARS:
        return value
    return f"{value[:MAX_TEXT_CHARS]}… [{len(value) - MAX_TEXT_CHARS} more characters]"
