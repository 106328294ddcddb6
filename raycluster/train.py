"""``fisher train-prior``: fit a PixelCNN prior with Ray Train (TorchTrainer).

Shards stream to the workers through Ray Data; each epoch ends with the
test NLL and a checkpoint. Failed workers are restarted from the last
reported checkpoint (``--max-failures``), and rerunning the command resumes
the run from its last checkpoint; rerunning a finished run with a larger
``--epochs`` continues it. The output directory holds the final
``weights.pt`` / ``model.json`` (see :func:`fisher.models.load_prior`), the
run's Ray storage under ``ray/`` and ``manifest.json``.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from fisher.io import FisherError, join, manifest_hash, parquet_metadata, read_manifest, write_manifest
from fisher.models import PixelCNNConfig
from fisher.training import PriorTrainConfig
from raycluster.runtime import add_ray_args, fit, init_ray, read_shards, torch_trainer

HISTORY = "history.json"    # in each checkpoint: the metrics of every epoch so far


def register(sub) -> None:
    p = sub.add_parser("train-prior", help="train a PixelCNN prior on prepared shards (Ray Train)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared data directory (from `fisher prepare`)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (local path or s3:// gs:// URI)")
    d = PriorTrainConfig()
    p.add_argument("--layers", type=int, default=d.model.n_layers, help="masked 7x7 layers (paper: 5, or 1)")
    p.add_argument("--filters", type=int, default=d.model.filters, help="filters per layer (paper: 64)")
    p.add_argument("--kernel", type=int, default=d.model.kernel_size, help="kernel size (paper: 7)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size (paper: 128)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--seed", type=int, default=d.seed, help="initialisation and shuffling seed")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (small runs)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=1.0,
                   help="CPUs reserved per worker (fractions allowed, default 1)")
    p.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    add_ray_args(p)
    p.set_defaults(func=run)


def _train_loop(config: dict) -> None:
    """Ray Train worker loop; all method logic comes from fisher.training."""
    import json

    import ray.train
    import torch
    from ray.train import Checkpoint

    from fisher.data import decode_images
    from fisher.models import PixelCNN, to_model_input
    from fisher.training import load_state, nll_metrics, nll_sum, state_bytes, train_step

    cfg = PriorTrainConfig.from_dict(config["train"])
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.manual_seed(cfg.seed)
    model = PixelCNN(cfg.model)
    device = ray.train.torch.get_device()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            files = {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)}
        start = load_state(model, opt, files)
        history = json.loads(files[HISTORY]) if HISTORY in files else []
        if ctx.get_world_rank() == 0:
            print(f"train-prior: resuming after epoch {start} from {ckpt.path}", flush=True)
    net = ray.train.torch.prepare_model(model)
    shape = config["image_shape"]
    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    per_worker = max(1, cfg.batch_size // world)
    for epoch in range(start, cfg.epochs):
        losses = []
        for batch in train_shard.iter_batches(batch_size=per_worker, batch_format="pyarrow",
                                              local_shuffle_buffer_size=4 * per_worker,
                                              local_shuffle_seed=cfg.seed + epoch):
            x = to_model_input(decode_images(batch, shape), device)
            losses.append(train_step(model, opt, x, net))
        total, count = 0.0, 0
        for batch in test_shard.iter_batches(batch_size=256, batch_format="pyarrow"):
            x = to_model_input(decode_images(batch, shape), device)
            total += nll_sum(model, x)
            count += x.shape[0]
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
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in state_bytes(model, opt, epoch + 1).items():
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
                with open(os.path.join(tmp, "metrics.json"), "w") as f:
                    json.dump(metrics, f)
                with open(os.path.join(tmp, HISTORY), "w") as f:
                    json.dump(history, f)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _dataset(data_dir: str, manifest: dict, split: str, limit: int | None):
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise FisherError(f"{data_dir}: no '{split}' shards; run `fisher prepare` with that split")
    files = [join(data_dir, s["file"]) for s in shards]
    for uri, s in zip(files, shards):      # truncated or replaced shards: refused before Ray starts
        parquet_metadata(uri, s.get("rows"), fix=f"rerun `fisher prepare` for {data_dir}")
    ds = read_shards(files, ["image"])
    return ds.limit(limit) if limit else ds


def run(args) -> None:
    data_manifest = read_manifest(args.data, "prepare")
    shape = data_manifest["image_shape"]
    levels = int(data_manifest.get("levels") or data_manifest["config"].get("levels", 2))
    for name in ("layers", "filters", "kernel", "epochs", "batch_size", "workers"):
        if getattr(args, name) < 1:
            raise FisherError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise FisherError(f"--limit {args.limit}: must be >= 1 (leave it out to train on all images)")
    cfg = PriorTrainConfig(model=PixelCNNConfig(channels=int(shape[2]), levels=levels, n_layers=args.layers,
                                                filters=args.filters, kernel_size=args.kernel),
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    stage_config = {**cfg.to_dict(), "limit": args.limit}
    data_hash = manifest_hash(data_manifest)
    if finished_run(args.out, "train-prior", stage_config, {"data": data_hash}):
        print(f"{args.out}: already trained for {args.epochs} epochs with this config and data; nothing to do")
        return

    init_ray(args)                      # before the datasets: Ray Data must not start a Ray of its own
    trainer = torch_trainer(_train_loop, {"train": cfg.to_dict(), "image_shape": shape}, args, "prior",
                            workers=args.workers,
                            datasets={"train": _dataset(args.data, data_manifest, "train", args.limit),
                                      "test": _dataset(args.data, data_manifest, "test", None)})
    result = fit(trainer, args.out)
    if result.checkpoint is None:
        raise FisherError(f"{args.out}: training finished without a checkpoint; see the Ray logs above")
    from fisher.models import CONFIG, WEIGHTS
    weights_sha256 = publish_checkpoint(result.checkpoint, args.out, (WEIGHTS, CONFIG, "metrics.json"))[WEIGHTS]
    history = _history(result)
    write_manifest(args.out, "train-prior", stage_config, inputs={"data": data_hash},
                   data=args.data, metrics=result.metrics, history=history, weights_sha256=weights_sha256)
    print(f"prior written to {args.out}: test NLL {result.metrics['test_nll_nats']:.2f} nats/image, "
          f"{result.metrics['test_bits_per_dim']:.4f} bits/dim")


def _history(result) -> list[dict]:
    """Every epoch's metrics, carried from checkpoint to checkpoint (``history.json``): Ray's
    ``metrics_dataframe`` only holds the kept checkpoints (the last 2), and after a worker restart
    only what the restarted workers reported."""
    import json
    with result.checkpoint.as_directory() as d:
        path = os.path.join(d, HISTORY)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []


def finished_run(out: str, stage: str, stage_config: dict, inputs: dict) -> bool:
    """True if ``out`` holds this finished run. A finished run of the same config with fewer
    epochs is continued (False); any other content of ``out`` is an error."""
    from fisher.io import MANIFEST, exists
    if not exists(join(out, MANIFEST)):
        return False
    old = read_manifest(out)
    same = {k: v for k, v in old.get("config", {}).items() if k != "epochs"} == \
        {k: v for k, v in stage_config.items() if k != "epochs"}
    if old.get("stage") != stage or not same or old.get("inputs") != inputs:
        raise FisherError(f"{out}: holds a {old.get('stage')} run with another config or inputs; pass a new --out")
    done = old["config"]["epochs"]
    if done > stage_config["epochs"]:
        raise FisherError(f"{out}: already trained for {done} epochs, more than --epochs {stage_config['epochs']}")
    return done == stage_config["epochs"]


def publish_checkpoint(checkpoint, out: str, names) -> dict[str, str]:
    """Copy files of a Ray checkpoint to the top of ``out`` (atomically); returns their sha256 by name."""
    import hashlib

    from fisher.io import atomic_write_bytes
    digests = {}
    with checkpoint.as_directory() as d:
        for name in names:
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
            atomic_write_bytes(join(out, name), data)
            digests[name] = hashlib.sha256(data).hexdigest()
    return digests
