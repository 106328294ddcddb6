"""Fisher-score latent spaces for autoregressive image models.

Yan, Ho, Abbeel, "Natural Image Manipulation for Autoregressive Models using
Fisher Scores". Pure PyTorch/NumPy: this package never imports ray.
"""
__version__ = "0.1.0"
