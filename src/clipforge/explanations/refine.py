"""Image-guided refinement of explanation maps: a coarse map (one value per grid cell) sharpened to
the image's own edges with a colour guided filter (He, Sun and Tang 2010), so a peak that bilinear
upsampling leaves between a thin object and its background moves onto the object's pixels.

Written here rather than taken from kornia (``guided_blur``): that would be a new dependency of the
core package, and it ran slower on these maps (benchmarks/explain/bench_guided.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

REFINES = ("guided", "none")  # the default first


def _window_mean(h: int, w: int, r: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [..., h, w] -> its mean over each (2r+1)^2 window, the window cut at the border. Running sums:
    the cost does not grow with the window, which spans a whole grid cell of a large image."""
    y0, y1 = torch.arange(h).sub(r).clamp(min=0), torch.arange(h).add(r + 1).clamp(max=h)
    x0, x1 = torch.arange(w).sub(r).clamp(min=0), torch.arange(w).add(r + 1).clamp(max=w)

    def window_sum(x: torch.Tensor) -> torch.Tensor:
        c = F.pad(x.double(), (1, 0, 1, 0)).cumsum(-2).cumsum(-1)  # float64: differences of sums stay exact
        rows = c[..., y1, :] - c[..., y0, :]
        return rows[..., x1] - rows[..., x0]

    count = window_sum(torch.ones(h, w))
    return lambda x: (window_sum(x) / count).to(x.dtype)


def guided_filter(maps: torch.Tensor, guide: torch.Tensor, radius: int, eps: float = 1e-2) -> torch.Tensor:
    """Maps [T, H, W] filtered under ``guide`` [3, H, W]: in each window the output is an affine
    function of the guide's colour fitted to the map (ridge ``eps``), averaged over the windows
    that cover a pixel. Where colour does not change, the map is smoothed; across a colour edge it
    follows the edge."""
    maps = maps.float()
    g = guide.detach().float().cpu()  # [3, H, W]
    mean = _window_mean(*g.shape[-2:], max(1, int(radius)))
    mean_g = mean(g)  # [3, H, W]
    mean_p = mean(maps)  # [T, H, W]
    cov_gp = mean(g * maps[:, None]) - mean_g * mean_p[:, None]  # [T, 3, H, W]

    def var(i: int, j: int) -> torch.Tensor:
        return mean(g[i] * g[j]) - mean_g[i] * mean_g[j]

    a = _solve3(var(0, 0) + eps, var(0, 1), var(0, 2), var(1, 1) + eps, var(1, 2), var(2, 2) + eps, cov_gp)
    b = mean_p - (a * mean_g).sum(1)  # [T, H, W]
    return (mean(a) * g).sum(1) + mean(b)


def _solve3(a, b, c, d, e, f, rhs: torch.Tensor) -> torch.Tensor:
    """[[a b c] [b d e] [c e f]]^-1 rhs at every pixel (each entry an [H, W] map, rhs [T, 3, H, W]),
    by the adjugate: elementwise, cheaper than a batched ``linalg.solve`` over every pixel."""
    adj = ((d * f - e * e, c * e - b * f, b * e - c * d),
           (c * e - b * f, a * f - c * c, b * c - a * e),
           (b * e - c * d, b * c - a * e, a * d - b * b))  # symmetric
    det = a * adj[0][0] + b * adj[0][1] + c * adj[0][2]
    return torch.stack([sum(adj[i][j] * rhs[:, j] for j in range(3)) / det for i in range(3)], dim=1)
