"""Every number quoted from the paper (Yan, Ho, Abbeel) and from its seed papers, in one place.

* :data:`PAPER_FIGURE_3A`: sec. 5.1, Figure 3a, the MNIST reconstruction error per projection
  density × dimension (rows: dimension, columns: density).
* :data:`PAPER_MNIST_FID`: Figure 3b, interpolation FID (Algorithm 1) against α on MNIST.
* :data:`PAPER_CELEBA_FID`: Figure 7, interpolation FID against α on CelebA, one table per prior.
* :data:`PAPER_MNIST_NLL`: reference test NLLs of PixelCNN priors on binarized MNIST (PixelVAE paper,
  Table 1), the yardstick for a trained prior.
* :data:`PAPER_LATENT_NLL`: the seed papers' own NLLs of the latent-variable baselines (PixelVAE Table 1,
  RealNVP Table 2).

Data only: the tables and plots that show these numbers are in :mod:`fisher.reports.figure3a`,
:mod:`fisher.reports.figure3b` and :mod:`fisher.reports.run`.
"""
from __future__ import annotations

from fisher.manipulation import ALPHAS

# Sec. 5.1, Figure 3a (MNIST): reconstruction error of the decoder per projection density × dimension.
# values[dim][k] belongs to density[k]. The paper does not define this error precisely.
PAPER_FIGURE_3A = {
    "source": "paper, Figure 3a (MNIST)",
    "density": [0.001, 0.01, 0.1, 1.0],
    "dim": [64, 256, 1024],
    "values": {
        64: [0.641, 0.638, 0.678, 0.633],
        256: [0.653, 0.456, 0.170, 0.155],
        1024: [0.142, 0.154, 0.129, 0.122],
    },
}

# Figure 3b (MNIST, 5-layer PixelCNN prior, conv decoder, N = 50 000 pairs); rows are "embedding/decoder".
PAPER_MNIST_FID = {
    "source": "paper, Figure 3b (MNIST)",
    "pairs": 50000,
    "rows": {
        "activation/conv": dict(zip(ALPHAS, (0.68, 0.60, 2.69, 12.84, 25.42))),
        "fisher/conv": dict(zip(ALPHAS, (1.21, 1.14, 1.03, 2.21, 5.43))),
    },
}


def _celeba(rows: dict) -> dict:
    return {"source": "paper, Figure 7 (CelebA)", "pairs": 50000,
            "rows": {k: dict(zip(ALPHAS, v)) for k, v in rows.items()}}


# Figure 7 (CelebA 128x128, 5 bits), one table per prior; rows are "embedding/decoder".
PAPER_CELEBA_FID = {
    "pixelcnn": _celeba({"activation/conv": (54.40, 55.75, 61.63, 89.38, 127.85),
                         "fisher/conv": (132.47, 131.85, 132.33, 133.76, 134.43),
                         "activation/realnvp": (22.29, 26.42, 34.41, 42.92, 46.99),
                         "fisher/realnvp": (30.27, 32.14, 35.53, 39.65, 41.83)}),
    "gated": _celeba({"activation/conv": (56.31, 56.92, 61.28, 77.38, 101.59),
                      "fisher/conv": (129.45, 128.99, 129.90, 132.50, 134.38),
                      "activation/realnvp": (24.42, 30.20, 41.76, 53.87, 59.00),
                      "fisher/realnvp": (33.46, 36.60, 41.74, 48.31, 52.17)}),
    "pyramid": _celeba({"activation/conv": (63.23, 63.38, 67.19, 74.98, 80.10),
                        "fisher/conv": (136.05, 130.70, 127.98, 127.62, 128.36),
                        "activation/realnvp": (24.52, 28.32, 36.81, 46.98, 51.75),
                        "fisher/realnvp": (31.16, 33.85, 37.30, 40.75, 42.38)}),
}

# Reference points for priors: test NLL on binarized MNIST, nats per image (lower is better).
PAPER_MNIST_NLL = {
    "source": "PixelVAE paper (Gulrajani et al.), Table 1 (binarized MNIST)",
    "unit": "nats/image",
    "rows": {"PixelCNN": 81.30, "Gated PixelCNN": 80.10},
    "baseline_note": ("The independent-pixel baseline (one Bernoulli per pixel, i.e. the train split's mean "
                      "image) is not quoted from a paper: it is computed from the data, and a prior is only as "
                      "good as its distance below it."),
}

# The latent-variable baselines' own papers: test NLL of the model whose latent is an embedding kind.
PAPER_LATENT_NLL = {
    "pixelvae": {"source": "PixelVAE paper (Gulrajani et al.), Table 1 (binarized MNIST; importance sampling with "
                           "5000 samples, the ELBO in parentheses)",
                 "text": "PixelVAE ≤ 80.64 (ELBO); Gated PixelVAE ≈ 79.48 (≤ 80.02)", "unit": "nats/image"},
    "realnvp": {"source": "RealNVP paper (Dinh et al.), Table 2 (CelebA 64×64, 8 bits)", "text": "3.02",
                "unit": "bits/dim"},
}
