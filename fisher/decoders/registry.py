"""The decoder registry: every decoder family registers here (``@DECODERS.register(name, Config)``)."""
from fisher.decoders.base import Decoder
from fisher.registry import Registry

DECODERS = Registry("decoder", Decoder, arg_names=("z_dim", "image_shape", "levels"),
                    base_name="fisher.decoders.Decoder")
