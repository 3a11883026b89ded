"""Captioned synthetic multi-view scenes: the toy model's training data.

A scene is one or two solids (sphere, cube, cylinder, torus), each with a named colour and a texture (plain, striped
or checkered), alone or composed ("on", "next to"), with a caption such as "a red cube on a blue sphere". It is
rendered by `carve3d_trl.synthetic` at the cameras of `instant3d_layout()` on white and tiled into a 2x2 grid,
so its views are exactly consistent. Everything is deterministic in the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..rewards.cameras import CameraLayout, instant3d_layout, orbit_layout, tile_views
from ..synthetic.objects import Primitive, SyntheticObject, render_object

__all__ = [
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "TEXTURES",
    "Scene",
    "Solid",
    "random_scene",
    "random_scenes",
    "render_random_views",
    "render_scenes",
    "scene_dataset",
    "turned_and_mirrored",
]

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.1),
    "orange": (0.95, 0.5, 0.08),
    "yellow": (0.92, 0.82, 0.1),
    "green": (0.15, 0.65, 0.2),
    "blue": (0.12, 0.3, 0.85),
    "purple": (0.5, 0.18, 0.7),
    "pink": (0.95, 0.45, 0.65),
    "brown": (0.5, 0.3, 0.12),
}
SHAPES = ("sphere", "cube", "cylinder", "torus")
TEXTURES = {"plain": "solid", "striped": "stripes", "checkered": "checker"}  # caption word -> pattern
RELATIONS = ("alone", "on", "next to")
_DARK = 0.35  # the second colour of a texture: the colour at this brightness
_RADIUS = 0.9  # every scene is scaled so that it fits in a sphere of this radius


@dataclass(frozen=True)
class Solid:
    """One captioned solid: a shape, a colour name, a texture word and a size factor."""

    shape: str
    color: str
    texture: str
    size: float = 1.0

    @property
    def words(self) -> str:
        return " ".join(w for w in (self.texture if self.texture != "plain" else "", self.color, self.shape) if w)

    def half_height(self) -> float:
        return {"sphere": 0.3, "cube": 0.25, "cylinder": 0.3, "torus": 0.1}[self.shape] * self.size

    def half_width(self) -> float:
        return {"sphere": 0.3, "cube": 0.25, "cylinder": 0.22, "torus": 0.38}[self.shape] * self.size

    def primitive(self, center: tuple[float, float, float], turn: float) -> Primitive:
        """The solid as a primitive centred at `center`, turned by `turn` degrees about the vertical."""
        s = self.size
        size = {
            "sphere": (0.3 * s,),
            "cube": (0.25 * s,) * 3,
            "cylinder": (0.22 * s, 0.3 * s),
            "torus": (0.28 * s, 0.1 * s),
        }[self.shape]
        color = COLORS[self.color]
        return Primitive(
            kind="box" if self.shape == "cube" else self.shape,
            center=center,
            size=size,
            rotation=(0.0, 0.0, turn),
            color=color,
            color2=tuple(_DARK * c for c in color),
            pattern=TEXTURES[self.texture],
            frequency=2.5 / s,
        )


@dataclass(frozen=True)
class Scene:
    """A captioned scene: `top` alone, `top` on `bottom`, or `top` next to `bottom`, turned by `yaw` degrees about
    the vertical (in "on" scenes the lower solid is turned by a further `yaw` relative to the upper one)."""

    top: Solid
    relation: str = "alone"
    bottom: Solid | None = None
    yaw: float = 0.0

    @property
    def caption(self) -> str:
        if self.bottom is None:
            return _article(self.top.words)
        return f"{_article(self.top.words)} {self.relation} {_article(self.bottom.words)}"

    def to_object(self) -> SyntheticObject:
        """The scene as a `SyntheticObject` centred on the origin and scaled to fit the layout's view."""
        top, bottom = self.top, self.bottom
        if bottom is None:
            primitives = [top.primitive((0.0, 0.0, 0.0), self.yaw)]
        elif self.relation == "on":
            lift = bottom.half_height() + top.half_height()
            primitives = [bottom.primitive((0.0, 0.0, -lift / 2), self.yaw), top.primitive((0.0, 0.0, lift / 2), 0.0)]
        else:  # next to: side by side along x, resting on one plane
            gap = top.half_width() + bottom.half_width() + 0.05
            floor = max(top.half_height(), bottom.half_height())
            primitives = [
                top.primitive((-gap / 2, 0.0, top.half_height() - floor), 0.0),
                bottom.primitive((gap / 2, 0.0, bottom.half_height() - floor), 0.0),
            ]
        obj = SyntheticObject(tuple(primitives), yaw=self.yaw if bottom is not None else 0.0)
        return SyntheticObject(obj.primitives, yaw=obj.yaw, scale=_RADIUS / _extent(obj.primitives))


def _article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def _extent(primitives: Sequence[Primitive]) -> float:
    """An upper bound of the distance from the origin of any point of the primitives."""
    reach = {
        "sphere": lambda s: s[0],
        "box": lambda s: math.sqrt(3) * max(s),
        "cylinder": lambda s: math.hypot(s[0], s[1]),
        "torus": lambda s: s[0] + s[1],
    }
    return max(math.hypot(*p.center) + reach[p.kind](p.size) for p in primitives)


def random_scene(generator: torch.Generator) -> Scene:
    """A random scene; the same generator state gives the same scene."""

    def pick(options: Sequence[str]) -> str:
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    def solid() -> Solid:
        size = 0.8 + 0.4 * float(torch.rand(1, generator=generator))
        return Solid(pick(SHAPES), pick(list(COLORS)), pick(list(TEXTURES)), size)

    relation = pick(RELATIONS)
    top = solid()
    bottom = None if relation == "alone" else solid()
    return Scene(top, relation, bottom, yaw=360.0 * float(torch.rand(1, generator=generator)))


def render_scenes(scenes: Sequence[Scene], view_size: int = 32, layout: CameraLayout | None = None) -> torch.Tensor:
    """Grid images `(N, 3, rows * view_size, cols * view_size)` in [0, 1] of `scenes` at the layout's cameras."""
    layout = layout or instant3d_layout()
    views = torch.stack([render_object(scene.to_object(), layout, view_size) for scene in scenes])
    return tile_views(views, layout)


def render_random_views(
    scenes: Sequence[Scene],
    views_per_scene: int,
    generator: torch.Generator,
    view_size: int = 32,
    elevation_range: tuple[float, float] = (0.0, 40.0),
) -> torch.Tensor:
    """Views `(N, views_per_scene, 3, view_size, view_size)` of `scenes` from cameras at random azimuths and
    elevations (uniform in `elevation_range`, degrees), at the toy cameras' distance (2.5) and field of view (50)."""
    views = []
    for scene in scenes:
        azimuths = (360.0 * torch.rand(views_per_scene, generator=generator)).tolist()
        low, high = elevation_range
        elevations = (low + (high - low) * torch.rand(views_per_scene, generator=generator)).tolist()
        layout = orbit_layout(1, views_per_scene, elevations, azimuths, 2.5, 50.0)
        views.append(render_object(scene.to_object(), layout, view_size))
    return torch.stack(views)


def turned_and_mirrored(grids: torch.Tensor) -> torch.Tensor:
    """The 8 turned and mirrored versions of 2x2 Instant3D grids `(N, 3, H, W)`: `(8N, 3, H, W)`, grid by grid.

    The views sit at azimuths 0, 90, 180, 270 degrees, so turning a scene by 90 degrees shifts them cyclically, and
    mirroring it across the plane of camera 0 flips every view and swaps the views at 90 and 270 degrees. Each
    version is a consistent grid of the turned or mirrored scene (lit from turned or mirrored lights).
    """
    n, c, height, width = grids.shape
    views = grids.view(n, c, 2, height // 2, 2, width // 2).permute(0, 2, 4, 1, 3, 5).reshape(n, 4, c, height // 2, -1)
    versions = [v.roll(shift, dims=1) for v in (views, views.flip(-1)[:, [0, 3, 2, 1]]) for shift in range(4)]
    out = torch.stack(versions, dim=1).reshape(8 * n, 2, 2, c, height // 2, width // 2)
    return out.permute(0, 3, 1, 4, 2, 5).reshape(8 * n, c, height, width)


def random_scenes(num_scenes: int, seed: int = 0) -> list[Scene]:
    """The first `num_scenes` random scenes of seed `seed` (what `scene_dataset` renders)."""
    generator = torch.Generator().manual_seed(seed)
    return [random_scene(generator) for _ in range(num_scenes)]


def scene_dataset(num_scenes: int, seed: int = 0, view_size: int = 32) -> tuple[list[str], torch.Tensor]:
    """`num_scenes` random scenes of seed `seed`: their captions and grid images (see `render_scenes`)."""
    scenes = random_scenes(num_scenes, seed)
    return [scene.caption for scene in scenes], render_scenes(scenes, view_size)
