"""What a network costs: parameters, forward FLOPs, and which parameters are offset predictors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.ops import DeformConv2d


def offset_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every offset/mask-predictor parameter of the model's deformable layers."""
    for module in model.modules():
        if isinstance(module, DeformConv2d):
            yield from module.offset_parameters()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class ModelCost:
    params: int
    flops_per_image: int
    by_op: dict[str, int] = field(default_factory=dict)


def measure_cost(model: nn.Module, image_size: int, in_channels: int = 3) -> ModelCost:
    """Parameters and forward FLOPs for one image (torch.utils.flop_counter; a multiply-add is 2 FLOPs).

    Bilinear sampling is not counted by the flop counter; the convolutions, the deformable layers'
    column matmuls and the dense head are.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    model.train(was_training)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return ModelCost(count_parameters(model), int(counter.get_total_flops()), by_op)
