"""Counted (not estimated) model size: parameters and multiply-adds of one forward pass.

The face-recognition papers (insightface's IResNet table, ResSaNet, LVFace) quote "GFLOPs" that are in
fact giga multiply-accumulates (one MAC = one multiply + one add), so `count_gmacs` returns
multiply-adds, i.e. half of what `torch.utils.flop_counter.FlopCounterMode` calls FLOPs. Like the
papers' tools, it counts the work of convolutions, linear layers, matrix products and attention; it
leaves out element-wise work (batch norm, activations, residual additions, softmax, pooling), which is
well under 1% of these networks.

    python -m trainer.model_io.flops --network r50 mbf [--size 112]     (or: facetrain flops ...)

prints parameters (millions) and GMACs of each named network on one image, as the papers' tables do.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # q @ k^T then attn @ v, two FLOPs per multiply-add, as torch's own formula for the CUDA kernels.
    b, h, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                         **kwargs) -> int:
    # Four products (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q): twice the forward's two.
    return 2 * _sdpa_flops(query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the fused CPU one that scaled_dot_product_attention
# dispatches to here, so without these entries a ViT's attention would silently count as zero.
_EXTRA_FORMULAS: Dict[Any, Any] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_size: Tuple[int, ...] = (1, 3, 112, 112),
                backward: bool = False) -> int:
    """FLOPs (2 per multiply-add) of one forward pass, or forward + backward, on a zero input.

    Forward-only counting runs in eval mode under no_grad, so training-only paths (patch masking,
    dropout, stochastic depth) are not counted; the model's mode is restored afterwards.
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = torch.zeros(input_size, device=device)
    was_training = model.training
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        if backward:
            model.train()
            with counter:
                model(x).float().sum().backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with counter, torch.no_grad():
                model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def count_gmacs(model: nn.Module, image_size: int = 112, in_channels: int = 3) -> float:
    """Giga multiply-adds of one forward pass on one image: the papers' "GFLOPs"."""
    return count_flops(model, (1, in_channels, image_size, image_size)) / 2 / 1e9


def describe(model: nn.Module, image_size: int = 112) -> Dict[str, float]:
    """Millions of parameters and counted GMACs, for tables and logs."""
    return {"params_m": count_params(model) / 1e6, "gmacs": count_gmacs(model, image_size)}


def _kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value  # a bare string, e.g. act=prelu


def build_parser(prog: str = "python -m trainer.model_io.flops") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", nargs="+", required=True, metavar="NAME",
                    help="backbone name(s) of the registry (trainer/backbones); `--network list` names them")
    ap.add_argument("--size", type=int, default=112, help="input side in pixels (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="one JSON object per network instead of a table")
    ap.add_argument("kwargs", nargs="*", metavar="key=value", type=_kwarg,
                    help="backbone arguments, e.g. embedding_size=256 (JSON values)")
    return ap


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m trainer.model_io.flops") -> int:
    from trainer.backbones import available_backbones, build_backbone

    args = build_parser(prog).parse_intermixed_args(argv)
    if args.network == ["list"]:
        print("\n".join(available_backbones()))
        return 0
    if args.size < 8:
        print(f"error: --size {args.size} is too small", file=sys.stderr)
        return 2
    rows = []
    for name in args.network:
        try:
            model = build_backbone(name, **dict(args.kwargs))
        except (KeyError, TypeError) as e:
            print(f"error: {name}: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
        row = {"network": name, **describe(model, args.size)}
        rows.append(row)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    head = ["network", "params (M)", f"GMACs @{args.size}"]
    cells = [[r["network"], f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}"] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    for line in [head, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
