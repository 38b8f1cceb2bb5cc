"""`automl-ad report`: one self-contained HTML file about a tiny search on demo data."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from automl_ad.cli import main
from automl_ad.constraints import load_constraints
from automl_ad.data import open_dataset
from automl_ad.data.demo import generate_demo
from automl_ad.profiling import profile_dataset
from automl_ad.recommend import recommend
from automl_ad.reporting.html_report import SECTIONS, Evaluation, gather, render
from automl_ad.screening import NormalScreen
from automl_ad.search.engine import run_search
from automl_ad.search.request import SearchRequest
from automl_ad.tracking.records import SearchStore


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    data = generate_demo(work / "data", categories=["texture"], n_train=16, n_test_good=6, n_test_per_defect=2,
                         size=64)["texture"]
    profile = profile_dataset(open_dataset(data))
    recommendation = recommend(profile, load_constraints(None))
    profile_file = profile.save(work / "state" / "profile.json")
    recommendation_file = recommendation.save(work / "state" / "recommendation.json")
    goods = sorted(Path(data, "train", "good").iterdir())  # as if recommend's screen had named the first one
    screen = NormalScreen("patchcore", "resnet18", 3, fence=1.0, scores=[(str(goods[0]), 2.0), (str(goods[1]), 0.5)])
    screen_file = screen.save(work / "state" / "screen.json")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    request = SearchRequest(data=str(data), families=["gaussian", "frequency"], max_trials=3, budget_s=120,
                            trial_timeout_s=90, tracking_uri=uri, profile_file=str(profile_file),
                            recommendation_file=str(recommendation_file), screen_file=str(screen_file))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        result = run_search(request)
    return result, uri, work


def test_report_has_every_section_and_is_self_contained(searched, tmp_path, monkeypatch):
    result, uri, work = searched
    monkeypatch.chdir(work)
    out = tmp_path / "report.html"
    assert main(["report", result.parent_run_id, "--out", str(out), "--tracking-uri", uri]) == 0
    text = out.read_text()
    for key, _ in SECTIONS:
        assert f'<section id="{key}">' in text
    assert text.count("data:image/png;base64,") >= 4  # Pareto, histogram, curves, gallery thumbnails
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", text)  # nothing loaded from outside the file
    assert "<script" not in text and "url(" not in text and "@import" not in text
    assert "could not be built" not in text and "class=\"note\"" not in text.split('id="trials"')[0]
    assert "gaussian" in text and "frequency" in text and "True positives" in text and "False negatives" in text
    assert "reasons for" in text  # the recommendation was logged with the search
    screen = text.split("Good images that look unlike the others")[1].split("</section>")[0]  # and the screen
    assert "named <b>1</b> of the 2 good training images" in screen and screen.count("data:image/png;base64,") == 1


def test_report_of_experiment_name_and_missing_parts(searched, tmp_path, monkeypatch):
    result, uri, work = searched
    monkeypatch.chdir(work)
    out = tmp_path / "by-name.html"
    assert main(["report", result.experiment, "--out", str(out), "--tracking-uri", uri]) == 0
    assert result.parent_run_id in out.read_text()
    store = SearchStore(uri)
    facts = dataclasses.replace(gather(store, store.search(result.parent_run_id)), profile=None, recommendation=None,
                                profile_note="No profile was logged with this search.")
    text = render(facts, Evaluation("The dataset /gone is not on this machine."), uri)
    for key, _ in SECTIONS:
        assert f'<section id="{key}">' in text
    assert "No profile was logged" in text and "No recommendation was logged" in text
    assert text.count("/gone is not on this machine") == 4  # scores, operating curve, curves, gallery say why


def test_a_split_without_test_images_is_reported_on_its_validation_images(searched, tmp_path, monkeypatch):
    """A few normals without labelled defects train instead of making a test split: the report then shows the
    best model's scores, curves and heatmaps on the validation images, and says they selected it."""
    result, uri, work = searched
    monkeypatch.chdir(work)
    split_of = SearchStore.split
    monkeypatch.setattr(SearchStore, "split", lambda self, search, **checks: dataclasses.replace(
        split_of(self, search, **checks), test=split_of(self, search).test.subset([])))
    out = tmp_path / "report.html"
    assert main(["report", result.parent_run_id, "--out", str(out), "--tracking-uri", uri]) == 0
    text = out.read_text()
    assert "holds no test images, so these figures are on the validation images" in text
    assert "Anomaly maps over the validation images" in text and "True positives" in text
    assert "test false alarms" not in text and "No test scores" not in text
