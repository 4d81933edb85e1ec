"""trainer/mixing.py: CutMix and mixup through Partial FC, the same on every rank."""
import pytest
import torch

from tests._heads_helpers import run_ranks
from trainer import losses
from trainer.mixing import cutmix_box, draw_mix, mix_batch, mixed_loss, step_generator
from trainer.partial_fc import PartialFC


def test_cutmix_pastes_the_partners_box_and_weights_by_its_area():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 20, 16)
    mixed, perm, own = mix_batch(images, "cutmix", lam=0.7, cy=0.9, cx=0.1)  # a box clipped at two edges
    y0, y1, x0, x1 = cutmix_box(20, 16, 0.7, 0.9, 0.1)
    assert y1 == 20 and x0 == 0 and (y1 - y0) * (x1 - x0) < 0.3 * 20 * 16
    assert torch.equal(mixed[:, :, y0:y1, x0:x1], images[perm, :, y0:y1, x0:x1])
    outside = torch.ones(20, 16, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert torch.equal(mixed[:, :, outside], images[:, :, outside])
    assert own == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 320)
    assert sorted(perm.tolist()) == list(range(6))


def test_mixup_blends_and_lam_one_leaves_the_batch_alone():
    images = torch.randn(4, 3, 8, 8)
    mixed, perm, own = mix_batch(images, "mixup", lam=0.25)
    assert own == 0.25
    assert torch.allclose(mixed, 0.25 * images + 0.75 * images[perm])
    same, _, own = mix_batch(images, "cutmix", lam=1.0)
    assert same is images and own == 1.0
    with pytest.raises(ValueError, match="mix must be"):
        mix_batch(images, "blend", lam=0.5)


def test_draw_mix_follows_p_and_the_beta_law_and_depends_on_its_key_alone():
    draws = [draw_mix(0.5, 1.0, step_generator(7, step, 1))[0] for step in range(4000)]
    assert draws == [draw_mix(0.5, 1.0, step_generator(7, step, 1))[0] for step in range(4000)]
    assert draws != [draw_mix(0.5, 1.0, step_generator(8, step, 1))[0] for step in range(4000)]
    mixed = torch.tensor([d for d in draws if d < 1.0])
    assert 0.46 < len(mixed) / len(draws) < 0.54
    assert abs(float(mixed.mean()) - 0.5) < 0.03 and abs(float(mixed.var()) - 1 / 12) < 0.01  # Beta(1, 1)


def _rank_loss(rank: int, world: int, kind: str):
    torch.manual_seed(100 + rank)  # different streams per rank, as in training: lam must still agree
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    torch.nn.init.constant_(model[1].bias, 0.1)
    with torch.no_grad():
        model[1].weight.copy_(torch.linspace(-0.05, 0.05, 16 * 192).reshape(16, 192))
    head = PartialFC(losses.build_margin_loss((1.0, 0.0, 0.35), 32.0), 16, 10, seed=5)
    images = torch.randn(5, 3, 8, 8)
    labels = torch.randint(0, 10, (5,))
    key = (2048, 0.5, 1)
    loss = mixed_loss(model, head, images, labels, kind, 1.0, 1.0, key=key, rank=rank)
    lam, cy, cx = draw_mix(1.0, 1.0, step_generator(*key))
    perm = torch.from_numpy(step_generator(*key, "perm", rank).permutation(5))
    mixed, perm, own = mix_batch(images, kind, lam, cy, cx, perm)
    return dict(lam=lam, own=own, loss=loss.item(), mixed=mixed, labels=labels, partner=labels[perm],
                weight=head.weight.detach().clone(), model=model.state_dict())


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_two_ranks_draw_one_lam_and_give_the_single_process_loss(tmp_path, kind):
    results = run_ranks(_rank_loss, 2, tmp_path, kind)
    assert results[0]["lam"] == results[1]["lam"] < 1.0
    assert results[0]["own"] == results[1]["own"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    # One process over the global batch: the same mixed images, the same two label sets.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16))
    model.load_state_dict(results[0]["model"])
    head = PartialFC(losses.build_margin_loss((1.0, 0.0, 0.35), 32.0), 16, 10, seed=5)
    with torch.no_grad():
        head.weight.copy_(torch.cat([r["weight"] for r in results]))
    emb = model(torch.cat([r["mixed"] for r in results]))
    own = results[0]["own"]
    expected = own * head(emb, torch.cat([r["labels"] for r in results])) + \
        (1 - own) * head(emb, torch.cat([r["partner"] for r in results]))
    assert results[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["mix=blend"], "mix must be"),
    (["mix=cutmix", "sample_rate=0.5"], "sample_rate 1.0"),
    (["mix=cutmix", "mode=lvface"], "mode 'standard'"),
])
def test_mix_config_errors(overrides, message):
    from trainer.config import ConfigError, load_config
    from trainer.modes import build_mode

    with pytest.raises(ConfigError, match=message):
        build_mode(load_config("cpu_demo", overrides))
