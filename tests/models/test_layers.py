import math

import pytest
import torch
from torch import nn

from kdtune.models.layers import init_conv_weights, stage
from kdtune.models.resnet import BasicBlock


def test_init_conv_weights_is_he_fan_out_and_leaves_other_layers_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 64, 3), nn.Linear(5, 5))
    linear_before = model[1].weight.clone()
    init_conv_weights(model)
    fan_out = 64 * 3 * 3
    assert model[0].weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert torch.equal(model[1].weight, linear_before)


def test_stage_first_block_strides_and_widens_the_rest_keep_shape():
    layers = stage(BasicBlock, 16, 32, blocks=3, stride=2)
    assert len(layers) == 3
    assert layers(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    assert [b.conv1.stride for b in layers] == [(2, 2), (1, 1), (1, 1)]
    assert [b.conv1.in_channels for b in layers] == [16, 32, 32]
