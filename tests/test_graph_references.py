"""Each graph family's scores (its inference graph, run by ``score_samples``) against a reference written here in
plain numpy/scipy: the scoring graph is the families' only implementation, so these keep it checked against an
independent one. The fitted state (bank, Gaussians, trained networks) is the detector's; networks are run as they
are, everything around them (patch features, distances, re-weighting, upsampling, blur, reductions) is numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors import create_detector, graph_based
from automl_ad.features import runtime

SIZE = 32
BACKBONE = {"backbone": "resnet18", "pretrained": False, "input_size": SIZE, "cache_features": False}
TOLERANCE = 1e-3  # of the reference's span, as the ONNX parity check


@pytest.fixture(scope="module")
def images() -> ImageSet:
    """Smooth random colour images with a bright blob, so maps vary across the image."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for _ in range(10):
        base = ndimage.gaussian_filter(rng.random((SIZE, SIZE, 3)), (2, 2, 0))
        cy, cx = rng.integers(6, SIZE - 6, 2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 8.0)[..., None]
        out.append(np.clip(0.5 * base + 0.5 * blob, 0, 1).astype(np.float32))
    return ImageSet.from_arrays(out)


# --- numpy references -------------------------------------------------------------------------------------------
def bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes to ``size``: bilinear, pixel centres at half-pixel offsets (align_corners False),
    source positions before the first pixel clamped to it, no antialiasing."""
    def taps(out: int, length: int):
        source = np.maximum((np.arange(out) + 0.5) * length / out - 0.5, 0.0)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, length - 1), source - low

    (y0, y1, fy), (x0, x1, fx) = taps(size[0], maps.shape[-2]), taps(size[1], maps.shape[-1])
    rows = maps[..., y0, :] * (1 - fy)[:, None] + maps[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """scipy's Gaussian blur of each (H, W) map of an (N, H, W) stack (reflecting border, 4 sigma)."""
    return ndimage.gaussian_filter(maps, (0, sigma, sigma), mode="reflect", truncate=4.0) if sigma > 0 else maps


def patch_embedding(features: list[np.ndarray], neighbourhood: int = 3) -> np.ndarray:
    """PatchCore's locally aware patch features (N, h, w, D): each map's neighbourhood mean (zeros outside),
    coarser maps resized bilinearly to the finest grid, concatenated."""
    pooled = [ndimage.uniform_filter(f.astype(np.float64), (1, 1, neighbourhood, neighbourhood), mode="constant")
              for f in features]
    grid = pooled[0].shape[-2:]
    return np.concatenate([p if p.shape[-2:] == grid else bilinear(p, grid) for p in pooled], axis=1).transpose(
        0, 2, 3, 1)


def pixel_map(grid_scores: np.ndarray, sigma: float) -> np.ndarray:
    """(N, h, w) cell scores -> (N, SIZE, SIZE): resized bilinearly, then blurred."""
    return blur(bilinear(grid_scores, (SIZE, SIZE)), sigma)


def assert_scores(detector, images: ImageSet, image_scores: np.ndarray, maps: np.ndarray) -> None:
    actual = detector.score_samples(images)
    span = float(np.ptp(maps))
    assert span > 0
    np.testing.assert_allclose(actual.anomaly_maps, maps, rtol=0, atol=TOLERANCE * span)
    np.testing.assert_allclose(actual.image_scores, image_scores, rtol=0, atol=TOLERANCE * span)


def run(network, *arrays) -> list:
    """A fitted network (in eval mode after fit) on numpy inputs without gradients, outputs as float64 numpy."""
    with torch.no_grad():
        outputs = network(*[torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in arrays])
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [o.double().numpy() for o in outputs]


# --- families ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", ["exact", "hnsw"])
def test_patchcore_is_the_reweighted_nearest_neighbour_distance(images, index):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("patchcore", **BACKBONE, coreset_ratio=0.5, num_neighbors=3, smoothing_sigma=2.0,
                               index=index).fit(train)
    bank = detector.memory_bank_.astype(np.float64)
    embedding = patch_embedding(detector._features(test))
    n, h, w, d = embedding.shape
    queries = embedding.reshape(n, h * w, d)
    distances = np.sqrt(((queries[:, :, None] - bank[None, None]) ** 2).sum(axis=-1))  # (N, P, M)
    nearest, patch_distance = distances.argmin(axis=2), distances.min(axis=2)
    scores = []
    for i in range(n):
        worst = patch_distance[i].argmax()
        star, m_star = patch_distance[i, worst], nearest[i, worst]
        support = np.argsort(((bank - bank[m_star]) ** 2).sum(axis=1))[:3]  # m* and its 2 nearest bank features
        support_distances = np.sqrt(((bank[support] - queries[i, worst]) ** 2).sum(axis=1))
        support_distances[0] = star
        weights = np.exp(support_distances - support_distances.max())
        scores.append((1 - weights[0] / weights.sum()) * star)
    assert_scores(detector, test, np.array(scores), pixel_map(patch_distance.reshape(n, h, w), 2.0))


def test_padim_is_the_mahalanobis_distance_at_each_position(images):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("padim", **BACKBONE, n_features=20, smoothing_sigma=1.5).fit(train)
    fine, coarse = detector._features(test)
    upsampled = np.repeat(np.repeat(coarse, 2, axis=2), 2, axis=3)  # nearest: each coarse cell covers 2x2 fine
    embedding = np.concatenate([fine, upsampled], axis=1)[:, detector.channels_].astype(np.float64)
    n, _, h, w = embedding.shape
    delta = embedding.reshape(n, -1, h * w).transpose(0, 2, 1) - detector.mean_  # (N, P, D)
    distances = np.sqrt(np.einsum("npd,pde,npe->np", delta, detector.inv_covariance_.astype(np.float64), delta))
    maps = pixel_map(distances.reshape(n, h, w), 1.5)
    assert_scores(detector, test, maps.max(axis=(1, 2)), maps)


def test_fastflow_is_one_minus_the_mean_stage_likelihood(images):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("fastflow", **BACKBONE, flow_steps=2, epochs=2, batch_size=4,
                               smoothing_sigma=1.0).fit(train)
    model = detector.model_
    likelihoods = []
    for feature, norm, flow in zip(detector._features(test), model["norms"], model["flows"]):
        z = run(lambda f, flow=flow, norm=norm: flow(norm(f))[0], feature)[0]
        likelihoods.append(bilinear(np.exp(-0.5 * (z ** 2).mean(axis=1)), (SIZE, SIZE)))
    maps = blur(1 - np.mean(likelihoods, axis=0), 1.0)
    assert_scores(detector, test, maps.max(axis=(1, 2)), maps)


@pytest.mark.parametrize("combination", ["product", "sum"])
def test_stpm_combines_normalised_feature_distances(images, combination):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("stpm", **BACKBONE, epochs=2, batch_size=4, map_combination=combination).fit(train)
    weights = detector._extractor().spec.weights
    pixels = test.load(SIZE).transpose(0, 3, 1, 2)
    normalised = (pixels - np.array(weights.mean)[:, None, None]) / np.array(weights.std)[:, None, None]
    levels = []
    for teacher, student in zip(detector._features(test), run(lambda x: tuple(detector.student_(x)), normalised)):
        unit = [f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) for f in (teacher, student)]
        levels.append(bilinear(0.5 * ((unit[0] - unit[1]) ** 2).sum(axis=1), (SIZE, SIZE)))
    maps = np.prod(levels, axis=0) if combination == "product" else np.sum(levels, axis=0)
    assert_scores(detector, test, maps.max(axis=(1, 2)), maps)


def _local_features(image: np.ndarray, scales) -> np.ndarray:
    """(H, W, 7 x scales): local mean, local standard deviation, sigma*Ix, sigma*Iy, sigma^2*Ixx, sigma^2*Iyy,
    sigma^2*Ixy per scale (scipy's Gaussian filters)."""
    image = image.astype(np.float64)
    channels = []
    for sigma in scales:
        mean = ndimage.gaussian_filter(image, sigma)
        channels += [mean, np.sqrt(np.maximum(ndimage.gaussian_filter(image * image, sigma) - mean * mean, 0))]
        for order, power in (((0, 1), 1), ((1, 0), 1), ((0, 2), 2), ((2, 0), 2), ((1, 1), 2)):
            channels.append(sigma ** power * ndimage.gaussian_filter(image, sigma, order=order))
    return np.stack(channels, axis=-1)


@pytest.mark.parametrize("mode", ["per_position", "shared"])
def test_gaussian_is_the_mahalanobis_distance_of_local_features(images, mode):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("gaussian", input_size=SIZE, mode=mode, scales=(1.0, 2.0), max_samples=2000,
                               smoothing_sigma=1.5).fit(train)
    location, precision = detector.location_.astype(np.float64), detector.precision_.astype(np.float64)
    pattern = "hwi,hwij,hwj->hw" if mode == "per_position" else "hwi,ij,hwj->hw"
    distances = []
    for image in test.load(SIZE, gray=True):
        centred = _local_features(image, (1.0, 2.0)) - location
        distances.append(np.sqrt(np.maximum(np.einsum(pattern, centred, precision, centred), 0)))
    maps = blur(np.stack(distances), 1.5)
    assert_scores(detector, test, maps.max(axis=(1, 2)), maps)


@pytest.mark.parametrize("image_score", ["max", "top_k_mean"])
def test_autoencoder_is_the_smoothed_squared_reconstruction_error(images, image_score):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("autoencoder", input_size=SIZE, latent_dim=8, base_channels=8, epochs=2,
                               batch_size=4, loss="mse", map_metric="l2", smoothing_sigma=1.0,
                               image_score=image_score, top_k_fraction=0.05).fit(train)
    pixels = test.load(SIZE).transpose(0, 3, 1, 2)
    maps = blur(((pixels - run(detector.model_, pixels)[0]) ** 2).sum(axis=1), 1.0)
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)
    scores = flat[:, -1] if image_score == "max" else flat[:, -round(0.05 * SIZE * SIZE):].mean(axis=1)
    assert_scores(detector, test, scores, maps)


def test_ganomaly_scores_the_latent_distance_and_maps_the_residual(images):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("ganomaly", input_size=SIZE, latent_dim=8, base_channels=8, epochs=2, batch_size=4,
                               image_score="latent", smoothing_sigma=1.0).fit(train)
    inputs = test.load(SIZE).transpose(0, 3, 1, 2) * 2 - 1
    fake, latent_in, latent_out = run(detector.generator_, inputs)
    maps = blur(np.abs(inputs - fake).mean(axis=1) / 2, 1.0)
    scores = ((latent_in - latent_out) ** 2).reshape(len(inputs), -1).mean(axis=1)
    actual = detector.score_samples(test)
    np.testing.assert_allclose(actual.anomaly_maps, maps, rtol=0, atol=TOLERANCE * np.ptp(maps))
    np.testing.assert_allclose(actual.image_scores, scores, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("objective", ["one-class", "soft-boundary"])
def test_deep_svdd_maps_the_distance_to_the_centre(images, objective):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("deep_svdd", **BACKBONE, epochs=2, batch_size=64, learning_rate=1e-3,
                               objective=objective, nu=0.2, warm_up_epochs=0, smoothing_sigma=1.5).fit(train)
    embedding = patch_embedding(detector._features(test))
    n, h, w, d = embedding.shape
    represented = run(detector.network_, embedding.reshape(-1, d))[0]
    distances = ((represented - detector.centre_.double().numpy()) ** 2).sum(axis=1)
    if objective == "soft-boundary":
        assert detector.radius_ > 0
        distances -= detector.radius_ ** 2
    maps = pixel_map(distances.reshape(n, h, w), 1.5)
    assert_scores(detector, test, maps.max(axis=(1, 2)), maps)


def test_simplenet_maps_the_negated_discriminator(images):
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("simplenet", **BACKBONE, epochs=2, batch_size=2, hidden_dim=32, noise_std=0.5,
                               smoothing_sigma=1.5).fit(train)
    embedding = patch_embedding(detector._features(test))
    n, h, w, d = embedding.shape
    model = detector.model_
    scores = -run(lambda x: model["discriminator"](model["adaptor"](x)), embedding.reshape(-1, d))[0][:, 0]
    maps = pixel_map(scores.reshape(n, h, w), 1.5)
    assert_scores(detector, test, maps.max(axis=(1, 2)), maps)


# --- how the graph runs -----------------------------------------------------------------------------------------
def test_graph_runs_in_eager_torch_past_the_onnx_size_limit(images, monkeypatch):
    """A graph whose constants pass protobuf's 2 GiB limit runs in torch (the path a GPU takes), with the same
    scores as through ONNX Runtime."""
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("padim", **BACKBONE, n_features=20).fit(train)
    through_onnx = detector.score_samples(test)
    monkeypatch.setattr(graph_based, "ONNX_CONSTANTS_LIMIT", 0)
    monkeypatch.setattr(graph_based, "cpu_runner", lambda *args: pytest.fail("exported despite the size limit"))
    eager = detector.set_params(n_features=20).score_samples(test)  # set_params: the graph is built again
    np.testing.assert_allclose(eager.anomaly_maps, through_onnx.anomaly_maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eager.image_scores, through_onnx.image_scores, rtol=1e-5, atol=1e-5)


def test_the_graph_follows_parameters_set_after_fit_and_survives_copies(images):
    import copy
    import pickle

    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector("patchcore", **BACKBONE, smoothing_sigma=0.0).fit(train)
    sharp = detector.score_samples(test)
    smooth = detector.set_params(smoothing_sigma=2.0).score_samples(test)
    np.testing.assert_allclose(smooth.anomaly_maps, blur(sharp.anomaly_maps.astype(np.float64), 2.0), rtol=0,
                               atol=TOLERANCE * np.ptp(sharp.anomaly_maps))
    for twin in (copy.deepcopy(detector), pickle.loads(pickle.dumps(detector))):
        np.testing.assert_allclose(twin.score_samples(test).anomaly_maps, smooth.anomaly_maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, params", [("patchcore", {"coreset_ratio": 0.5}),
                                            ("stpm", {"epochs": 1, "batch_size": 4})])
def test_the_whole_graph_and_the_head_on_extracted_features_agree(images, family, params):
    """In-memory images run backbone and head as one graph; images whose features are extracted (or cached) first
    run the head alone (STPM's head reads the images too): the same scores and maps."""
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector(family, **BACKBONE, **params).fit(train)
    whole = detector.score_samples(test)
    head = graph_based.GraphDetector._score(detector, test)  # the path of images read through the feature cache
    assert set(detector._runners) == {"whole", "head"}
    span = np.ptp(whole.anomaly_maps)
    np.testing.assert_allclose(head.anomaly_maps, whole.anomaly_maps, rtol=0, atol=1e-4 * span)
    np.testing.assert_allclose(head.image_scores, whole.image_scores, rtol=0, atol=1e-4 * span)


@pytest.mark.parametrize("family, params, branches", [("stpm", {"epochs": 1, "batch_size": 4}, 2),
                                                      ("fastflow", {"epochs": 1, "flow_steps": 2}, 2)])
def test_families_in_parts_run_them_side_by_side_with_the_scores_of_one_session(images, monkeypatch, family, params,
                                                                                branches):
    """On two threads or more, in-memory images run in parts side by side (STPM: teacher and student; FastFlow:
    its stages' flows in two groups after the backbone), each on a thread: the scores of the whole graph in one
    session, which one thread falls back to. A package's one graph is declined, so that a loaded package runs
    them side by side too."""
    train, test = images.subset(range(6)), images.subset(range(6, 10))
    detector = create_detector(family, **BACKBONE, **params).fit(train)
    built = []

    def recording(branch_modules, *args, **kwargs):
        built.append((len(branch_modules), runtime.concurrent_runner(branch_modules, *args, **kwargs)))
        return built[-1][1]

    monkeypatch.setattr(graph_based, "concurrent_runner", recording)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        in_parts = detector.score_samples(test)
        torch.set_num_threads(1)
        one_session = detector.set_params(epochs=1).score_samples(test)  # set_params: the graph is built again
    finally:
        torch.set_num_threads(threads)
    assert built[0][0] == branches and built[0][1] is not None and built[1][1] is None
    span = np.ptp(one_session.anomaly_maps)
    np.testing.assert_allclose(in_parts.anomaly_maps, one_session.anomaly_maps, rtol=0, atol=1e-5 * span)
    np.testing.assert_allclose(in_parts.image_scores, one_session.image_scores, rtol=0, atol=1e-5 * span)
    assert not detector.use_inference_model(b"not read")


def test_concurrent_runner_joins_the_branches_outputs_in_order():
    class Scale(torch.nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return [x * self.factor, x + self.factor]

    class Join(torch.nn.Module):
        def forward(self, a, b, c, d):
            return [a - 2 * b + 3 * c - 4 * d]

    class Second(torch.nn.Module):  # reads only its second input: the exporter drops the first
        def forward(self, a, b):
            return [b * 10]

    class Pair(torch.nn.Module):
        def forward(self, a, b):
            return [a + b, a - b, a * b]

    x = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    expected = Join()(*Scale(2.0)(x), *Scale(-3.0)(x))[0]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run = runtime.concurrent_runner([Scale(2.0), Scale(-3.0)], Join(), (x,))
        after = runtime.concurrent_runner([Second(), Pair()], Join(), (x,), prefix=Scale(2.0))
        assert runtime.concurrent_runner([Scale(2.0)], Join(), (x,)) is None
        torch.set_num_threads(1)
        assert runtime.concurrent_runner([Scale(2.0), Scale(-3.0)], Join(), (x,)) is None
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(run(x[:1])[0].numpy(), expected[:1].numpy(), rtol=1e-6)
    prefixed = Join()(*Second()(*Scale(2.0)(x)), *Pair()(*Scale(2.0)(x)))[0]
    np.testing.assert_allclose(after(x)[0].numpy(), prefixed.numpy(), rtol=1e-6)
