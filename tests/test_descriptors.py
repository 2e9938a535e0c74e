"""Descriptors: dims, normalisation, determinism, and that SSCD sees an edited copy as the same photo."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from provenance.descriptors.clip import TINY_CLIP_MODEL, CLIPDescriptor, make_tiny_checkpoint
from provenance.descriptors.pdq import PDQDescriptor, hamming
from provenance.descriptors.sscd import SSCDDescriptor
from provenance.errors import ModelLoadError


@pytest.fixture(scope="module")
def photos(coco_dir):
    return [Image.open(p).convert("RGB") for p in sorted(coco_dir.glob("*.jpg"))[:6]]


@pytest.fixture(scope="module")
def sscd():
    return SSCDDescriptor.load()


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_sscd_dim_norm_determinism(sscd, photos):
    a = sscd.embed(photos)
    b = sscd.embed(photos)
    assert a.shape == (6, 512) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(a, b)
    assert sscd.spec.dim == 512 and sscd.spec.checksum
    # mixed shapes in one batch give the same vectors as one at a time
    single = np.stack([sscd.embed([p])[0] for p in photos[:3]])
    np.testing.assert_allclose(a[:3], single, atol=1e-5)


def test_sscd_concurrent_calls_give_the_same_vectors(photos):
    # The server's scan workers embed side by side; overlapping calls then run on a one-thread session,
    # which must give exactly the bits the multi-threaded one gives.
    from concurrent.futures import ThreadPoolExecutor

    model = SSCDDescriptor.load()  # its own instance: the module fixture stays as loaded
    inputs = [model.preprocess(p) for p in photos]
    expected = model.embed_batch(inputs)
    model.prepare_concurrent_calls()
    serial = model._serial
    assert serial is not None
    model.prepare_concurrent_calls()  # idempotent
    assert model._serial is serial

    class Counting:  # the one-thread session, counting its calls
        calls = 0

        def get_inputs(self):
            return serial.get_inputs()

        def get_outputs(self):
            return serial.get_outputs()

        def run(self, *args):
            Counting.calls += 1
            return serial.run(*args)

    model._serial = Counting()
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda x: model.embed_batch([x])[0], inputs * 3))
    np.testing.assert_array_equal(np.stack(got), np.concatenate([expected] * 3))
    assert 0 < Counting.calls < len(got)  # overlapping calls went to it, and some to the main session
    assert model._running == 0
    # a session already on one thread needs no second one
    one = SSCDDescriptor.load(threads=1)
    one.prepare_concurrent_calls()
    assert one._serial is None


def test_sscd_preprocess_short_side_288(sscd, photos):
    x = sscd.preprocess(photos[0])
    assert min(x.shape[:2]) == 288 and x.dtype == np.uint8 and x.shape[2] == 3


def test_sscd_feature_taps_come_from_the_same_pass_and_change_no_embedding(sscd, photos):
    import onnxruntime as ort

    from provenance.descriptors.sscd import default_onnx_path

    assert sscd.has_feature_taps
    x = [sscd.preprocess(p) for p in photos[:3]]
    emb, taps = sscd.embed_batch_with_taps(x)
    np.testing.assert_array_equal(emb, sscd.embed_batch(x))
    # the unmodified graph, straight from the wheel: the extra outputs must not change a bit of the descriptor
    plain = ort.InferenceSession(str(default_onnx_path()), providers=["CPUExecutionProvider"])
    for xi in x:
        raw = plain.run(None, {plain.get_inputs()[0].name: xi[None]})[0]
        np.testing.assert_array_equal(raw, sscd._run(xi[None])[0])
    h, w = x[0].shape[:2]
    assert taps[0]["stride16"].shape == (1024, -(-h // 16), -(-w // 16)) and taps[0]["stride16"].dtype == np.uint8
    assert taps[0]["stride8"].shape == (512, -(-h // 8), -(-w // 8))
    assert taps[0]["stride16"].max() > 0  # live activations, not an empty buffer


def test_sscd_graph_cut_after_a_tap_gives_the_same_maps(sscd, photos):
    # a visible-watermark head read at its own size (512 px) gets maps from a graph cut after them: same bits
    from provenance.descriptors.sscd import resize_short_side

    x = [np.asarray(resize_short_side(p, 448)) for p in photos[:2]] + [sscd.preprocess(photos[2])]
    _, full = sscd.embed_batch_with_taps(x)
    cut = sscd.tap_maps(x, ("stride16",))
    assert [set(c) for c in cut] == [{"stride16"}] * 3
    for a, b in zip(full, cut, strict=False):
        np.testing.assert_array_equal(a["stride16"], b["stride16"])
    assert cut[0]["stride16"].shape[1:] == tuple(-(-d // 16) for d in x[0].shape[:2])
    with pytest.raises(ModelLoadError, match="maps"):
        sscd.tap_maps(x, ("stride4",))


def test_sscd_edited_copy_scores_far_above_other_photos(sscd, photos):
    im = photos[0]
    w, h = im.size
    edited = _jpeg(ImageEnhance.Color(im.crop((w // 6, h // 6, w - w // 6, h - h // 6))).enhance(0.5), 50)
    e = sscd.embed([edited, *photos])
    sims = e[1:] @ e[0]
    assert sims[0] > 0.6, sims  # the edited photo's own original
    assert sims[0] > sims[1:].max() + 0.3, sims  # well above every other photo


def test_sscd_torchscript_path_loads_through_same_interface(tmp_path, photos):
    import torch

    class Tiny(torch.nn.Module):  # stands in for sscd_disc_*.torchscript.pt (same I/O contract)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 512, 8, stride=8)

        def forward(self, x):
            return torch.nn.functional.normalize(self.conv(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    path = tmp_path / "sscd_disc_tiny.torchscript.pt"
    torch.jit.script(Tiny()).save(str(path))
    d = SSCDDescriptor.load(path)
    e = d.embed(photos[:2])
    assert e.shape == (2, 512) and d.backend == "torchscript" and d.spec.model_id.endswith(path.name)


def test_sscd_missing_model_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        SSCDDescriptor.load(tmp_path / "nope.onnx")


def test_pdq_hash_shape_and_near_duplicates(photos):
    pdq = PDQDescriptor.load()
    h = pdq.embed(photos)
    assert h.shape == (6, 32) and h.dtype == np.uint8
    again = pdq.embed([_jpeg(photos[0], 70), photos[0].resize((320, 213))])
    d = hamming(again, h)
    assert d[0, 0] <= 16 and d[1, 0] <= 16  # recompressed / resized copies stay close
    others = hamming(h, h)[0, 1:]
    assert others.min() > 60  # different photos are far apart (random pairs sit near 128)


def test_clip_tiny_checkpoint_round_trip(tmp_path, photos):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny.pt", seed=0)
    a = CLIPDescriptor.load(TINY_CLIP_MODEL, ckpt, device="cpu")
    b = CLIPDescriptor.load(TINY_CLIP_MODEL, ckpt, device="cpu")
    ea, eb = a.embed(photos[:2]), b.embed(photos[:2])
    assert ea.shape == (2, 64)
    np.testing.assert_allclose(ea, eb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, atol=1e-4)
    t = a.embed_text(["a man making pizza", ""])
    assert t.shape == (2, 64)
    assert a.spec.model_id == f"{TINY_CLIP_MODEL}/tiny.pt" and a.spec.checksum != "hub:"


def test_clip_bad_checkpoint_and_unknown_model(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError):
        CLIPDescriptor.load(TINY_CLIP_MODEL, bad, device="cpu")
    with pytest.raises(ModelLoadError, match="unknown OpenCLIP model"):
        CLIPDescriptor.load("No-Such-Model", None, device="cpu")
