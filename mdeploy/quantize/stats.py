"""Second-moment statistics of a CONV/LINEAR layer's inputs, accumulated over calibration batches.

A layer is seen as ``G`` groups (1 for a dense conv or linear, ``groups`` for a grouped conv, one per channel for
a depthwise conv), each mapping input rows of ``K`` values (im2col patches, in the weight's (C/G, kh, kw) order) to
``R = O / G`` outputs. ``hessian`` is E[x x^T] over the rows ``x`` the layer is fed (by the quantised network in
sequential calibration), augmented with a trailing constant 1 for the bias; on large feature maps it is estimated
on a regular subset of positions. ``mean_input`` is the exact mean row over all positions (for bias correction:
a subset's mean is biased, e.g. by zero padding at the borders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mdeploy.graph.ir import ConvAttrs, Node, Op

PATCH_BYTES = 96 << 20  # largest im2col buffer built at once
ROWS_PER_GROUP = 1 << 17  # rows a layer's statistics are accumulated over, at most about
MIN_ROWS_PER_GROUP = 1 << 13
ROWS_PER_COLUMN = 128  # a K-column Hessian is well estimated from this many rows per column


class LayerStats:
    def __init__(self, node: Node, total_images: int = 0, out_positions: int = 1) -> None:
        if node.op not in (Op.CONV, Op.LINEAR):
            raise ValueError(f"{node.name}: statistics are for CONV/LINEAR nodes, not {node.op.value}")
        self.node = node
        weight = node.weight
        self.groups = node.attrs.groups if isinstance(node.attrs, ConvAttrs) else 1
        self.rows_per_group = weight.shape[0] // self.groups
        self.k = int(weight[0].size)
        self.hessian = torch.zeros(self.groups, self.k + 1, self.k + 1, dtype=torch.float64)
        self.rows = 0
        self.batches = 0
        self.input_sums = torch.zeros(self.groups, self.k, dtype=torch.float64)  # over every position
        self.positions = 0
        self.total_images = total_images  # for decimation of large feature maps (0: use every position)
        self.out_positions = out_positions  # output positions per image

    def weight(self) -> torch.Tensor:
        """The node's weight as (G, R, K) float64."""
        return torch.from_numpy(self.node.weight).double().reshape(self.groups, self.rows_per_group, self.k)

    def bias(self) -> torch.Tensor:
        return torch.from_numpy(self.node.bias).double().reshape(self.groups, self.rows_per_group)

    def _decimation(self, x: torch.Tensor) -> int:
        """Keep every d-th output position in each spatial direction so a group sees about ``ROWS_PER_COLUMN``
        rows per column of its Hessian, within [MIN_ROWS_PER_GROUP, ROWS_PER_GROUP] (offsets rotate between
        batches, so every position class is visited). Depthwise layers (10 columns) thus read a small subset of
        their large feature maps: their full im2col was half the quantisation time."""
        if self.node.op is Op.LINEAR or self.total_images == 0:
            return 1
        positions = self.out_positions * self.total_images
        target = min(ROWS_PER_GROUP, max(MIN_ROWS_PER_GROUP, ROWS_PER_COLUMN * (self.k + 1)))
        return max(1, int(math.sqrt(positions / target)))

    def patches(self, x: torch.Tensor, d: int = 1, offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """(G, rows, K) input rows of a batch ``x`` at output positions offset + d * (i, j)."""
        if self.node.op is Op.LINEAR:
            return x.reshape(1, -1, self.k)
        attrs = self.node.attrs
        assert isinstance(attrs, ConvAttrs)
        kh, kw = self.node.weight.shape[2:]
        sh, sw = attrs.stride
        top, bottom, left, right = attrs.padding
        if (kh, kw) == (1, 1) and attrs.padding == (0, 0, 0, 0):
            x = x[:, :, offset[0] * sh :: sh * d, offset[1] * sw :: sw * d]
            return x.permute(0, 2, 3, 1).reshape(-1, self.groups, self.k).transpose(0, 1)
        (dh, dw), n = attrs.dilation, x.shape[0]
        x = F.pad(x, (left, right, top, bottom))
        ho = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
        rows, cols = -(-(ho - offset[0]) // d), -(-(wo - offset[1]) // d)  # output positions kept
        # Strided views of the kernel taps at the kept positions only (F.unfold would copy the whole map first).
        taps = [
            x[:, :, i * dh + offset[0] * sh :: sh * d, j * dw + offset[1] * sw :: sw * d][:, :, :rows, :cols]
            for i in range(kh)
            for j in range(kw)
        ]
        patches = torch.stack(taps, dim=2).reshape(n, self.groups, self.k, rows * cols)
        return patches.permute(1, 0, 3, 2).reshape(self.groups, -1, self.k)

    def _images_per_step(self, x: torch.Tensor, d: int) -> int:
        kh, kw = self.node.weight.shape[2:] if self.node.op is Op.CONV else (1, 1)
        per_image = x[0].numel() * kh * kw * 4 * 2 // (d * d)
        return max(1, PATCH_BYTES // max(per_image, 1))

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a batch of the layer's input."""
        sums, positions = patch_sums(self.node, x.sum(0))
        self.input_sums += sums
        self.positions += positions * x.shape[0]
        d = self._decimation(x)
        step = self._images_per_step(x, d)
        k = self.k
        for i in range(0, x.shape[0], step):
            offset = (self.batches % d, (self.batches // d) % d)
            self.batches += 1
            rows = self.patches(x[i : i + step].float(), d, offset)
            self.hessian[:, :k, :k] += (rows.transpose(1, 2) @ rows).double()
            sums = rows.sum(1).double()
            self.hessian[:, :k, k] += sums
            self.hessian[:, k, :k] += sums
            self.hessian[:, k, k] += rows.shape[1]
            self.rows += rows.shape[1]

    def mean_input(self) -> torch.Tensor:
        """(G, K) mean input row over every output position (the Hessian may use a subset of positions)."""
        return self.input_sums / max(self.positions, 1)

    def normalised(self) -> torch.Tensor:
        """E[x x^T] over augmented rows (G, K + 1, K + 1)."""
        return self.hessian / max(self.rows, 1)


def patch_sums(node: Node, x_sum: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sums over output positions of a layer's input rows, from its input summed over the batch (C, H, W) or
    (K,): (G, K) in the weight's order, and the number of output positions per image."""
    weight = node.weight
    if node.op is Op.LINEAR:
        return x_sum.reshape(1, -1).double(), 1
    attrs = node.attrs
    assert isinstance(attrs, ConvAttrs)
    kh, kw = weight.shape[2:]
    (sh, sw), (dh, dw) = attrs.stride, attrs.dilation
    top, bottom, left, right = attrs.padding
    xp = F.pad(x_sum.double()[None], (left, right, top, bottom))[0]
    ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    sums = [
        xp[:, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw].sum((1, 2))
        for i in range(kh)
        for j in range(kw)
    ]
    groups = attrs.groups
    return torch.stack(sums, dim=1).reshape(groups, -1), ho * wo
