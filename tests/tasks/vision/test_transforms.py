"""Torch-only transforms against hand-computed tensors."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from loralab.tasks.vision.transforms import (ImageTransform, channel_mean_std, normalize, pad_crop, random_crop,
                                             random_hflip, resize, to_float)


def test_to_float_and_normalize_by_hand():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    x = to_float(u8)
    assert x.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    out = normalize(x, (0.5, 0.1, 0.25), (0.5, 0.2, 0.25))
    assert out.flatten().tolist() == pytest.approx([-1.0, 0.5, 3.0])  # (0-.5)/.5, (.2-.1)/.2, (1-.25)/.25
    with pytest.raises(ValueError, match="3 channels but mean"):
        normalize(x, (0.5,), (0.5,))
    with pytest.raises(TypeError, match="uint8"):
        to_float(x)


def test_channel_mean_std_by_hand():
    u8 = torch.tensor([[[[0, 255]], [[51, 51]]], [[[255, 0]], [[102, 0]]]], dtype=torch.uint8)  # (2, 2, 1, 2)
    mean, std = channel_mean_std(u8)
    # channel 0: 0, 1, 1, 0 -> mean .5, std .5; channel 1: .2, .2, .4, 0 -> mean .2, var (0+0+.04+.04)/4
    assert mean == pytest.approx((0.5, 0.2)) and std == pytest.approx((0.5, 0.02 ** 0.5))


def test_resize_bilinear_upsample_by_hand():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    # align_corners=False: output i samples input coordinate (i + .5) / 2 - .5 = -.25, .25, .75, 1.25,
    # clamped to [0, 1]: weights a = 0, .25, .75, 1 -> out[i, j] = 2 a_i + a_j
    a = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(resize(x, 4)[0, 0], 2 * a.view(4, 1) + a.view(1, 4))
    assert resize(x, (2, 2)) is x
    # shrinking 4 -> 2 antialiased: triangle filter stretched by the scale 2, output i centred at input
    # 2 (i + .5); taps j weigh tri((j + .5 - centre) / 2): i = 0: j 0,1,2 -> .75,.75,.25 (/1.75),
    # i = 1: j 1,2,3 -> .25,.75,.75. On a row 0,1,2,3: 5/7 and 16/7 (plain bilinear would give .5, 2.5)
    big = torch.arange(16.0).view(1, 1, 4, 4)  # 4 r + c, separable
    a = torch.tensor([5 / 7, 16 / 7])
    torch.testing.assert_close(resize(big, 2)[0, 0], 4 * a.view(2, 1) + a.view(1, 2))
    with pytest.raises(TypeError, match="float"):
        resize(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), 4)


def test_pad_crop_by_hand():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3).repeat(2, 1, 1, 1)
    x[1] *= -1
    out = pad_crop(x, torch.tensor([0, 2]), torch.tensor([1, 2]), (3, 3), padding=1)
    # padded image 0: rows [0 0 0 0 0], [0 1 2 3 0], [0 4 5 6 0], [0 7 8 9 0], [0 0 0 0 0]; window at (0, 1)
    assert out[0, 0].tolist() == [[0, 0, 0], [1, 2, 3], [4, 5, 6]]
    assert out[1, 0].tolist() == [[-5, -6, 0], [-8, -9, 0], [0, 0, 0]]  # window at (2, 2) of the negated image
    with pytest.raises(ValueError, match="leaves the padded image"):
        pad_crop(x, torch.tensor([0, 3]), torch.tensor([0, 0]), (3, 3), padding=1)


def test_random_crop_outputs_are_windows_and_cover_all_offsets():
    torch.manual_seed(0)
    x = torch.rand(200, 3, 6, 6)
    out = random_crop(x, 6, padding=2, generator=torch.Generator().manual_seed(1))
    xp = F.pad(x, (2, 2, 2, 2))
    seen = set()
    for n in range(len(x)):
        hits = [(t, l) for t, l in itertools.product(range(5), range(5)) if torch.equal(out[n], xp[n, :, t:t + 6, l:l + 6])]
        assert len(hits) == 1, n
        seen.add(hits[0])
    assert len(seen) == 25  # every offset in [0, 4]^2 drawn (200 draws of 25: a miss has probability < 1e-9)
    again = random_crop(x, 6, padding=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_random_hflip():
    x = torch.arange(2.0 * 4).view(2, 1, 1, 4)
    assert torch.equal(random_hflip(x, 0.0), x)
    assert random_hflip(x, 1.0)[:, 0, 0].tolist() == [[3, 2, 1, 0], [7, 6, 5, 4]]
    y = torch.rand(400, 1, 2, 3)
    out = random_hflip(y, 0.5, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(out[n], y[n].flip(-1))) for n in range(400)]
    kept = [bool(torch.equal(out[n], y[n])) for n in range(400)]
    assert all(f != k for f, k in zip(flipped, kept)) and 150 < sum(flipped) < 250


def test_image_transform_train_and_eval():
    u8 = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    t = ImageTransform(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), size=8, crop_padding=2, hflip=True)
    ev = t(u8)
    ref = (F.interpolate(u8.float() / 255, size=(8, 8), mode="bilinear", align_corners=False) - 0.5) / 0.25
    torch.testing.assert_close(ev, ref)  # eval: resize + normalise only
    tr = t(u8, train=True, generator=torch.Generator().manual_seed(3))
    assert tr.shape == (8, 3, 8, 8) and not torch.equal(tr, ev)
    # padding is black in pixel space, so a shifted window has a whole border row or column of
    # (0 - .5) / .25 = -2 in every channel (resized random pixels essentially never do)
    black = tr == -2.0
    edge_rows = torch.stack([black[:, :, 0, :].all(-1).all(-1), black[:, :, -1, :].all(-1).all(-1)])
    edge_cols = torch.stack([black[:, :, :, 0].all(-1).all(-1), black[:, :, :, -1].all(-1).all(-1)])
    assert (edge_rows | edge_cols).any() and not (ev == -2.0)[:, :, 0, :].all(-1).all(-1).any()
