"""Procedural 3D objects rendered exactly at a layout's cameras.

Objects are unions of signed-distance primitives (sphere, box, cylinder, torus) with solid, striped or checkered
colours in each primitive's own frame, rendered by sphere tracing with Lambertian shading under fixed world lights
on the layout's background. The shading does not depend on the camera, so the views of an object are exactly
consistent (`carve3d_trl.synthetic.distortions` then makes one view inconsistent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..rewards.cameras import CameraLayout
from ..rewards.rays import camera_rays, intersect_box

__all__ = [
    "Primitive",
    "SyntheticObject",
    "object_depth",
    "random_object",
    "render_object",
]

PRIMITIVES = ("sphere", "box", "cylinder", "torus")
PATTERNS = ("solid", "stripes", "checker")

_LIGHTS = ((0.5, 0.3, 0.8, 0.6), (-0.6, -0.4, 0.3, 0.25))  # (direction xyz, intensity); ambient below
_AMBIENT = 0.3
_TRACE_STEPS = 96
_SCENE_BOUND = 1.5


@dataclass(frozen=True)
class Primitive:
    """One solid of a synthetic object.

    Args:
        kind (`str`): `"sphere"` (size: radius), `"box"` (size: half extents), `"cylinder"` (size: radius,
            half height; axis along local Z) or `"torus"` (size: major radius, minor radius; in the local XY plane).
        center (`tuple[float, float, float]`): Centre in object coordinates.
        size (`tuple[float, ...]`): See `kind`.
        rotation (`tuple[float, float, float]`): Euler angles in degrees (X, then Y, then Z) from local to object axes.
        color, color2 (`tuple[float, float, float]`): RGB in [0, 1]; `color2` is the pattern's second colour.
        pattern (`str`): `"solid"`, `"stripes"` (along local X) or `"checker"`.
        frequency (`float`): Pattern periods per unit length.
    """

    kind: str
    center: tuple[float, float, float]
    size: tuple[float, ...]
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)
    color: tuple[float, float, float] = (0.8, 0.3, 0.2)
    color2: tuple[float, float, float] = (0.2, 0.3, 0.8)
    pattern: str = "solid"
    frequency: float = 4.0

    def __post_init__(self):
        if self.kind not in PRIMITIVES:
            raise ValueError(f"Unknown primitive {self.kind!r}; valid primitives: {', '.join(PRIMITIVES)}.")
        if self.pattern not in PATTERNS:
            raise ValueError(f"Unknown pattern {self.pattern!r}; valid patterns: {', '.join(PATTERNS)}.")


@dataclass(frozen=True)
class SyntheticObject:
    """A union of primitives, placed in the world by a yaw about +Z, an offset and a uniform scale.

    `hue_shift` rotates every colour about the grey axis of RGB, in degrees.
    """

    primitives: tuple[Primitive, ...]
    yaw: float = 0.0
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    hue_shift: float = 0.0


def random_object(generator: torch.Generator, radius: float = 0.9) -> SyntheticObject:
    """A random object of 2 or 3 textured primitives, off-centre (not symmetric about the vertical axis).

    Args:
        generator (`torch.Generator`): Source of randomness; the same state gives the same object.
        radius (`float`): The object is scaled so that its farthest surface point lies at this distance from the
            origin.
    """

    def uniform(low: float, high: float, n: int = 1) -> list[float]:
        return (low + (high - low) * torch.rand(n, generator=generator)).tolist()

    def color() -> tuple[float, float, float]:
        hue, sat, val = uniform(0.0, 1.0)[0], uniform(0.5, 0.9)[0], uniform(0.45, 0.85)[0]
        return _hsv_to_rgb(hue, sat, val)

    primitives = []
    count = int(torch.randint(2, 4, (1,), generator=generator))
    for index in range(count):
        kind = PRIMITIVES[int(torch.randint(len(PRIMITIVES), (1,), generator=generator))]
        size = {
            "sphere": lambda: (uniform(0.25, 0.4)[0],),
            "box": lambda: tuple(uniform(0.12, 0.3, 3)),
            "cylinder": lambda: (uniform(0.12, 0.25)[0], uniform(0.2, 0.35)[0]),
            "torus": lambda: (uniform(0.22, 0.32)[0], uniform(0.07, 0.11)[0]),
        }[kind]()
        if index == 0:
            center = tuple(uniform(-0.05, 0.05, 3))
        else:
            azimuth, distance = uniform(0.0, 2 * math.pi)[0], uniform(0.3, 0.45)[0]
            center = (distance * math.cos(azimuth), distance * math.sin(azimuth), uniform(-0.25, 0.25)[0])
        pattern = PATTERNS[int(torch.randint(len(PATTERNS), (1,), generator=generator))]
        primitives.append(
            Primitive(
                kind=kind,
                center=center,
                size=size,
                rotation=tuple(uniform(-60.0, 60.0, 3)),
                color=color(),
                color2=color(),
                pattern=pattern,
                frequency=uniform(3.0, 6.0)[0],
            )
        )
    obj = SyntheticObject(tuple(primitives))
    return replace(obj, scale=radius / _bounding_radius(obj))


def _bounding_radius(obj: SyntheticObject, resolution: int = 48) -> float:
    """Distance from the origin of the farthest point inside `obj`, on a grid over `[-1.5, 1.5]^3`."""
    axis = torch.linspace(-_SCENE_BOUND, _SCENE_BOUND, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    inside = _object_sdf(obj, points).amin(dim=1) < 0
    return float(points[inside].norm(dim=-1).max())


def render_object(
    obj: SyntheticObject, layout: CameraLayout, view_size: int | tuple[int, int], supersample: int = 2
) -> torch.Tensor:
    """Render `obj` at every camera of `layout` on the layout's background.

    Args:
        obj (`SyntheticObject`): The object.
        layout (`CameraLayout`): Cameras and background.
        view_size (`int` or `tuple[int, int]`): `(h, w)` of each view.
        supersample (`int`): Rays per pixel side, averaged (antialiasing).

    Returns:
        `torch.Tensor` of shape `(V, 3, h, w)` in [0, 1], on CPU.
    """
    height, width = (view_size, view_size) if isinstance(view_size, int) else view_size
    return _render(obj, layout.cam2world, layout.intrinsics, height, width, layout.background, supersample)


def object_depth(obj: SyntheticObject, layout: CameraLayout, view_size: int | tuple[int, int]) -> torch.Tensor:
    """The true geometry of `obj` as the reconstructors see it: the distance `(V, h * w)` from each camera of
    `layout` to the object's surface along the ray through each pixel's centre (`inf` where the ray misses it)."""
    height, width = (view_size, view_size) if isinstance(view_size, int) else view_size
    origins, directions = camera_rays(layout.cam2world, layout.intrinsics, height, width)
    t, surface = _trace(obj, origins.reshape(-1, 3), directions.reshape(-1, 3))[:2]
    return torch.where(surface, t, torch.full_like(t, float("inf"))).view(layout.num_views, height * width)


def _trace(obj: SyntheticObject, origins: torch.Tensor, directions: torch.Tensor):
    """Sphere-trace rays `(N, 3)`: distance `(N,)`, whether it reached the surface `(N,)`, and the signed distances
    `(N, P)` of the end points to each primitive."""
    near, far, hit = intersect_box(origins, directions, _SCENE_BOUND)
    t = near.clone()
    for _ in range(_TRACE_STEPS):
        distance = _object_sdf(obj, origins + directions * t[:, None]).amin(dim=1)
        t = torch.where(hit & (t < far), t + distance.clamp_min(1e-4), t)
    per_primitive = _object_sdf(obj, origins + directions * t[:, None])
    return t, hit & (t < far) & (per_primitive.amin(dim=1) < 2e-3), per_primitive


def _render(obj, cam2world, intrinsics, height, width, background, supersample) -> torch.Tensor:
    num_views = cam2world.shape[0]
    origins, directions = camera_rays(cam2world, intrinsics, height * supersample, width * supersample)
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    t, surface, per_primitive = _trace(obj, origins, directions)
    points = origins + directions * t[:, None]
    shade = _shading(obj, points)
    albedo = _albedo(obj, points, per_primitive.argmin(dim=1))
    bg = torch.tensor(background, dtype=torch.float32)
    color = torch.where(surface[:, None], (albedo * shade[:, None]).clamp(0, 1), bg)
    image = color.view(num_views, height * supersample, width * supersample, 3).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, supersample) if supersample > 1 else image


def _to_object(obj: SyntheticObject, points: torch.Tensor) -> torch.Tensor:
    """World points `(N, 3)` in the object's coordinates."""
    yaw = _rotation_matrix(0.0, 0.0, obj.yaw)
    return (points - torch.tensor(obj.offset)) @ yaw / obj.scale


def _object_sdf(obj: SyntheticObject, points: torch.Tensor) -> torch.Tensor:
    """Signed distances `(N, P)` of world points `(N, 3)` to each primitive."""
    local = _to_object(obj, points)
    distances = []
    for primitive in obj.primitives:
        p = (local - torch.tensor(primitive.center)) @ _rotation_matrix(*primitive.rotation)
        distances.append(_primitive_sdf(primitive, p))
    return torch.stack(distances, dim=1) * obj.scale


def _primitive_sdf(primitive: Primitive, p: torch.Tensor) -> torch.Tensor:
    size = primitive.size
    if primitive.kind == "sphere":
        return p.norm(dim=-1) - size[0]
    if primitive.kind == "box":
        q = p.abs() - torch.tensor(size)
        return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0)
    if primitive.kind == "cylinder":
        q = torch.stack([p[:, :2].norm(dim=-1) - size[0], p[:, 2].abs() - size[1]], dim=-1)
        return q.clamp_min(0).norm(dim=-1) + q.amax(dim=-1).clamp_max(0)
    q = torch.stack([p[:, :2].norm(dim=-1) - size[0], p[:, 2]], dim=-1)  # torus
    return q.norm(dim=-1) - size[1]


def _shading(obj: SyntheticObject, points: torch.Tensor) -> torch.Tensor:
    """Lambertian shading `(N,)` from the SDF normal under the fixed world lights."""
    eps = 1e-3
    offsets = torch.eye(3) * eps
    normal = torch.stack(
        [
            _object_sdf(obj, points + offsets[i]).amin(dim=1) - _object_sdf(obj, points - offsets[i]).amin(dim=1)
            for i in range(3)
        ],
        dim=-1,
    )
    normal = F.normalize(normal, dim=-1)
    shade = torch.full(points.shape[:1], _AMBIENT)
    for *direction, intensity in _LIGHTS:
        light = F.normalize(torch.tensor(direction), dim=0)
        shade = shade + intensity * (normal @ light).clamp_min(0)
    return shade


def _albedo(obj: SyntheticObject, points: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Colour `(N, 3)` of each point from the pattern of its nearest primitive."""
    local = _to_object(obj, points)
    albedo = torch.zeros(points.shape[0], 3)
    hue = _hue_rotation(obj.hue_shift)
    for index, primitive in enumerate(obj.primitives):
        p = (local - torch.tensor(primitive.center)) @ _rotation_matrix(*primitive.rotation)
        phase = p * primitive.frequency * math.pi
        if primitive.pattern == "stripes":
            second = torch.sin(phase[:, 0]) > 0
        elif primitive.pattern == "checker":
            second = torch.sin(phase).prod(dim=-1) > 0
        else:
            second = torch.zeros(p.shape[0], dtype=torch.bool)
        colors = torch.where(second[:, None], torch.tensor(primitive.color2), torch.tensor(primitive.color))
        albedo = torch.where((nearest == index)[:, None], colors @ hue.T, albedo)
    return albedo.clamp(0, 1)


def _rotation_matrix(rx: float, ry: float, rz: float) -> torch.Tensor:
    """Rotation (local to parent axes) of Euler angles in degrees, applied X, then Y, then Z."""
    ax, ay, az = (math.radians(a) for a in (rx, ry, rz))
    x = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    y = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    z = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return (z @ y @ x).float()


def _hue_rotation(degrees: float) -> torch.Tensor:
    """Rotation of RGB about the grey axis by `degrees` (Rodrigues' formula)."""
    angle = math.radians(degrees)
    k = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)
    return torch.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _hsv_to_rgb(hue: float, sat: float, val: float) -> tuple[float, float, float]:
    channels = []
    for n in (5, 3, 1):
        k = (n + hue * 6) % 6
        channels.append(val - val * sat * max(0.0, min(k, 4 - k, 1)))
    return tuple(channels)
