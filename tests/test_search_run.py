"""A tiny end-to-end search (Ray Tune + Optuna + MLflow) on demo data: runs, failures, Pareto tags, resume."""

from __future__ import annotations

import numpy as np
import pytest

from automl_ad.data.demo import generate_demo
from automl_ad.search.engine import run_search
from automl_ad.search.request import SearchRequest
from automl_ad.tracking.board import leaderboard
from automl_ad.tracking.store import OBJECTIVES, Tracker, pareto_ranks

FAMILIES = ["gaussian", "frequency", "template"]  # template cannot work on the unaligned texture: it must fail


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    work = tmp_path_factory.mktemp("search")
    data = generate_demo(work / "data", categories=["texture"], n_train=20, n_test_good=6, n_test_per_defect=2,
                         size=64)["texture"]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    request = SearchRequest(data=str(data), families=FAMILIES, priors={"gaussian": 0.8, "frequency": 0.7,
                            "template": 0.6}, budget_s=240, max_trials=4, tracking_uri=uri, trial_timeout_s=120,
                            compare_synthetic=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        first = run_search(request)
        request.resume, request.max_trials = True, 6
        second = run_search(request)
    return first, second, uri


def test_search_records_parent_and_child_runs(searched):
    first, second, uri = searched
    assert second.parent_run_id == first.parent_run_id  # resumed, not restarted
    assert len(first.trials) == 4
    families = [t["family"] for t in first.trials]
    assert set(families) == set(FAMILIES)  # warm start: every family's default ran first
    tracker = Tracker(uri)
    parent = tracker.client.get_run(first.parent_run_id)
    assert parent.data.tags["automl_ad.kind"] == "search" and "search_space.json" in str(
        [a.path for a in tracker.client.list_artifacts(first.parent_run_id, "search")])


def test_compare_synthetic_scores_every_saved_model_after_the_budget(searched):
    _, second, uri = searched
    runs = {r.data.tags["trial"]: r for r in Tracker(uri).trials(second.parent_run_id)}
    for trial in second.trials:
        metrics = runs[trial["trial"]].data.metrics
        if trial["status"] == "ok":  # both searches' trials: the resumed one scores only its own new trials
            assert 0 <= metrics["synthetic_quality"] <= 1 and "synthetic_image_auroc" in metrics
        else:
            assert "synthetic_quality" not in metrics


def test_failing_family_is_recorded_and_search_goes_on(searched):
    _, second, _ = searched
    failed = [t for t in second.trials if t["status"] == "failed"]
    assert failed and all(t["family"] == "template" for t in failed)
    assert "NotApplicable" in failed[0]["failure_reason"] and "aligned" in failed[0]["error"]
    assert sum(t["status"] == "ok" for t in second.trials) >= 3


def test_resume_does_not_repeat_finished_trials(searched):
    _, second, _ = searched
    assert len(second.trials) == 6
    assert len({t["trial"] for t in second.trials}) == 6
    defaults = [t["family"] for t in second.trials if t["default_config"]]
    assert sorted(defaults) == sorted(FAMILIES)  # each default exactly once, even after resuming


def test_front_tags_match_non_dominated_runs(searched):
    _, second, uri = searched
    ok = [t for t in second.trials if t["status"] == "ok"]
    ranks = pareto_ranks(np.array([[t[m] for m, _ in OBJECTIVES] for t in ok]), [d for _, d in OBJECTIVES])
    assert [t["pareto_rank"] == 0 for t in ok] == [r == 0 for r in ranks]
    front = leaderboard(None, tracking_uri=uri, pareto=True)
    assert {r["run_id"] for r in front} == {t["run_id"] for t, r in zip(ok, ranks) if r == 0}
    tracker = Tracker(uri)
    assert any(a.path == "pareto.png" for a in tracker.client.list_artifacts(second.parent_run_id))
    assert all(any(a.path == "model" for a in tracker.client.list_artifacts(r["run_id"])) for r in front)


def test_export_best_front_member_and_predict(searched, tmp_path):
    from automl_ad import load_package
    from automl_ad.deploy.export import choose_run, export_run
    from automl_ad.tracking.records import SearchStore

    _, second, uri = searched
    store = SearchStore(uri)
    run_id = choose_run(store, None, "quality").run_id
    best = max((t for t in second.trials if t.get("pareto_rank") == 0), key=lambda t: t["quality"])
    assert run_id == best["run_id"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path.parent)  # another working folder: the model and the split are read from the store
        said = []
        path = export_run(store, run_id, tmp_path / "pkg", say=said.append)
    manifest = load_package(path).manifest
    assert manifest["family"] == best["family"] and manifest["training"]["run_id"] == run_id
    assert manifest["thresholds"]["image"]["n_normal"] > 0 and "test" in manifest["metrics"]
    # a few held-out normals cannot set a 1% false-alarm rate, even joined by the training normals scored out of
    # fold: export says so, and the threshold flags none of them
    n_normal = manifest["thresholds"]["image"]["n_normal"]
    assert n_normal < 99 and any(f"only {n_normal} " in line and "needs at least 99" in line for line in said), said
    assert manifest["metrics"]["validation_at_threshold"]["false_alarm_rate"] == 0.0
    # the package keeps what the training images looked like; predict notes an image unlike them, and only that one
    from pathlib import Path

    from PIL import Image

    from automl_ad.data.io import save_png
    from automl_ad.deploy.predict import predict_files

    looks = manifest["training"]["images"]
    assert looks["height"] == looks["width"] == [64, 64] and looks["aspect"] == [1.0, 1.0]
    like = np.asarray(Image.open(next(Path(manifest["training"]["dataset"]).rglob("train/good/*.png"))))
    (tmp_path / "new").mkdir()
    save_png(tmp_path / "new" / "like.png", like)
    save_png(tmp_path / "new" / "wide.png", np.concatenate([like] * 3, axis=1))
    rows = predict_files(load_package(path), [str(tmp_path / "new")], tmp_path / "out", progress=False)
    notes = {Path(row["image"]).name: row["note"] for row in rows}
    assert notes["like.png"] == "" and notes["wide.png"].startswith("aspect ratio 3.00 (width / height) against 1.00")


def test_export_warns_when_the_threshold_is_set_by_a_good_image_the_screen_named(searched, tmp_path):
    """A defect filed as good among the held-out normals raises the threshold for every image: when recommend's
    screen (logged with the search) named the normal that sets it, export says which and what to do."""
    from automl_ad.deploy.export import choose_run, export_run
    from automl_ad.screening import NormalScreen
    from automl_ad.tracking.records import SearchStore

    _, second, uri = searched
    store = SearchStore(uri)
    run_id = choose_run(store, None, "quality").run_id
    normals = store.split(store.search(second.parent_run_id)).normal_validation()
    screen = NormalScreen("patchcore", "resnet18", 3, fence=0.0, scores=[(str(p), 1.0) for p in normals.paths])
    store.tracker.client.log_artifact(second.parent_run_id, str(screen.save(tmp_path / "screen.json")), "search")
    said = []
    export_run(store, run_id, tmp_path / "pkg", say=said.append)
    warning = next((line for line in said if "recommend's screen named" in line), None)
    assert warning and "normal image(s) that recommend's screen named" in warning, said
    assert "move it to a defect folder" in warning
    assert any(str(p) in warning for p in normals.paths)


def test_an_interrupted_search_says_so_and_resumes_with_the_rest_of_its_budget(tmp_path, monkeypatch):
    """Ray Tune ends on Ctrl+C as it does on its budget: the search says it was stopped early and how to go on, and
    its state stays resumable."""
    import json

    from automl_ad.search import engine

    data = generate_demo(tmp_path / "data", categories=["texture"], n_train=20, n_test_good=6, n_test_per_defect=2,
                         size=64)["texture"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine, "_tune", lambda *args, **kwargs: True)  # as if Ctrl+C had stopped Ray Tune at once
    said = []

    class Console:
        def print(self, text, *args, **kwargs):
            said.append(str(text))

    request = SearchRequest(data=str(data), families=["gaussian"], budget_s=120,
                            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = run_search(request, console=Console())
    assert any("stopped after" in line and "of its 120-s budget (interrupted)" in line and "--resume" in line
               for line in said), said
    state = json.loads(next(tmp_path.glob(f".automl-ad/search/*/searches/{result.parent_run_id}.json")).read_text())
    assert not state["finished"] and state["elapsed_s"] < 120
    monkeypatch.setattr(engine, "_tune", lambda *args, **kwargs: False)  # a search that ran its budget says nothing
    said.clear()
    request.resume = True
    assert run_search(request, console=Console()).parent_run_id == result.parent_run_id
    assert not any("stopped after" in line for line in said), said
