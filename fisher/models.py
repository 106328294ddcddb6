"""Old import path of the priors, kept for existing code: everything lives in :mod:`fisher.priors`."""
from fisher.checkpoints import SPEC as CONFIG, WEIGHTS  # noqa: F401
from fisher.priors import (PRIORS, PixelCNN, PixelCNNConfig, Prior, build_prior, load_prior,  # noqa: F401
                           prior_files, prior_from_files, save_prior, to_model_input)
from fisher.priors.layers import MaskedConv2d, causal_mask  # noqa: F401
