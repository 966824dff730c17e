"""The scene models' pure parts: the training transform keeps boxes, masks and pixels together; CenterNet's
targets decode back to the boxes they came from; the maintained evaluators score truth as perfect and a worse
answer as worse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import detector, scene_metrics, scenes
from models.preprocessing import LetterboxPreset
from models.scene_train import transform


def _box_of(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_the_training_transform_moves_boxes_with_their_pixels(flip, turns):
    side, crop = 40, 24
    mask = torch.zeros(side, side, dtype=torch.uint8)
    mask[10:17, 12:30] = 3  # rows 10..16, columns 12..29
    image = torch.stack([mask * 10, mask * 20, mask * 30])
    box = torch.tensor([[12.0, 10.0, 30.0, 17.0]])
    got_image, got_mask, got_boxes, keep = transform(image, mask, box, top=5, left=8, side=crop, flip=flip, turns=turns)
    assert keep.tolist() == [True]
    assert got_mask.shape == (crop, crop) and got_image.shape == (3, crop, crop)
    assert got_boxes[0].tolist() == _box_of(got_mask == 3)  # the box still bounds its pixels
    assert torch.equal(got_image[0], got_mask * 10)  # and the image moved with the mask


def test_a_box_cut_off_by_the_crop_is_clipped_or_dropped():
    mask = torch.zeros(40, 40, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [33.0, 30.0, 40.0, 40.0]])
    _, _, got, keep = transform(torch.zeros(3, 40, 40), mask, boxes, top=8, left=8, side=24, flip=False, turns=0)
    assert keep.tolist() == [True, False]  # the first keeps a 2x2 corner, the second falls outside
    assert got[0].tolist() == [0.0, 0.0, 2.0, 2.0]


def test_centernet_targets_decode_back_to_their_boxes():
    boxes = [torch.tensor([[8.0, 12.0, 40.0, 30.0], [50.0, 44.0, 61.0, 63.0]]), torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    labels = [torch.tensor([2, 7]), torch.tensor([5])]
    heat, size, offset, _ = detector.targets(boxes, labels, 64, heatmaps=8)
    logits = torch.logit(heat.clamp(1e-6, 1 - 1e-6))  # the heads a perfect model would give
    got_boxes, scores, got_labels = detector.decode(logits, size, offset, k=4)
    for i, (want, want_labels) in enumerate(zip(boxes, labels, strict=True)):
        n = len(want)
        assert scores[i, :n].min() > 0.99 and scores[i, n:].max() < 0.99  # the peaks come first
        order = torch.argsort(got_labels[i, :n])
        assert torch.allclose(got_boxes[i, :n][order], want[torch.argsort(want_labels)], atol=1e-4)
        assert sorted(got_labels[i, :n].tolist()) == sorted(want_labels.tolist())


def test_centernet_outputs_have_fixed_shapes_for_any_multiple_of_16():
    model = detector.CenterNet(num_classes=9, max_detections=5).eval()
    with torch.inference_mode():
        for side in (32, 48):
            boxes, scores, labels = model(torch.zeros(2, 3, side, side))
            assert boxes.shape == (2, 5, 4) and scores.shape == (2, 5) and labels.shape == (2, 5)
            assert labels.dtype == torch.int64 and labels.min() >= 1 and labels.max() <= 8


def test_the_evaluators_score_the_truth_as_perfect_and_a_worse_answer_lower():
    split = scenes.generate("test", 4, size=96)
    truth = [(s.boxes, np.ones(len(s.labels)), s.labels) for s in split]
    assert scene_metrics.detection(truth, split)["map_50"] == pytest.approx(1.0)
    shifted = [(s.boxes + np.float32(6.0), np.ones(len(s.labels)), s.labels) for s in split]
    assert scene_metrics.detection(shifted, split)["map"] < 1.0
    assert scene_metrics.segmentation([s.mask for s in split], split, num_classes=9)["miou"] == pytest.approx(1.0)
    empty = scene_metrics.segmentation([np.zeros_like(s.mask) for s in split], split, num_classes=9)
    assert empty["miou"] < 0.5 and empty["per_class"][0] < 1.0


@pytest.mark.parametrize("backbone", ["small", "resnet18"])
def test_the_segmenter_answers_a_class_per_pixel_at_any_size(backbone):
    from models.segmenter import Segmenter

    model = Segmenter(num_classes=9, backbone=backbone).eval()
    with torch.inference_mode():
        for shape in ((1, 3, 64, 64), (2, 3, 48, 80)):
            mask = model(torch.zeros(shape))
            assert mask.shape == (shape[0], *shape[2:]) and mask.dtype == torch.uint8 and int(mask.max()) < 9
            assert model.logits(torch.zeros(shape)).shape == (shape[0], 9, *shape[2:])


@pytest.mark.parametrize("name", ["shapes-detector", "shapes-segmenter"])
def test_a_scene_model_starts_from_the_same_weights_for_a_seed(name):
    from models import registry
    from models.scene_train import initial_model

    spec = registry.get(name)
    first, again, other = (initial_model(spec, seed).state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_scene_training_is_deterministic_for_a_seed(tmp_path):
    from models.registry import TrainSpec
    from models.scene_train import fit

    recipe = TrainSpec(epochs=2, batch_size=4, lr=1e-3, weight_decay=0.0, seed=3, min_accuracy=0.0,
                       epoch_sizes=(64, 96), dataset_kwargs={"train": 8})
    def flat(model):
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = detector.CenterNet(num_classes=9, max_detections=4)
        initial = flat(model)
        metrics = fit(model, detector.loss, recipe, LetterboxPreset(size=160), log=lambda line: None)
        weights.append(flat(model))
        assert not torch.equal(weights[-1], initial)  # it trained
    assert metrics["steps"] == 4
    assert torch.equal(weights[0], weights[1])
