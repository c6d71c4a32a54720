import pytest
import torch

from difflineage.models.pixelcnn import GatedPixelCNN, PixelCNNConfig


def model(**kw) -> GatedPixelCNN:
    torch.manual_seed(0)
    m = GatedPixelCNN(PixelCNNConfig(channels=16, layers=4, kernel=3), codes=7, **kw).eval()
    with torch.no_grad():  # larger weights than the default init, so that any leak would show
        for p in m.parameters():
            p.mul_(3.0)
    return m


@pytest.mark.parametrize("position", [(0, 0), (2, 3), (4, 5), (5, 0)])
def test_a_later_position_never_changes_an_earlier_output(position):
    m = model(num_classes=10, cond_channels=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 7, (2, 6, 6), generator=g)
    labels, cond = torch.tensor([3, 8]), torch.randn(2, 3, 6, 6, generator=g)
    before = m(x, labels, cond)
    changed = x.clone()
    i, j = position
    changed[:, i, j] = (changed[:, i, j] + 1) % 7
    after = m(changed, labels, cond)
    order = torch.arange(36).view(6, 6)
    earlier_or_same = order <= i * 6 + j  # the output at position p predicts x_p from x_<p
    assert torch.equal(before[..., earlier_or_same], after[..., earlier_or_same])
    later = order > i * 6 + j
    if later.any():
        assert not torch.equal(before[..., later], after[..., later])  # and the change does reach later outputs


def test_every_earlier_position_is_seen():
    """No blind spot: the last output depends on every earlier position (the two-stack design's point)."""
    m = model()
    x = torch.randint(0, 7, (1, 5, 5), generator=torch.Generator().manual_seed(2))
    base = m(x)[..., 4, 4]
    for i in range(5):
        for j in range(5):
            if (i, j) == (4, 4):
                continue
            y = x.clone()
            y[0, i, j] = (y[0, i, j] + 3) % 7
            assert not torch.equal(m(y)[..., 4, 4], base), f"position {(i, j)} is in a blind spot"


def test_sampling_shapes_conditions_and_temperature():
    m = model(num_classes=10)
    g = torch.Generator().manual_seed(0)
    codes = m.sample(3, (4, 5), labels=torch.tensor([1, 2, 3]), generator=g)
    assert codes.shape == (3, 4, 5) and codes.dtype == torch.long and codes.min() >= 0 and codes.max() < 7
    same = m.sample(3, (4, 5), labels=torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, same)  # a seed gives the same maps
    cold = m.sample(2, (4, 5), labels=torch.tensor([1, 1]), temperature=1e-4, generator=g)
    assert torch.equal(cold[0], cold[1])  # near-zero temperature: the argmax path, the same for equal conditions
    assert m.nll(codes, torch.tensor([1, 2, 3])).shape == (3,)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(1, (2, 2), labels=torch.tensor([0]), temperature=0)
