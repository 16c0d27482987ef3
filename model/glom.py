"""GLOM (Hinton 2021, "How to represent part-whole hierarchies in a neural network").

Every image location (a pixel, or a p x p patch) holds a column of L level embeddings
of D dimensions; all columns share weights. Level 0 holds the input and is never
updated. For T iterations every other level is replaced, everywhere at once, by a
weighted average of

- its previous value,
- a bottom-up prediction from the level below (a small MLP per level pair),
- a top-down prediction from the level above given the location's position
  embedding (a small MLP per level pair; the top level has none),
- a lateral term over the window x window neighbourhood at the same level:
  ``attention``: the paper's parameter-free attention, weights
  ``softmax_y(beta * <e_x, e_y>)`` over the neighbours y (the location itself
  included, so the weights stay defined at a non-wrapping border and an isolated
  location keeps its own vote), averaging the neighbours' embeddings;
  ``concat``: an MLP over the concatenated neighbour embeddings (no attention; the
  variant behind the 91% MNIST figure this project was asked to check);
  ``none``: no lateral term (an ablation).

The MLPs are 1x1 convolutions (grouped over levels), neighbourhoods are stacks of
shifted copies of the state (torch.roll when toroidal), so one iteration is a few
tensor operations over the whole batch and every location.

The top level is read as class scores (the embedding itself when D equals the number
of classes, else through a linear head) and trained toward the one-hot class with MSE
at every location, with Gaussian noise added to the updated levels during training, as
in neural cellular automata; the prediction is the vote of all locations. An optional
denoising objective corrupts some input locations and asks level 1 to reconstruct them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Glom",
    "GlomConfig",
    "GlomOutput",
    "attention_average",
    "attention_weights",
    "neighbourhood",
    "position_embedding",
    "vote",
    "window_offsets",
]

Lateral = Literal["attention", "concat", "none"]
Column = Literal["pixel", "patch"]


@dataclass(frozen=True)
class GlomConfig:
    """Everything a GLOM network depends on. The defaults are 4 levels of 10 dimensions over pixel columns for
    30 iterations, with the top level read directly as the 10 class scores."""

    levels: int = 4
    dim: int = 10
    iterations: int = 30
    n_classes: int = 10
    in_channels: int = 1
    column: Column = "pixel"
    patch_size: int = 4  # patch columns only: each column sees a patch_size x patch_size patch
    hidden: int = 32  # width of the bottom-up, top-down and concat-lateral MLPs
    lateral: Lateral = "attention"
    # Bottom-up and top-down MLPs read the concatenated window of the level below / above instead of their own
    # column's embedding (with lateral="concat": the variant behind the 91% figure, every net a 3x3 convolution).
    window_inputs: bool = False
    beta: float = 1.0  # attention sharpness: weights are softmax(beta * <e_x, e_y>)
    window: int = 3  # the neighbourhood is window x window (odd)
    toroidal: bool = True  # neighbourhoods wrap around the image edges
    # Weights of the previous value, bottom-up, top-down and lateral terms in the new embedding
    # (renormalised where a term is absent: the top level has no top-down term).
    mix: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    position_frequencies: int = 2  # sinusoidal position embedding: 4 * frequencies channels
    linear_head: bool = False  # False: the top embedding is the class scores (needs dim == n_classes)
    noise_std: float = 0.05  # Gaussian noise added to the updated levels each iteration while training
    loss_iterations: int = 1  # the class loss averages the last this-many iterations
    denoise: bool = False  # also train level 1 to reconstruct corrupted input locations
    corrupt_fraction: float = 0.25
    denoise_weight: float = 1.0
    checkpointing: bool = False  # recompute each iteration in the backward pass: memory O(1) in iterations

    def __post_init__(self) -> None:
        if self.levels < 2:
            raise ValueError("GLOM needs at least an input level and a top level (levels >= 2)")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be odd and positive, not {self.window}")
        if self.iterations < 1:
            raise ValueError("iterations must be at least 1")
        if not 1 <= self.loss_iterations <= self.iterations:
            raise ValueError("loss_iterations must lie in 1..iterations")
        if not self.linear_head and self.dim != self.n_classes:
            raise ValueError(
                f"the top embedding is read as class scores: dim ({self.dim}) must equal "
                f"n_classes ({self.n_classes}), or set linear_head=True"
            )
        top_level_mix = self.mix[0] + self.mix[1] + (self.mix[3] if self.lateral != "none" else 0.0)
        if len(self.mix) != 4 or min(self.mix) < 0 or top_level_mix <= 0:
            raise ValueError("mix holds four non-negative weights, and the top level's must not all be 0")

    @property
    def stride(self) -> int:
        """Pixels per column side."""
        return self.patch_size if self.column == "patch" else 1

    @property
    def position_dim(self) -> int:
        return 4 * self.position_frequencies

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The column grid of an image of this size."""
        if height % self.stride or width % self.stride:
            raise ValueError(f"a {height}x{width} image does not split into {self.stride}x{self.stride} patches")
        return height // self.stride, width // self.stride


@dataclass
class GlomOutput:
    """What one pass computes. `class_scores[:, t]` is the top level read as class scores after iteration t + 1."""

    state: torch.Tensor  # (B, L, D, H, W) after the last iteration
    class_scores: torch.Tensor  # (B, T, n_classes, H, W)
    states: torch.Tensor | None = None  # (B, T, L, D, H, W) when asked for: the state after every iteration
    reconstruction: torch.Tensor | None = None  # (B, C * p * p, H, W) with denoising: level 1's input prediction

    def prediction(self, iteration: int = -1) -> torch.Tensor:
        """The locations' vote (B,) after an iteration (the last by default)."""
        return vote(self.class_scores[:, iteration])


# ---------------------------------------------------------------- neighbourhoods and attention


def window_offsets(window: int) -> list[tuple[int, int]]:
    """The (dy, dx) of the window x window neighbourhood in row-major order; the centre (0, 0) is the middle one."""
    r = window // 2
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]


def neighbourhood(x: torch.Tensor, window: int, toroidal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of every location of x (..., C, H, W) as (..., K, C, H, W), K = window**2, where entry k at
    (i, j) is x at (i + dy_k, j + dx_k), and a (K, H, W) mask of the neighbours inside the image (all true when
    toroidal: indices wrap; otherwise outside neighbours are zeros and masked out)."""
    offsets = window_offsets(window)
    height, width = x.shape[-2:]
    if toroidal:
        shifted = [torch.roll(x, shifts=(-dy, -dx), dims=(-2, -1)) for dy, dx in offsets]
        inside = torch.ones(len(offsets), height, width, dtype=torch.bool, device=x.device)
        return torch.stack(shifted, dim=-4), inside
    r = window // 2
    padded = F.pad(x, (r, r, r, r))
    shifted = [padded[..., r + dy : r + dy + height, r + dx : r + dx + width] for dy, dx in offsets]
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    dys = torch.tensor([dy for dy, _ in offsets], device=x.device).view(-1, 1, 1)
    dxs = torch.tensor([dx for _, dx in offsets], device=x.device).view(-1, 1, 1)
    inside = (rows + dys >= 0) & (rows + dys < height) & (cols + dxs >= 0) & (cols + dxs < width)
    return torch.stack(shifted, dim=-4), inside


def attention_weights(
    embeddings: torch.Tensor, beta: float, window: int = 3, toroidal: bool = True, include_self: bool = True
) -> torch.Tensor:
    """softmax over the neighbours y of beta * <e_x, e_y>, for embeddings (..., D, H, W): (..., K, H, W)."""
    weights, _ = _attention(embeddings, beta, window, toroidal, include_self)
    return weights


def attention_average(
    embeddings: torch.Tensor, beta: float, window: int = 3, toroidal: bool = True, include_self: bool = True
) -> torch.Tensor:
    """The attention-weighted average of the neighbours' embeddings, same shape as `embeddings`."""
    weights, neighbours = _attention(embeddings, beta, window, toroidal, include_self)
    return (weights.unsqueeze(-3) * neighbours).sum(dim=-4)


def _attention(
    embeddings: torch.Tensor, beta: float, window: int, toroidal: bool, include_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    neighbours, inside = neighbourhood(embeddings, window, toroidal)
    logits = beta * (neighbours * embeddings.unsqueeze(-4)).sum(dim=-3)  # (..., K, H, W)
    allowed = inside.clone()
    if not include_self:
        allowed[len(window_offsets(window)) // 2] = False
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-3), neighbours


def position_embedding(height: int, width: int, frequencies: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoids of the normalised row and column (4 * frequencies, H, W); any grid size, no parameters."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=device, dtype=torch.float32)
    y = (scales.view(-1, 1, 1) * ys.view(1, -1, 1)).expand(frequencies, height, width)
    x = (scales.view(-1, 1, 1) * xs.view(1, 1, -1)).expand(frequencies, height, width)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=0)


def vote(class_scores: torch.Tensor) -> torch.Tensor:
    """Each location votes for its highest class score; (B, C, H, W) -> (B,) the most voted class (ties: lowest)."""
    n_classes = class_scores.shape[1]
    ballots = F.one_hot(class_scores.argmax(dim=1).flatten(1), n_classes)  # (B, H*W, C)
    return ballots.sum(dim=1).argmax(dim=1)


# ---------------------------------------------------------------- the network


class ColumnMLPs(nn.Module):
    """`groups` independent two-layer MLPs, each applied at every location:
    (B, G, d_in, H, W) -> (B, G, d_out, H, W)."""

    def __init__(self, groups: int, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.groups, self.d_out = groups, d_out
        self.net = nn.Sequential(
            nn.Conv2d(groups * d_in, groups * d_hidden, 1, groups=groups),
            nn.GELU(),
            nn.Conv2d(groups * d_hidden, groups * d_out, 1, groups=groups),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, _, height, width = x.shape
        out = self.net(x.flatten(1, 2))
        return out.view(batch, self.groups, self.d_out, height, width)


class Glom(nn.Module):
    """GLOM over pixel or patch columns; see the module docstring. `loss` and `predict` make it a classifier."""

    mix: torch.Tensor  # (4, L - 1): the weights of previous value, bottom-up, top-down, lateral per level

    def __init__(self, config: GlomConfig) -> None:
        super().__init__()
        self.config = c = config
        n_updated = c.levels - 1
        self.embed = nn.Conv2d(c.in_channels, c.dim, c.stride, stride=c.stride)  # the input level
        self.initial = nn.Parameter(torch.zeros(n_updated, c.dim))  # every location starts from these
        read = c.window**2 * c.dim if c.window_inputs else c.dim  # what a bottom-up or top-down MLP reads
        self.bottom_up = ColumnMLPs(n_updated, read, c.hidden, c.dim)
        self.top_down = ColumnMLPs(c.levels - 2, read + c.position_dim, c.hidden, c.dim) if c.levels > 2 else None
        self.lateral = ColumnMLPs(n_updated, c.window**2 * c.dim, c.hidden, c.dim) if c.lateral == "concat" else None
        self.head = nn.Conv2d(c.dim, c.n_classes, 1) if c.linear_head else None
        self.decoder = (
            ColumnMLPs(1, c.dim + c.position_dim, c.hidden, c.in_channels * c.stride**2) if c.denoise else None
        )
        w_prev, w_up, w_down, w_lateral = c.mix
        mix = torch.tensor([w_prev, w_up, w_down, w_lateral if c.lateral != "none" else 0.0])
        mix = mix.view(4, 1).repeat(1, n_updated)
        mix[2, -1] = 0.0  # the top level has nothing above it
        self.register_buffer("mix", mix / mix.sum(dim=0), persistent=False)  # (4 terms, L - 1 levels)

    # -- one iteration

    def _lateral(self, upper: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.lateral == "attention":
            return attention_average(upper, c.beta, c.window, c.toroidal)
        if c.lateral == "concat":
            assert self.lateral is not None
            neighbours, _ = neighbourhood(upper, c.window, c.toroidal)  # zeros outside when not toroidal
            return self.lateral(neighbours.flatten(2, 3))
        return torch.zeros_like(upper)

    def _read(self, levels: torch.Tensor) -> torch.Tensor:
        """What the bottom-up and top-down MLPs see of (B, G, D, H, W): each column, or its concatenated window."""
        if not self.config.window_inputs:
            return levels
        neighbours, _ = neighbourhood(levels, self.config.window, self.config.toroidal)
        return neighbours.flatten(2, 3)

    def _step(self, state: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One synchronous update of levels 1..L-1 from the previous state (B, L, D, H, W)."""
        c = self.config
        batch, _, _, height, width = state.shape
        upper = state[:, 1:]
        if self.training and c.noise_std > 0:
            upper = upper + c.noise_std * torch.randn_like(upper)
        below = torch.cat([state[:, :1], upper[:, :-1]], dim=1)
        up = self.bottom_up(self._read(below))
        if self.top_down is not None:
            above = self._read(upper[:, 1:])
            where = position.expand(batch, above.shape[1], -1, height, width)
            down = F.pad(self.top_down(torch.cat([above, where], dim=2)), (0, 0, 0, 0, 0, 0, 0, 1))
        else:
            down = torch.zeros_like(up)
        lateral = self._lateral(upper)

        weights = self.mix.view(4, 1, -1, 1, 1, 1)
        new = weights[0] * upper + weights[1] * up + weights[2] * down + weights[3] * lateral
        return torch.cat([state[:, :1], new], dim=1)

    # -- passes

    def initial_state(self, images: torch.Tensor, corrupt: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D, H, W): the embedded input at level 0, the learned start vectors above it.
        `corrupt` (B, 1, H, W) bool over the column grid blanks those columns' input (to 0, the data mean)."""
        c = self.config
        if corrupt is not None:
            pixels = corrupt.repeat_interleave(c.stride, dim=-2).repeat_interleave(c.stride, dim=-1)
            images = images.masked_fill(pixels, 0.0)
        bottom = self.embed(images)
        batch, _, height, width = bottom.shape
        upper = self.initial.view(1, -1, c.dim, 1, 1).expand(batch, -1, -1, height, width)
        return torch.cat([bottom.unsqueeze(1), upper], dim=1)

    def class_scores(self, state: torch.Tensor) -> torch.Tensor:
        """The top level read as class scores (B, n_classes, H, W)."""
        top = state[:, -1]
        return self.head(top) if self.head is not None else top

    def forward(
        self,
        images: torch.Tensor,
        *,
        iterations: int | None = None,
        keep_states: bool = False,
        corrupt: torch.Tensor | None = None,
    ) -> GlomOutput:
        c = self.config
        state = self.initial_state(images, corrupt)
        height, width = state.shape[-2:]
        position = position_embedding(height, width, c.position_frequencies, images.device).view(
            1, 1, c.position_dim, height, width
        )
        recompute = c.checkpointing and torch.is_grad_enabled() and self.training
        scores, states = [], []
        for _ in range(iterations or c.iterations):
            if recompute:
                state = checkpoint(self._step, state, position, use_reentrant=False)
            else:
                state = self._step(state, position)
            scores.append(self.class_scores(state))
            if keep_states:
                states.append(state)
        reconstruction = None
        if self.decoder is not None:
            level_one = torch.cat([state[:, 1:2], position.expand(state.shape[0], 1, -1, height, width)], dim=2)
            reconstruction = self.decoder(level_one)[:, 0]
        return GlomOutput(
            state=state,
            class_scores=torch.stack(scores, dim=1),
            states=torch.stack(states, dim=1) if keep_states else None,
            reconstruction=reconstruction,
        )

    # -- as a classifier

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """MSE of every location's class scores to the one-hot class over the last `loss_iterations` iterations,
        plus the weighted reconstruction MSE of the corrupted input columns when denoising."""
        c = self.config
        corrupt = None
        if c.denoise and self.training:
            grid = c.grid(*images.shape[-2:])
            corrupt = torch.rand(images.shape[0], 1, *grid, device=images.device) < c.corrupt_fraction
        output = self(images, corrupt=corrupt)
        target = F.one_hot(labels, c.n_classes).to(output.class_scores.dtype).view(-1, 1, c.n_classes, 1, 1)
        scores = output.class_scores[:, -c.loss_iterations :]
        loss = F.mse_loss(scores, target.expand_as(scores))
        if corrupt is not None and output.reconstruction is not None:
            clean = F.pixel_unshuffle(images, c.stride) if c.stride > 1 else images
            error = (output.reconstruction - clean).pow(2).mean(dim=1, keepdim=True)
            loss = loss + c.denoise_weight * (error * corrupt).sum() / corrupt.sum().clamp(min=1)
        return loss

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).prediction()

    @torch.no_grad()
    def predict_by_iteration(self, images: torch.Tensor) -> torch.Tensor:
        """(B, T): the vote after every iteration, for accuracy against iterations."""
        scores = self(images).class_scores
        return torch.stack([vote(scores[:, t]) for t in range(scores.shape[1])], dim=1)
