"""``fisher train-prior``: fit a prior (``--prior``, any registered family) with Ray Train (TorchTrainer).

Shards stream to the workers through Ray Data; each epoch ends with the
test NLL and a checkpoint. Failed workers are restarted from the last
reported checkpoint (``--max-failures``), and rerunning the command resumes
the run from its last checkpoint; rerunning a finished run with a larger
``--epochs`` continues it. The output directory holds the final
``weights.pt`` / ``module.json`` (see :func:`fisher.priors.load_prior`), the
run's Ray storage under ``ray/`` and ``manifest.json``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch

from fisher.checkpoints import METRICS, SPEC, WEIGHTS, read_train_state
from fisher.data import check_shards, data_levels
from fisher.footprint import training_bytes
from fisher.io import FisherError, manifest_hash, read_manifest, write_manifest
from fisher.priors import PRIORS, build_prior
from fisher.training import PriorTrainConfig
from raycluster import console
from raycluster.options import add_options, architecture_config, at_least, option
from raycluster.progress import tracked
from raycluster.runtime import (TrainerOptions, check_memory, checkpoint_files, finished_run, fit, init_ray,
                                publish_checkpoint, read_shards, report_files, torch_trainer)


@dataclass(kw_only=True)
class TrainPriorOptions(TrainerOptions):
    """Options of ``fisher train-prior`` (defaults: the paper's, sec. 5.2)."""
    data: str = option(help="prepared data directory (from `fisher prepare`)")
    out: str = option(help="checkpoint directory to write (local path or s3:// gs:// URI)")
    prior: str = option("pixelcnn", help="prior architecture: a registered name (see the architecture options)")
    model: dict = option(default_factory=dict, architecture=PRIORS, help="architecture (each prior's own options)")
    limit: int | None = option(None, help="use only the first N training images (small runs)")
    workers: int = option(1, help="Ray Train workers (data parallel)")
    is_samples: int = option(100, help="a latent-variable prior (pixelvae): importance samples per test image for "
                                       "the final NLL estimate (Burda et al. 2015; the PixelVAE paper uses 5000)")
    is_images: int = option(1000, help="a latent-variable prior: test images for that estimate (0: all)")

    def __post_init__(self):
        super().__post_init__()
        at_least(self, 1, "workers", "limit", "is_samples")
        at_least(self, 0, "is_images")
        PRIORS.get(self.prior)
        self.model = architecture_config(self.model, PRIORS, self.prior, "--prior")
        PRIORS.config(self.prior, **self.model)     # types and the architecture's own checks, before any step runs


def register(sub) -> None:
    p = sub.add_parser("train-prior", help="train an autoregressive prior on prepared shards (Ray Train)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, TrainPriorOptions)
    p.set_defaults(func=run, options=TrainPriorOptions)


def _train_loop(config: dict) -> None:
    """Ray Train worker loop; all method logic comes from fisher.training."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from fisher.data import decode_images
    from fisher.malloc import keep_freed_memory
    from fisher.priors import to_model_input
    from fisher.training import load_state, nll_metrics, nll_sum, state_bytes, train_step

    cfg = PriorTrainConfig.from_dict(config["train"])
    torch.set_num_threads(config["threads"])
    keep_freed_memory()           # step after step: reuse the memory, not fresh pages (fisher.malloc)
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.manual_seed(cfg.seed)
    model = cfg.build()
    device = ray.train.torch.get_device()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        files = checkpoint_files(ckpt)
        start = load_state(model, opt, files)
        history = read_train_state(files)["history"]
        if ctx.get_world_rank() == 0:
            console.say(f"train-prior: resuming after epoch {start} from {ckpt.path}")
    net = ray.train.torch.prepare_model(model)
    shape = config["image_shape"]
    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    per_worker = max(1, cfg.batch_size // world)
    progress, seen = config["progress"], start * config["images_per_epoch"] // world     # images, train + test
    for epoch in range(start, cfg.epochs):
        losses = []
        for batch in train_shard.iter_batches(batch_size=per_worker, batch_format="pyarrow",
                                              local_shuffle_buffer_size=4 * per_worker,
                                              local_shuffle_seed=cfg.seed + epoch):
            x = to_model_input(decode_images(batch, shape), device)
            losses.append(train_step(model, opt, x, net))
            seen += x.shape[0]
            progress.set(seen, key=rank)
        total, count = 0.0, 0
        for batch in test_shard.iter_batches(batch_size=256, batch_format="pyarrow"):
            x = to_model_input(decode_images(batch, shape), device)
            total += nll_sum(model, x)
            count += x.shape[0]
            seen += x.shape[0]
            progress.set(seen, key=rank)
        if world > 1:
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            total, count = float(t[0]), int(t[1])
        dims = int(shape[0] * shape[1] * shape[2])
        metrics = {"epoch": epoch + 1, "resumed_after_epoch": start,
                   "train_nll_nats": sum(losses) / max(len(losses), 1),
                   **{f"test_{k}": v for k, v in nll_metrics(total, count, dims).items()}}
        history.append(metrics)
        if rank == 0:
            what = f"test NLL ({model.bound} bound)" if model.bound else "test NLL"
            progress.set(seen, key=rank, info=f"epoch {epoch + 1}/{cfg.epochs} {what} {metrics['test_nll_nats']:.2f} nats")
            report_files(ray.train.report, Checkpoint, metrics, state_bytes(model, opt, epoch + 1, history, metrics))
        else:
            ray.train.report(metrics)


def _shard_files(data_dir: str, manifest: dict, split: str) -> list[str]:
    """The shards of ``split``, each checked from its footer (truncated or replaced shards, a missing
    column): called before Ray starts."""
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise FisherError(f"{data_dir}: no '{split}' shards; run `fisher prepare` with that split")
    return check_shards(data_dir, manifest, [split])


def _dataset(files: list[str], limit: int | None):
    ds = read_shards(files, ["image"])
    return ds.limit(limit) if limit else ds


def run(args: TrainPriorOptions) -> None:
    data_manifest = read_manifest(args.data, "prepare")
    shape = data_manifest["image_shape"]
    model = {"channels": int(shape[2]), "levels": data_levels(data_manifest), **args.model}
    cfg = PriorTrainConfig(prior=args.prior, model=asdict(PRIORS.config(args.prior, **model)),
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    is_bound = hasattr(PRIORS[args.prior], "importance_log_prob")
    stage_config = {**cfg.to_dict(), "limit": args.limit,
                    **({"is_samples": args.is_samples, "is_images": args.is_images} if is_bound else {})}
    h, w, c = (int(v) for v in shape)
    need = training_bytes(lambda: build_prior(args.prior, **cfg.model),
                          lambda m, n: m.log_prob(torch.zeros(n, c, h, w)), args.batch_size)
    arch = "".join(f" {k}={v}" for k, v in args.model.items())
    check_memory(args, args.workers * need, f"--prior {args.prior}{arch} at --batch-size {args.batch_size} "
                 f"on {h}x{w}x{c} images, {args.workers} worker(s)")
    data_hash = manifest_hash(data_manifest)
    if finished_run(args.out, "train-prior", stage_config, {"data": data_hash}):
        console.say(f"{args.out}: already trained for {args.epochs} epochs with this config and data; nothing to do")
        return

    files = {split: _shard_files(args.data, data_manifest, split) for split in ("train", "test")}
    counts = data_manifest["counts"]
    n_train = min(counts["train"], args.limit or counts["train"])
    console.say(f"train-prior: {args.prior} on {n_train} train images ({h}x{w}x{c}), test NLL on {counts['test']} "
                f"after each of {args.epochs} epochs")
    init_ray(args)                      # before the datasets: Ray Data must not start a Ray of its own
    per_epoch = n_train + counts["test"]
    with tracked(args.epochs * per_epoch, "train-prior", "img") as progress:
        trainer = torch_trainer(_train_loop, {"train": cfg.to_dict(), "image_shape": shape, "progress": progress,
                                              "images_per_epoch": per_epoch}, args, "prior",
                                workers=args.workers,
                                datasets={"train": _dataset(files["train"], args.limit),
                                          "test": _dataset(files["test"], None)})
        result = fit(trainer, args.out)
    if result.checkpoint is None:
        raise FisherError(f"{args.out}: training finished without a checkpoint; see the Ray logs above")
    weights_sha256 = publish_checkpoint(result.checkpoint, args.out, (WEIGHTS, SPEC, METRICS))[WEIGHTS]
    history = read_train_state(checkpoint_files(result.checkpoint))["history"]
    metrics = dict(result.metrics)
    bound = PRIORS[args.prior].bound
    if bound:
        metrics["test_nll_bound"] = bound
    if is_bound:
        metrics.update(_importance_nll(args, h * w * c))
    write_manifest(args.out, "train-prior", stage_config, inputs={"data": data_hash},
                   data=args.data, metrics=metrics, history=history, weights_sha256=weights_sha256)
    console.say(f"prior written to {args.out}: test NLL{f' ({bound} bound)' if bound else ''} "
                f"{metrics['test_nll_nats']:.2f} nats/image, {metrics['test_bits_per_dim']:.4f} bits/dim"
                + (f"; importance-sampled NLL {metrics['test_is_nll_nats']:.2f} nats/image "
                   f"(K = {args.is_samples}, {metrics['is_images']} images)" if is_bound else ""))


def _importance_nll(args: TrainPriorOptions, dims: int) -> dict:
    """The importance-sampled test NLL of a latent-variable prior (its ``importance_log_prob``, Burda et al.
    2015) on the first ``--is-images`` test images with ``--is-samples`` samples each, next to its bound on
    the same images; seeded by ``--seed``."""
    from fisher.data import load_prepared
    from fisher.priors import load_prior, to_model_input
    model = load_prior(args.out).eval()
    images = load_prepared(args.data, "test", args.is_images or None)["image"]
    torch.manual_seed(args.seed)
    is_sum, bound_sum = 0.0, 0.0
    with tracked(len(images), "importance-sampled NLL", "img") as progress:
        for start in range(0, len(images), 100):
            x = to_model_input(images[start:start + 100])
            with torch.no_grad():
                is_sum -= float(model.importance_log_prob(x, args.is_samples).double().sum())
                bound_sum -= float(model.log_prob(x).double().sum())
            progress.set(start + len(x))
    n = len(images)
    return {"test_is_nll_nats": is_sum / n, "test_is_bits_per_dim": is_sum / n / (dims * math.log(2)),
            "is_bound_nll_nats": bound_sum / n, "is_samples": args.is_samples, "is_images": n}
