"""Conditional WGAN-GP decoder x = G(z, n) (paper sec. 5.2 and appendix 7.2; Gulrajani et al. 2017).

Architecture: the DCGAN networks of the code the appendix points to (LynnHo's DCGAN/WGAN-GP), for an
image side S = 4·2^k:

* generator G(h, n): the standardized embedding h concatenated to noise n ~ N(0, I) (``noise_dim``), as a
  (z_dim + noise_dim) × 1 × 1 map, ConvT(k4) to 4 × 4, then k - 1 ConvT(k4, s2, p1) blocks, each followed
  by BatchNorm and ReLU, the last ConvT(k4, s2, p1) to C channels and tanh; channels width·2^(k-1) at
  4 × 4, halved by every block, at most width·8 (``width`` = 64). 32 × 32: 256 → 128 → 64 → C; 64 × 64:
  512 → 256 → 128 → 64 → C; 128 × 128 adds one more block: 512 → 512 → 256 → 128 → 64 → C.
* critic D(h, x): the mirror, k Conv(k4, s2, p1) blocks with LeakyReLU(0.2) (channels width, 2·width, ...,
  at most width·8) and a last Conv(k4) to one output. Normalization is layer norm (GroupNorm with one group,
  after every block but the first, as LynnHo's WGAN-GP critic): batch norm couples the images of a batch
  and breaks the per-image gradient penalty.

Conditioning (appendix 7.2): h enters G through its input; in D it is projected by a linear map to the
channels of every convolution's input and added as a bias, broadcast over the image.

Other sizes (MNIST's 28 × 28): G works at the smallest S = 4·2^k ≥ max(H, W) (and S ≥ 8) and its output
is center-cropped to H × W; D pads every image, real or generated, back to S × S with -1 (black), so both
see the same border. The gradient penalty is taken w.r.t. the H × W image, not the constant border.

Training (Gulrajani et al. Algorithm 1): images on [-1, 1]; each :meth:`WGANDecoder.train_step` is one
critic step minimizing D(h, G(h, n)) - D(h, x) + λ (‖∇_x̂ D(h, x̂)‖₂ - 1)², x̂ = εx + (1-ε)G(h, n),
ε ~ U[0, 1] per image (λ = ``gp_weight`` = 10); every ``n_critic``-th (5) also one generator step minimizing
-D(h, G(h, n)). The count is a buffer, so a resumed run continues the cycle. One Adam over all parameters
(each step gives gradients to one network only; Adam skips the others), lr 2e-4 and β₁ = 0.5 of the DCGAN
code, β₂ = 0.9 of Gulrajani et al.

Decoding (``generates = "sample"``, no likelihood): x = round((G(h, n) + 1)/2 · (L - 1)) on {0, …, L-1},
with G in eval mode (BatchNorm running statistics) and n seeded by ``sample_seed`` and the bytes of the
embedding row, so the same z always decodes to the same image, whatever the batch it is in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from fisher.decoders.base import Decoder
from fisher.decoders.registry import DECODERS
from fisher.errors import FisherError
from fisher.noise import row_generators


@dataclass
class WGANConfig:
    """Defaults of LynnHo's DCGAN code and Gulrajani et al.: 128 noise dims, width 64, 5 critic steps, λ = 10."""
    noise_dim: int = field(default=128, metadata={"help": "wgan decoder: dimension of the generator's Gaussian noise"})
    width: int = field(default=64, metadata={"help": "wgan decoder: base width of generator and critic (DCGAN: 64)"})
    n_critic: int = field(default=5, metadata={
        "help": "wgan decoder: critic steps per generator step (Gulrajani et al.: 5)"})
    gp_weight: float = field(default=10.0, metadata={
        "help": "wgan decoder: weight lambda of the gradient penalty (Gulrajani et al.: 10)"})
    sample_seed: int = field(default=0, metadata={"help": "wgan decoder: seed of the per-image decoding noise"})

    def __post_init__(self):
        for name in ("noise_dim", "width", "n_critic"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not (self.gp_weight >= 0 and math.isfinite(self.gp_weight)):
            raise ValueError(f"gp_weight={self.gp_weight}: must be a finite number >= 0")


def _side(h: int, w: int) -> tuple[int, int]:
    """(S, k): the smallest S = 4·2^k ≥ max(h, w), with k ≥ 1."""
    side, k = 8, 1
    while side < max(h, w):
        side, k = 2 * side, k + 1
    return side, k


class Generator(nn.Module):
    """G(h, n): (B, z_dim), (B, noise_dim) → (B, C, S, S) on [-1, 1]."""

    def __init__(self, in_dim: int, channels: int, width: int, k: int):
        super().__init__()
        widths = [min(width * 2 ** (k - 1 - i), width * 8) for i in range(k)]      # at 4, 8, ..., S/2
        layers = [nn.ConvTranspose2d(in_dim, widths[0], 4, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for a, b in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([h, noise], 1)[:, :, None, None])


class Critic(nn.Module):
    """D(h, x): (B, z_dim), (B, C, H, W) on [-1, 1] → (B,); pads x to S × S with -1."""

    def __init__(self, z_dim: int, channels: int, width: int, k: int, pad: tuple[int, int, int, int]):
        super().__init__()
        self.pad = pad
        widths = [min(width * 2 ** i, width * 8) for i in range(k)]                 # at S/2, ..., 4
        ins = [channels] + widths
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ins[i], widths[i], 4, 2, 1, bias=i == 0),
                          nn.GroupNorm(1, widths[i]) if i else nn.Identity(), nn.LeakyReLU(0.2))
            for i in range(k))
        self.layers.append(nn.Conv2d(widths[-1], 1, 4))
        self.cond = nn.ModuleList(nn.Linear(z_dim, c) for c in ins)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, self.pad, value=-1.0)
        for cond, layer in zip(self.cond, self.layers):
            x = layer(x + cond(h)[:, :, None, None])
        return x.flatten()


@DECODERS.register("wgan", WGANConfig)
class WGANDecoder(Decoder):
    """The paper's conditional WGAN-GP (module docstring)."""
    generates = "sample"
    has_likelihood = False
    default_lr = 2e-4

    def __init__(self, z_dim: int, image_shape, levels: int, noise_dim: int = 128, width: int = 64,
                 n_critic: int = 5, gp_weight: float = 10.0, sample_seed: int = 0):
        super().__init__(z_dim, image_shape, levels)
        h, w, c = image_shape
        self.noise_dim, self.n_critic, self.gp_weight, self.sample_seed = noise_dim, n_critic, gp_weight, sample_seed
        side, k = _side(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        self.crop = (slice(top, top + h), slice(left, left + w))
        self.generator = Generator(z_dim + noise_dim, c, width, k)
        self.critic = Critic(z_dim, c, width, k, (left, side - w - left, top, side - h - top))
        self.register_buffer("critic_steps", torch.zeros((), dtype=torch.long))

    def generate_images(self, h: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """G(h, n) cropped to the image, (B, C, H, W) on [-1, 1]."""
        return self.generator(h, noise)[:, :, self.crop[0], self.crop[1]]

    def _noise(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, self.noise_dim, device=device)

    def critic_terms(self, h: torch.Tensor, real: torch.Tensor, fake: torch.Tensor):
        """D(h, real), D(h, fake) and the gradient penalty (‖∇_x̂ D(h, x̂)‖₂ - 1)², per image; differentiable
        w.r.t. the critic's parameters (the penalty through ``create_graph``)."""
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        mix = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
        d_real, d_fake, d_mix = self.critic(h.repeat(3, 1), torch.cat([real, fake, mix])).chunk(3)
        grad, = torch.autograd.grad(d_mix.sum(), mix, create_graph=True)
        return d_real, d_fake, (grad.flatten(1).norm(dim=1) - 1).square()

    def _real(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / (self.levels - 1) * 2 - 1

    def _critic_loss(self, z: torch.Tensor, x: torch.Tensor):
        """(h, the critic's loss D(h, G(h, n)) - D(h, x) + λ·GP, the estimate D(h, x) - D(h, G(h, n))), per image."""
        h = self.standardize(z)
        with torch.no_grad():
            fake = self.generate_images(h, self._noise(len(z), z.device))
        d_real, d_fake, gp = self.critic_terms(h, self._real(x), fake)
        return h, d_fake - d_real + self.gp_weight * gp, d_real - d_fake

    # ------------------------------------------------------------ the contract
    def loss(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The critic's loss per image (what :meth:`train_step` minimizes)."""
        return self._critic_loss(z, x)[1]

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        raise FisherError("decoder 'wgan' has no mean; it decodes by sampling (generate)")

    def make_optimizer(self, lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.default_lr if lr is None else lr, betas=(0.5, 0.9))

    def train_step(self, opt: torch.optim.Optimizer, z: torch.Tensor, x: torch.Tensor) -> dict:
        """One critic step; every ``n_critic``-th call also one generator step (module docstring)."""
        self.train()
        h, losses, wasserstein = self._critic_loss(z, x)
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise FisherError(f"the WGAN critic's loss became {loss.item()}; lower --lr and rerun with a new --out")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self.critic_steps += 1
        if int(self.critic_steps) % self.n_critic == 0:
            params = list(self.generator.parameters())
            g_loss = -self.critic(h, self.generate_images(h, self._noise(len(z), z.device))).mean()
            opt.zero_grad(set_to_none=True)
            for p, g in zip(params, torch.autograd.grad(g_loss, params)):
                p.grad = g
            opt.step()
        return {"loss": loss.item(), "wasserstein": wasserstein.mean().item()}

    @torch.no_grad()
    def sample(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Integer images (B, C, H, W) of G in eval mode. Without ``generator`` the noise of each image is
        seeded by its embedding row (module docstring)."""
        if generator is None:
            noise = torch.stack([torch.randn(self.noise_dim, generator=g) for g in row_generators(z, self.sample_seed)])
        else:
            noise = torch.randn(len(z), self.noise_dim, generator=generator)
        training = self.training
        self.eval()
        try:
            y = (self.generate_images(self.standardize(z), noise.to(z.device)) + 1) / 2
        finally:
            self.train(training)
        return (y * (self.levels - 1)).round().clamp_(0, self.levels - 1).long()
