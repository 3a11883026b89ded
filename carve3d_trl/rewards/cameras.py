"""Camera layouts of multi-view grids: which camera produced which tile of a generated image.

Conventions (shared by every module of `carve3d_trl.rewards`):

- World frame: right-handed, **+Z up** (the frame of OpenLRM and InstantMesh). An orbit camera at azimuth 0 sits on
  the +X axis; azimuth grows towards +Y; elevation is the angle above the XY plane.
- Camera frame: OpenGL axes; the camera looks down its -Z axis, +Y is up in the image, +X to the right.
- Intrinsics are normalised by the view size: `[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]` with `fx, cx` fractions of the
  view width and `fy, cy` fractions of its height; pixel rows grow downwards from the top of the view.
- View-batched models (MVDream-like) take their cameras from `multiview_cameras`, which gives the model's inputs in
  MVDream's convention and the matching `CameraLayout` for MRC (MVDream's Blender world frame is this frame).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "CameraLayout",
    "ViewBatchedCameras",
    "fov_to_intrinsics",
    "instant3d_layout",
    "look_at_cam2world",
    "multiview_cameras",
    "orbit_cam2world",
    "orbit_layout",
    "split_grid",
    "tile_views",
    "zero123pp_layout",
]


@dataclass(frozen=True, eq=False)
class CameraLayout:
    """The cameras of a multi-view grid image, as data.

    Args:
        rows (`int`): Number of view rows in the grid.
        cols (`int`): Number of view columns in the grid. Views are numbered row-major.
        cam2world (`torch.Tensor` of shape `(V, 4, 4)`): Camera-to-world matrices (OpenGL camera axes),
            `V = rows * cols`.
        intrinsics (`torch.Tensor` of shape `(V, 3, 3)`): Intrinsics normalised by the view size.
        background (`tuple[float, float, float]`): Background RGB in [0, 1] (white for Instant3D).
    """

    rows: int
    cols: int
    cam2world: torch.Tensor
    intrinsics: torch.Tensor
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"A layout needs at least one row and one column, got {self.rows}x{self.cols}.")
        num_views = self.rows * self.cols
        cam2world = torch.as_tensor(self.cam2world, dtype=torch.float32).cpu()
        intrinsics = torch.as_tensor(self.intrinsics, dtype=torch.float32).cpu()
        if cam2world.shape != (num_views, 4, 4):
            raise ValueError(f"cam2world must have shape ({num_views}, 4, 4), got {tuple(cam2world.shape)}.")
        if intrinsics.shape != (num_views, 3, 3):
            raise ValueError(f"intrinsics must have shape ({num_views}, 3, 3), got {tuple(intrinsics.shape)}.")
        background = tuple(float(c) for c in self.background)
        if len(background) != 3 or not all(0.0 <= c <= 1.0 for c in background):
            raise ValueError(f"background must be 3 values in [0, 1], got {self.background}.")
        object.__setattr__(self, "cam2world", cam2world)
        object.__setattr__(self, "intrinsics", intrinsics)
        object.__setattr__(self, "background", background)

    @property
    def num_views(self) -> int:
        return self.rows * self.cols

    def camera_distances(self) -> torch.Tensor:
        """Distance of each camera centre to the world origin, shape `(V,)`."""
        return self.cam2world[:, :3, 3].norm(dim=-1)

    def view_size(self, height: int, width: int) -> tuple[int, int]:
        """Size `(h, w)` of one view in a grid image of size `(height, width)`.

        Raises:
            ValueError: if the grid does not divide the image size evenly.
        """
        if height % self.rows or width % self.cols:
            fit_h = f"{height - height % self.rows} or {height - height % self.rows + self.rows}"
            fit_w = f"{width - width % self.cols} or {width - width % self.cols + self.cols}"
            raise ValueError(
                f"An image of size {height}x{width} (HxW) does not fit the {self.rows}x{self.cols} (rows x cols) "
                f"camera layout: the height must be a multiple of {self.rows} (e.g. {fit_h}) and the width a "
                f"multiple of {self.cols} (e.g. {fit_w})."
            )
        return height // self.rows, width // self.cols


def look_at_cam2world(positions: torch.Tensor, target: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """Camera-to-world matrices (OpenGL axes, world +Z up) of cameras at `positions` looking at `target`.

    Args:
        positions (`torch.Tensor` of shape `(V, 3)`): Camera centres; must not lie on the vertical through `target`.
        target (`Sequence[float]`): Point looked at.

    Returns:
        `torch.Tensor` of shape `(V, 4, 4)`.
    """
    positions = torch.as_tensor(positions, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=torch.float32)
    up = torch.tensor([0.0, 0.0, 1.0])
    backward = torch.nn.functional.normalize(positions - target, dim=-1)  # camera +Z points away from the target
    right = torch.linalg.cross(up.expand_as(backward), backward, dim=-1)
    if (right.norm(dim=-1) < 1e-6).any():
        raise ValueError("A camera looking straight up or down has no defined roll with world +Z up.")
    right = torch.nn.functional.normalize(right, dim=-1)
    cam_up = torch.linalg.cross(backward, right, dim=-1)
    cam2world = torch.eye(4).repeat(positions.shape[0], 1, 1)
    cam2world[:, :3, 0] = right
    cam2world[:, :3, 1] = cam_up
    cam2world[:, :3, 2] = backward
    cam2world[:, :3, 3] = positions
    return cam2world


def orbit_cam2world(
    elevations: Sequence[float] | float, azimuths: Sequence[float], radius: float | Sequence[float]
) -> torch.Tensor:
    """Cameras on a sphere around the origin, looking at it.

    Args:
        elevations (`float` or `Sequence[float]`): Degrees above the XY plane, one value or one per view.
        azimuths (`Sequence[float]`): Degrees from +X towards +Y, one per view.
        radius (`float` or `Sequence[float]`): Distance to the origin, one value or one per view.

    Returns:
        `torch.Tensor` of shape `(V, 4, 4)`: camera-to-world matrices.
    """
    azimuth = torch.deg2rad(torch.as_tensor(azimuths, dtype=torch.float64))
    elevation = torch.deg2rad(torch.as_tensor(elevations, dtype=torch.float64)).expand_as(azimuth)
    radius = torch.as_tensor(radius, dtype=torch.float64).expand_as(azimuth)
    positions = torch.stack(
        [
            radius * elevation.cos() * azimuth.cos(),
            radius * elevation.cos() * azimuth.sin(),
            radius * elevation.sin(),
        ],
        dim=-1,
    )
    return look_at_cam2world(positions.float())


def fov_to_intrinsics(fov: float, num_views: int = 1) -> torch.Tensor:
    """Normalised intrinsics of a centred pinhole camera with a square field of view of `fov` degrees.

    Returns:
        `torch.Tensor` of shape `(num_views, 3, 3)` with `fx = fy = 0.5 / tan(fov / 2)` and `cx = cy = 0.5`.
    """
    focal = 0.5 / math.tan(math.radians(fov) / 2)
    intrinsics = torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]])
    return intrinsics.repeat(num_views, 1, 1)


def orbit_layout(
    rows: int,
    cols: int,
    elevations: Sequence[float] | float,
    azimuths: Sequence[float],
    radius: float,
    fov: float,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> CameraLayout:
    """A grid of orbit cameras (see `orbit_cam2world`) sharing one field of view of `fov` degrees."""
    cam2world = orbit_cam2world(elevations, azimuths, radius)
    return CameraLayout(rows, cols, cam2world, fov_to_intrinsics(fov, cam2world.shape[0]), background)


def instant3d_layout(radius: float = 2.5, fov: float = 50.0) -> CameraLayout:
    """Instant3D's 2x2 grid: elevation 20 degrees, azimuths 0/90/180/270 (row-major), white background.

    Instant3D does not publish its field of view or camera distance. The defaults (50 degree field of view at
    distance 2.5, so a sphere of radius 1 around the origin spans ~94% of the view width) are this project's choice.
    """
    return orbit_layout(2, 2, 20.0, [0.0, 90.0, 180.0, 270.0], radius, fov)


def zero123pp_layout(radius: float = 4.0, fov: float = 30.0) -> CameraLayout:
    """Zero123++ v1.2's 3x2 grid (3 rows, 2 columns) of 6 views around the input view, white background.

    Azimuths 30, 90, 150, 210, 270, 330 degrees relative to the input view, elevations alternating 20 and -10
    degrees, field of view 30 degrees, as in InstantMesh's `get_zero123plus_input_cameras` (distance 4.0). The
    background is white as produced by InstantMesh's white-background UNet (the released v1.2 UNet paints gray).
    """
    return orbit_layout(
        3, 2, [20.0, -10.0, 20.0, -10.0, 20.0, -10.0], [30.0, 90.0, 150.0, 210.0, 270.0, 330.0], radius, fov
    )


# OpenGL world axes (y up) -> Blender world axes (z up): (x, y, z) -> (x, -z, y), applied on the world side.
_OPENGL_TO_BLENDER = torch.tensor(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
)


@dataclass(frozen=True, eq=False)
class ViewBatchedCameras:
    """The cameras of a view-batched multi-view model (MVDream-like), for the model and for MRC.

    View `i` of `model_inputs` and view `i` of `layout` are the same viewpoint, so the views a model generates with
    `model_inputs` are scored by `MRCReward(layout)` in the same order. Build it with `multiview_cameras`.

    Args:
        model_inputs (`torch.Tensor` of shape `(V, 16)`, float32): The model's camera inputs, MVDream's
            `get_camera` convention: row-major flattened 4x4 camera-to-world matrices on the unit sphere, Blender
            world axes (+Z up, azimuth 0 on -Y, 90 on +X), OpenGL camera axes (columns right, up, backward).
        layout (`CameraLayout`): The same cameras for MRC, in this project's world frame (the Blender frame
            itself: +Z up, right-handed), at distance `radius` with a `fov` degree pinhole.
        elevation (`float`): Degrees above the horizontal plane, shared by all views.
        azimuths (`tuple[float, ...]`): MVDream azimuth of each view in degrees (0 on -Y, 90 on +X). The project's
            orbit azimuth (0 on +X, 90 on +Y, as in `orbit_cam2world`) of view `i` is `azimuths[i] - 90`.
        fov (`float`): Field of view of the layout's renders, degrees.
        radius (`float`): Camera distance of the layout.
    """

    model_inputs: torch.Tensor
    layout: CameraLayout
    elevation: float
    azimuths: tuple[float, ...]
    fov: float
    radius: float

    @property
    def num_views(self) -> int:
        return self.layout.num_views


def multiview_cameras(
    num_views: int = 4,
    elevation: float = 15.0,
    azimuth_start: float = 0.0,
    azimuth_span: float = 360.0,
    *,
    fov: float = 50.0,
    radius: float = 2.5,
    background: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> ViewBatchedCameras:
    """One camera source for a view-batched multi-view model and for MRC: MVDream's cameras, in both forms.

    The views sit at `elevation` and azimuths `azimuth_start + i * azimuth_span / num_views`, `i < num_views`
    (MVDream's `get_camera(num_views, elevation, azimuth_start, azimuth_span)`; with a span that `num_views` does not
    divide exactly, MVDream's `np.arange` may return one view more, this function never does).

    - `model_inputs`, shape `(V, 16)`: MVDream's convention exactly. An OpenGL (y up) look-at at the origin from
      `(cos e sin a, sin e, cos e cos a)` on the unit sphere, with columns right, up, -forward, converted to Blender
      world axes by `(x, y, z) -> (x, -z, y)`, flattened row-major. View 0 (azimuth 0) sits on -Y, view 1 of four on
      +X, then +Y and -X.
    - `layout`, a `CameraLayout` for MRC: the same cameras in this project's world frame, which is the Blender frame
      (+Z up, right-handed; no axis change), with the camera centres scaled from the unit sphere to `radius` and the
      same orientations (OpenGL camera axes in both). 2x2 for 4 views, 1xV otherwise: the grid only matters for
      display (`tile_views`), since a view-batched model emits views that `MRCReward` scores directly.

    MVDream feeds no intrinsics to the model (it was trained with fields of view of 15-60 degrees at distances
    0.8-1.0); the reconstruction only needs a consistent pinhole, so `fov` and `radius` (default 50 degrees at 2.5,
    the project's Instant3D-like render settings) set the reconstruction's scale and framing, not the model's input.

    Args:
        num_views (`int`): Number of views V, at least 1.
        elevation (`float`): Degrees above the horizontal plane, in (-90, 90); MVDream's default is 15.
        azimuth_start (`float`): MVDream azimuth of view 0 in degrees (0 on -Y, growing towards +X).
        azimuth_span (`float`): Degrees covered by the views.
        fov (`float`): Field of view of the layout's pinhole in degrees, in (0, 180).
        radius (`float`): Camera distance of the layout, > 0.
        background (`tuple[float, float, float]`): The layout's background RGB in [0, 1].

    Returns:
        `ViewBatchedCameras`.
    """
    if isinstance(num_views, bool) or not isinstance(num_views, numbers.Integral) or num_views < 1:
        raise ValueError(f"num_views must be an integer >= 1, got {num_views!r}.")
    num_views = int(num_views)
    for name, value in (("elevation", elevation), ("azimuth_start", azimuth_start), ("azimuth_span", azimuth_span)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number of degrees, got {value!r}.")
    if not -90.0 < elevation < 90.0:
        raise ValueError(
            f"elevation must be in (-90, 90) degrees, got {elevation!r}: a camera looking straight up or down has no "
            "defined roll with a vertical up vector."
        )
    if not 0.0 < fov < 180.0:
        raise ValueError(f"fov must be in (0, 180) degrees, got {fov!r}.")
    if not (math.isfinite(radius) and radius > 0.0):
        raise ValueError(f"radius must be > 0, got {radius!r}.")

    azimuths = tuple(azimuth_start + index * azimuth_span / num_views for index in range(num_views))
    azimuth = torch.deg2rad(torch.tensor(azimuths, dtype=torch.float64))
    elev = torch.deg2rad(torch.tensor(elevation, dtype=torch.float64)).expand_as(azimuth)
    # MVDream's look-at, in OpenGL world axes (y up), on the unit sphere.
    position = torch.stack([elev.cos() * azimuth.sin(), elev.sin(), elev.cos() * azimuth.cos()], dim=-1)
    forward = -position  # towards the origin; unit length
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(forward)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, world_up, dim=-1), dim=-1)
    cam_up = torch.nn.functional.normalize(torch.linalg.cross(right, forward, dim=-1), dim=-1)
    cam2world_opengl = torch.eye(4, dtype=torch.float64).repeat(num_views, 1, 1)
    cam2world_opengl[:, :3, :3] = torch.stack([right, cam_up, -forward], dim=-1)  # columns
    cam2world_opengl[:, :3, 3] = position
    cam2world_blender = _OPENGL_TO_BLENDER @ cam2world_opengl
    model_inputs = cam2world_blender.reshape(num_views, 16).float()

    # This project's world frame is the Blender frame: same orientations, centres scaled to `radius`.
    cam2world = cam2world_blender.clone()
    cam2world[:, :3, 3] *= radius
    rows, cols = (2, 2) if num_views == 4 else (1, num_views)
    layout = CameraLayout(rows, cols, cam2world.float(), fov_to_intrinsics(fov, num_views), background)
    return ViewBatchedCameras(
        model_inputs=model_inputs,
        layout=layout,
        elevation=float(elevation),
        azimuths=tuple(float(a) for a in azimuths),
        fov=float(fov),
        radius=float(radius),
    )


def split_grid(images: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
    """Split grid images into their views.

    Args:
        images (`torch.Tensor` of shape `(B, C, H, W)`): Grid images.
        layout (`CameraLayout`): The grid's layout; `H` must be a multiple of `rows` and `W` of `cols`.

    Returns:
        `torch.Tensor` of shape `(B, V, C, H // rows, W // cols)`, views in row-major order.
    """
    if images.ndim != 4:
        raise ValueError(f"Expected grid images of shape (B, C, H, W), got {tuple(images.shape)}.")
    batch, channels, height, width = images.shape
    h, w = layout.view_size(height, width)
    views = images.reshape(batch, channels, layout.rows, h, layout.cols, w)
    return views.permute(0, 2, 4, 1, 3, 5).reshape(batch, layout.num_views, channels, h, w)


def tile_views(views: torch.Tensor, layout: CameraLayout) -> torch.Tensor:
    """Tile views into grid images; the inverse of `split_grid`.

    Args:
        views (`torch.Tensor` of shape `(B, V, C, h, w)`): Views in row-major order, `V = rows * cols`.

    Returns:
        `torch.Tensor` of shape `(B, C, rows * h, cols * w)`.
    """
    if views.ndim != 5 or views.shape[1] != layout.num_views:
        raise ValueError(
            f"Expected views of shape (B, {layout.num_views}, C, h, w) for a {layout.rows}x{layout.cols} layout, "
            f"got {tuple(views.shape)}."
        )
    batch, _, channels, h, w = views.shape
    grid = views.reshape(batch, layout.rows, layout.cols, channels, h, w).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, layout.rows * h, layout.cols * w)
