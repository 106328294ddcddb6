"""``fisher probe``: semantic probes of an embedding (beyond the paper; :mod:`fisher.probes`).

Tests the paper's claim (sec. 5) that Fisher scores hold semantic information directly: on the
train/test embeddings of one column, a closed-form ridge linear probe's test accuracy for the label
(MNIST: the digit; CelebA: each of the 40 attributes, averaged) and the agreement of each test
image's k nearest train neighbours with its label (k = 10), next to the majority-label baseline.
It runs in this process (NumPy; no Ray): the whole train split of the column is held in memory.
Output: ``probe.json`` and ``manifest.json``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

from fisher.io import (MANIFEST, FisherError, atomic_write_bytes, claim_output, exists, join, manifest_hash, read_manifest,
                       write_manifest)
from raycluster import console
from raycluster.options import add_options, at_least, option, positive


@dataclass(kw_only=True)
class ProbeOptions:
    """Options of ``fisher probe``."""
    embeddings: str = option(help="embedding directory (from `fisher embed`)")
    data: str = option(help="prepared data directory the embeddings were made from (for the labels)")
    column: str = option("z", help="embedding column (default z)")
    out: str = option(help="directory to write probe.json into")
    k: int = option(10, help="neighbours of the kNN agreement (default 10)")
    ridge: str | float = option("auto", help="ridge penalty of the linear probe, per train row, or 'auto' (default): "
                                             "the most accurate of 1e-4 … 100 on a 20%% hold-out of the train split")

    def __post_init__(self):
        at_least(self, 1, "k")
        if self.ridge != "auto":
            try:
                self.ridge = float(self.ridge)
            except (TypeError, ValueError):
                raise FisherError(f"--ridge {self.ridge!r}: expected a number > 0 or 'auto'") from None
            positive(self, "ridge")


def register(sub) -> None:
    p = sub.add_parser("probe", help="linear-probe accuracy and kNN label agreement of an embedding",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ProbeOptions)
    p.set_defaults(func=run, options=ProbeOptions)


def run(args: ProbeOptions) -> None:
    from fisher.embedding import load_pairs
    from fisher.probes import knn_agreement, linear_probe, majority_baseline
    from fisher.embedding import paired_manifests
    emb, data = paired_manifests(args.embeddings, args.data, args.column)
    config = {"column": args.column, "k": args.k, "ridge": args.ridge}
    inputs = {"embeddings": manifest_hash(emb), "data": manifest_hash(data)}
    if _finished(args.out, config, inputs):
        console.say(f"{args.out}: already probed with this config; nothing to do")
        return
    claim_output(args.out, "probe")
    train, test = (load_pairs(args.embeddings, args.data, split, args.column) for split in ("train", "test"))
    target = "label" if "label" in train else "attrs"
    if args.k > len(train["z"]):
        raise FisherError(f"--k {args.k}: more than the {len(train['z'])} train embeddings")
    probe = linear_probe(train["z"], train[target], test["z"], test[target], ridge=args.ridge)
    result = {"kind": emb.get("config", {}).get("kind"), "column": args.column, "target": target,
              "linear_probe": probe, "knn": {"k": args.k, "agreement": knn_agreement(
                  train["z"], train[target], test["z"], test[target], k=args.k)},
              "majority": majority_baseline(train[target], test[target]),
              "n_train": len(train["z"]), "n_test": len(test["z"])}
    atomic_write_bytes(join(args.out, "probe.json"), json.dumps(result, indent=2).encode())
    write_manifest(args.out, "probe", config, inputs=inputs, embeddings=args.embeddings, data=args.data,
                   linear_probe_accuracy=probe["accuracy"], knn_agreement=result["knn"]["agreement"],
                   files=["probe.json"])
    what = "mean accuracy over the attributes" if target == "attrs" else "accuracy"
    console.say(f"probe of {result['kind']} `{args.column}`: linear probe {what} {probe['accuracy']:.3f}, "
          f"{args.k}-NN agreement {result['knn']['agreement']:.3f} (majority label {result['majority']['accuracy']:.3f}; "
          f"{len(train['z'])} train / {len(test['z'])} test); written to {join(args.out, 'probe.json')}")


def _finished(out: str, config: dict, inputs: dict) -> bool:
    """A finished probe of the same embeddings with the same config is there."""
    if not (exists(join(out, MANIFEST)) and exists(join(out, "probe.json"))):
        return False
    old = read_manifest(out)
    return old.get("stage") == "probe" and old.get("config") == config and old.get("inputs") == inputs
