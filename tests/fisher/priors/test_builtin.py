"""Builtin priors (fisher.priors.builtin): each loads by name and scores the real test images as its
manifest says (within 0.5 nats/image)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fisher.data import binarize, celeba_files, decode_celeba_files, load_mnist_split
from fisher.errors import FisherError
from fisher.priors import builtin, load_prior, prior_location, to_model_input
from fisher.training import nll_sum

SHARED = Path(os.environ.get("FISHER_SHARED_DATA", Path(__file__).resolve().parents[3].parent / "shared" / "data"))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_there_is_a_builtin_mnist_prior_and_names_resolve():
    assert "mnist-pixelcnn" in builtin.names()
    assert Path(prior_location("builtin:mnist-pixelcnn")) == builtin.HERE / "mnist-pixelcnn"
    assert prior_location("/some/dir") == "/some/dir"
    with pytest.raises(FisherError, match="builtin:nope: no such builtin prior .*builtin:mnist-pixelcnn"):
        prior_location("builtin:nope")


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin.names())
def test_builtin_scores_the_real_test_images_as_its_manifest_says(name):
    manifest = json.loads((builtin.HERE / name / "manifest.json").read_text())
    data = manifest["builtin"]["data"]["config"]
    check = manifest["builtin"]["check"]
    if data.get("dataset") == "mnist":
        if not (SHARED / "mnist").exists():
            pytest.skip("real MNIST not in ../shared/data")
        grey, _ = load_mnist_split(str(SHARED / "mnist"), "test", limit=check["images"])
        images = binarize(grey, data["seed"], "test")[..., None]
        independent_pixels = 205.9           # nats/image on this split: the line a prior must be far below
    elif data.get("dataset") == "celeba":
        if not (SHARED / "celeba" / "img_align_celeba").exists():
            pytest.skip("real CelebA not in ../shared/data")
        files = celeba_files(str(SHARED / "celeba"))["test"][:check["images"]]
        images, _ = decode_celeba_files(files, size=data["size"], bits=data["bits"], crop=tuple(data["crop"]))
        independent_pixels = 4.5 * images[0].size * np.log(2)    # well below the 5 bits/dim of uniform levels
    else:
        pytest.fail(f"{name}: no check written for a {data.get('dataset')} prior")
    assert len(images) == check["images"]
    model = load_prior(f"builtin:{name}")
    torch.manual_seed(0)                    # as the package step: a PixelVAE's ELBO is stochastic
    with torch.no_grad():
        nll = nll_sum(model, to_model_input(images)) / len(images)
    assert nll == pytest.approx(check["nll_nats"], abs=0.5)
    # and it has learned the data
    assert manifest["metrics"]["test_nll_nats"] < independent_pixels and np.isfinite(nll)
