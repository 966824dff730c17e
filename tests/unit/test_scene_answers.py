"""The scene kinds' pure parts: the letterbox preset, detections and masks mapped back to each image's pixels, OIP
padding, and the comparisons export verification judges by."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.kinds import detect, segment
from models import registry
from models.preprocessing import LetterboxPreset

LABELS = registry.SCENE_LABELS


def png(width: int, height: int, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_scene_labels_are_the_background_then_the_shape_classes():
    from models.shapes import CLASSES

    assert LABELS == ("background", *CLASSES)


def test_letterbox_keeps_the_aspect_at_the_top_left_and_pads_with_the_mean():
    preset = LetterboxPreset(size=160)
    image = np.full((100, 200, 3), 255, dtype=np.uint8)  # wide and white
    x = preset.from_array(image)
    assert x.shape == (3, 160, 160) and preset.content(200, 100) == (160, 80)
    assert np.allclose(x[:, :80], (1 - 0.5) / 0.25)
    assert (x[:, 80:] == 0).all()  # the mean colour, normalised
    scene = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    assert np.array_equal(preset.from_array(scene), preset.normalise(torch.from_numpy(scene).permute(2, 0, 1)).numpy())
    with pytest.raises(ValueError):
        LetterboxPreset(size=100)


def test_registry_preset_shape_agrees_with_the_letterbox():
    spec = registry.get("shapes-detector")
    assert registry.preset_output_shape(spec.preset) == tuple(LetterboxPreset(size=160).from_array(
        np.zeros((50, 70, 3), dtype=np.uint8)).shape)


def test_detections_keep_the_threshold_and_count_and_go_back_to_the_image_pixels():
    boxes = np.array([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 170.0, 90.0], [5.0, 5.0, 6.0, 6.0]], dtype=np.float32)
    scores, labels = np.array([0.4, 0.9, 0.1], dtype=np.float32), np.array([1, 4, 2])
    # a 320x160 image letterboxed into 160: scale 0.5, the image fills the top half
    found = detect.detections(boxes, scores, labels, LABELS, scale=0.5, size=(320, 160), threshold=0.3, limit=5)
    assert [d["label"] for d in found] == ["star", "circle"]  # best first, the 0.1 left out
    assert found[0]["box"] == [0.0, 0.0, 320.0, 160.0]  # doubled, then clipped to the image
    assert found[1]["box"] == [20.0, 40.0, 100.0, 120.0] and found[1]["index"] == 1
    assert len(detect.detections(boxes, scores, labels, LABELS, scale=0.5, size=(320, 160), threshold=0.0,
                                 limit=1)) == 1


def detector(config=None) -> detect.Detector:
    """A Detector whose 'model' finds one box in the middle of each input, scored by the input's mean."""
    def runner(inputs):
        x = inputs[0]
        n = x.shape[0]
        boxes = torch.tensor([[40.0, 40.0, 120.0, 120.0], [0.0, 0.0, 8.0, 8.0]]).expand(n, 2, 4).clone()
        scores = torch.stack([torch.full((n,), 0.9), torch.full((n,), 0.01)], dim=1)
        return [boxes.numpy(), scores.numpy(), torch.tensor([[3, 1]]).expand(n, 2).numpy()]

    return detect.Detector(runner, LetterboxPreset(size=160), LABELS, config or detect.DetectorConfig(),
                           input_shape=(3, 160, 160))


def test_a_detector_answers_each_request_in_its_own_image_pixels():
    pipeline = detector()
    answers = pipeline.process([{"body": png(320, 320)}, {"body": png(80, 40)}], ["image/png", "image/png"])
    big, small = (json.loads(a) for a in answers)
    assert big == [{"label": "triangle", "index": 3, "score": 0.9, "box": [80.0, 80.0, 240.0, 240.0]}]
    assert small[0]["box"] == [20.0, 20.0, 60.0, 40.0]  # scale 2, clipped to the 80x40 image


def test_a_native_detection_answer_reads_back_as_arrays():
    (answer,) = detector().process([{"body": png(320, 320)}], ["image/png"])
    boxes, scores, labels = detect.parse(json.loads(answer))
    assert boxes.tolist() == [[80.0, 80.0, 240.0, 240.0]] and scores.tolist() == [pytest.approx(0.9)]
    assert labels.tolist() == [3] and labels.dtype == np.int64
    assert detect.parse([])[0].shape == (0, 4)


def test_oip_detections_pad_to_the_most_in_any_row():
    pipeline = detector()
    rows = [[{"label": "star", "index": 4, "score": 0.8, "box": [1.0, 2.0, 3.0, 4.0]}] * 2, []]
    boxes, scores, labels, count = pipeline.infer_outputs(rows)
    assert boxes.shape == (2, 2, 4) and scores.shape == labels.shape == (2, 2) and count.shape == (2,)
    assert count.data == [2, 0] and labels.data == ["star", "star", "", ""] and scores.data[2:] == [0.0, 0.0]
    assert pipeline.infer_outputs([[]])[0].shape == (1, 1, 4)  # k is at least 1


def test_detector_settings_refuse_a_threshold_out_of_range():
    with pytest.raises(ValueError, match="score_threshold"):
        detect.DetectorConfig(score_threshold=1.5)
    with pytest.raises(ValueError, match="score_threshold"):
        detect.DetectorConfig.from_mapping({"score_threshold": "high"})


def test_a_requests_own_threshold_and_limit_stay_within_the_configs_bounds():
    from handlers.requests import RequestError

    config = detect.DetectorConfig(score_threshold=0.3, max_detections=8, min_score_threshold=0.1)
    assert detect.knobs({}, config) == detect.Knobs(0.3, 8)
    assert detect.knobs({"score_threshold": 0.5, "max_detections": 2}, config) == detect.Knobs(0.5, 2)
    assert detect.knobs({"score_threshold": b"0.25", "max_detections": b"8"}, config) == detect.Knobs(0.25, 8)
    assert detect.knobs({"max_detections": 3.0, "body": b"\x89PNG"}, config) == detect.Knobs(0.3, 3)
    for bad in ({"score_threshold": 0.05}, {"score_threshold": 1.01}, {"score_threshold": "nan"},
                {"score_threshold": b"high"}, {"score_threshold": None}, {"score_threshold": [0.5]},
                {"max_detections": 9}, {"max_detections": 0}, {"max_detections": 1.5}, {"max_detections": True}):
        with pytest.raises(RequestError) as caught:
            detect.knobs(bad, config)
        assert caught.value.status == 400 and next(iter(bad)) in caught.value.message
    with pytest.raises(ValueError, match="min_score_threshold"):
        detect.DetectorConfig(score_threshold=0.2, min_score_threshold=0.5)


def test_each_row_of_a_batch_keeps_its_own_knobs():
    boxes = np.array([[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 1.0, 2.0, 2.0]]] * 2, dtype=np.float32)
    scores = np.array([[0.9, 0.6, 0.4]] * 2, dtype=np.float32)
    labels = np.array([[1, 2, 3]] * 2)
    config = detect.DetectorConfig(score_threshold=0.3, max_detections=3)
    pipeline = detect.Detector(lambda inputs: [], LetterboxPreset(size=32), LABELS, config)
    sizes = [(32, 32), (32, 32)]
    default = pipeline.answers([boxes, scores, labels], sizes)
    assert [len(row) for row in default] == [3, 3]
    own = pipeline.answers([boxes, scores, labels], sizes, [detect.Knobs(0.5, 3), detect.Knobs(0.3, 1)])
    assert [[d["score"] for d in row] for row in own] == [[0.9, 0.6], [0.9]]


def test_a_mask_is_cut_to_the_image_and_scaled_to_its_size():
    mask = torch.zeros(160, 160, dtype=torch.uint8)
    mask[:40, :80] = 2  # the left half of the image's part (a 320x160 image fills the top 80 rows)
    mask[80:] = 7  # padding rows: must not count
    restored = segment.restore(mask, (160, 80), (320, 160), len(LABELS))
    assert restored.mask.shape == (160, 320)
    assert (restored.mask[:80, :160] == 2).all() and (restored.mask[80:] == 0).all()
    assert restored.fractions[2] == pytest.approx(0.25) and restored.fractions[7] == 0


def test_a_native_mask_answer_reads_back_as_the_class_mask():
    pipeline = segment.Segmenter(lambda inputs: [], LetterboxPreset(size=160), LABELS, segment.SegmenterConfig())
    mask = np.arange(12, dtype=np.uint8).reshape(3, 4) % len(LABELS)
    answer = json.loads(pipeline.native(segment.Segmentation(mask, np.eye(len(LABELS))[0])))
    read = segment.parse(answer)
    assert read.dtype == np.uint8 and (read == mask).all() and (answer["width"], answer["height"]) == (4, 3)


def test_oip_masks_pad_with_255_and_say_each_size():
    pipeline = segment.Segmenter(lambda inputs: [], LetterboxPreset(size=160), LABELS, segment.SegmenterConfig())
    rows = [segment.Segmentation(np.ones((2, 3), dtype=np.uint8), np.eye(len(LABELS))[1]),
            segment.Segmentation(np.zeros((4, 1), dtype=np.uint8), np.eye(len(LABELS))[0])]
    mask, size, fraction = pipeline.infer_outputs(rows)
    assert mask.shape == (2, 4, 3) and size.data == [2, 3, 4, 1] and fraction.shape == (2, len(LABELS))
    grid = np.asarray(mask.data).reshape(2, 4, 3)
    assert (grid[0, :2] == 1).all() and (grid[0, 2:] == segment.PAD).all() and (grid[1, :, 1:] == segment.PAD).all()


def test_detection_comparison_matches_one_to_one_and_counts_what_differs():
    boxes = torch.tensor([[[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 90.0], [0.0, 0.0, 1.0, 1.0]]])
    scores, labels = torch.tensor([[0.9, 0.6, 0.01]]), torch.tensor([[1, 2, 3]])
    same = detect.compare([boxes, scores, labels], [boxes.flip(1), scores.flip(1), labels.flip(1)])
    assert same == {"detections": 2, "unmatched": 0, "extra": 0, "min_box_iou": 1.0, "max_score_diff": 0.0}
    moved = boxes.clone()
    moved[0, 0] += 2.0
    figures = detect.compare([boxes, scores, labels], [moved, scores + 1e-4, torch.tensor([[1, 5, 3]])])
    assert figures["unmatched"] == 1 and figures["extra"] == 1 and figures["min_box_iou"] < 0.99
    assert figures["max_score_diff"] == pytest.approx(1e-4, abs=1e-6)


def test_mask_comparison_is_the_share_of_agreeing_pixels():
    a = torch.zeros(2, 10, 10, dtype=torch.uint8)
    b = a.clone()
    b[0, 0, :5] = 3
    assert segment.compare([a], [b])["pixel_agreement"] == pytest.approx(1 - 5 / 200)


def test_the_stock_peers_letterbox_transforms_make_the_served_tensor():
    preset = LetterboxPreset(size=160)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 250, 3), dtype=np.uint8)).convert("P")
    assert np.array_equal(preset.torchvision_transforms()(image).numpy(), preset(image))
