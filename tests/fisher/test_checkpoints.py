"""One checkpoint format (fisher.checkpoints): module.json + weights, legacy directories, masks rebuilt
from the architecture, the resumable training state."""
import io
import json

import pytest
import torch

from fisher import checkpoints
from fisher.decoders import build_decoder, load_decoder
from fisher.errors import FisherError
from fisher.priors import PixelCNN, load_prior, prior_files


def _legacy_prior(model, directory):
    """A prior directory as fisher-ray 0.1 wrote it: model.json with flat config, masks in the weights."""
    directory.mkdir()
    cfg = model.config
    (directory / "model.json").write_text(json.dumps({"arch": "pixelcnn", "channels": cfg.channels, "levels": cfg.levels,
                                                      "n_layers": cfg.n_layers, "filters": cfg.filters,
                                                      "kernel_size": cfg.kernel_size}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if hasattr(mod, "mask"):
            state[f"{name}.mask"] = mod.mask.clone()
    torch.save(state, directory / "weights.pt")
    return state


def test_module_json_names_family_arch_and_config():
    m = PixelCNN(n_layers=2, filters=4)
    spec = json.loads(prior_files(m)["module.json"])
    assert spec == {"format": "fisher-module/1", "family": "prior", "arch": "pixelcnn", "args": {},
                    "config": {"channels": 1, "levels": 2, "n_layers": 2, "filters": 4, "kernel_size": 7}}
    dec = build_decoder("conv", 5, (8, 8, 1), 2, base_channels=4)
    spec = json.loads(checkpoints.module_files(dec, "decoder")["module.json"])
    assert spec["family"] == "decoder" and spec["arch"] == "conv" and spec["config"] == {"base_channels": 4}
    assert spec["args"] == {"z_dim": 5, "image_shape": [8, 8, 1], "levels": 2}
    state = torch.load(io.BytesIO(prior_files(m)["weights.pt"]), weights_only=True)
    assert not any(k.endswith("mask") for k in state)            # masks are rebuilt, never stored


def test_legacy_prior_loads_and_its_masks_are_not_trusted(tmp_path):
    torch.manual_seed(0)
    m = PixelCNN(n_layers=2, filters=4, kernel_size=3).eval()
    x = torch.randint(0, 2, (3, 1, 5, 5))
    _legacy_prior(m, tmp_path / "old")
    assert torch.equal(load_prior(tmp_path / "old").log_prob(x), m.log_prob(x))
    # an all-ones mask in the file (a non-causal "prior") is ignored: the architecture's mask is used
    state = torch.load(tmp_path / "old" / "weights.pt", weights_only=True)
    state["hidden_layers.0.mask"].fill_(1)
    torch.save(state, tmp_path / "old" / "weights.pt")
    loaded = load_prior(tmp_path / "old")
    assert torch.equal(loaded.hidden_layers[0].mask, m.hidden_layers[0].mask)
    assert torch.equal(loaded.log_prob(x), m.log_prob(x))


def test_legacy_decoder_loads(tmp_path):
    torch.manual_seed(0)
    dec = build_decoder("conv", 5, (8, 8, 1), 2).eval()
    d = tmp_path / "old"
    d.mkdir()
    (d / "decoder.json").write_text(json.dumps({"arch": "conv", "z_dim": 5, "image_shape": [8, 8, 1], "levels": 2,
                                                "config": {}}))
    torch.save(dec.state_dict(), d / "weights.pt")
    z = torch.randn(2, 5)
    with torch.no_grad():
        assert torch.equal(load_decoder(d).generate(z), dec.generate(z))


def test_wrong_family_and_bad_spec_are_one_line_errors(tmp_path):
    files = checkpoints.module_files(build_decoder("conv", 5, (8, 8, 1), 2), "decoder")
    with pytest.raises(FisherError, match="a 'decoder' checkpoint, not a prior"):
        checkpoints.module_from_files(files, "prior", "d")
    with pytest.raises(FisherError, match="not a prior description"):
        checkpoints.module_from_files({**files, "module.json": b"[1, 2]"}, "prior", "d")
    with pytest.raises(FisherError, match="not valid JSON"):
        checkpoints.module_from_files({**files, "module.json": b"{"}, "decoder", "d")
    with pytest.raises(FisherError, match="module.json: missing"):
        checkpoints.module_from_files({"weights.pt": files["weights.pt"]}, "decoder", "d")
    spec = json.loads(files["module.json"])
    spec["config"] = {"base_channels": -1}
    with pytest.raises(FisherError, match="base_channels=-1 must be >= 1"):
        checkpoints.module_from_files({**files, "module.json": json.dumps(spec).encode()}, "decoder", "d")


def test_train_state_round_trip():
    torch.manual_seed(0)
    m = PixelCNN(n_layers=1, filters=4)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loss = -m.log_prob(torch.randint(0, 2, (2, 1, 5, 5))).mean()
    loss.backward()
    opt.step()
    history = [{"epoch": 1, "test_nll_nats": 3.0}, {"epoch": 2, "test_nll_nats": 2.5}]
    files = checkpoints.train_state_files(m, "prior", opt, 2, history, history[-1])
    state = checkpoints.read_train_state(files)
    assert state["epoch"] == 2 and state["history"] == history
    assert json.loads(files["metrics.json"]) == history[-1]
    fresh = PixelCNN(n_layers=1, filters=4)
    fresh.load_state_dict(state["weights"])
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), fresh.state_dict().values()))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # a checkpoint of fisher-ray 0.1: progress.json without history, history.json beside it
    old = {**files, "progress.json": json.dumps({"epoch": 2}).encode(), "history.json": json.dumps(history).encode()}
    assert checkpoints.read_train_state(old)["history"] == history
