"""Packaging: the base install runs `index build` (SSCD, PDQ), `search` and `scan` without any extra; the heavy
libraries load only for the feature that needs them, and a missing one names its extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from provenance.errors import MissingExtraError

REPO = Path(__file__).resolve().parents[1]
# what the extras install (and the reference encoders only tests use): none may load for an SSCD + PDQ scan
EXTRA_MODULES = (
    "diffusers",
    "transformers",
    "huggingface_hub",
    "datasets",
    "fastapi",
    "uvicorn",
    "starlette",
    "pydantic_settings",
    "open_clip",
    "timm",
    "cv2",
    "imwatermark",
    "provenance.api",
    "httpx",
    "ray",
)

# Runs a command of the CLI with every extra's module made unimportable (None in sys.modules: `import x` raises
# ImportError), then prints which of them were imported anyway.
_RUN_WITHOUT_EXTRAS = """
import json, sys
blocked = {blocked}
for name in blocked:
    sys.modules[name] = None
from provenance.cli import app
try:
    app({argv}, standalone_mode=False)
finally:
    print("LOADED=" + json.dumps(sorted(n for n in blocked if sys.modules.get(n) is not None)))
"""


def _run_without_extras(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = _RUN_WITHOUT_EXTRAS.format(blocked=repr(EXTRA_MODULES), argv=repr(argv))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_index_search_and_scan_run_without_any_extra(tmp_path, coco_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    photos = sorted(coco_dir.glob("*.jpg"))[:6]
    for p in photos:
        shutil.copy(p, corpus / p.name)
    index = tmp_path / "index"
    built = _run_without_extras(
        ["index", "build", str(corpus), "--index", str(index), "--descriptors", "sscd,pdq"], tmp_path
    )
    assert built.returncode == 0, built.stderr[-2000:]
    report = tmp_path / "scan.json"
    scanned = _run_without_extras(
        ["scan", str(photos[0]), "--index", str(index), "--format", "json", "--output", str(report)], tmp_path
    )
    assert scanned.returncode == 0, scanned.stderr[-2000:]
    assert "LOADED=[]" in scanned.stdout
    record = json.loads(report.read_text())
    record = record["records"][0] if isinstance(record, dict) and "records" in record else record
    record = record[0] if isinstance(record, list) else record
    assert record["verdict"] == "exact" and record["watermarks"]["visible"]["probability"] is not None
    searched = _run_without_extras(["search", "--image", str(photos[1]), "--index", str(index)], tmp_path)
    assert searched.returncode == 0, searched.stderr[-2000:]
    assert "LOADED=[]" in searched.stdout


def test_a_missing_extra_is_named(monkeypatch):
    from provenance.descriptors.clip import CLIPDescriptor

    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingExtraError, match=r"provenance\[clip\]"):
        CLIPDescriptor.load("provenance-tiny", None, device="cpu")
    from provenance import generator

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingExtraError, match=r"provenance\[generate\]"):
        generator.load_pipeline(generator.TINY_RANDOM, "cpu")
    from provenance.consent import Fetcher, FetchOptions, url_consent

    monkeypatch.setitem(sys.modules, "httpx", None)
    with Fetcher(FetchOptions(use_cache=False)) as f, pytest.raises(MissingExtraError, match=r"provenance\[consent\]"):
        url_consent(["https://example.org/a.jpg"], f)


def test_pyproject_keeps_heavy_parts_in_extras_and_pins_in_constraints():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [d.split(";")[0].replace(" ", "") for d in project["dependencies"]]
    names = {d.split(">")[0].split("=")[0].split("<")[0].lower() for d in base}
    assert not names & {
        "diffusers",
        "transformers",
        "datasets",
        "fastapi",
        "uvicorn",
        "open_clip_torch",
        "invisible-watermark",
        "opencv-python",
        "python-multipart",
        "timm",
    }
    all_requirements = base + [d for reqs in project["optional-dependencies"].values() for d in reqs]
    assert not [d for d in all_requirements if "==" in d], "exact pins belong in constraints.txt"
    extras = project["optional-dependencies"]
    assert {"clip", "generate", "serve", "hf", "test"} <= set(extras)
    assert any(
        d.startswith("provenance[") and all(e in d for e in ("clip", "generate", "serve", "hf")) for d in extras["test"]
    )
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert any(e.startswith("training") for e in find["exclude"])


def test_the_runtime_library_does_not_import_training_code():
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "provenance").rglob("*.py")
        if "import training" in p.read_text() or "from training" in p.read_text()
    ]
    assert offenders == []
