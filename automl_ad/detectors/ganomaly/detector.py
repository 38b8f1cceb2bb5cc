"""GANomaly (Akcay, Atapour-Abarghouei and Breckon, ACCV 2018): semi-supervised anomaly detection via adversarial
training of an encoder-decoder-encoder generator, as the official code (github.com/samet-akcay/ganomaly).

1. Images at ``input_size`` (a power of two >= 16: DCGAN layers halve the size down to 4x4), colour or ``gray``,
   scaled to [-1, 1].
2. Generator G = (G_E, G_D) plus a second encoder E: G_E(x) = z, x' = G_D(z), z' = E(x'). G_E and E are DCGAN
   encoders (4x4 stride-2 convolutions, BatchNorm, LeakyReLU(0.2), ``base_channels`` doubling per layer, a final
   4x4 convolution to the ``latent_dim`` vector), G_D the DCGAN decoder (transposed convolutions, BatchNorm, ReLU,
   tanh output). The discriminator D is the DCGAN encoder with one output and a sigmoid; its last hidden feature
   map (before the classifier) is used for feature matching. Weights initialised N(0, 0.02) (BatchNorm
   N(1, 0.02)), as DCGAN.
3. Generator loss = ``w_adv`` x L_adv + ``w_con`` x L_con + ``w_enc`` x L_enc with the paper's weights 1, 50 and 1:
   L_adv = mean squared difference between D's features of x and of x' (feature matching), L_con = mean |x - x'|
   (L1, contextual), L_enc = mean (z - z')^2. D minimises binary cross-entropy on real vs generated images. Both
   use Adam with lr 2e-4 and betas (0.5, 0.999); each step updates G then D, and D is re-initialised when its
   loss falls below 1e-5 (it has collapsed), as the official code. These are the settings the paper reports
   as stable; the reported epoch ``loss`` is the generator's total loss, the parts are in ``loss_parts_``.
4. Image score = mean over the latent dimensions of (G_E(x) - E(G(x)))^2, the paper's score (the official code
   additionally min-max scales scores over the test set; we do not, so a score does not depend on the other
   images). The anomaly map is our addition (GANomaly only scores images): |x - G(x)| averaged over channels,
   smoothed by a Gaussian of ``smoothing_sigma`` pixels; ``image_score="residual"`` (also ours) scores an image
   by that map's maximum instead of the latent distance. Networks run in eval mode at test time (BatchNorm
   running statistics), so a score does not depend on the batch it is computed in.

The official code defaults to 15 epochs at batch 64 on 32 px images (anomalib trains at 256 px); our default size
is 64 px.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from automl_ad.data.imageset import ImageSet
from automl_ad.detectors.base import EpochCallback
from automl_ad.detectors.ganomaly.graph import GanomalyGraph
from automl_ad.detectors.generative import epoch_batches, image_tensor, load_module_tensors, module_tensors
from automl_ad.detectors.graph_based import GraphDetector
from automl_ad.detectors.parameters import (
    DECAY,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    Options,
    PowerOfTwo,
)
from automl_ad.detectors.registry import register_detector
from automl_ad.errors import InvalidParameterError
from automl_ad.features import resolve_device

log = logging.getLogger(__name__)

IMAGE_SCORES = ("latent", "residual")
#: The official code re-initialises the discriminator when its loss falls below this.
DISCRIMINATOR_COLLAPSE = 1e-5


@register_detector
class GANomaly(GraphDetector):
    """GAN route: encoder-decoder-encoder generator trained adversarially; latent-code distance is the score."""

    name = "ganomaly"
    route = "gan"
    iterative = True
    # The paper's latent score is unreliable after a few seconds of training on 24 demo images (image AUROC 0.2-0.85
    # over seeds); the residual map's maximum is not (0.82-1.0), so the contract test uses it.
    test_params = {"input_size": 32, "epochs": 60, "batch_size": 8, "base_channels": 16, "latent_dim": 8,
                   "image_score": "residual"}
    test_category = "object"
    _parameter_constraints = {
        "input_size": [PowerOfTwo(16)], "gray": [bool], "latent_dim": [POSITIVE_INT], "base_channels": [POSITIVE_INT],
        "extra_layers": [NON_NEGATIVE_INT], "epochs": [POSITIVE_INT], "batch_size": [POSITIVE_INT],
        "learning_rate": [POSITIVE], "beta1": [DECAY], "w_adv": [NON_NEGATIVE], "w_con": [NON_NEGATIVE],
        "w_enc": [NON_NEGATIVE], "image_score": [Options(*IMAGE_SCORES)], "smoothing_sigma": [NON_NEGATIVE],
        "device": [str], "seed": [NON_NEGATIVE_INT],
    }

    def __init__(self, input_size=64, gray=False, latent_dim=100, base_channels=64, extra_layers=0, epochs=15,
                 batch_size=64, learning_rate=2e-4, beta1=0.5, w_adv=1.0, w_con=50.0, w_enc=1.0,
                 image_score="latent", smoothing_sigma=2.0, device="auto", seed=0):
        self._store_parameters(locals())

    def _check_parameter_relations(self) -> None:
        if self.w_adv + self.w_con + self.w_enc <= 0:
            raise InvalidParameterError(f"{self.name}: at least one of w_adv, w_con and w_enc must be > 0")

    # --- model ------------------------------------------------------------------------------------------------
    def _build(self):
        """(generator, discriminator) initialised from ``seed`` on the device."""
        device = resolve_device(self.device)
        channels = 1 if self.gray else 3
        size, latent, width, extra = (int(self.input_size), int(self.latent_dim), int(self.base_channels),
                                      int(self.extra_layers))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            generator = Generator(size, channels, latent, width, extra)
            discriminator = Discriminator(size, channels, width, extra)
            generator.apply(weights_init)
            discriminator.apply(weights_init)
        return generator.to(device), discriminator.to(device)

    # --- fit --------------------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, on_epoch: EpochCallback | None) -> None:
        generator, discriminator = self._build()
        device = next(generator.parameters()).device
        images = image_tensor(train, int(self.input_size), bool(self.gray), device) * 2 - 1
        betas = (float(self.beta1), 0.999)
        optimiser_g = torch.optim.Adam(generator.parameters(), lr=self.learning_rate, betas=betas)
        optimiser_d = torch.optim.Adam(discriminator.parameters(), lr=self.learning_rate, betas=betas)
        shuffle = torch.Generator().manual_seed(self.seed)
        self.loss_parts_, self.discriminator_resets_ = [], 0
        generator.train()
        discriminator.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # discriminator re-initialisations draw from here
            for epoch in range(int(self.epochs)):
                sums, seen = dict.fromkeys(("adv", "con", "enc", "generator", "discriminator"), 0.0), 0
                for index in self._until_deadline(epoch_batches(len(images), int(self.batch_size), shuffle)):
                    real = images[index.to(device)]
                    fake, latent_in, latent_out = generator(real)
                    # generator: feature matching + contextual L1 + latent L2
                    adversarial = F.mse_loss(discriminator(fake)[1], discriminator(real)[1])
                    contextual = F.l1_loss(fake, real)
                    encoder = F.mse_loss(latent_out, latent_in)
                    loss_g = self.w_adv * adversarial + self.w_con * contextual + self.w_enc * encoder
                    optimiser_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                    optimiser_g.step()
                    # discriminator: real vs generated
                    prediction_real, _ = discriminator(real)
                    prediction_fake, _ = discriminator(fake.detach())
                    loss_d = 0.5 * (F.binary_cross_entropy(prediction_real, torch.ones_like(prediction_real))
                                    + F.binary_cross_entropy(prediction_fake, torch.zeros_like(prediction_fake)))
                    optimiser_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    optimiser_d.step()
                    if float(loss_d.detach()) < DISCRIMINATOR_COLLAPSE:
                        discriminator.apply(weights_init)
                        self.discriminator_resets_ += 1
                    for key, value in (("adv", adversarial), ("con", contextual), ("enc", encoder),
                                       ("generator", loss_g), ("discriminator", loss_d)):
                        sums[key] += float(value.detach()) * len(index)
                    seen += len(index)
                parts = {key: value / seen for key, value in sums.items()}
                self.loss_parts_.append(parts)
                if self._record_epoch(epoch, parts["generator"], on_epoch, "lower learning_rate",
                                      interim=lambda: self._interim_state([generator, discriminator],
                                                                          generator_=generator,
                                                                          discriminator_=discriminator)):
                    break
        self._set_models(generator, discriminator)
        log.info("%s: %d epochs, final generator loss %.4f, %d discriminator resets", self.name,
                 len(self.loss_history_), self.loss_history_[-1], self.discriminator_resets_)

    def _set_models(self, generator, discriminator) -> None:
        self.generator_ = generator.eval()
        self.discriminator_ = discriminator.eval()

    # --- score ------------------------------------------------------------------------------------------------
    def _scoring_graph(self) -> GanomalyGraph:
        return GanomalyGraph(self.generator_, int(self.input_size), self.smoothing_sigma,
                             self.image_score == "latent")

    # --- persistence ------------------------------------------------------------------------------------------
    def _state(self):
        tensors = {**module_tensors(self.generator_, "generator."),
                   **module_tensors(self.discriminator_, "discriminator.")}
        return tensors, {"loss_parts": self.loss_parts_, "discriminator_resets": self.discriminator_resets_}

    def _restore(self, tensors, state):
        self.loss_parts_ = list(state["loss_parts"])
        self.discriminator_resets_ = state["discriminator_resets"]
        generator, discriminator = self._build()
        load_module_tensors(generator, tensors, "generator.")
        load_module_tensors(discriminator, tensors, "discriminator.")
        self._set_models(generator, discriminator)


# --- DCGAN networks (as the official GANomaly code) ---------------------------------------------------------------
def weights_init(module) -> None:
    """DCGAN initialisation: convolutions N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def encoder_layers(size: int, channels: int, latent: int, width: int, extra: int) -> list:
    """DCGAN encoder: 4x4 stride-2 convolution + LeakyReLU, ``extra`` 3x3 layers, then stride-2 convolution +
    BatchNorm + LeakyReLU doubling the channels down to 4x4, and a final 4x4 convolution to ``latent`` x 1 x 1."""
    layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
    for _ in range(extra):
        layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
    current, spatial = width, size // 2
    while spatial > 4:
        layers += [nn.Conv2d(current, current * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(current * 2),
                   nn.LeakyReLU(0.2)]
        current, spatial = current * 2, spatial // 2
    return layers + [nn.Conv2d(current, latent, 4, 1, 0, bias=False)]


def decoder_layers(size: int, channels: int, latent: int, width: int, extra: int) -> list:
    """DCGAN decoder, the encoder's mirror: 4x4 transposed convolution to 4x4, then stride-2 transposed
    convolutions + BatchNorm + ReLU halving the channels, ``extra`` 3x3 layers, and a tanh output."""
    current = width * size // 8  # so that the channels reach ``width`` at half the output size
    layers = [nn.ConvTranspose2d(latent, current, 4, 1, 0, bias=False), nn.BatchNorm2d(current), nn.ReLU()]
    spatial = 4
    while spatial < size // 2:
        layers += [nn.ConvTranspose2d(current, current // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(current // 2),
                   nn.ReLU()]
        current, spatial = current // 2, spatial * 2
    for _ in range(extra):
        layers += [nn.Conv2d(current, current, 3, 1, 1, bias=False), nn.BatchNorm2d(current), nn.ReLU()]
    return layers + [nn.ConvTranspose2d(current, channels, 4, 2, 1, bias=False), nn.Tanh()]


class Generator(nn.Module):
    """G_E -> G_D -> E: returns (x', z, z')."""

    def __init__(self, size: int, channels: int, latent: int, width: int, extra: int):
        super().__init__()
        self.encoder1 = nn.Sequential(*encoder_layers(size, channels, latent, width, extra))
        self.decoder = nn.Sequential(*decoder_layers(size, channels, latent, width, extra))
        self.encoder2 = nn.Sequential(*encoder_layers(size, channels, latent, width, extra))

    def forward(self, x):
        latent_in = self.encoder1(x)
        fake = self.decoder(latent_in)
        return fake, latent_in, self.encoder2(fake)


class Discriminator(nn.Module):
    """DCGAN encoder with one output: returns (probability real, last hidden feature map)."""

    def __init__(self, size: int, channels: int, width: int, extra: int):
        super().__init__()
        layers = encoder_layers(size, channels, 1, width, extra)
        self.features = nn.Sequential(*layers[:-1])
        self.classifier = nn.Sequential(layers[-1], nn.Sigmoid())

    def forward(self, x):
        features = self.features(x)
        return self.classifier(features).flatten(), features

