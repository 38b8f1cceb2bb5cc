"""STPM specifics: training reduces the loss, early stopping, a trainable student beside a frozen teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import create_detector

# Random resnet18 at 32 px: no weights needed and a fit takes about a second.
TINY = {"backbone": "resnet18", "pretrained": False, "input_size": 32, "batch_size": 4, "cache_features": False,
        "learning_rate": 0.1}


@pytest.fixture(scope="module")
def images() -> ImageSet:
    rng = np.random.default_rng(0)
    base = rng.random((32, 32, 3), dtype=np.float32)
    return ImageSet.from_arrays([np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)
                                 for _ in range(8)])


@pytest.fixture(scope="module")
def trained(images):
    """A 6-epoch fit, with the teacher's and the untrained student's weights from before it."""
    torch.manual_seed(0)  # the random teacher is built on first use: make it the same in every run
    detector = create_detector("stpm", **TINY, epochs=6)
    teacher = {k: v.clone() for k, v in detector._extractor().model.state_dict().items()}
    initial = {k: v.clone() for k, v in detector._new_student().state_dict().items()}
    epochs = []
    detector.fit(images, on_epoch=lambda epoch, metrics: epochs.append(epoch))
    return detector, teacher, initial, epochs


def test_loss_decreases_over_epochs(trained):
    detector, _, _, epochs = trained
    assert epochs == list(range(6)) and detector.epochs_trained_ == 6
    assert detector.loss_history_[-1] < 0.85 * detector.loss_history_[0]


def test_student_trains_while_teacher_stays_frozen(trained):
    detector, teacher, initial, _ = trained
    model = detector._extractor().model
    assert not any(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, teacher[key]), f"teacher {key} changed during fit"
    student = detector.student_.state_dict()
    assert student.keys() == initial.keys()
    assert all(not torch.equal(student[k], initial[k]) for k in initial if k.endswith(".weight"))


def test_on_epoch_returning_true_stops_training_and_seed_repeats(trained, images):
    seen = []

    def stop_after_two(epoch, metrics):
        seen.append(epoch)
        return epoch == 1

    detector = create_detector("stpm", **TINY, epochs=10).fit(images, on_epoch=stop_after_two)
    assert seen == [0, 1] and detector.epochs_trained_ == 2
    np.testing.assert_allclose(detector.loss_history_, trained[0].loss_history_[:2], rtol=1e-5)


def test_maps_combine_levels_by_product_or_sum(trained, images):
    detector = trained[0]
    product = detector.score_samples(images)
    assert product.anomaly_maps.shape == (8, 32, 32) and (product.anomaly_maps >= 0).all()
    np.testing.assert_allclose(product.image_scores, product.anomaly_maps.max(axis=(1, 2)))
    summed = detector.set_params(map_combination="sum").score_samples(images)
    detector.set_params(map_combination="product")
    assert not np.allclose(summed.anomaly_maps, product.anomaly_maps)


@pytest.mark.parametrize("params, match", [
    ({"epochs": 0}, "epochs"), ({"batch_size": 2.5}, "batch_size"), ({"optimizer": "rmsprop"}, "optimizer"),
    ({"learning_rate": 0}, "learning_rate"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -1}, "weight_decay"),
    ({"map_combination": "mean"}, "map_combination"), ({"smoothing_sigma": -1}, "smoothing_sigma"),
])
def test_bad_parameters_raise(images, params, match):
    with pytest.raises(ValueError, match=match):
        create_detector("stpm", **{**TINY, "epochs": 1, **params}).fit(images)
