"""The prior registry: every prior family registers here (``@PRIORS.register(name, Config)``)."""
from fisher.priors.base import Prior
from fisher.registry import Registry

PRIORS = Registry("prior", Prior, base_name="fisher.priors.Prior")
