"""Interpolation, attribute directions, Algorithm 1 pairs (paper sec. 4.3, 5.2) and PNG grids (Figures 2, 4, 5)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fisher.images import grid, interpolation_strip, save_png, to_uint8
from fisher.io import FisherError
from fisher.manipulation import ALPHAS, attribute_direction, edit, interpolate, random_pairs


def test_interpolate_endpoints_exact_and_linear():
    torch.manual_seed(0)
    z1, z2 = torch.randn(257) * 1e3, torch.randn(257) * 1e-3
    out = interpolate(z1, z2, [0.0, 0.5, 1.0, *ALPHAS])
    assert out.shape == (8, 257) and out.dtype == torch.float32
    assert torch.equal(out[0], z1) and torch.equal(out[2], z2) and torch.equal(out[3], z1)
    assert torch.allclose(out[1], (z1 + z2) / 2, rtol=1e-6, atol=0)
    a = 0.375
    assert torch.allclose(out[6], (1 - a) * z1 + a * z2, rtol=1e-6, atol=1e-6)
    assert ALPHAS == (0.0, 0.125, 0.25, 0.375, 0.5)
    with pytest.raises(FisherError, match="vectors of one size"):
        interpolate(z1, z2[:3], ALPHAS)


def test_attribute_direction_and_edit():
    z = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 1.0], [2.0, 5.0], [4.0, 0.0]], np.float32)
    has = np.array([1, 1, 0, 0, 0], bool)
    # mean with = (2, 1); mean without = (2, 2)
    delta = attribute_direction(z, has, "Smiling")
    assert delta.dtype == torch.float32 and torch.equal(delta, torch.tensor([0.0, -1.0]))
    assert torch.equal(edit(torch.tensor([1.0, 1.0]), delta), torch.tensor([1.0, -2.0]))          # scale 3
    assert torch.equal(edit(torch.tensor([[1.0, 1.0]]), delta, -1.0), torch.tensor([[1.0, 2.0]]))
    with pytest.raises(FisherError, match="no embeddings with attribute 'Eyeglasses' among 5 rows"):
        attribute_direction(z, np.zeros(5, bool), "Eyeglasses")
    with pytest.raises(FisherError, match="without"):
        attribute_direction(z, np.ones(5, bool))
    with pytest.raises(FisherError, match="one flag per row"):
        attribute_direction(z, has[:3])


def test_random_pairs():
    p = random_pairs(5, 2000, seed=3)
    assert p.shape == (2000, 2) and p.dtype == np.int64
    assert (p[:, 0] != p[:, 1]).all() and p.min() == 0 and p.max() == 4
    assert np.array_equal(p, random_pairs(5, 2000, seed=3))
    assert not np.array_equal(p, random_pairs(5, 2000, seed=4))
    assert len({tuple(r) for r in p}) == 20                        # every ordered pair of distinct items occurs
    assert np.array_equal(random_pairs(2, 10, 0)[:, 0], 1 - random_pairs(2, 10, 0)[:, 1])
    with pytest.raises(FisherError, match="at least 2"):
        random_pairs(1, 3, 0)


def test_to_uint8_and_grid():
    x = torch.tensor([0.0, 0.5, 1.0, 1.7, -0.2, 0.999]).view(1, 1, 2, 3)
    u = to_uint8(x)
    assert u.shape == (1, 2, 3, 1) and u.dtype == np.uint8
    assert u[0, :, :, 0].tolist() == [[0, 128, 255], [255, 0, 255]]
    tiles = np.arange(2 * 3 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 3, 4, 5, 3)
    g = grid(tiles, pad=1, pad_value=7)
    assert g.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    assert np.array_equal(g[1 + 5:1 + 5 + 4, 1 + 2 * 6:1 + 2 * 6 + 5], tiles[1, 2])
    assert (g[0] == 7).all() and (g[:, 6] == 7).all()


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_interpolation_strip_png(tmp_path, channels, mode):
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (2, 6, 5, channels), dtype=np.uint8) for _ in range(2))
    dec = rng.integers(0, 256, (2, len(ALPHAS), 6, 5, channels), dtype=np.uint8)
    strip = interpolation_strip(a, b, dec, pad=2)
    save_png(tmp_path / "sub" / "strip.png", strip)
    img = Image.open(tmp_path / "sub" / "strip.png")
    cols = len(ALPHAS) + 2
    assert img.mode == mode and img.size == (cols * 7 + 2, 2 * 8 + 2)      # (width, height)
    back = np.asarray(img).reshape(strip.shape)
    tile = lambda r, c: back[2 + r * 8:2 + r * 8 + 6, 2 + c * 7:2 + c * 7 + 5]
    for r in range(2):
        assert np.array_equal(tile(r, 0), a[r]) and np.array_equal(tile(r, cols - 1), b[r])
        assert np.array_equal(tile(r, 1), dec[r, 0])
    one = interpolation_strip(a[0], b[0], dec[0])                        # a single row
    assert np.array_equal(one, strip[:10])
    assert list(tmp_path.joinpath("sub").iterdir()) == [tmp_path / "sub" / "strip.png"]  # no temporary left
    with pytest.raises(FisherError, match="do not fit"):
        interpolation_strip(a, b, dec[:1])
