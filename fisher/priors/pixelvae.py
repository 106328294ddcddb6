"""PixelVAE prior (Gulrajani et al. 2016, "PixelVAE: A Latent Variable Model for Natural Images"): a VAE
whose decoder p(x | z) is a conditional Gated PixelCNN; binarized MNIST, Table 1's "Gated PixelVAE".

* **Model** (their sec. 3): z ~ N(0, I) of ``latent_dim`` dimensions; the encoder q(z | x) = N(μ, σ²)
  is a strided convolutional network; the decoder first maps z through transposed convolutions to
  32 feature maps s = m(z) at the image's resolution, then p(x | z) = Π_i p(x_i | x_<i, s) is a Gated
  PixelCNN (:class:`fisher.priors.gated.GatedPixelCNN`) with few layers, conditioned on s.
* **Sizes** (appendix E.1): encoder, ReLU after every convolution, 3×3 kernels, on the image scaled to
  [-1, 1]: conv 32, conv/2 32, conv 32, conv/2 64, conv 64, conv/2 64, conv 64 ×3, flatten, Linear to
  (μ, log σ); decoder m: Linear to 64 maps at the encoder's smallest size (4×4 on MNIST), ReLU,
  conv 64 ×2, then three stages of (transposed conv/2, conv) with 64, 32 and 32 maps, ReLU after each,
  each stage cropped to the encoder's map size at that level (on MNIST only 8×8 → 7×7 crops, as the
  appendix's "crop 8×8 feature maps to 7×7"; any H × W works); PixelCNN blocks of 32 maps (``filters``),
  5×5 kernels (``kernel``). The head is Bernoulli for binary data (the paper's sigmoid output),
  categorical per sub-pixel otherwise, R → G → B within a pixel.
* **Training** (sec. 3.1 with one latent level): ``forward`` draws z = μ + σ·ε (reparameterization)
  and returns the head's parameters given s = m(z) and the true x (teacher forcing) with the closed-form
  KL(q(z | x) ‖ N(0, I)); ``log_prob_from_output`` is the single-sample ELBO log p(x | z) − KL, so the
  prior training loop maximizes the ELBO. ``log_prob`` is that ELBO: stochastic, a lower bound
  (``exact_likelihood = False``, ``bound = "ELBO"``).
* **Evaluation** (sec. 4.1): :meth:`PixelVAE.importance_log_prob`, the importance-sampled estimate of
  Burda et al. (2015), log (1/K) Σ_k p(x | z_k) p(z_k) / q(z_k | x) with z_k ~ q(z | x); a lower bound in
  expectation that tightens as K grows (the paper: K = 5000).
* **Latent code**: :meth:`PixelVAE.encode` (the posterior mean μ); :meth:`PixelVAE.decode` samples
  x ~ p(x | z) by the Gated PixelCNN's cached exact sampler.

Deviations, stated:

* s enters every gated layer of both stacks through a 1×1 convolution added to the gates (the Gated
  PixelCNN's location-dependent conditioning, van den Oord et al. 2016 eq. 5), where the paper
  concatenates s to the image at the PixelCNN's input. s is a function of z only, so it needs no mask;
  each layer sees s at the pixel itself (the concatenation's current-pixel tap, repeated in every layer),
  and s at the other pixels of the causal window through the layers below, not through the first
  layer's other taps.
* Every PixelCNN layer has the kernel ``kernel`` (the appendix: a 7×7 first block, then 5×5 blocks,
  their number N unstated); the default 3 layers keep CPU training affordable: the authors' released
  MNIST command (``-L 12 -fs 5 -dpx 16 -ldim 16``) uses a 7×7 input layer plus 12 layers of 5×5 and 16
  PixelCNN maps, and trains the variant "without upsampling" (z conditions every gate directly),
  not this one. The output layers are the Gated PixelCNN's (ReLU, 1×1, ReLU, 1×1), not the appendix's
  two gated 1×1 convolutions.
* The appendix pads the encoder's 7×7 maps to 8×8 before its third stride-2 convolution; here every
  stride-2 convolution pads by 1 (H → ceil(H/2)), which also gives 28 → 14 → 7 → 4, for any size.
* The encoder's and decoder's Linear layers depend on the image size, so the model is built for one
  H × W (``height``, ``width``; MNIST's 28 × 28 by default) and refuses other sizes.
* No KL annealing, free bits or weight normalization (the released code anneals the KL weight over its
  first 10 000 iterations and normalizes weights).

The baseline activations (:meth:`Prior.hidden`) are not defined: that baseline is for the exact
autoregressive priors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fisher.errors import FisherError
from fisher.priors.base import Prior
from fisher.priors.gated import GatedPixelCNN
from fisher.priors.registry import PRIORS

MAPS = 32          # the conditioning maps s = m(z) (appendix E.1: the decoder's last convolution)


@dataclass
class PixelVAEConfig:
    """Appendix E.1 (MNIST) with the authors' released latent size; see the module docstring."""
    channels: int = field(default=1, metadata={"data": True, "help": "image channels (1 grey, 3 RGB)"})
    levels: int = field(default=2, metadata={"data": True, "help": "values per sub-pixel"})
    latent_dim: int = field(default=16, metadata={"help": "latent dimensions (authors' MNIST command: 16)"})
    pixel_layers: int = field(default=3, metadata={
        "help": "autoregressive (gated PixelCNN) layers of the decoder; the authors' MNIST command uses "
                "a 7x7 layer plus 12 (-L 12), 3 keeps CPU training affordable"})
    filters: int = field(default=32, metadata={"help": "feature maps per PixelCNN stack (appendix: 32)"})
    kernel: int = field(default=5, metadata={"help": "PixelCNN kernel size, odd (appendix: 5)"})
    height: int = field(default=28, metadata={"help": "image height the encoder and decoder are built for"})
    width: int = field(default=28, metadata={"help": "image width the encoder and decoder are built for"})

    def __post_init__(self):
        for name in ("channels", "latent_dim", "pixel_layers", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.levels < 2:
            raise ValueError(f"levels={self.levels} must be >= 2")
        if self.kernel % 2 == 0 or self.kernel < 3:
            raise ValueError(f"kernel={self.kernel} must be odd and >= 3")
        if self.filters < self.channels:
            raise ValueError(f"filters={self.filters} must be >= channels={self.channels} (one colour group each)")


def _conv(i: int, o: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, stride, padding=1)


def _up(i: int, o: int) -> nn.ConvTranspose2d:
    """3×3 transposed convolution, stride 2: H → 2H."""
    return nn.ConvTranspose2d(i, o, 3, stride=2, padding=1, output_padding=1)


@PRIORS.register("pixelvae", PixelVAEConfig)
class PixelVAE(Prior):
    """VAE with a Gated PixelCNN decoder; ``log_prob`` is the single-sample ELBO (module docstring)."""
    exact_likelihood = False
    bound = "ELBO"

    def __init__(self, channels: int = 1, levels: int = 2, latent_dim: int = 16, pixel_layers: int = 3,
                 filters: int = 32, kernel: int = 5, height: int = 28, width: int = 28):
        super().__init__(channels, levels)
        self.config = PixelVAEConfig(channels, levels, latent_dim, pixel_layers, filters, kernel, height, width)
        self.sizes = [(height, width)]                     # the encoder's map sizes, full resolution first
        for _ in range(3):
            self.sizes.append(tuple((n + 1) // 2 for n in self.sizes[-1]))
        h4, w4 = self.sizes[-1]
        spec = [(channels, 32, 1), (32, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 2)] + [(64, 64, 1)] * 3
        self.encoder = nn.Sequential(*[m for i, o, s in spec for m in (_conv(i, o, s), nn.ReLU())],
                                     nn.Flatten(), nn.Linear(64 * h4 * w4, 2 * latent_dim))
        self.decoder_in = nn.Sequential(nn.Linear(latent_dim, 64 * h4 * w4), nn.ReLU(), nn.Unflatten(1, (64, h4, w4)),
                                        _conv(64, 64), nn.ReLU(), _conv(64, 64), nn.ReLU())
        self.decoder_up = nn.ModuleList([nn.Sequential(_up(i, o), nn.ReLU(), _conv(o, o), nn.ReLU())
                                         for i, o in ((64, 64), (64, MAPS), (MAPS, MAPS))])
        self.pixelcnn = GatedPixelCNN(channels, levels, n_layers=pixel_layers, filters=filters, kernel_size=kernel,
                                      condition_dim=MAPS)

    def _check(self, shape) -> None:
        if tuple(shape[-2:]) != self.sizes[0]:
            raise FisherError(f"pixelvae built for {self.sizes[0][0]}x{self.sizes[0][1]} images, got "
                              f"{shape[-2]}x{shape[-1]}; rebuild it with --height {shape[-2]} --width {shape[-1]}")

    # ------------------------------------------------------------ encoder, decoder
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x) = N(μ, σ²): (μ, log σ), each (B, latent_dim)."""
        self._check(x.shape)
        return self.encoder(self.scale(x)).chunk(2, dim=1)

    def conditioning(self, z: torch.Tensor) -> torch.Tensor:
        """s = m(z): the decoder's maps (B, 32, H, W) that condition every gated layer."""
        s = self.decoder_in(z)
        for stage, (h, w) in zip(self.decoder_up, reversed(self.sizes[:-1])):
            s = stage(s)[:, :, :h, :w]
        return s

    def decoder_nll(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) in nats per image, Tensor[B] (teacher forced)."""
        self._check(x.shape)
        return self.likelihood.nll(self.pixelcnn(x, self.conditioning(z)), x).flatten(1).sum(1)

    # ------------------------------------------------------------ the prior contract
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head parameters given z = μ + σ·ε and the true x, KL(q(z | x) ‖ N(0, I)) per image)."""
        mu, log_sigma = self.posterior(x)
        z = mu + log_sigma.exp() * torch.randn_like(mu)
        kl = 0.5 * (mu.square() + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(1)
        return self.pixelcnn(x, self.conditioning(z)), kl

    def log_prob_from_output(self, out, x: torch.Tensor) -> torch.Tensor:
        """The single-sample ELBO log p(x | z) − KL in nats per image, from ``forward``'s output."""
        params, kl = out
        return self.likelihood.log_prob(params, x).flatten(1).sum(1) - kl

    log_prob_from_logits = log_prob_from_output

    # ------------------------------------------------------------ latent code, evaluation
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean μ (B, latent_dim): deterministic."""
        return self.posterior(x)[0]

    def latent_size(self, image_shape) -> int:
        """Length of :meth:`encode`'s code for images (H, W, C): ``latent_dim``."""
        return self.config.latent_dim

    @torch.no_grad()
    def decode(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """x ~ p(x | z), long (B, C, H, W): the inverse CDF of uniforms ``u`` (B, C, H, W) by the cached sampler."""
        self._check(u.shape)
        return self.pixelcnn.sample_with(u, self.conditioning(z))

    @torch.no_grad()
    def importance_log_prob(self, x: torch.Tensor, samples: int, chunk: int = 512) -> torch.Tensor:
        """log (1/K) Σ_k p(x | z_k) p(z_k) / q(z_k | x), z_k ~ q(z | x), K = ``samples`` (Burda et al. 2015;
        paper sec. 4.1), Tensor[B] in nats, in eval mode. The noise ε (K, B, latent_dim) is drawn up front
        from torch's global RNG; the decoder takes ``chunk`` (sample, image) pairs per pass, so ``chunk``
        bounds the memory and does not change the draws."""
        was = self.training
        self.eval()
        mu, log_sigma = self.posterior(x)
        b = len(x)
        eps = torch.randn(samples * b, mu.shape[1], device=mu.device, dtype=mu.dtype)    # pair k·B + i
        log_w = []
        for start in range(0, samples * b, chunk):
            e = eps[start:start + chunk]
            i = torch.arange(start, start + len(e), device=x.device) % b
            z = mu[i] + log_sigma[i].exp() * e
            # log p(z) − log q(z | x) = Σ (ε² − z²)/2 + log σ (the 2π terms cancel)
            log_w.append(-self.decoder_nll(z, x[i]) + (0.5 * (e.square() - z.square()) + log_sigma[i]).sum(1))
        self.train(was)
        return torch.logsumexp(torch.cat(log_w).view(samples, b), 0) - math.log(samples)
