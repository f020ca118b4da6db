"""Image-guided refinement of explanation maps: a coarse map (one value per grid cell) sharpened to
the image's own edges with a colour guided filter (He, Sun and Tang 2010), so a peak that bilinear
upsampling leaves between a thin object and its background moves onto the object's pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

REFINES = ("guided", "none")  # the default first


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, the window cut at the border: running sums, so the cost does not
    grow with the window (a pooling kernel of a 224 px map's 33 px window took ~0.5 s a map)."""
    return _window_sum(x, r) / _window_sum(torch.ones(x.shape[-2:], dtype=x.dtype), r)


def _window_sum(x: torch.Tensor, r: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    c = F.pad(x.double(), (1, 0, 1, 0)).cumsum(-2).cumsum(-1)  # float64: sums of differences stay exact
    y0, y1 = torch.arange(h).sub(r).clamp(min=0), torch.arange(h).add(r + 1).clamp(max=h)
    x0, x1 = torch.arange(w).sub(r).clamp(min=0), torch.arange(w).add(r + 1).clamp(max=w)
    rows = c[..., y1, :] - c[..., y0, :]
    return (rows[..., x1] - rows[..., x0]).to(x.dtype)


def guided_filter(maps: torch.Tensor, guide: torch.Tensor, radius: int, eps: float = 1e-2) -> torch.Tensor:
    """Maps [T, H, W] filtered under ``guide`` [3, H, W]: in each window the output is an affine
    function of the guide's colour fitted to the map (ridge ``eps``), averaged over the windows
    that cover a pixel. Where colour does not change, the map is smoothed; across a colour edge it
    follows the edge."""
    maps = maps.float()
    g = guide.detach().float().cpu()[None]  # [1, 3, H, W]
    r = max(1, int(radius))
    mean_g = _box(g, r)  # [1, 3, H, W]
    mean_p = _box(maps[:, None], r)  # [T, 1, H, W]
    cov_gp = _box(g * maps[:, None], r) - mean_g * mean_p  # [T, 3, H, W]
    var = [[_box(g[:, i] * g[:, j], r)[0] - mean_g[0, i] * mean_g[0, j] if j >= i else None for j in range(3)]
           for i in range(3)]  # the upper triangle: var is symmetric
    a = _solve3(var, eps, cov_gp)  # [T, 3, H, W]
    b = mean_p[:, 0] - (a * mean_g).sum(1)  # [T, H, W]
    return (_box(a, r) * g).sum(1) + _box(b[:, None], r)[:, 0]


def _solve3(var: list[list[torch.Tensor]], eps: float, rhs: torch.Tensor) -> torch.Tensor:
    """(var + eps I)^-1 rhs per pixel, var a symmetric 3x3 of [H, W] maps and rhs [T, 3, H, W], by
    cofactors: elementwise, where a batched ``linalg.solve`` over every pixel took most of a 224 px map."""
    a, b, c = var[0][0] + eps, var[0][1], var[0][2]
    d, e, f = var[1][1] + eps, var[1][2], var[2][2] + eps
    inv = [[d * f - e * e, c * e - b * f, b * e - c * d],
           [None, a * f - c * c, b * c - a * e],
           [None, None, a * d - b * b]]
    det = a * inv[0][0] + b * inv[0][1] + c * inv[0][2]
    full = [[inv[min(i, j)][max(i, j)] for j in range(3)] for i in range(3)]
    return torch.stack([sum(full[i][j] * rhs[:, j] for j in range(3)) / det for i in range(3)], dim=1)
