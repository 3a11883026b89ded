"""The default reconstructor: the visual hull of the views' silhouettes, painted with the views' colours."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..cameras import CameraLayout
from ..crop import foreground_mask
from ..rays import camera_rays, intersect_box, project_points, scaled_size

__all__ = ["VisualHullReconstructor"]

_PROTOCOL_OWN_VIEW_PENALTY = {"held_out": 3.0, "same_view": 0.0}
_SURFACES = ("rounded", "hull")
_PACK = 8  # samples whose silhouettes share one byte in the ray march
_RAY_CHUNK = 8192  # rays marched at once through the rounded shape


class VisualHullReconstructor:
    """Carves the visual hull of the views (the points whose projection lies inside every view's silhouette) and
    renders it at the layout's cameras, painting each visible surface point with the colours the views show there.

    No optimisation and no randomness: the reconstruction is exact geometry (a ray march to the first hull point,
    refined by bisection) and image-based colour. The hull of four views is larger than the object (a sphere's
    bulges by 41% towards the diagonals between the views), which puts the views' colours in the wrong places; by
    default the colours are therefore placed on a rounder shape inside the hull (`surface`), while the renders keep
    the hull's silhouettes. A point's colour is a weighted mean of the views' colours at its
    projections; a view's weight falls with how far the point lies behind that view's own first surface (it is
    occluded there), and with `"held_out"` the rendered view itself is penalised, so its render shows what the *other*
    views see wherever they see it and its own colours only where no other view does (blended there with the colours
    extended from the nearby parts the others see, a weak prior). Inconsistency therefore shows
    up twice: a silhouette that disagrees with the others carves the hull (every render loses area), and
    colours that disagree with the other views' are replaced by theirs. Foreground colours are bled a few pixels past
    the silhouettes before sampling, so points projecting onto an anti-aliased edge do not pick up the background.

    Silhouettes follow MRC's crop rule (`foreground_mask`). Renders are made at the views' size (at most
    `render_size`): no blur to mistake for inconsistency. A batch costs less than its samples one by one: the ray
    geometry is cached across calls, and the ray march reads the silhouettes of 8 samples at once (packed in the bits
    of one byte); each sample's renders do not depend on the rest of the batch. See `benchmarks/RESULTS.md`
    ("MRC reward") for the validity study that chose the defaults.

    Args:
        protocol (`str`): `"held_out"` (default): a render's colours come from the other views where they see the
            point (`own_view_penalty` 3). `"same_view"` (the paper's protocol): every view that sees the point weighs
            the same, the rendered one included (penalty 0).
        surface (`str`): Where the colours are placed. `"rounded"` (default): on the points of the hull whose
            positions across the silhouettes' rows, `s_v` in [-1, 1] from the left to the right edge of the row's
            foreground run in view `v`, satisfy `sum_v s_v^2 <= V / 2`: a round cross-section seen by views spread
            evenly around it (the ellipse inscribed in the hull's cross-section for four views 90 degrees apart;
            cameras on an orbit about the vertical, image rows level). Pixels whose ray crosses the hull but not that
            shape keep the hull's point. `"hull"`: on the hull itself.
        render_size (`int`): Longest side of the renders; larger views are downsampled (antialiased) first.
        samples_per_ray (`int`): Samples of the ray march through the cube `[-bound, bound]^3`.
        refine_steps (`int`): Bisection steps locating each ray's first hull (or rounded) point between two samples.
        occlusion_slack (`float`): Distance, in world units, a point may lie behind a view's first surface (the
            one painted) and still count as seen by that view.
        occlusion_softness (`float`): World units per unit of log-weight beyond the slack: a view's weight is
            `exp(-max(0, behind - slack) / softness)`, normalised over the views.
        own_view_penalty (`float`, *optional*): Log-weight subtracted from the rendered view's own colour.
            Default: the protocol's.
        colour_bleed (`int`): Pixels the foreground colours are extended past the eroded silhouettes.
        inpaint_pixels (`int`): How far, in pixels, the colours of the parts another view sees are extended into the
            parts only the rendered view sees.
        inpaint_weight (`float`): Weight of those extended colours against the view's own there (0: own colours).
        bound (`float`): Half side of the reconstructed cube, centred on the world origin.
    """

    def __init__(
        self,
        protocol: str = "held_out",
        *,
        surface: str = "rounded",
        render_size: int = 128,
        samples_per_ray: int = 96,
        refine_steps: int = 5,
        occlusion_slack: float = 0.06,
        occlusion_softness: float = 0.02,
        own_view_penalty: float | None = None,
        colour_bleed: int = 4,
        inpaint_pixels: int = 4,
        inpaint_weight: float = 0.5,
        bound: float = 1.0,
    ):
        if protocol not in _PROTOCOL_OWN_VIEW_PENALTY:
            raise ValueError(f"Unknown protocol {protocol!r}; valid protocols: 'held_out', 'same_view'.")
        if surface not in _SURFACES:
            raise ValueError(f"Unknown surface {surface!r}; valid surfaces: {', '.join(map(repr, _SURFACES))}.")
        for name, value in (("render_size", render_size), ("samples_per_ray", samples_per_ray)):
            if value < 2:
                raise ValueError(f"{name} must be at least 2, got {value}.")
        for name, value in (
            ("refine_steps", refine_steps),
            ("colour_bleed", colour_bleed),
            ("inpaint_pixels", inpaint_pixels),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if not 0.0 <= inpaint_weight <= 1.0:
            raise ValueError(f"inpaint_weight must be in [0, 1], got {inpaint_weight}.")
        if occlusion_softness <= 0 or occlusion_slack < 0 or bound <= 0:
            raise ValueError(
                "occlusion_softness and bound must be > 0 and occlusion_slack >= 0, got "
                f"{occlusion_softness}, {bound} and {occlusion_slack}."
            )
        self.protocol = protocol
        self.surface = surface
        self.render_size = render_size
        self.samples_per_ray = samples_per_ray
        self.refine_steps = refine_steps
        self.occlusion_slack = occlusion_slack
        self.occlusion_softness = occlusion_softness
        self.own_view_penalty = (
            _PROTOCOL_OWN_VIEW_PENALTY[protocol] if own_view_penalty is None else float(own_view_penalty)
        )
        self.colour_bleed = colour_bleed
        self.inpaint_pixels = inpaint_pixels
        self.inpaint_weight = inpaint_weight
        self.bound = bound
        self._geometry_key: tuple | None = None
        self._geometry: _RayGeometry | None = None

    @torch.no_grad()
    def reconstruct(
        self, views: torch.Tensor, layout: CameraLayout, depth: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Carve the hull of each sample's views and render it at the layout's cameras.

        Args:
            views (`torch.Tensor` of shape `(B, V, 3, h, w)`): Views in [0, 1], on any device.
            layout (`CameraLayout`): Their cameras.
            depth (`torch.Tensor` of shape `(B, V, h' * w')`, *optional*): A known geometry to paint instead of the
                hull (and of `surface`): the distance from each camera to the surface along the ray through each
                render pixel's centre (`inf` where it misses; e.g. `carve3d_trl.synthetic.object_depth`, to measure
                what a perfect geometry would give).

        Returns:
            `torch.Tensor` of shape `(B, V, 3, h', w')` in [0, 1], `max(h', w') = min(max(h, w), render_size)`.
        """
        batch, num_views, _, height, width = views.shape
        if num_views != layout.num_views:
            raise ValueError(f"Got {num_views} views for a layout of {layout.num_views} cameras.")
        size = scaled_size(height, width, self.render_size)
        if depth is not None and depth.shape != (batch, num_views, size[0] * size[1]):
            raise ValueError(
                f"depth must have shape (B, V, h * w) = {(batch, num_views, size[0] * size[1])} at the render size "
                f"{size}, got {tuple(depth.shape)}."
            )
        if size != (height, width):
            views = F.interpolate(views.flatten(0, 1), size=size, mode="bilinear", antialias=True)
            views = views.view(batch, num_views, 3, *size).clamp(0, 1)
        geometry = self._ray_geometry(layout, size, views.device)
        masks = foreground_mask(views, layout.background)  # (B, V, h, w)
        colours = _bleed(views, masks, self.colour_bleed)
        if depth is None:
            depth = self._first_hull_points(geometry, masks)
            if self.surface == "rounded":
                rounded = self._first_rounded_points(geometry, masks, depth)
                depth = torch.where(rounded.isfinite(), rounded, depth)
        else:
            depth = depth.to(views.device)
        background = torch.tensor(layout.background, device=views.device, dtype=views.dtype)
        renders, only_own = map(torch.stack, zip(*(self._paint(geometry, depth[b], colours[b]) for b in range(batch))))
        renders = torch.where(depth.isfinite()[:, :, None], renders, background.view(1, 1, 3, 1))  # (B, V, 3, N)
        renders = renders.view(batch, num_views, 3, *size)
        if self.inpaint_pixels and self.inpaint_weight:
            renders = self._inpaint(renders, only_own.view(batch, num_views, 1, *size), depth.isfinite())
        return renders.clamp(0, 1)

    def _ray_geometry(self, layout: CameraLayout, size: tuple[int, int], device: torch.device) -> _RayGeometry:
        """The sample points of every camera's rays and their pixels in every view, cached for the last layout."""
        key = (layout.cam2world.tolist(), layout.intrinsics.tolist(), size, str(device))
        if key != self._geometry_key:
            self._geometry = _RayGeometry(layout, size, self.samples_per_ray, self.bound, device)
            self._geometry_key = key
        return self._geometry

    def _first_hull_points(self, geometry: _RayGeometry, masks: torch.Tensor) -> torch.Tensor:
        """Distance `(B, V, N)` along every camera's rays to each sample's first hull point (`inf` where a ray
        misses the hull), from the silhouettes `(B, V, h, w)`: a ray march, then bisection between two samples."""
        batch = masks.shape[0]
        padded = torch.cat([masks.flatten(1), masks.new_zeros(batch, 1)], dim=1)  # index V*h*w: outside every view
        inside = torch.cat([_march(geometry.sample_pixels, padded[i : i + _PACK]) for i in range(0, batch, _PACK)])
        inside &= geometry.hit[..., None]  # (B, V, N, S)
        hit = inside.any(dim=-1)
        first = inside.to(torch.uint8).argmax(dim=-1)
        depth = torch.full(hit.shape, float("inf"), device=masks.device)
        sample, view, ray = hit.nonzero(as_tuple=True)  # the K rays that reach the hull
        depth[sample, view, ray] = self._bisect(
            geometry, view, ray, first[sample, view, ray], lambda index: padded[sample[:, None], index].all(dim=-1)
        )
        return depth

    def _first_rounded_points(self, geometry: _RayGeometry, masks: torch.Tensor, hull: torch.Tensor) -> torch.Tensor:
        """Distance `(B, V, N)` along every camera's rays to the first point of each sample's rounded shape (see
        `surface`; `inf` where a ray misses it), from the silhouettes `(B, V, h, w)` and the hull's first points
        `(B, V, N)` (only rays that reach the hull are marched)."""
        batch = masks.shape[0]
        across = _squared_position_across_rows(masks).flatten(1)
        padded = torch.cat([across, across.new_full((batch, 1), torch.inf)], dim=1)  # index V*h*w: outside
        depth = torch.full_like(hull, float("inf"))
        rays = hull.isfinite().nonzero(as_tuple=True)
        for start in range(0, len(rays[0]), _RAY_CHUNK):
            sample, view, ray = (index[start : start + _RAY_CHUNK] for index in rays)
            inside = _inside_rounded(padded[sample[:, None, None], geometry.sample_pixels[view, ray].long()])  # (k, S)
            found = inside.any(dim=-1)
            sample, view, ray = sample[found], view[found], ray[found]
            first = inside[found].to(torch.uint8).argmax(dim=-1)
            depth[sample, view, ray] = self._bisect(
                geometry, view, ray, first, lambda index, rows=sample: _inside_rounded(padded[rows[:, None], index])
            )
        return depth

    def _bisect(
        self,
        geometry: _RayGeometry,
        view: torch.Tensor,
        ray: torch.Tensor,
        first: torch.Tensor,
        is_inside: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Distance `(K,)` to the first point of a shape along K rays (`view`, `ray`: `(K,)`), from the index `(K,)`
        of each ray's first sample inside it, by bisection between that sample and the one before;
        `is_inside` maps the pixels `(K, V)` of K points (`_RayGeometry.pixel_index`) to whether they are inside."""
        t_in = geometry.t[view, ray].gather(-1, first[:, None])[:, 0]
        t_out = torch.maximum(t_in - geometry.step[view, ray], geometry.near[view, ray])
        origins, directions = geometry.origins[view, ray], geometry.directions[view, ray]
        for _ in range(self.refine_steps):  # t_in stays inside the shape, t_out before it
            middle = 0.5 * (t_in + t_out)
            now_inside = is_inside(geometry.pixel_index(origins + directions * middle[:, None]))
            t_in = torch.where(now_inside, middle, t_in)
            t_out = torch.where(now_inside, t_out, middle)
        return t_in

    def _paint(self, geometry: _RayGeometry, depth: torch.Tensor, colours: torch.Tensor):
        """Colours `(V, 3, N)` of one sample's first hull points (undefined where a ray misses the hull), from their
        distances `(V, N)` and the bled views `(V, 3, h, w)`; and which of them no other view sees `(V, N)`."""
        num_views, _, height, width = colours.shape
        hit = depth.isfinite()
        painted = colours.new_zeros(num_views, 3, height * width)
        only_own = torch.zeros(num_views, height * width, dtype=torch.bool, device=colours.device)
        view_index = torch.arange(num_views, device=colours.device)
        for v in range(num_views):
            rays = hit[v].nonzero()[:, 0]
            points = geometry.origins[v, rays] + geometry.directions[v, rays] * depth[v, rays, None]  # (K, 3)
            uv, in_front = project_points(points[:, None], geometry.cam2world, geometry.intrinsics)  # (K, V, 2)
            pixel = geometry.pixel_index(points)  # (K, V)
            visible = (in_front > 0) & (pixel < num_views * height * width)
            surface = depth.flatten()[pixel.clamp_max(num_views * height * width - 1)]
            distance = (points[:, None] - geometry.cam2world[:, :3, 3]).norm(dim=-1)
            behind = (distance - surface - self.occlusion_slack).clamp_min(0)
            logits = -behind / self.occlusion_softness - self.own_view_penalty * (view_index == v)
            weights = torch.where(visible, logits, torch.full_like(logits, -torch.inf)).softmax(dim=-1)
            grid = (uv * 2 - 1).transpose(0, 1)[:, None]  # (V, 1, K, 2)
            sampled = F.grid_sample(colours, grid, mode="bilinear", padding_mode="border", align_corners=False)
            painted[v][:, rays] = (sampled[:, :, 0] * weights.t()[:, None]).sum(dim=0)
            only_own[v, rays] = torch.where(visible & (view_index != v), behind, torch.inf).amin(dim=-1) > 0
        return painted, only_own

    def _inpaint(self, renders: torch.Tensor, only_own: torch.Tensor, hit: torch.Tensor) -> torch.Tensor:
        """Renders `(B, V, 3, h, w)` whose pixels showing a hull point no other view sees (`only_own`,
        `(B, V, 1, h, w)`) are blended with colours extended from the nearby pixels whose point another view sees
        (up to `inpaint_pixels` away); `hit` `(B, V, N)`: the pixels showing the hull."""
        seen = hit.view_as(only_own) & ~only_own
        extended, reached = _extend(renders.flatten(0, 1), seen.flatten(0, 1), self.inpaint_pixels)
        blend = (only_own & reached.view_as(only_own)).float() * self.inpaint_weight
        return renders * (1 - blend) + extended.view_as(renders) * blend


class _RayGeometry:
    """Rays through every pixel of every camera, sampled through the cube, with each sample's pixel in every view.

    Attributes:
        origins, directions: `(V, N, 3)`, N = h * w pixels row-major.
        near, step: `(V, N)`, entry distance into the cube and distance between samples.
        hit: `(V, N)` bool, whether the ray crosses the cube.
        t: `(V, N, S)` sample distances.
        sample_pixels: `(V, N, S, V)` flat pixel index of each sample in each view (`V * h * w` when outside it).
    """

    def __init__(self, layout: CameraLayout, size: tuple[int, int], samples: int, bound: float, device):
        self.cam2world = layout.cam2world.to(device)
        self.intrinsics = layout.intrinsics.to(device)
        self.size = size
        self.origins, self.directions = camera_rays(self.cam2world, self.intrinsics, *size)
        self.near, far, self.hit = intersect_box(self.origins, self.directions, bound)
        self.step = (far - self.near).clamp_min(0) / samples
        offsets = torch.arange(samples, device=device) + 0.5
        self.t = self.near[..., None] + self.step[..., None] * offsets
        samples_xyz = self.origins[:, :, None] + self.directions[:, :, None] * self.t[..., None]  # (V, N, S, 3)
        self.sample_pixels = self.pixel_index(samples_xyz).int()  # int32: the largest tensor here

    def pixel_index(self, points: torch.Tensor) -> torch.Tensor:
        """Flat pixel index `(..., V)` of world points `(..., 3)` in every view; `V * h * w` where a point falls
        outside a view or behind its camera."""
        height, width = self.size
        num_views = self.cam2world.shape[0]
        uv, depth = project_points(points[..., None, :], self.cam2world, self.intrinsics)
        col = (uv[..., 0] * width).floor().long()
        row = (uv[..., 1] * height).floor().long()
        inside = (depth > 0) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
        view = torch.arange(num_views, device=points.device)
        index = (view * height + row.clamp(0, height - 1)) * width + col.clamp(0, width - 1)
        return torch.where(inside, index, torch.full_like(index, num_views * height * width))


def _march(sample_pixels: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    """Whether every ray sample lies inside the hull of each of up to 8 samples: `(b, V, N, S)` bool from the flat
    silhouettes `(b, V * h * w + 1)` and the samples' pixels `(V, N, S, V)`, in one gather of bytes that pack the
    b samples' silhouettes bit by bit (a batch shares the march's cost)."""
    bits = torch.arange(len(padded), dtype=torch.uint8, device=padded.device)
    packed = (padded.to(torch.uint8) << bits[:, None]).sum(dim=0, dtype=torch.uint8)
    in_every_view = functools.reduce(torch.bitwise_and, packed[sample_pixels].unbind(dim=-1))  # (V, N, S)
    return ((in_every_view[None] >> bits.view(-1, 1, 1, 1)) & 1).bool()


def _squared_position_across_rows(masks: torch.Tensor) -> torch.Tensor:
    """Squared position `(B, V, h, w)` of every silhouette pixel across its row's foreground run, from the
    silhouettes `(B, V, h, w)`: 0 at the run's centre, approaching 1 at its ends; `inf` outside the silhouettes."""
    width = masks.shape[-1]
    column = torch.arange(width, device=masks.device).expand_as(masks)
    start = torch.where(masks, -1, column).cummax(dim=-1).values + 1  # after the last background pixel on the left
    end = torch.where(masks, width, column).flip(-1).cummin(dim=-1).values.flip(-1) - 1  # before the next one
    position = (column - 0.5 * (start + end)) / (0.5 * (end - start + 1)).clamp_min(0.5)
    return torch.where(masks, position.square(), torch.inf)


def _inside_rounded(squared_positions: torch.Tensor) -> torch.Tensor:
    """Whether points lie inside the rounded shape, from their squared positions `(..., V)` across the silhouettes'
    rows in every view (`inf` outside a silhouette)."""
    num_views = squared_positions.shape[-1]
    return squared_positions.isfinite().all(dim=-1) & (squared_positions.sum(dim=-1) <= num_views / 2)


def _bleed(views: torch.Tensor, masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Views `(B, V, 3, h, w)` whose foreground colours, taken inside the silhouettes `(B, V, h, w)` eroded by one
    pixel (the anti-aliased edge mixes in the background), are extended `pixels` pixels outwards."""
    if pixels == 0:
        return views
    interior = -F.max_pool2d(-masks.flatten(0, 1)[:, None].float(), 3, stride=1, padding=1) > 0.5
    return _extend(views.flatten(0, 1), interior, pixels)[0].view(views.shape)


def _extend(images: torch.Tensor, known: torch.Tensor, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend the colours of the `known` pixels of images `(N, 3, h, w)` into the others, one ring of pixels per step
    (the mean of the known 3x3 neighbours), `pixels` steps.

    Args:
        known (`torch.BoolTensor` of shape `(N, 1, h, w)`).

    Returns:
        `(images, reached)`: the images with the reached pixels replaced, and the known or reached pixels
        `(N, 1, h, w)`.
    """
    known = known.float()
    colour = images * known
    for _ in range(pixels):
        total = F.avg_pool2d(colour, 3, stride=1, padding=1, count_include_pad=False)
        count = F.avg_pool2d(known, 3, stride=1, padding=1, count_include_pad=False)
        fill = (count > 0) & (known == 0)
        colour = torch.where(fill, total / count.clamp_min(1e-6), colour)
        known = torch.where(fill, torch.ones_like(known), known)
    return torch.where(known > 0, colour, images), known > 0
