"""SoftHebb convolution (Journé, Garcia Rodriguez, Guo & Moraitis, ICLR 2023, "Hebbian deep
learning without feedback"): a soft winner-take-all Hebbian layer that learns without any
gradient reaching it.

For an input batch x (already batch-normalised by the block), reflect-padded to keep the
spatial size, the layer computes u = conv(x, W) without bias and, when learning,

    y_k    = softmax_k(u_k / tau)                  over channels, at every sample and position
    ỹ_k    = y_k for the winning channel, -y_k for the others        (anti-Hebbian competitors)
    ΔW_k   = Σ_{batch,positions} ỹ_k x_patch - (Σ_{batch,positions} ỹ_k u_k) W_k
    ΔW    /= max |ΔW|                                                  (over the whole layer)
    W_k   += η_k ΔW_k,   η_k = η m_k (| ||W_k||_2 - 1 | + 1e-10)^0.5

m_k is a per-kernel plasticity multiplier (1 by default) through which neuromodulation
slows or speeds single kernels. η_k shrinks as a kernel's norm reaches 1, which is where
the rule drives every kernel. The Σ ỹ x_patch term is the weight gradient of a convolution,
computed in one call; nothing here loops over kernels or samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

__all__ = ["INIT_RADIUS", "SoftHebbConv2d", "Triangle", "softhebb_delta", "triangle"]

INIT_RADIUS = 25.0  # expected norm of a kernel at initialisation
NORM_EPS = 1e-10  # keeps η_k above zero (and its square root defined) when a norm is exactly 1


def triangle(u: Tensor, power: float) -> Tensor:
    """The "triangle" activation: relu(u - mean over channels)^p; only above-average channels pass."""
    return F.relu(u - u.mean(dim=1, keepdim=True)).pow(power)


class Triangle(nn.Module):
    """`triangle` as a module, so hooks can read a block's activation from outside."""

    def __init__(self, power: float) -> None:
        super().__init__()
        self.power = power

    def forward(self, u: Tensor) -> Tensor:
        return triangle(u, self.power)

    def extra_repr(self) -> str:
        return f"power={self.power}"


def softhebb_delta(
    x_padded: Tensor, u: Tensor, weight: Tensor, inverse_temperature: float, *, stride: int = 1
) -> Tensor:
    """The layer's update direction ΔW, already divided by its largest absolute entry.

    `x_padded` is the input the convolution saw (N x C x H' x W'), `u` its output (N x K x H x W).
    """
    y = torch.softmax(u * inverse_temperature, dim=1)
    winners = F.one_hot(y.argmax(dim=1), num_classes=y.shape[1]).permute(0, 3, 1, 2).bool()
    signed = torch.where(winners, y, -y)
    hebbian = conv2d_weight(x_padded, weight.shape, signed, stride=stride)  # Σ ỹ_k x_patch per kernel
    decay = (signed * u).sum(dim=(0, 2, 3))  # Σ ỹ_k u_k per kernel
    delta = hebbian - decay.view(-1, 1, 1, 1) * weight
    return delta / delta.abs().amax().clamp_min(torch.finfo(delta.dtype).tiny)


class SoftHebbConv2d(nn.Module):
    """A square-kernel convolution with "same" reflect padding, learnt by the SoftHebb rule.

    `forward` only computes u; `learn` computes u and applies one update from that batch
    (with the weights from before the update, as a gradient step would). The weight is a
    parameter that never requires grad, so it travels with `state_dict` and `.to()` but no
    optimiser or autograd graph ever reaches it.
    """

    weight: Tensor
    plasticity: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        lr: float,
        inverse_temperature: float = 1.0,
        stride: int = 1,
        init_radius: float = INIT_RADIUS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so that reflect padding keeps the size, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.lr = lr
        self.inverse_temperature = inverse_temperature
        fan_in = in_channels * kernel_size * kernel_size
        weight = torch.randn(out_channels, in_channels, kernel_size, kernel_size, device=device, dtype=dtype)
        self.weight = nn.Parameter(weight * (init_radius / math.sqrt(fan_in)), requires_grad=False)
        # m_k: scales each kernel's learning rate; 0 freezes a kernel. Saved with the model.
        self.register_buffer("plasticity", torch.ones(out_channels, device=device, dtype=weight.dtype))

    def pad(self, x: Tensor) -> Tensor:
        p = self.padding
        return F.pad(x, (p, p, p, p), mode="reflect") if p else x

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self.pad(x), self.weight, stride=self.stride)

    def kernel_norms(self) -> Tensor:
        return torch.linalg.vector_norm(self.weight.flatten(1), dim=1)

    def kernel_lrs(self) -> Tensor:
        """η_k for the next update: the base rate, the kernel's plasticity and its distance from norm 1."""
        return self.lr * self.plasticity * ((self.kernel_norms() - 1.0).abs() + NORM_EPS).sqrt()

    @torch.no_grad()
    def learn(self, x: Tensor) -> Tensor:
        """One SoftHebb update from this batch; returns u computed before the update."""
        x_padded = self.pad(x.detach())
        u = F.conv2d(x_padded, self.weight, stride=self.stride)
        delta = softhebb_delta(x_padded, u, self.weight, self.inverse_temperature, stride=self.stride)
        self.weight.add_(self.kernel_lrs().view(-1, 1, 1, 1) * delta)
        return u

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"lr={self.lr}, inverse_temperature={self.inverse_temperature}, padding_mode=reflect"
        )
