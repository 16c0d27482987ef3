"""SoftHebb: the layer's update is the published rule, it normalises the kernels, and the
presets build the published shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.softhebb import SoftHebbConv2d, softhebb_delta, triangle
from model.softhebb_net import (
    CIFAR10_NET,
    DIGITS8_NET,
    GREY28_NET,
    SoftHebbNet,
    SoftHebbTraining,
    features_of,
    train_hebbian,
    train_readout,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slow_softhebb_step(
    x: torch.Tensor, weight: torch.Tensor, inverse_temperature: float, lr: float, plasticity: torch.Tensor
) -> torch.Tensor:
    """The rule written out patch by patch and kernel by kernel, straight from its formula."""
    n_kernels, _, k, _ = weight.shape
    p = k // 2
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    yx = torch.zeros_like(weight)
    yu = torch.zeros(n_kernels, dtype=weight.dtype)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                patch = padded[b, :, i : i + k, j : j + k]
                u = torch.stack([(weight[q] * patch).sum() for q in range(n_kernels)])
                y = torch.softmax(u * inverse_temperature, dim=0)
                winner = int(torch.argmax(y))
                for q in range(n_kernels):
                    signed = y[q] if q == winner else -y[q]
                    yx[q] += signed * patch
                    yu[q] += signed * u[q]
    delta = yx - yu.view(-1, 1, 1, 1) * weight
    delta = delta / delta.abs().max()
    updated = weight.clone()
    for q in range(n_kernels):
        eta = lr * plasticity[q] * math.sqrt(abs(float(weight[q].norm()) - 1.0) + 1e-10)
        updated[q] += eta * delta[q]
    return updated


def test_the_update_is_the_published_rule_computed_patch_by_patch():
    torch.manual_seed(0)
    layer = SoftHebbConv2d(2, 3, 3, lr=0.08, inverse_temperature=0.65, dtype=torch.float64)
    layer.plasticity.copy_(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    expected = slow_softhebb_step(x, layer.weight.detach().clone(), 0.65, 0.08, layer.plasticity)
    before = layer.weight.detach().clone()

    u = layer.learn(x)

    assert u.shape == (2, 3, 5, 5)
    torch.testing.assert_close(u, F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), before))
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(layer.weight[2], before[2])  # plasticity 0 freezes a kernel


def test_the_update_direction_is_scaled_to_a_largest_entry_of_one():
    torch.manual_seed(1)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    delta = softhebb_delta(padded, F.conv2d(padded, weight), weight, 1.0)
    assert delta.abs().max().item() == pytest.approx(1.0)


def test_kernel_norms_converge_towards_one_on_random_data():
    torch.manual_seed(2)
    layer = SoftHebbConv2d(2, 6, 3, lr=0.08)
    assert (layer.kernel_norms() - 1).abs().min() > 10  # initialised at radius 25
    generator = torch.Generator().manual_seed(3)
    for _ in range(150):
        layer.learn(torch.randn(10, 2, 8, 8, generator=generator))
    assert (layer.kernel_norms() - 1).abs().max() < 0.05


def test_initial_kernels_have_radius_25():
    torch.manual_seed(4)
    layer = SoftHebbConv2d(16, 512, 3, lr=0.01)
    assert layer.weight.std().item() == pytest.approx(25 / math.sqrt(16 * 9), rel=0.02)
    assert layer.kernel_norms().mean().item() == pytest.approx(25, rel=0.03)


def test_learning_needs_no_autograd_and_leaves_no_gradient():
    torch.manual_seed(5)
    layer = SoftHebbConv2d(1, 4, 3, lr=0.08)
    before = layer.weight.detach().clone()
    with torch.no_grad():
        layer.learn(torch.randn(2, 1, 6, 6))
    assert not torch.equal(layer.weight, before)
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    u = layer.learn(x)  # also outside no_grad: the update is never part of a graph
    assert not u.requires_grad
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_triangle_passes_only_channels_above_the_mean_raised_to_p():
    u = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)  # mean 3
    torch.testing.assert_close(triangle(u, 2.0).flatten(), torch.tensor([0.0, 0.0, 9.0]))


def test_the_cifar10_preset_is_the_published_network():
    layers = CIFAR10_NET.layers
    assert [layer.channels for layer in layers] == [96, 384, 1536]
    assert [layer.kernel_size for layer in layers] == [5, 3, 3]
    assert [layer.inverse_temperature for layer in layers] == [1.0, 0.65, 0.25]
    assert [layer.lr for layer in layers] == [0.08, 0.005, 0.01]
    assert [layer.power for layer in layers] == [0.7, 1.4, 1.0]
    pooling = [(layer.pool, layer.pool_kernel, layer.pool_stride, layer.pool_padding) for layer in layers]
    assert pooling == [("max", 4, 2, 1), ("max", 4, 2, 1), ("avg", 2, 2, 0)]
    assert SoftHebbNet(CIFAR10_NET).n_features == 24576  # built, not run: that is not a unit test


@pytest.mark.parametrize(("config", "features"), [(GREY28_NET, 128 * 7 * 7), (DIGITS8_NET, 32 * 2 * 2)])
def test_the_small_presets_classify_their_images(config, features):
    net = SoftHebbNet(config).eval()
    assert net.n_features == features
    images = torch.randn(3, config.in_channels, config.image_size, config.image_size)
    assert net(images).shape == (3, config.n_classes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_update_is_the_same_on_cuda():
    torch.manual_seed(7)
    layer = SoftHebbConv2d(3, 8, 5, lr=0.08, dtype=torch.float64)
    twin = SoftHebbConv2d(3, 8, 5, lr=0.08, dtype=torch.float64, device="cuda")
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    for _ in range(3):
        layer.learn(x)
        twin.learn(x.cuda())
    torch.testing.assert_close(twin.weight.cpu(), layer.weight, rtol=1e-9, atol=1e-12)


def test_layer_by_layer_training_changes_only_the_kernels_and_the_readout_learns():
    torch.manual_seed(6)
    net = SoftHebbNet(DIGITS8_NET)
    images = torch.randn(40, 1, 8, 8)
    labels = torch.arange(40) % 2
    before = {name: conv.weight.detach().clone() for name, conv in net.conv_layers().items()}
    readout_before = net.readout[1].weight.detach().clone()
    updates: list[int] = []

    train_hebbian(net, images, epochs=1, batch_size=10, on_batch=lambda i, _block: updates.append(i))

    assert updates == [0] * 4 + [1] * 4  # one block after the other
    assert all(not torch.equal(conv.weight, before[name]) for name, conv in net.conv_layers().items())
    assert torch.equal(net.readout[1].weight, readout_before)
    frozen = features_of(net, images)
    training = SoftHebbTraining(readout_epochs=3, readout_batch_size=10)
    loss = train_readout(net, images, labels, epochs=training.readout_epochs, batch_size=10)
    assert math.isfinite(loss)
    assert not torch.equal(net.readout[1].weight, readout_before)
    torch.testing.assert_close(features_of(net, images), frozen)  # the read-out never touches the blocks
