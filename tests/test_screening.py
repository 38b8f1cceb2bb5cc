"""Screening the good images: out-of-fold scores name the images that look unlike the others."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_WEIGHTS, needs, write_image

from automl_ad.cli import EXIT_OK, main
from automl_ad.data import open_dataset
from automl_ad.screening import screen_normals
from automl_ad.search.plan import plan_search

SHARED_BOTTLE = SHARED_WEIGHTS.parents[1] / "datasets" / "mvtec_ad" / "bottle"
#: A tiny random-weight backbone: the images below differ in structure, which its features separate.
FAST = {"pretrained": False, "input_size": 64}


def _part(seed: int, size: int = 48) -> np.ndarray:
    """A 'good part': the same horizontal stripes, a little noise."""
    rng = np.random.default_rng(seed)
    rows = np.where((np.arange(size) // 6) % 2 == 0, 200, 60)
    image = np.repeat(rows[:, None], size, axis=1) + rng.normal(0, 6, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def _odd(seed: int, size: int = 48) -> np.ndarray:
    """A 'good' image that is not: a large dark hole through the stripes."""
    image = _part(seed, size)
    image[12:36, 12:36] = 0
    return image


@pytest.fixture
def mixed(tmp_path):
    """24 good parts and 2 defective ones filed among them, in a flat folder."""
    root = tmp_path / "parts"
    for i in range(24):
        write_image(root / f"good_{i:02d}.png", _part(i))
    for i in range(2):
        write_image(root / f"zz_filed_as_good_{i}.png", _odd(100 + i))
    return root


def test_defects_filed_as_good_are_named_first_and_above_the_fence(mixed):
    screen = screen_normals(open_dataset(mixed), "resnet18", params=FAST)
    assert screen.skipped is None and screen.folds == 3 and len(screen.scores) == 26
    top = [path for path, _ in screen.scores[:2]]
    assert all("zz_filed_as_good" in path for path in top)
    suspects = [path for path, _ in screen.suspects]
    assert set(top) <= set(suspects) and len(suspects) <= 4  # the planted two, perhaps a good one near the fence
    scores = [score for _, score in screen.scores]
    assert scores == sorted(scores, reverse=True)
    # each image was scored by a model that never saw it: fitted on all, the planted ones would score as normal
    q1, q3 = np.percentile(scores, [25, 75])
    assert screen.fence == pytest.approx(q3 + 3 * (q3 - q1))


def test_too_few_good_images_or_no_weights_are_skipped_with_the_reason(tmp_path, mixed):
    few = tmp_path / "few"
    for i in range(8):
        write_image(few / f"{i}.png", _part(i))
    screen = screen_normals(open_dataset(few), "resnet18", params=FAST)
    assert screen.scores == [] and "8 good training images" in screen.skipped and screen.suspects == []
    assert "no backbone has weights" in screen_normals(open_dataset(mixed), None).skipped


def test_the_fits_see_at_most_fit_images_and_never_the_fold_they_score(mixed, monkeypatch):
    import automl_ad.screening.normals as normals

    seen = []
    real = normals.create_detector

    def recording(family, **params):
        detector = real(family, **params)
        fit = detector.fit

        def fit_and_record(images, *args, **kwargs):
            seen.append({str(p) for p in images.paths})
            return fit(images, *args, **kwargs)

        detector.fit = fit_and_record
        return detector

    monkeypatch.setattr(normals, "create_detector", recording)
    screen = screen_normals(open_dataset(mixed), "resnet18", params=FAST, fit_images=10)
    assert len(seen) == 3 and all(len(s) == 10 for s in seen)
    scored = [path for path, _ in screen.scores]
    held_out = [set(scored) - s for s in seen]
    assert all(len(h) >= 8 for h in held_out)  # each fit left out at least its own fold


def test_recommend_prints_and_saves_the_screen_and_no_screen_skips_it(mixed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import automl_ad.screening.normals as normals

    real = normals.screen_normals

    def fast(dataset, backbone, weights=None, **kwargs):
        return real(dataset, "resnet18", params=FAST, **kwargs)

    monkeypatch.setattr("automl_ad.journey.screen_normals", fast)
    assert main(["recommend", str(mixed)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Good-image screen (patchcore on resnet18" in out and "zz_filed_as_good_" in out and "Check them" in out
    saved = json.loads(next((tmp_path / ".automl-ad").glob("*/screen.json")).read_text())
    assert saved["suspects"] and saved["suspects"][0]["image"].endswith(".png") and saved["fence"] > 0
    said = []
    plan_search(None, say=said.append)  # the search says it again
    assert any("screen named" in line and "zz_filed_as_good_" in line for line in said)
    assert main(["recommend", str(mixed), "--no-screen", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["categories"][0]["screen"] is None
    assert not list((tmp_path / ".automl-ad").glob("*/screen.json"))  # nor does an earlier screen stay behind


@needs(SHARED_BOTTLE)
@needs(SHARED_WEIGHTS)
def test_real_defects_filed_among_bottle_s_good_images_are_named(tmp_path):
    """Three real bottle defects copied among the 209 good training images come first, above the fence."""
    import shutil

    root = tmp_path / "bottle"
    shutil.copytree(SHARED_BOTTLE / "train" / "good", root)
    for kind, name in (("broken_large", "000.png"), ("broken_small", "005.png"), ("contamination", "003.png")):
        shutil.copy(SHARED_BOTTLE / "test" / kind / name, root / f"zz_{kind}_{name}")
    screen = screen_normals(open_dataset(root), "mobilenetv2_100", str(SHARED_WEIGHTS))
    assert all("zz_" in path for path, _ in screen.scores[:3])
    suspects = screen.suspects
    assert sum("zz_" in path for path, _ in suspects) == 3 and len(suspects) <= 3 + 0.03 * 209


def test_a_screen_that_fails_leaves_the_recommendation_standing(mixed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("automl_ad.journey.screen_normals", broken)
    assert main(["recommend", str(mixed)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Good-image screen: skipped (it failed: RuntimeError: boom" in out and "Saved profile" in out
