"""trainer/ema.py: the moving average of the backbone's weights."""
import copy

import pytest
import torch

from trainer.ema import ModelEMA


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def test_average_follows_the_formula_with_its_warmup_ramp():
    net = _net()
    net(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    ema = ModelEMA(net, decay=0.9)
    expected = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for n in range(30):
        net(torch.randn(8, 3, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        d = min(0.9, (1 + n) / (10 + n))
        ema.update(net)
        for k, v in net.state_dict().items():
            expected[k] = v.clone() if not v.dtype.is_floating_point else d * expected[k] + (1 - d) * v
    got = ema.module.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k].float(), v.float(), rtol=1e-5, atol=1e-6), k
    # BatchNorm's running statistics are averaged too, and the count is copied.
    assert not torch.allclose(got["1.running_mean"], net.state_dict()["1.running_mean"])
    assert int(got["1.num_batches_tracked"]) == int(net.state_dict()["1.num_batches_tracked"]) == 31
    assert int(ema.updates) == 30
    # The average never trains: no gradients, eval mode.
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_state_round_trips_through_a_state_dict():
    net = _net()
    net(torch.randn(2, 3, 6, 6))
    ema = ModelEMA(net, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        ema.update(net)
    other = ModelEMA(copy.deepcopy(net), decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert int(other.updates) == 3
    assert other.current_decay() == ema.current_decay()
    for a, b in zip(ema.module.state_dict().values(), other.module.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_interval_is_an_error(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        ModelEMA(_net(), decay)
