"""ResSaNet's ablation rows (paper Tables 2-4) and the accounting of its multiply-adds against IResNet-50."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainer.backbones import build_backbone
from trainer.backbones.iresnet import IBasicBlock
from trainer.backbones.ressanet import (
    ABLATION_ROWS,
    FReLU,
    IBasicTransformerBlock,
    ResSaNet,
    SEIBasicBlock,
    SqueezeExcite,
)
from trainer.model_io.flops import count_flops, count_params


def on_meta(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


def layout(model: ResSaNet) -> list[list[str]]:
    """Per stage, per block: which kind it is, read off the modules."""
    def kind(b: nn.Module) -> str:
        if isinstance(b, IBasicTransformerBlock):
            return ("ibt" if b.ffn is not None else "ibsa") + ("_se" if b.se is not None else "")
        if isinstance(b, SEIBasicBlock):
            return {(True, True): "se_f", (True, False): "se", (False, True): "f"}[
                (b.se is not None, isinstance(b.prelu, FReLU))]
        return "ibasic"
    return [[kind(b) for b in stage] for stage in (model.layer1, model.layer2, model.layer3, model.layer4)]


@pytest.mark.parametrize("row,stages", [
    # Table 3: SE position on R50_FReLU_IBSA
    ("t3_se_none", [["ibasic"] * 3, ["f"] * 4, ["f"] * 14, ["ibsa"] * 3]),
    ("t3_se_2_3", [["ibasic"] * 3, ["se_f"] * 4, ["se_f"] * 14, ["ibsa"] * 3]),
    ("t3_se_1_2_3", [["se"] * 3, ["se_f"] * 4, ["se_f"] * 14, ["ibsa"] * 3]),
    ("t3_se_2_3_4", [["ibasic"] * 3, ["se_f"] * 4, ["se_f"] * 14, ["ibsa_se"] * 3]),
    # Table 4: IBSA position on R50_FReLU
    ("t4_ibsa_s4x3", [["ibasic"] * 3, ["f"] * 4, ["f"] * 14, ["ibsa"] * 3]),
    ("t4_ibsa_s4x6", [["ibasic"] * 3, ["f"] * 4, ["f"] * 14, ["ibsa"] * 6]),
    ("t4_ibsa_s3x2_s4x3", [["ibasic"] * 3, ["f"] * 4, ["f"] * 12 + ["ibsa"] * 2, ["ibsa"] * 3]),
])
def test_ablation_rows_place_the_blocks_as_the_tables(row, stages):
    assert layout(on_meta("ressanet50_ablation", row=row)) == stages


def test_table3_se_with_ibsa_in_stage4_adds_exactly_the_se_gates():
    base, se4 = on_meta("ressanet50_ablation", row="t3_se_2_3"), on_meta("ressanet50_ablation", row="t3_se_2_3_4")
    gate = SqueezeExcite(512, 0.25)
    assert count_params(se4) - count_params(base) == 3 * count_params(gate)
    assert all(isinstance(b.se, SqueezeExcite) for b in se4.layer4)


def test_attention_blocks_inside_stage3_run_on_its_map():
    model = build_backbone("ressanet50_ablation", row="t4_ibsa_s3x2_s4x3", input_size=32, embedding_size=8).eval()
    assert [type(b).__name__ for b in model.layer3[-3:]] == ["SEIBasicBlock", "IBasicTransformerBlock",
                                                              "IBasicTransformerBlock"]
    assert model.layer3[-1].conv2[1].size == (4, 4)  # 32 -> 16 -> 8 -> 4: stage 3's map
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)


def test_rows_and_kinds_are_checked():
    with pytest.raises(ValueError, match="unknown ResSaNet ablation row"):
        build_backbone("ressanet50_ablation", row="t9")
    with pytest.raises(ValueError, match="got 2 block kinds"):
        ResSaNet([1, 1, 1, 3], stage_blocks=("ibasic", "f", "f", ("ibsa", "ibsa")), input_size=32)
    with pytest.raises(ValueError, match="unknown ResSaNet block kind"):
        ResSaNet([1, 1, 1, 1], stage_blocks=("ibasic", "f", "f", "ibsa_f"), input_size=32)
    # the default row is the paper's chosen ResSaNet-50-IBSA
    assert count_params(on_meta("ressanet50_ablation")) == count_params(on_meta("ressanet50_ibsa"))
    assert set(ABLATION_ROWS) >= {"t2_ibsa", "t2_ibsa_frelu", "t2_ibsa_frelu_se"}


def test_macs_over_iresnet50_are_frelu_se_and_a_mac_neutral_stage4():
    """The measured reason ResSaNet-50 has 27.6M more multiply-adds than IResNet-50 (the paper: 20M fewer)."""
    macs = lambda name: count_flops(on_meta(name)) // 2  # noqa: E731
    frelu = 56 * 56 * 128 * 9 + 3 * 28 * 28 * 128 * 9 + 28 * 28 * 256 * 9 + 13 * 14 * 14 * 256 * 9  # depth-wise 3x3
    se = 4 * 128 * 128 // 2 + 14 * 256 * 256 // 2  # two 1x1 convs of C x C/4 on the pooled vector
    hw = 7 * 7
    ibt = (3 * 512 * 512 * hw          # q, k, v
           + 3 * hw * hw * 512         # q k^T, q r^T, attention x v
           + 2 * 512 * 1536 * hw + 1536 * 9 * hw  # MBConv FFN, expansion 3
           - 512 * 512 * 9 * hw)       # the 3x3 conv it replaces
    assert macs("ressanet50") - macs("r50") == frelu + se + 3 * ibt == 27_586_560
    # the paper's parameter column: the stage-4 swap is parameter-neutral (+0.2%), all extra weights
    # are in SE + FReLU of stages 2-3
    sef = ResSaNet([3, 4, 14, 3], stage_blocks=("ibasic", "se_f", "se_f", "ibasic"), input_size=112)
    assert abs(count_params(on_meta("ressanet50")) - count_params(sef)) / count_params(sef) < 0.002
    assert isinstance(sef.layer4[0], IBasicBlock)
