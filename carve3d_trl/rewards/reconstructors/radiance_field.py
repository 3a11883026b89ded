"""A built-in reconstructor: radiance fields (voxel grids) fitted to the views by differentiable volume rendering."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..cameras import CameraLayout
from ..crop import foreground_mask
from ..rays import camera_rays, intersect_box, project_points, scaled_size

__all__ = ["RadianceFieldReconstructor", "flush_denormal"]

_CHANNELS = 4  # density + RGB (with a triplane, the planes' features are added to the grid's)
_DENSITY_SCALE = 20.0
_PRESCAN_SAMPLES = 32


def _flush_denormal_enabled() -> bool:
    # There is no getter: a denormal survives a multiplication only when flushing is off.
    return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() == 0.0


@contextmanager
def flush_denormal() -> Iterator[None]:
    """Flush denormal floats to zero on CPU inside the block, then restore the previous mode.

    Transmittance products of volume rendering produce denormals, which are very slow on x86 CPUs.
    """
    previous = _flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


class _SparseMatmul(torch.autograd.Function):
    """`matrix @ dense` with a precomputed transpose for the backward pass (CSR on CPU and CUDA)."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor, matrix_t: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        ctx.matrix_t = matrix_t
        return matrix @ dense

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, ctx.matrix_t @ grad


@dataclass
class _Fields:
    """Fitted fields of a batch: the touched cells' features; the other cells keep the initial features."""

    init: torch.Tensor  # (cells, C) initial features, shared by every field
    active: torch.Tensor  # (n,) sorted indices of the touched cells into `blocks * cells`
    features: torch.Tensor  # (n, G, C) their fitted features, per group


@dataclass
class _Rays:
    """Sample points of a set of rays, each ray belonging to one sample of the batch (its "block")."""

    block: torch.Tensor  # (K,) sample index of each ray
    view: torch.Tensor  # (K,) view index of each ray
    pixel: torch.Tensor  # (K,) flat pixel index of each ray
    delta: torch.Tensor  # (K,) distance between consecutive samples
    hull: torch.Tensor  # (K, S, G) 1 where the point lies in the visual hull of group g, else 0
    matrix: torch.Tensor  # (K * S, blocks * cells) CSR interpolation matrix of the feature cells
    matrix_t: torch.Tensor  # its transpose, CSR


class RadianceFieldReconstructor:
    """Fits radiance fields to the views (one per sample and held-out view, or one per sample with `"same_view"`) and
    renders them at the layout's cameras.

    Each field is a voxel grid of `grid_resolution^3` cells over the cube `[-bound, bound]^3` holding density and RGB
    features (trilinearly interpolated), optionally plus a triplane of three `plane_resolution^2` feature planes whose
    bilinearly interpolated features are added; density is `20 * softplus(feature + density_offset)` per unit length
    and colour is `sigmoid(features)`. Fields are rendered by emission-absorption volume rendering composited over the
    layout's background. Density is confined to the visual hull of the field's training views (the silhouettes,
    foreground as in MRC's crop rule), so only rays through the silhouettes are traced and the samples of a ray are
    spread over the part of it inside the hull. All fields of a batch are fitted at once with Adam on a mean-squared
    photometric loss plus a total-variation and a density-sparsity term; only the cells the training rays touch are
    optimised (the others keep their seeded initial features). Fields are independent: a batch gives the same renders
    as its samples one by one, and the same seed gives the same renders.

    Why a voxel grid with a transparent start by default: a triplane shares each plane's features between all the
    points along the axis normal to it, so fitting a view also paints the surfaces behind what it sees, which the
    opposite view shows; with `"held_out"` any change to one view then moves the renders of the other views either
    way, and MRC stops worsening monotonically with the inconsistency of one view. An opaque start
    (`density_offset=-1`) leaves density in the empty parts of the visual hull and blurs the held-out renders. See
    `benchmarks/RESULTS.md` ("MRC reward"). The former default field is `grid_resolution=0, plane_resolution=32,
    density_offset=-1.0, fit_size=32, samples_per_ray=24`.

    Args:
        protocol (`str`): `"held_out"` (default): for each evaluated view, fit a field on the *other* views and
            render the evaluated view, so an inconsistent view cannot be reproduced by the field. `"same_view"`
            (the paper's protocol): fit one field on all views and re-render all of them.
        held_out_views (`int`, *optional*): With `"held_out"`, evaluate only this many views per sample, drawn
            with the seeded generator (the others get NaN renders). Default: all views.
        fit_size (`int`): Longest side, in pixels, of the views as fitted (they are downsampled, antialiased).
        render_size (`int`, *optional*): Longest side of the renders, at most the view size. Default: `fit_size`
            (a field fitted at a low resolution rendered larger is blurry, which MRC would count as inconsistency).
        grid_resolution (`int`): Side of the voxel grid (0: no grid).
        plane_resolution (`int`): Side of each plane of an added triplane (0, the default: no triplane).
        samples_per_ray (`int`): Samples per ray inside the visual hull.
        steps (`int`): Adam steps.
        learning_rate (`float`): Adam learning rate.
        tv_weight (`float`): Weight of the total variation (mean squared difference of neighbouring cells).
        sparsity_weight (`float`): Weight of the mean opacity of the samples.
        density_offset (`float`): Added to the density feature before the softplus: the initial density is
            `20 * softplus(density_offset)` per unit length (about 1 for -3, a mostly transparent start; 6 for -1).
        bound (`float`): Half side of the reconstructed cube, centred on the world origin.
        init_std (`float`): Standard deviation of the seeded initial features.
        seed (`int`): Seed of the initial features (and of `held_out_views`'s draw).
    """

    def __init__(
        self,
        protocol: str = "held_out",
        *,
        held_out_views: int | None = None,
        fit_size: int = 48,
        render_size: int | None = None,
        grid_resolution: int = 32,
        plane_resolution: int = 0,
        samples_per_ray: int = 16,
        steps: int = 100,
        learning_rate: float = 0.1,
        tv_weight: float = 0.03,
        sparsity_weight: float = 0.001,
        density_offset: float = -3.0,
        bound: float = 1.0,
        init_std: float = 0.01,
        seed: int = 0,
    ):
        if protocol not in ("held_out", "same_view"):
            raise ValueError(f"Unknown protocol {protocol!r}; valid protocols: 'held_out', 'same_view'.")
        if held_out_views is not None and (protocol != "held_out" or held_out_views < 1):
            raise ValueError("held_out_views must be a positive number of views and needs protocol='held_out'.")
        for name, resolution in (("grid_resolution", grid_resolution), ("plane_resolution", plane_resolution)):
            if resolution < 0 or resolution == 1:
                raise ValueError(f"{name} must be 0 (none) or at least 2, got {resolution}.")
        if grid_resolution == 0 and plane_resolution == 0:
            raise ValueError("A field needs a voxel grid or a triplane: grid_resolution or plane_resolution > 0.")
        self.protocol = protocol
        self.held_out_views = held_out_views
        self.fit_size = fit_size
        self.render_size = render_size
        self.grid_resolution = grid_resolution
        self.plane_resolution = plane_resolution
        self.samples_per_ray = samples_per_ray
        self.steps = steps
        self.learning_rate = learning_rate
        self.tv_weight = tv_weight
        self.sparsity_weight = sparsity_weight
        self.density_offset = density_offset
        self.bound = bound
        self.init_std = init_std
        self.seed = seed

    @torch.no_grad()
    def reconstruct(self, views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
        """Fit fields to `views` and render them at the layout's cameras.

        Args:
            views (`torch.Tensor` of shape `(B, V, 3, h, w)`): Views in [0, 1], on any device.
            layout (`CameraLayout`): Their cameras.

        Returns:
            `torch.Tensor` of shape `(B, V, 3, h', w')` in [0, 1], `max(h', w')` being the render size (at most
            `max(h, w)`): the render of each view by the field that held it out (`"held_out"`), or by the single
            field (`"same_view"`); NaN for views not evaluated.
        """
        batch, num_views, _, height, width = views.shape
        if num_views != layout.num_views:
            raise ValueError(f"Got {num_views} views for a layout of {layout.num_views} cameras.")
        if self.protocol == "held_out" and num_views < 2:
            raise ValueError("The held_out protocol needs at least 2 views.")
        generator = torch.Generator().manual_seed(self.seed)
        uses, render_field = self._plan(batch, num_views, generator)
        uses, render_field = uses.to(views.device), render_field.to(views.device)
        cameras = (layout.cam2world.to(views.device), layout.intrinsics.to(views.device))
        background = torch.tensor(layout.background, device=views.device)
        masks = F.max_pool2d(foreground_mask(views, layout.background).float(), 3, stride=1, padding=1) > 0
        fit_hw = scaled_size(height, width, self.fit_size)
        targets = F.interpolate(views.flatten(0, 1), size=fit_hw, mode="bilinear", antialias=True)
        targets = targets.view(batch, num_views, 3, *fit_hw)
        fit_candidates = F.adaptive_max_pool2d(masks.float(), fit_hw) > 0
        fit_candidates = F.max_pool2d(fit_candidates.float(), 3, stride=1, padding=1) > 0
        with torch.enable_grad(), flush_denormal():
            fields = self._fit(targets, fit_candidates, masks, uses, cameras, background, generator)
        return self._render(fields, masks, uses, render_field, cameras, background, (height, width))

    def _plan(self, batch: int, num_views: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Training views of each field, `(B, G, V)` bool, and the field rendering each view, `(B, V)` (-1: none)."""
        if self.protocol == "same_view":
            return torch.ones(batch, 1, num_views, dtype=torch.bool), torch.zeros(batch, num_views, dtype=torch.long)
        count = num_views if self.held_out_views is None else min(self.held_out_views, num_views)
        if count == num_views:
            held = torch.arange(num_views).expand(batch, -1)
        else:
            held = torch.stack(
                [torch.randperm(num_views, generator=generator)[:count].sort().values for _ in range(batch)]
            )
        uses = torch.ones(batch, count, num_views, dtype=torch.bool)
        uses.scatter_(2, held[:, :, None], False)
        render_field = torch.full((batch, num_views), -1, dtype=torch.long)
        render_field.scatter_(1, held, torch.arange(count).expand(batch, -1))
        return uses, render_field

    def _cells(self) -> int:
        """Feature cells of one field: the `r^3` voxels, then the `3 p^2` plane texels."""
        return self.grid_resolution**3 + 3 * self.plane_resolution**2

    def _fit(self, targets, candidates, masks, uses, cameras, background, generator) -> _Fields:
        batch, num_views, _, fit_h, fit_w = targets.shape
        groups = uses.shape[1]
        rays = self._sample_rays(candidates, masks, uses, uses, cameras, (fit_h, fit_w))
        colors = targets.permute(0, 1, 3, 4, 2).reshape(batch, num_views, fit_h * fit_w, 3)[
            rays.block, rays.view, rays.pixel
        ]
        in_loss = uses[rays.block, :, rays.view].float()  # (K, G): the ray's view is a training view of the group
        # Per-field normalisers that do not depend on the rest of the batch.
        pixel_norm = 1.0 / (3 * fit_h * fit_w * uses.sum(dim=2).clamp_min(1)).float()  # (B, G)
        sample_norm = pixel_norm * 3 / self.samples_per_ray

        init = (torch.randn(self._cells(), _CHANNELS, generator=generator) * self.init_std).to(targets.device)
        # Only the cells the rays touch are optimised, as a compact copy; the others keep their initial features.
        active, rays, pairs, pair_weight = self._compact(rays, batch)
        features = init[active % self._cells()][:, None].repeat(1, groups, 1).reshape(-1, groups * _CHANNELS)
        features.requires_grad_(True)
        optimizer = torch.optim.Adam([features], lr=self.learning_rate, betas=(0.9, 0.99))
        for _ in range(self.steps):
            color, alpha = self._composite(features, rays, background)
            error = (color - colors[:, None]).square().sum(-1) * in_loss  # (K, G)
            loss = (error * pixel_norm[rays.block]).sum()
            loss = loss + self.sparsity_weight * (alpha.sum(1) * in_loss * sample_norm[rays.block]).sum()
            # Per field, the mean squared difference of neighbouring cells (pairs with an untouched cell left out).
            tv = ((features[pairs[0]] - features[pairs[1]]).square().sum(dim=1) * pair_weight).sum()
            loss = loss + self.tv_weight * tv
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return _Fields(init, active, features.detach().view(-1, groups, _CHANNELS))

    def _compact(self, rays: _Rays, blocks: int) -> tuple[torch.Tensor, _Rays, torch.Tensor, torch.Tensor]:
        """Restrict the rays' interpolation matrix to the cells it touches.

        Returns:
            `active`, the touched cells `(n,)` (sorted indices into `blocks * cells`); the rays with matrices over the
            `n` active cells; `pairs` `(2, P)`, compact indices of active neighbours (along each axis of the grid and
            of each plane); `pair_weight` `(P,)`, the normaliser of each pair's squared difference.
        """
        res, cells = self.grid_resolution, self._cells()
        columns = rays.matrix.col_indices()
        active = columns.unique()
        compact = torch.full((blocks * cells,), -1, dtype=torch.long, device=columns.device)
        compact[active] = torch.arange(active.numel(), device=columns.device)
        size = (rays.matrix.shape[0], active.numel())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            matrix = torch.sparse_csr_tensor(
                rays.matrix.crow_indices(), compact[columns], rays.matrix.values(), size=size, check_invariants=False
            )
            matrix_t = matrix.t().to_sparse_csr()
        cell = active % cells
        index = torch.arange(active.numel(), device=columns.device)
        first, second, weight = [], [], []

        def add(selected, stride, norm):
            neighbour = compact[active[selected] + stride]
            both = neighbour >= 0
            first.append(index[selected][both])
            second.append(neighbour[both])
            weight.append(torch.full((int(both.sum()),), 1.0 / norm, device=columns.device))

        in_grid = cell < res**3
        if res:
            for stride, coordinate in ((res * res, cell // (res * res)), (res, cell // res % res), (1, cell % res)):
                add(in_grid & (coordinate < res - 1), stride, res * res * (res - 1) * _CHANNELS)
        pres = self.plane_resolution
        if pres:
            texel = cell - res**3
            for stride, coordinate in ((pres, texel // pres % pres), (1, texel % pres)):
                add(~in_grid & (coordinate < pres - 1), stride, 3 * pres * (pres - 1) * _CHANNELS)
        pairs = torch.stack([torch.cat(first), torch.cat(second)])
        return active, replace(rays, matrix=matrix, matrix_t=matrix_t), pairs, torch.cat(weight)

    def _render(self, fields: _Fields, masks, uses, render_field, cameras, background, view_hw) -> torch.Tensor:
        batch, num_views = render_field.shape
        device = fields.init.device
        out_h, out_w = scaled_size(*view_hw, self.render_size or self.fit_size)
        renders = torch.full((batch, num_views, 3, out_h, out_w), float("nan"), device=device)
        all_rays = torch.ones(1, num_views, out_h * out_w, dtype=torch.bool, device=device)
        cells = self._cells()
        bounds = torch.searchsorted(fields.active, torch.arange(batch + 1, device=device) * cells).tolist()
        for b in range(batch):
            active = fields.active[bounds[b] : bounds[b + 1]] - b * cells
            for v in range(num_views):
                field = int(render_field[b, v])
                if field < 0:
                    continue
                features = fields.init.clone()
                features[active] = fields.features[bounds[b] : bounds[b + 1], field]
                wanted = torch.zeros(1, 1, num_views, dtype=torch.bool, device=device)
                wanted[0, 0, v] = True
                rays = self._sample_rays(
                    all_rays.view(1, num_views, out_h, out_w),
                    masks[b : b + 1],
                    uses[b : b + 1, field : field + 1],
                    wanted,
                    cameras,
                    (out_h, out_w),
                )
                image = background.view(1, 3).repeat(out_h * out_w, 1)
                if rays.block.numel():
                    color, _ = self._composite(features, rays, background)
                    image[rays.pixel] = color[:, 0]
                renders[b, v] = image.t().reshape(3, out_h, out_w)
        return renders.clamp(0, 1)

    def _composite(self, cells: torch.Tensor, rays: _Rays, background: torch.Tensor):
        """Colours `(K, G, 3)` and sample opacities `(K, S, G)` of the rays for cell features `(cells, G * C)`."""
        num_rays, samples, groups = rays.hull.shape
        features = _SparseMatmul.apply(rays.matrix, rays.matrix_t, cells).view(num_rays, samples, groups, _CHANNELS)
        sigma = _DENSITY_SCALE * F.softplus(features[..., 0] + self.density_offset) * rays.hull
        rgb = torch.sigmoid(features[..., 1:])
        tau = sigma * rays.delta[:, None, None]
        transmittance = torch.exp(tau - tau.cumsum(dim=1))
        alpha = 1.0 - torch.exp(-tau)
        weights = transmittance * alpha
        color = (weights[..., None] * rgb).sum(dim=1) + (1.0 - weights.sum(dim=1))[..., None] * background
        return color, alpha

    def _sample_rays(self, candidates, masks, hull_views, wanted, cameras, size) -> _Rays:
        """Rays of the candidate pixels, sampled inside the visual hulls that need them.

        Args:
            candidates: `(B, V, h, w)` bool, pixels whose rays may be traced.
            masks: `(B, V, H, W)` bool, silhouettes defining the visual hulls.
            hull_views: `(B, G, V)` bool, the views whose silhouettes bound group g.
            wanted: `(B, G, V)` bool, whether group g needs the rays of view v.
            cameras: `(cam2world (V, 4, 4), intrinsics (V, 3, 3))`.
            size: `(h, w)` of the ray grid.
        """
        cam2world, intrinsics = cameras
        device = cam2world.device
        origins, directions = camera_rays(cam2world, intrinsics, *size)
        near, far, hit = intersect_box(origins, directions, self.bound)
        needed = wanted.any(dim=1)[:, :, None] & hit[None] & candidates.flatten(2)  # (B, V, N)
        block, view, pixel = needed.nonzero(as_tuple=True)

        # Pre-scan: find the part of each ray inside the hull of a group that needs the ray.
        steps = (torch.arange(_PRESCAN_SAMPLES, device=device) + 0.5) / _PRESCAN_SAMPLES
        t_near, t_far = near[view, pixel], far[view, pixel]
        t = t_near[:, None] + (t_far - t_near)[:, None] * steps
        points = origins[view, pixel][:, None] + directions[view, pixel][:, None] * t[..., None]
        inside = self._in_hulls(points, block, masks, hull_views, cameras)  # (K, S0, G)
        relevant = (inside & wanted[block, :, view][:, None, :]).any(dim=2)
        keep = relevant.any(dim=1)
        first = relevant.float().argmax(dim=1)
        last = _PRESCAN_SAMPLES - 1 - relevant.flip(1).float().argmax(dim=1)
        half_step = 0.5 * (t_far - t_near) / _PRESCAN_SAMPLES
        start = (t.gather(1, first[:, None])[:, 0] - 2 * half_step).clamp_min(t_near)
        end = (t.gather(1, last[:, None])[:, 0] + 2 * half_step).clamp_max(t_far)
        block, view, pixel, start, end = block[keep], view[keep], pixel[keep], start[keep], end[keep]

        steps = (torch.arange(self.samples_per_ray, device=device) + 0.5) / self.samples_per_ray
        t = start[:, None] + (end - start)[:, None] * steps
        points = origins[view, pixel][:, None] + directions[view, pixel][:, None] * t[..., None]
        hull = self._in_hulls(points, block, masks, hull_views, cameras).float()
        matrix, matrix_t = self._interpolation_matrix(points, block, masks.shape[0])
        delta = (end - start) / self.samples_per_ray
        return _Rays(block, view, pixel, delta, hull, matrix, matrix_t)

    @staticmethod
    def _in_hulls(points, block, masks, hull_views, cameras) -> torch.Tensor:
        """Whether points `(K, S, 3)` of sample `block` `(K,)` lie in each group's visual hull: `(K, S, G)` bool."""
        cam2world, intrinsics = cameras
        _, num_views, height, width = masks.shape
        uv, depth = project_points(points[:, :, None, :], cam2world, intrinsics)  # (K, S, V, 2), (K, S, V)
        col = (uv[..., 0] * width).floor().long()
        row = (uv[..., 1] * height).floor().long()
        valid = (depth > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
        view_index = torch.arange(num_views, device=points.device)
        flat = ((block[:, None, None] * num_views + view_index) * height + row.clamp(0, height - 1)) * width
        silhouette = masks.flatten()[flat + col.clamp(0, width - 1)] & valid  # (K, S, V)
        hull_views = hull_views[block][:, None]  # (K, 1, G, V)
        return (silhouette[:, :, None, :] | ~hull_views).all(dim=-1)

    def _interpolation_matrix(self, points: torch.Tensor, block: torch.Tensor, blocks: int):
        """Interpolation of the features at `points` `(K, S, 3)`: CSR `(K*S, blocks*cells)`.

        Trilinear in the voxel grid plus bilinear in each of the three planes of the triplane, whichever exist.
        """
        cells = self._cells()
        rows = points.shape[0] * points.shape[1]
        block_offset = block.repeat_interleave(points.shape[1]) * cells
        columns, values = [], []
        unit = (points.reshape(-1, 3) / self.bound + 1) * 0.5
        if self.grid_resolution:
            res = self.grid_resolution
            base, frac = _lattice_cell(unit, res)
            for dx, dy, dz in itertools.product((0, 1), repeat=3):
                wx = frac[:, 0] if dx else 1 - frac[:, 0]
                wy = frac[:, 1] if dy else 1 - frac[:, 1]
                wz = frac[:, 2] if dz else 1 - frac[:, 2]
                voxel = ((base[:, 0] + dx) * res + base[:, 1] + dy) * res + base[:, 2] + dz
                columns.append(block_offset + voxel)
                values.append(wx * wy * wz)
        if self.plane_resolution:
            res = self.plane_resolution
            base, frac = _lattice_cell(unit, res)
            block_offset = block_offset + self.grid_resolution**3
            for plane, (a, b) in enumerate(((0, 1), (0, 2), (1, 2))):
                for da, db in itertools.product((0, 1), repeat=2):
                    wa = frac[:, a] if da else 1 - frac[:, a]
                    wb = frac[:, b] if db else 1 - frac[:, b]
                    columns.append(block_offset + plane * res * res + (base[:, a] + da) * res + base[:, b] + db)
                    values.append(wa * wb)
        per_row = len(columns)
        columns = torch.stack(columns, dim=1).flatten()
        values = torch.stack(values, dim=1).flatten()
        crow = torch.arange(0, per_row * rows + 1, per_row, device=points.device)
        size = (rows, blocks * cells)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            matrix = torch.sparse_csr_tensor(crow, columns, values, size=size, check_invariants=False)
            matrix_t = matrix.t().to_sparse_csr()
        return matrix, matrix_t


def _lattice_cell(unit: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower corner `(N, 3)` (long) and fractional position `(N, 3)` of unit-cube points `(N, 3)` in the cell of a
    lattice with `resolution` nodes per side that holds them."""
    coords = (unit * (resolution - 1)).clamp(0, resolution - 1 - 1e-4)
    base = coords.floor()
    return base.long(), coords - base
