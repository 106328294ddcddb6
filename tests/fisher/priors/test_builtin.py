"""Builtin priors (fisher.priors.builtin): each loads by name and scores the real test images as its
manifest says (within 0.5 nats/image)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fisher.data import binarize, load_mnist_split
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
    if data.get("dataset") != "mnist":
        pytest.skip(f"{name}: a {data.get('dataset')} prior (only MNIST checks are written)")
    if not (SHARED / "mnist").exists():
        pytest.skip("real MNIST not in ../shared/data")
    check = manifest["builtin"]["check"]
    grey, _ = load_mnist_split(str(SHARED / "mnist"), "test", limit=check["images"])
    x = to_model_input(binarize(grey, data["seed"], "test")[..., None])
    model = load_prior(f"builtin:{name}")
    with torch.no_grad():
        nll = nll_sum(model, x) / len(x)
    assert nll == pytest.approx(check["nll_nats"], abs=0.5)
    # and it has learned the data: far below an independent-pixel model (205.9 nats on this split)
    assert manifest["metrics"]["test_nll_nats"] < 100 and np.isfinite(nll)
