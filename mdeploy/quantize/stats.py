"""Second-moment statistics of a CONV/LINEAR layer's inputs, accumulated over calibration batches.

A layer is seen as ``G`` groups (1 for a dense conv or linear, ``groups`` for a grouped conv, one per channel for
a depthwise conv), each mapping input rows of ``K`` values (im2col patches, in the weight's (C/G, kh, kw) order) to
``R = O / G`` outputs. ``hessian`` is E[xq xq^T] and ``cross`` E[xq xf^T], with ``xq`` the rows the quantised
network feeds the layer augmented with a trailing constant 1 (the bias), and ``xf`` the float model's rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mdeploy.graph.ir import ConvAttrs, Node, Op

PATCH_BYTES = 96 << 20  # largest im2col buffer built at once


class LayerStats:
    def __init__(self, node: Node) -> None:
        if node.op not in (Op.CONV, Op.LINEAR):
            raise ValueError(f"{node.name}: statistics are for CONV/LINEAR nodes, not {node.op.value}")
        self.node = node
        weight = node.weight
        self.groups = node.attrs.groups if isinstance(node.attrs, ConvAttrs) else 1
        self.rows_per_group = weight.shape[0] // self.groups
        self.k = int(weight[0].size)
        self.hessian = torch.zeros(self.groups, self.k + 1, self.k + 1, dtype=torch.float64)
        self.cross = torch.zeros(self.groups, self.k + 1, self.k, dtype=torch.float64)
        self.rows = 0

    def weight(self) -> torch.Tensor:
        """The node's weight as (G, R, K) float64."""
        return torch.from_numpy(self.node.weight).double().reshape(self.groups, self.rows_per_group, self.k)

    def bias(self) -> torch.Tensor:
        return torch.from_numpy(self.node.bias).double().reshape(self.groups, self.rows_per_group)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(G, rows, K) input rows of a batch ``x``."""
        if self.node.op is Op.LINEAR:
            return x.reshape(1, -1, self.k)
        attrs = self.node.attrs
        assert isinstance(attrs, ConvAttrs)
        kh, kw = self.node.weight.shape[2:]
        top, bottom, left, right = attrs.padding
        if (kh, kw) == (1, 1) and attrs.padding == (0, 0, 0, 0):
            x = x[:, :, :: attrs.stride[0], :: attrs.stride[1]]
            cols = x.reshape(x.shape[0], self.groups, self.k, -1)
        else:
            if attrs.symmetric_padding is None:
                x = F.pad(x, (left, right, top, bottom))
                padding: tuple[int, int] = (0, 0)
            else:
                padding = attrs.symmetric_padding
            cols = F.unfold(x, (kh, kw), dilation=attrs.dilation, padding=padding, stride=attrs.stride)
            cols = cols.reshape(x.shape[0], self.groups, self.k, -1)
        return cols.permute(1, 0, 3, 2).reshape(self.groups, -1, self.k)

    def _images_per_step(self, x: torch.Tensor) -> int:
        kh, kw = self.node.weight.shape[2:] if self.node.op is Op.CONV else (1, 1)
        per_image = x[0].numel() * kh * kw * 4 * 2
        return max(1, PATCH_BYTES // max(per_image, 1))

    def add(self, xq: torch.Tensor, xf: torch.Tensor) -> None:
        step = self._images_per_step(xq)
        for i in range(0, xq.shape[0], step):
            pq = self.patches(xq[i : i + step].float())
            pf = pq if xf is xq else self.patches(xf[i : i + step].float())
            ones = torch.ones(pq.shape[0], pq.shape[1], 1)
            pq = torch.cat([pq, ones], dim=-1)
            self.hessian += (pq.transpose(1, 2) @ pq).double()
            self.cross += (pq.transpose(1, 2) @ pf).double()
            self.rows += pq.shape[1]

    def normalised(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E[xq xq^T] and E[xq xf^T] (sums divided by the number of rows)."""
        n = max(self.rows, 1)
        return self.hessian / n, self.cross / n
