"""Decoders (appendix 7.2): shapes, ResBlock, objective and metrics, training, checkpoints, registry."""
import math

import pytest
import torch
import torch.nn as nn

from fisher.decoders import (DECODERS, Decoder, DecoderTrainConfig, ResBlock, build_decoder, decode_mean, decode_mode,
                             decoder_files, decoder_from_files, decoder_train_step, load_decoder,
                             reconstruction_loss, reconstruction_metrics, register_decoder, save_decoder,
                             fit_decoder, summarize_metrics)
from fisher.io import FisherError


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("name, shape, levels, expected", [
    ("conv", (28, 28, 1), 2, (3, 1, 28, 28)),
    ("conv", (32, 32, 3), 32, (3, 3, 32, 32, 32)),
    ("conv", (64, 64, 3), 32, (3, 3, 32, 64, 64)),
    ("conv", (20, 13, 1), 4, (3, 1, 4, 20, 13)),
    ("celeba_conv", (32, 32, 3), 32, (3, 3, 32, 32, 32)),
    ("celeba_conv", (64, 64, 3), 32, (3, 3, 32, 64, 64)),
    ("celeba_conv", (32, 32, 1), 2, (3, 1, 32, 32)),
])
def test_output_shapes(name, shape, levels, expected):
    torch.manual_seed(0)
    dec = build_decoder(name, 16, shape, levels, **({"channels": 16} if name == "celeba_conv" else {}))
    assert tuple(dec(torch.randn(3, 16)).shape) == expected


def test_mnist_conv_shape_fix():
    """Appendix 7.2.1 fixed minimally: Linear 1024 = 64x4x4, then 4 -> 7 -> 14 -> 28 (k5, s2, p2, op 0/1/1)."""
    dec = build_decoder("conv", 16, (28, 28, 1), 2)
    assert dec.linear.out_features == 1024 and dec.start == (64, 4, 4)
    ups = [m for m in dec.net if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in ups] == [(64, 128), (128, 32), (32, 1)]
    assert all(m.kernel_size == (5, 5) and m.stride == (2, 2) and m.padding == (2, 2) for m in ups)
    assert [m.output_padding for m in ups] == [(0, 0), (1, 1), (1, 1)]
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for m in ups]
    dec(torch.randn(2, 16))
    assert sizes == [7, 14, 28]
    for h in hooks:
        h.remove()
    assert [m.output_padding for m in build_decoder("conv", 4, (32, 32, 3), 2).net
            if isinstance(m, nn.ConvTranspose2d)] == [(1, 1)] * 3


def test_celeba_conv_stages_and_bad_size():
    dec = build_decoder("celeba_conv", 8, (64, 64, 3), 32, channels=8)
    assert sum(isinstance(m, nn.Upsample) for m in dec.net) == 4        # log2(64/4)
    assert sum(isinstance(m, ResBlock) for m in dec.net) == 4
    assert dec.net[-1].out_channels == 3 * 32 and dec.net[-1].kernel_size == (1, 1)
    paper = build_decoder("celeba_conv", 8, (128, 128, 3), 32, channels=4)
    assert sum(isinstance(m, nn.Upsample) for m in paper.net) == 5     # 4 -> 128
    with pytest.raises(FisherError, match="28x28"):
        build_decoder("celeba_conv", 8, (28, 28, 1), 2)


def test_resblock_layout_and_shortcut():
    block = ResBlock(4)
    kinds = [type(m).__name__ for m in block.body]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 3
    convs = [m for m in block.body if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)] and convs[1].padding == (1, 1)
    assert all(c.bias is None for c in convs)
    for c in convs:
        nn.init.zeros_(c.weight)                      # body outputs 0: only the shortcut is left
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x), torch.relu(x))


def test_metrics_perfect_and_uninformative_binary():
    x = torch.randint(0, 2, (4, 1, 6, 6))
    perfect = summarize_metrics(reconstruction_metrics((2 * x - 1).float() * 40, x, 2))
    assert perfect["bce_nats_per_pixel"] < 1e-15 and perfect["mse"] < 1e-30
    zero = torch.zeros(4, 1, 6, 6)
    m = reconstruction_metrics(zero, x, 2)
    assert m["n_subpixels"] == 144 and m["n_images"] == 4
    s = summarize_metrics(m)
    assert s["bce_nats_per_pixel"] == pytest.approx(math.log(2), rel=1e-7)
    assert s["mse"] == 0.25
    assert s["nll_nats_per_image"] == pytest.approx(36 * math.log(2), rel=1e-7)
    assert torch.allclose(reconstruction_loss(zero, x, 2), torch.full((4,), 36 * math.log(2)))


def test_metrics_categorical_known_logits():
    p = torch.tensor([0.2, 0.3, 0.5])
    logits = p.log().view(1, 1, 3, 1, 1).expand(1, 1, 3, 1, 3).contiguous()
    x = torch.tensor([[[[0, 1, 2]]]])                             # (1, 1, 1, 3)
    mean = 0.3 * 0.5 + 0.5 * 1.0                                  # E[x̂] = Σ p_k k/(levels-1) = 0.65
    assert torch.allclose(decode_mean(logits, 3), torch.full((1, 1, 1, 3), mean))
    assert torch.equal(decode_mode(logits, 3), torch.full((1, 1, 1, 3), 2))
    s = summarize_metrics(reconstruction_metrics(logits, x, 3))
    assert s["bce_nats_per_pixel"] == pytest.approx(-(math.log(.2) + math.log(.3) + math.log(.5)) / 3, rel=1e-6)
    assert s["mse"] == pytest.approx((mean ** 2 + (mean - .5) ** 2 + (mean - 1) ** 2) / 3, rel=1e-6)
    onehot = torch.nn.functional.one_hot(x, 3).permute(0, 1, 4, 2, 3).float() * 60
    perfect = summarize_metrics(reconstruction_metrics(onehot, x, 3))
    assert perfect["bce_nats_per_pixel"] < 1e-20 and perfect["mse"] < 1e-20


def test_metrics_sum_exactly_over_batches():
    torch.manual_seed(0)
    logits, x = torch.randn(6, 3, 5, 4, 4), torch.randint(0, 5, (6, 3, 4, 4))
    whole = summarize_metrics(reconstruction_metrics(logits, x, 5))
    parts = summarize_metrics(reconstruction_metrics(logits[:2], x[:2], 5), reconstruction_metrics(logits[2:], x[2:], 5))
    assert whole == pytest.approx(parts, rel=1e-12)
    assert whole["nll_nats_per_image"] == pytest.approx(float(reconstruction_loss(logits, x, 5).mean()), rel=1e-5)
    with pytest.raises(FisherError, match="do not match"):
        reconstruction_loss(logits, x[:, :1], 5)


def test_training_reduces_loss():
    torch.manual_seed(0)
    z = torch.randn(64, 16)
    x = torch.randint(0, 2, (64, 1, 28, 28))
    dec = build_decoder("conv", 16, (28, 28, 1), 2)
    cfg = DecoderTrainConfig()
    assert (cfg.lr, cfg.batch_size, cfg.decoder) == (None, 128, "conv")     # None: the decoder's own default
    opt = dec.make_optimizer(cfg.lr)
    assert opt.defaults["lr"] == 1e-3 and type(opt) is torch.optim.Adam     # the paper's Adam at 1e-3
    losses = [decoder_train_step(dec, opt, z, x, 2) for _ in range(40)]
    assert losses[0] > 0.95 * 784 * math.log(2)        # an untrained decoder knows nothing: >= ln 2 per pixel
    assert losses[-1] < 0.6 * losses[0], losses[::5]


def _trained(name, shape, levels, **config):
    torch.manual_seed(0)
    dec = build_decoder(name, 8, shape, levels, **config)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    x = torch.randint(0, 2, (4, shape[2], shape[0], shape[1])) if levels == 2 else \
        torch.randint(0, levels, (4, shape[2], shape[0], shape[1]))
    decoder_train_step(dec, opt, torch.randn(4, 8), x, levels)      # moves weights and BN running stats
    return dec.eval()


def _respec(files, arch=None, **args):
    """Checkpoint files whose module.json names another architecture or other constructor args."""
    import json
    spec = json.loads(files["module.json"])
    spec["arch"] = arch or spec["arch"]
    spec["args"].update(args)
    return {**files, "module.json": json.dumps(spec).encode()}


def test_checkpoint_roundtrip_and_rejections(tmp_path):
    dec = _trained("celeba_conv", (8, 8, 3), 4, channels=8)
    files = decoder_files(dec)
    z = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(dec(z), decoder_from_files(files)(z))
    save_decoder(dec, tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(dec(z), load_decoder(tmp_path / "d")(z))
    # weights of another architecture
    with pytest.raises(FisherError, match="does not match"):
        decoder_from_files(_respec(files, z_dim=9))
    # unknown decoder name in the JSON
    with pytest.raises(FisherError, match="unknown decoder 'gan'"):
        decoder_from_files(_respec(files, arch="gan"))
    # a pickle carrying code is refused
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    import io
    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with pytest.raises(FisherError, match="not a plain weights file"):
        decoder_from_files({**files, "weights.pt": buf.getvalue()})
    # NaN weights
    with torch.no_grad():
        next(dec.parameters()).fill_(float("nan"))
    with pytest.raises(FisherError, match="NaN"):
        decoder_from_files(decoder_files(dec))
    with pytest.raises(FisherError, match="missing"):
        decoder_from_files({"weights.pt": files["weights.pt"]})


def test_registry():
    with pytest.raises(FisherError, match="unknown decoder 'nope'.*celeba_conv, conv"):
        build_decoder("nope", 4, (28, 28, 1), 2)
    with pytest.raises(FisherError, match="invalid config"):
        build_decoder("conv", 4, (28, 28, 1), 2, widht=3)

    with pytest.raises(TypeError, match="must subclass fisher.decoders.Decoder"):
        register_decoder("plain_module")(nn.Linear)

    @register_decoder("toy_linear")
    class Toy(Decoder):
        def __init__(self, z_dim, image_shape, levels, scale=1.0):
            super().__init__(z_dim)
            h, w, c = image_shape
            self.shape, self.scale = (c, h, w), scale
            self.lin = nn.Linear(z_dim, c * h * w)

        def decode(self, z):
            return self.scale * self.lin(z).view(len(z), *self.shape)
    try:
        dec = build_decoder("toy_linear", 5, (4, 3, 1), 2, scale=2.0)
        assert isinstance(dec, Toy) and dec.scale == 2.0
        z = torch.randn(2, 5)
        again = decoder_from_files(decoder_files(dec))
        assert again.scale == 2.0 and torch.equal(dec(z), again(z))
        assert reconstruction_loss(dec(z), torch.zeros(2, 1, 4, 3), 2).shape == (2,)
    finally:
        DECODERS.pop("toy_linear")


def test_input_standardization_is_fitted_saved_and_affine_invariant(tmp_path):
    """fit_decoder standardizes z with train statistics, so a decoder trained on a*z + b (per coordinate)
    is the same function of its input as one trained on z; the statistics travel with the weights."""
    torch.manual_seed(0)
    z_train, z_test = torch.randn(32, 6), torch.randn(8, 6)
    x_train, x_test = torch.randint(0, 2, (32, 1, 8, 8)), torch.randint(0, 2, (8, 1, 8, 8))
    a, b = torch.tensor([1e3, 1e-2, 5.0, 1.0, 2e4, 0.5], dtype=torch.float64), torch.arange(6.0, dtype=torch.float64)
    scaled = lambda z: (z.double() * a + b).float()
    cfg = DecoderTrainConfig(epochs=2, batch_size=16)
    dec, m = fit_decoder(cfg, z_train, x_train, z_test, x_test, 2, (8, 8, 1))
    dec2, m2 = fit_decoder(cfg, scaled(z_train), x_train, scaled(z_test), x_test, 2, (8, 8, 1))
    assert torch.allclose(dec2.z_mean, z_train.double().mean(0).mul(a).add(b).float(), rtol=1e-4, atol=1e-3)
    assert torch.allclose(dec2.z_scale, z_train.double().std(0).mul(a).float(), rtol=1e-4)
    assert m["test_bce_nats_per_pixel"] == pytest.approx(m2["test_bce_nats_per_pixel"], abs=1e-3)
    fresh = [build_decoder("conv", 6, (8, 8, 1), 2) for _ in range(2)]
    fresh[1].load_state_dict(fresh[0].state_dict())
    fresh[0].fit_input(z_train)
    fresh[1].fit_input(scaled(z_train))
    with torch.no_grad():        # same weights: the same function of the standardized input
        assert torch.allclose(fresh[0].eval()(z_test), fresh[1].eval()(scaled(z_test)), atol=1e-5)
    save_decoder(dec2, tmp_path / "d")
    loaded = load_decoder(tmp_path / "d")
    assert torch.equal(loaded.z_mean, dec2.z_mean) and torch.equal(loaded.z_scale, dec2.z_scale)
    constant = torch.ones(4, 6)                        # no spread: scale stays 1, nothing divides by 0
    dec.fit_input(constant)
    assert torch.equal(dec.z_scale, torch.ones(6)) and torch.isfinite(dec(constant)).all()


def test_resumed_fit_matches_an_undisturbed_one():
    """Stopped after epoch 1 and resumed from its state, fit_decoder ends with the weights of one run of 2
    epochs: same optimizer state, and the resumed epoch is shuffled as the undisturbed run's second."""
    import copy
    torch.manual_seed(0)
    z, x = torch.randn(48, 6), torch.randint(0, 2, (48, 1, 8, 8))
    cfg = DecoderTrainConfig(decoder_config={"base_channels": 4}, epochs=2, batch_size=16)
    states = {}

    def keep(epoch, metrics, decoder, opt):
        states[epoch] = {"weights": copy.deepcopy(decoder.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
                         "epoch": epoch}
    whole, _ = fit_decoder(cfg, z, x, z[:8], x[:8], 2, (8, 8, 1), on_epoch=keep)
    resumed, _ = fit_decoder(cfg, z, x, z[:8], x[:8], 2, (8, 8, 1), start=states[1])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(states[1]["weights"]["linear.weight"], whole.state_dict()["linear.weight"])


def test_shuffled_z_metric_measures_what_the_decoder_takes_from_z():
    """After the last epoch fit_decoder reports the test NLL with each image given the next image's z. A
    decoder trained on z = the image itself gets much worse with another image's z; one whose z is the same
    for every image cannot, to the bit: the rolled z is the same z."""
    from fisher.decoders.training import shuffled_z_metrics
    torch.manual_seed(0)
    own = torch.randn(256, 4)                                  # images determined by their z
    x = (own @ torch.randn(4, 64) > 0).long().view(-1, 1, 8, 8)
    cfg = DecoderTrainConfig(decoder_config={"base_channels": 4}, epochs=4, batch_size=16, lr=1e-2)
    dec, m = fit_decoder(cfg, own[:192], x[:192], own[192:], x[192:], 2, (8, 8, 1))
    gain = m["test_nll_shuffled_z_nats_per_image"] - m["test_nll_nats_per_image"]
    assert gain > m["test_nll_nats_per_image"]
    assert m["test_nll_shuffled_z_nats_per_image"] == pytest.approx(   # the definition: another image's z
        summarize_metrics(dec.eval().reconstruction_metrics(own[192:].roll(1, 0), x[192:]))["nll_nats_per_image"])
    same = torch.randn(1, 4).expand(256, 4).contiguous()
    _, m0 = fit_decoder(cfg, same[:192], x[:192], same[192:], x[192:], 2, (8, 8, 1))
    assert m0["test_nll_shuffled_z_nats_per_image"] == m0["test_nll_nats_per_image"]
    assert shuffled_z_metrics(dec, own[:1], x[:1]) == {}
