"""``fisher train-decoder``: fit a decoder z → x (paper sec. 4.2, appendix 7.2) with Ray Train.

The embeddings (one column of an ``fisher embed`` directory) are joined to
their images by ``id``; the decoder (a :data:`fisher.decoders.DECODERS`
registry name, ``conv`` by default) is trained by :func:`fisher.decoders.fit_decoder`
inside a ``TorchTrainer`` worker, which reports the test reconstruction error
and a checkpoint every epoch. A failed worker restarts from the last
checkpoint (``--max-failures``); rerunning the command resumes the run, and a
finished run with a larger ``--epochs`` is continued.

Reconstruction error on the test split (see :mod:`fisher.decoders`):
``bce_nats_per_pixel``, the decoder's mean per-sub-pixel NLL in nats (binary
cross-entropy for binarized MNIST, categorical for 5-bit CelebA), and ``mse``,
the mean squared error of the decoder's expected image on [0, 1] pixels.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from fisher.checkpoints import METRICS, SPEC, WEIGHTS, train_state_files
from fisher.data import check_shards, data_levels
from fisher.decoders import DECODERS, DecoderTrainConfig
from fisher.footprint import training_bytes
from fisher.io import FisherError, manifest_hash, write_manifest
from raycluster import console
from raycluster.options import add_options, architecture_config, option
from raycluster.runtime import (TrainerOptions, check_memory, checkpoint_files, finished_run, fit, publish_checkpoint,
                                report_files, torch_trainer)


@dataclass(kw_only=True)
class TrainDecoderOptions(TrainerOptions):
    """Options of ``fisher train-decoder`` (defaults: the paper's, sec. 5.1/5.2)."""
    embeddings: str = option(help="embedding directory (from `fisher embed`)")
    data: str = option(help="prepared data directory the embeddings were made from")
    column: str = option("z", help="embedding column to decode from (default z)")
    out: str = option(help="decoder checkpoint directory to write")
    lr: float | None = option(None, help="Adam learning rate (default: the decoder's; paper 1e-3, wgan 2e-4)")
    decoder: str = option("conv", help="decoder architecture: a registered name (see the decoder options)")
    decoder_config: dict = option(default_factory=dict, architecture=DECODERS,
                                  help="decoder architecture (each decoder's own options)")

    def __post_init__(self):
        super().__post_init__()
        if self.decoder not in DECODERS:
            raise FisherError(f"--decoder {self.decoder}: unknown (have {', '.join(DECODERS.names())})")
        self.decoder_config = architecture_config(self.decoder_config, DECODERS, self.decoder, "--decoder")
        DECODERS.config(self.decoder, **self.decoder_config)    # types and the decoder's own checks, before any work


def register(sub) -> None:
    p = sub.add_parser("train-decoder", help="train a decoder from embeddings back to images (Ray Train)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainDecoderOptions)
    p.set_defaults(func=run, options=TrainDecoderOptions)


def _loop(config: dict) -> None:
    """Ray Train worker: load the joined split, then fisher.decoders.fit_decoder with per-epoch reports."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from fisher.checkpoints import read_train_state, train_state_files
    from fisher.decoders import fit_decoder, load_split_tensors

    torch.set_num_threads(config["threads"])
    cfg = DecoderTrainConfig.from_dict(config["train"])
    tensors = load_split_tensors(config["embeddings"], config["data"], config["column"], ray.train.torch.get_device())
    files = checkpoint_files(ray.train.get_checkpoint())
    start = read_train_state(files) if files else None
    if start:
        console.say(f"train-decoder: resuming after epoch {start['epoch']}")
    history = start["history"] if start else []

    def on_epoch(epoch, metrics, decoder, opt):
        metrics = {**metrics, "resumed_after_epoch": start["epoch"] if start else 0}
        history.append(metrics)
        config["progress"].set(epoch, info=_result_text(metrics, config["levels"]))
        report_files(ray.train.report, Checkpoint, metrics,
                     train_state_files(decoder, "decoder", opt, epoch, history, metrics))

    fit_decoder(cfg, *tensors["train"], *tensors["test"], config["levels"], config["image_shape"],
                on_epoch=on_epoch, start=start)


def run(args: TrainDecoderOptions) -> None:
    from fisher.embedding import paired_manifests
    emb, data = paired_manifests(args.embeddings, args.data, args.column)
    decoder_config, prepare = args.decoder_config, None
    from fisher.decoders import build_decoder
    if getattr(DECODERS[args.decoder], "uses_embedding_model", False):
        decoder_config, prepare = _embedding_model(args, emb)
    dim = emb["columns"][args.column].get("dim") or 1
    trainable = build_decoder(args.decoder, int(dim), data["image_shape"], data_levels(data),   # a misfit: now
                              **decoder_config).trainable
    h, w, c = data["image_shape"]
    if trainable:
        need = training_bytes(lambda: build_decoder(args.decoder, int(dim), data["image_shape"], data_levels(data),
                                                    **decoder_config),
                              lambda m, n: m.loss(torch.zeros(n, int(dim)), torch.zeros(n, c, h, w, dtype=torch.long)),
                              args.batch_size)
        check_memory(args, need, f"--decoder {args.decoder} for {dim}-dim embeddings at --batch-size {args.batch_size}")
    cfg = DecoderTrainConfig(decoder=args.decoder, decoder_config=decoder_config, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    stage_config = {**cfg.to_dict(), "column": args.column}
    inputs = {"embeddings": manifest_hash(emb), "data": manifest_hash(data)}
    if finished_run(args.out, "train-decoder", stage_config, inputs):
        console.say(f"{args.out}: already trained for {args.epochs} epochs with this config; nothing to do")
        return
    from fisher.embedding import check_embeddings
    check_embeddings(args.embeddings, args.column)      # mixed-in shards, NaN/Inf: refused before Ray starts
    check_shards(args.data, data, ("train", "test"))   # and the images' shards, from their footers
    counts = data.get("counts", {})
    console.say(f"train-decoder: {args.decoder} decoder from {dim}-dim `{args.column}` of {args.embeddings} "
                f"({counts.get('train', '?')} train images, test error on {counts.get('test', '?')})"
                + (f", {args.epochs} epochs" if trainable else ", nothing to train"))
    if trainable:
        from raycluster.progress import tracked
        with tracked(args.epochs, "train-decoder", "epoch") as progress:
            trainer = torch_trainer(_loop, {"train": cfg.to_dict(), "embeddings": args.embeddings, "data": args.data,
                                            "column": args.column, "image_shape": data["image_shape"],
                                            "levels": data_levels(data), "progress": progress}, args, "decoder")
            result = fit(trainer, args.out)
        if result.checkpoint is None:
            raise FisherError(f"{args.out}: training finished without a checkpoint; see the Ray logs above")
        publish_checkpoint(result.checkpoint, args.out, (WEIGHTS, SPEC, METRICS))
        m = result.metrics
        from fisher.checkpoints import read_train_state
        history = read_train_state(checkpoint_files(result.checkpoint))["history"]
    else:
        m = _write_untrained(args, cfg, data, prepare)
        history = [m]
    write_manifest(args.out, "train-decoder", stage_config, inputs=inputs, embeddings=args.embeddings,
                   data=args.data, metrics=m, history=history, image_shape=data["image_shape"],
                   levels=data_levels(data))
    console.say(f"decoder written to {args.out}: {_result_text(m, data_levels(data))}")


def _result_text(m: dict, levels: int = 2) -> str:
    """A decoder's test error in words: where it has a likelihood, BCE (nats per pixel, binary data) or the
    NLL in nats per sub-pixel and bits/dim (more levels); then the MSE."""
    nll = m.get("test_bce_nats_per_pixel")
    if nll is None:
        loss = ""
    elif levels == 2:
        loss = f"test BCE {nll:.4f} nats/pixel, "
    else:
        loss = f"test NLL {nll / math.log(2):.3f} bits/dim ({nll:.4f} nats/sub-pixel), "
    from fisher.decoders.training import z_gain
    gain = z_gain(m)
    if gain is not None:
        loss += (f"{gain:.4f} nats/pixel" if levels == 2 else f"{gain / math.log(2):.3f} bits/dim") + \
            " worse given another image's z, "
    return loss + f"MSE {m['test_mse']:.4f}"


def _embedding_model(args: TrainDecoderOptions, emb: dict):
    """(decoder config, prepare) of a decoder that is the embeddings' own model (``--decoder latent``): the
    architecture of the prior ``fisher embed`` used, and a function copying its weights into the decoder."""
    from dataclasses import asdict

    from fisher.priors import load_prior, prior_location
    from fisher.io import read_manifest
    uri = emb.get("prior")
    if not uri:
        raise FisherError(f"{args.embeddings}: made without a --prior; --decoder {args.decoder} decodes the latent of "
                          "a `fisher embed --kind pixelvae|realnvp` directory")
    if emb["columns"][args.column].get("transformed_from"):
        raise FisherError(f"--column {args.column}: standardized/PCA embeddings; --decoder {args.decoder} decodes "
                          "the model's own latent: pass --column z")
    if manifest_hash(read_manifest(prior_location(uri), "train-prior")) != emb.get("inputs", {}).get("prior"):
        raise FisherError(f"{uri}: not the prior {args.embeddings} was made with (it was retrained or replaced); "
                          "rerun `fisher embed` with it")
    model = load_prior(uri)
    config = {**args.decoder_config, "model": model.registered_name, "model_config": asdict(model.config)}
    return config, lambda decoder: decoder.model.load_state_dict(model.state_dict())


def _write_untrained(args: TrainDecoderOptions, cfg: DecoderTrainConfig, data: dict, prepare=None) -> dict:
    """A decoder with nothing to train (``trainable = False``: the pixel baseline's identity, a latent model's
    decoder, whose weights ``prepare`` sets): built and evaluated on the test split in the driver, with no Ray
    Train job; the same files as a trained one."""
    from fisher.decoders import fit_decoder, load_split_tensors
    from fisher.io import atomic_write_bytes, join
    tensors = load_split_tensors(args.embeddings, args.data, args.column)
    decoder, metrics = fit_decoder(cfg, *tensors["train"], *tensors["test"], data_levels(data), data["image_shape"],
                                   prepare=prepare)
    files = train_state_files(decoder, "decoder", None, 0, [metrics], metrics)
    for name in (WEIGHTS, SPEC, METRICS):
        atomic_write_bytes(join(args.out, name), files[name])
    return metrics
