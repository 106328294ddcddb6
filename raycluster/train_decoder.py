"""``fisher train-decoder``: fit a decoder z → x (paper sec. 3.4, appendix 7.2) with Ray Train.

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

from fisher.checkpoints import METRICS, SPEC, WEIGHTS
from fisher.data import data_levels
from fisher.decoders import DECODERS, DecoderTrainConfig
from fisher.io import FisherError, manifest_hash, read_manifest, write_manifest
from raycluster.options import add_architecture_options, architecture_config
from raycluster.runtime import add_ray_args, checkpoint_files, finished_run, fit, publish_checkpoint, report_files, torch_trainer


def register(sub) -> None:
    p = sub.add_parser("train-decoder", help="train a decoder from embeddings back to images (Ray Train)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, help="embedding directory (from `fisher embed`)")
    p.add_argument("--data", required=True, help="prepared data directory the embeddings were made from")
    p.add_argument("--column", default="z", help="embedding column to decode from (default z)")
    p.add_argument("--out", required=True, help="decoder checkpoint directory to write")
    d = DecoderTrainConfig()
    p.add_argument("--decoder", default=d.decoder, help=f"decoder architecture: {', '.join(sorted(DECODERS))}")
    add_architecture_options(p, DECODERS, "decoder architecture (each decoder's own options)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size (paper: 128)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation and shuffling seed")
    p.add_argument("--gpu", action="store_true", help="train on one GPU")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved for the worker")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    add_ray_args(p)
    p.set_defaults(func=run)


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
        print(f"train-decoder: resuming after epoch {start['epoch']}", flush=True)
    history = start["history"] if start else []

    def on_epoch(epoch, metrics, decoder, opt):
        metrics = {**metrics, "resumed_after_epoch": start["epoch"] if start else 0}
        history.append(metrics)
        report_files(ray.train.report, Checkpoint, metrics,
                     train_state_files(decoder, "decoder", opt, epoch, history, metrics))

    fit_decoder(cfg, *tensors["train"], *tensors["test"], config["levels"], config["image_shape"],
                on_epoch=on_epoch, start=start)


def run(args) -> None:
    emb = read_manifest(args.embeddings, "embed")
    data = read_manifest(args.data, "prepare")
    if emb.get("inputs", {}).get("data") != manifest_hash(data):
        raise FisherError(f"{args.embeddings}: embeddings were made from other data than {args.data}; "
                          "pass the --data used by `fisher embed`")
    if args.column not in emb["columns"]:
        raise FisherError(f"{args.embeddings}: no column '{args.column}' (has {', '.join(emb['columns'])}); "
                          "pass --column")
    if args.decoder not in DECODERS:
        raise FisherError(f"--decoder {args.decoder}: unknown (have {', '.join(sorted(DECODERS))})")
    if args.epochs < 1 or args.batch_size < 1:
        raise FisherError("--epochs and --batch-size must be >= 1")
    decoder_config = architecture_config(args, DECODERS, args.decoder, "--decoder")
    from fisher.decoders import build_decoder
    dim = emb["columns"][args.column].get("dim") or 1
    build_decoder(args.decoder, int(dim), data["image_shape"], data_levels(data), **decoder_config)  # refuse a misfit now
    cfg = DecoderTrainConfig(decoder=args.decoder, decoder_config=decoder_config, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    stage_config = {**cfg.to_dict(), "column": args.column}
    inputs = {"embeddings": manifest_hash(emb), "data": manifest_hash(data)}
    if finished_run(args.out, "train-decoder", stage_config, inputs):
        print(f"{args.out}: already trained for {args.epochs} epochs with this config; nothing to do")
        return
    from fisher.embedding import check_embeddings
    check_embeddings(args.embeddings, args.column)      # mixed-in shards, NaN/Inf: refused before Ray starts
    trainer = torch_trainer(_loop, {"train": cfg.to_dict(), "embeddings": args.embeddings, "data": args.data,
                                    "column": args.column, "image_shape": data["image_shape"],
                                    "levels": data_levels(data)}, args, "decoder")
    result = fit(trainer, args.out)
    if result.checkpoint is None:
        raise FisherError(f"{args.out}: training finished without a checkpoint; see the Ray logs above")
    publish_checkpoint(result.checkpoint, args.out, (WEIGHTS, SPEC, METRICS))
    write_manifest(args.out, "train-decoder", stage_config, inputs=inputs, embeddings=args.embeddings,
                   data=args.data, metrics=result.metrics, image_shape=data["image_shape"],
                   levels=data_levels(data))
    m = result.metrics
    print(f"decoder written to {args.out}: test BCE {m['test_bce_nats_per_pixel']:.4f} nats/pixel, "
          f"MSE {m['test_mse']:.4f}")
