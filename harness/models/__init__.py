"""The networks the ablations vary and where their deformable layers go (see `network.build_network`)."""

from harness.models.cnn import (
    CONV_LAYERS,
    MODELS,
    SMALL3_DEPTHS,
    UNET_ENCODER_DEPTHS,
    ConvBlock,
    DeformOptions,
    DeformSpec,
    MultiLabelCNN,
    conv_layer_count,
    create_model,
    resolve_deform_layers,
    small3,
    unet_encoder,
)
from harness.models.convert import conv_layers, is_candidate, make_deformable, select_convs, unsupported_reason
from harness.models.cost import ModelCost, count_parameters, measure_cost, offset_parameters
from harness.models.network import (
    NetworkSpec,
    arch_names,
    build_network,
    check_network,
    deformable_names,
    known_arch,
    stages_of,
)
from harness.models.zoo import RESNET_STAGES, RESNETS, hub_checkpoint, is_factory_ref, pretrained_file

__all__ = [
    "CONV_LAYERS", "MODELS", "RESNETS", "RESNET_STAGES", "SMALL3_DEPTHS", "UNET_ENCODER_DEPTHS", "ConvBlock",
    "DeformOptions", "DeformSpec", "ModelCost", "MultiLabelCNN", "NetworkSpec", "arch_names", "build_network",
    "check_network", "conv_layer_count", "conv_layers", "count_parameters", "create_model", "deformable_names",
    "hub_checkpoint", "is_candidate", "is_factory_ref", "known_arch", "make_deformable", "measure_cost",
    "offset_parameters", "pretrained_file", "resolve_deform_layers", "select_convs", "small3", "stages_of",
    "unet_encoder", "unsupported_reason",
]
