"""A synthetic Cityscapes: street scenes in the official layout and file naming.

Each image is a perspective street scene built from polygons in world coordinates
(a camera 1.3 m above a flat road): sky, building facades and trees with a varying
skyline, road, sidewalks and verges, walls and fences, poles carrying traffic signs
and lights, cars, trucks, buses, trams on rail tracks, pedestrians and riders on
bicycles and motorcycles, plus void regions (ego vehicle, static objects, parking,
rectification border) whose labelIds map to 255.

The polygons are written to ``_gtFine_polygons.json`` and rasterised exactly as the
official ``json2labelImg``/``json2instanceImg`` would, so the label files agree with
the official tools pixel for pixel. The photo gives every class a colour AND a texture
from overlapping distributions (grey road vs grey sidewalk vs grey wall, cars of any
colour, people and riders dressed alike), under random illumination, shadows and
noise: a per-pixel colour classifier does poorly; context and texture pay off.

Everything is seeded per image (``seed``, split, index), so a set is bit-identical for
a seed (given the same Pillow and zlib), and the first N images do not depend on how
many are generated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image, ImageDraw, ImageFilter

from seg.errors import DataError

# 320 train / 64 val images of 128x256 (Cityscapes' 2048x1024 at 1/8): on 2 CPU cores a
# from-scratch FCN sees ~15 images a second, so many small scenes teach it more per minute
# than a few large ones, and validation at the images' own size is the training scale.
DEFAULT_SYNTHETIC = dict(train=320, val=64, height=128, width=256, seed=0)
PARAMETERS_FILE = "synthetic.json"
# Bump when the generator's output changes, so an old set is recognised as different.
GENERATOR_VERSION = 1

CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn"),
}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Cityscapes annotates the 20th frame of each 30-frame snippet.
_ANNOTATED_FRAME = 19

# Rarer things, one of which every image is guaranteed to show (in rotation, shifted
# per split), so that even a handful of images covers most of the 19 classes.
_FEATURED = ("truck", "bus", "train", "motorcycle", "bicycle", "wall", "fence", "terrain", "traffic light")


def default_synthetic_root() -> Path:
    """``<repo>/data/synthetic_cityscapes``, where ``<repo>`` holds the ``seg`` package."""
    return Path(__file__).resolve().parents[2] / "data" / "synthetic_cityscapes"


def synthetic_parameters(train: int, val: int, height: int, width: int, seed: int, test: int = 0) -> dict:
    """The parameters recorded in ``synthetic.json``; equal dicts mean identical sets."""
    return dict(generator="seg.data.synthetic", version=GENERATOR_VERSION, train=int(train), val=int(val),
                test=int(test), height=int(height), width=int(width), seed=int(seed))


def read_synthetic_parameters(root: str | Path) -> dict | None:
    """The parameters a synthetic set was written with, or None if ``root`` holds none."""
    path = Path(root) / PARAMETERS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({error}). Delete the directory and generate it again.") from None


def write_synthetic_cityscapes(out: str | Path, train: int, val: int, height: int, width: int, seed: int,
                               test: int = 0) -> Path:
    """Write a synthetic data set in the official Cityscapes layout; return ``out`` resolved.

    Writes, per image, ``leftImg8bit/{split}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png``
    and under ``gtFine/`` the ``_gtFine_labelIds.png``, ``_gtFine_instanceIds.png``,
    ``_gtFine_color.png`` and ``_gtFine_polygons.json`` files, then ``synthetic.json``
    with the parameters. ``out`` is created if needed and must not already hold a data set.
    Not atomic: see ``ensure_synthetic_cityscapes`` for that.
    """
    if min(train, val, test) < 0 or train + val + test == 0:
        raise ValueError(f"image counts must be >= 0 and not all 0, got train={train} val={val} test={test}")
    if height < 16 or width < 16:
        raise ValueError(f"images must be at least 16x16, got {height}x{width}")
    out = Path(out).resolve()
    for existing in ("leftImg8bit", "gtFine"):
        if (out / existing).exists():
            raise FileExistsError(f"{out / existing} already exists: write the synthetic set to a new directory")
    for split, count in (("train", train), ("val", val), ("test", test)):
        cities = CITIES[split]
        for index in range(count):
            city = cities[index % len(cities)]
            stem = f"{city}_{index // len(cities):06d}_{_ANNOTATED_FRAME:06d}"
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
            featured = _FEATURED[(index + 4 * _SPLIT_CODES[split]) % len(_FEATURED)]
            shapes = _street_scene(rng, height, width, featured)
            _write_sample(out, split, city, stem, shapes, height, width, rng)
    parameters = synthetic_parameters(train, val, height, width, seed, test)
    (out / PARAMETERS_FILE).write_text(json.dumps(parameters, indent=2) + "\n")
    return out


def ensure_synthetic_cityscapes(out: str | Path, train: int, val: int, height: int, width: int, seed: int,
                                test: int = 0, force: bool = False) -> bool:
    """Make ``out`` hold the synthetic set with these parameters; True if it was (re)written.

    A missing ``out`` is generated in a temporary directory beside it and renamed into
    place, so concurrent callers never see a half-written set and exactly one rename
    wins. If ``out`` already holds a set with the same parameters, nothing is done
    unless ``force``; a set with other parameters is replaced only with ``force``. A
    non-empty directory that is not a synthetic set made here is never deleted.
    """
    out = Path(out).resolve()
    wanted = synthetic_parameters(train, val, height, width, seed, test)
    if out.exists():
        found = read_synthetic_parameters(out)
        if found == wanted and not force:
            return False
        if found is None and any(out.iterdir()):
            raise DataError(f"{out} exists and is not a synthetic data set made by this tool "
                            f"(no {PARAMETERS_FILE}); choose another output directory.")
        if found is not None and not force:
            raise DataError(f"{out} holds a synthetic set with other parameters ({_describe(found)}); "
                            f"use --force (force=True) to replace it, or choose another directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the data set is not
    try:
        write_synthetic_cityscapes(staging, train=train, val=val, height=height, width=width, seed=seed, test=test)
        if force and out.exists():
            # Replacing: move the old set aside first, as rename cannot replace a full directory.
            # Only with force: without it, a set that appeared meanwhile is a concurrent caller's.
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            with contextlib.suppress(FileNotFoundError):  # another caller moved it first
                os.replace(out, retired / out.name)
            shutil.rmtree(retired)
        try:
            os.rename(staging, out)
        except OSError:
            # Another process renamed its copy into place first; theirs is as good as ours.
            if read_synthetic_parameters(out) != wanted:
                raise
            return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _describe(parameters: dict) -> str:
    keys = ("train", "val", "test", "height", "width", "seed", "version")
    return ", ".join(f"{key}={parameters.get(key)}" for key in keys)


# --------------------------------------------------------------------------- scene

@dataclass
class _Shape:
    """One annotated polygon plus the appearance-only polygons painted inside it."""
    label: str  # official label name
    polygon: list[tuple[int, int]]  # image coordinates, clipped to the image
    look: str  # key of _LOOKS
    decorations: list[tuple[str, list[tuple[int, int]]]] = field(default_factory=list)


# Silhouettes in a unit frame: u in [0, 1] left to right (or near to far for side views),
# v in [0, 1] bottom to top.
_BOX = ((0, 0), (1, 0), (1, 1), (0, 1))
_CAR_REAR = ((0, 0), (1, 0), (1, 0.55), (0.92, 0.62), (0.8, 1), (0.2, 1), (0.08, 0.62), (0, 0.55))
_CAR_SIDE = ((0, 0.05), (1, 0.05), (1, 0.5), (0.85, 0.58), (0.68, 1), (0.3, 1), (0.15, 0.6), (0, 0.5))
_PERSON = ((0.25, 0), (0.45, 0), (0.5, 0.4), (0.55, 0), (0.75, 0), (0.78, 0.5), (0.95, 0.55), (0.9, 0.8),
           (0.62, 0.82), (0.62, 0.86), (0.7, 0.9), (0.7, 0.97), (0.6, 1), (0.4, 1), (0.3, 0.97), (0.3, 0.9),
           (0.38, 0.86), (0.38, 0.82), (0.1, 0.8), (0.05, 0.55), (0.22, 0.5))
_PERSON_HEAD = ((0.4, 0.84), (0.6, 0.84), (0.66, 0.9), (0.62, 0.98), (0.5, 1.0), (0.38, 0.98), (0.34, 0.9))
_PERSON_LEGS = (((0.27, 0.01), (0.44, 0.01), (0.48, 0.4), (0.26, 0.44)),
                ((0.56, 0.01), (0.73, 0.01), (0.74, 0.44), (0.52, 0.4)))
_RIDER = ((0.35, 0), (0.55, 0), (0.6, 0.3), (0.75, 0.55), (0.95, 0.6), (0.95, 0.68), (0.7, 0.7), (0.62, 0.8),
          (0.7, 0.85), (0.7, 0.97), (0.55, 1), (0.45, 0.95), (0.45, 0.85), (0.5, 0.8), (0.3, 0.65), (0.2, 0.3),
          (0.3, 0.25))
_BICYCLE = ((0, 0.3), (0.08, 0.06), (0.2, 0), (0.32, 0.06), (0.42, 0.35), (0.58, 0.35), (0.68, 0.06), (0.8, 0),
            (0.92, 0.06), (1, 0.3), (0.92, 0.54), (0.8, 0.6), (0.75, 1), (0.62, 1), (0.5, 0.6), (0.38, 0.85),
            (0.25, 0.85), (0.2, 0.6), (0.08, 0.54))
_MOTORCYCLE = ((0, 0.25), (0.1, 0), (0.25, 0), (0.35, 0.2), (0.65, 0.2), (0.75, 0), (0.9, 0), (1, 0.25),
               (0.95, 0.6), (0.8, 0.75), (0.75, 1), (0.6, 0.95), (0.45, 0.7), (0.2, 0.7), (0.05, 0.55))
_SIGN_SHAPES = (((0, 0.1), (1, 0.1), (0.5, 1)),  # warning triangle
                ((0.3, 0), (0.7, 0), (1, 0.3), (1, 0.7), (0.7, 1), (0.3, 1), (0, 0.7), (0, 0.3)),  # round
                _BOX)


def _ellipse(cu: float, cv: float, ru: float, rv: float, points: int = 8) -> list[tuple[float, float]]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return [(cu + ru * np.cos(a), cv + rv * np.sin(a)) for a in angles]


class _Camera:
    """Pinhole camera ``height`` metres above flat ground, looking along +Z."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.horizon = height * rng.uniform(0.36, 0.48)
        self.centre = width * rng.uniform(0.4, 0.6)  # vanishing point of the road
        self.focal = width * rng.uniform(1.0, 1.2)
        self.height = 1.3
        # Nearest ground depth visible at the bottom edge.
        self.nearest_z = self.height * self.focal / (height - self.horizon)

    def project(self, x: float, y: float, z: float) -> tuple[float, float]:
        """World (x right, y up from the ground, z ahead) -> image (column, row)."""
        return self.centre + self.focal * x / z, self.horizon + self.focal * (self.height - y) / z

    def front(self, unit: Sequence[tuple[float, float]], x: float, z: float, width: float, height: float,
              base: float = 0.0) -> list[tuple[float, float]]:
        """A silhouette on an upright plane facing the camera, centred at x, depth z."""
        return [self.project(x + (u - 0.5) * width, base + v * height, z) for u, v in unit]

    def side(self, unit: Sequence[tuple[float, float]], x: float, z: float, length: float, height: float,
             base: float = 0.0) -> list[tuple[float, float]]:
        """A silhouette on an upright plane along the road at lateral x, from depth z on."""
        return [self.project(x, base + v * height, z + u * length) for u, v in unit]

    def ground(self, points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        """A polygon on the ground given as (x, z) points."""
        return [self.project(x, 0.0, z) for x, z in points]


class _StreetScene:
    """Builds the polygons of one street scene, back to front."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng, self.height, self.width = rng, height, width
        self.camera = _Camera(rng, height, width)
        self.shapes: list[_Shape] = []
        # Lateral layout (metres, camera at x=0): road, then sidewalk, then verge, then facades.
        self.road = (-rng.uniform(3.0, 8.0), rng.uniform(3.0, 8.0))
        self.sidewalk = (self.road[0] - rng.uniform(2.0, 4.5), self.road[1] + rng.uniform(2.0, 4.5))
        self.verge = (self.sidewalk[0] - rng.uniform(0.0, 3.0), self.sidewalk[1] + rng.uniform(0.0, 3.0))
        self.near = max(1.0, 0.5 * self.camera.nearest_z)
        self.far = 400.0

    def add(self, label: str, polygon: Sequence[tuple[float, float]],
            decorations: Sequence[tuple[str, Sequence[tuple[float, float]]]] = (), look: str | None = None) -> None:
        """Add a polygon (image coordinates) unless nothing of it lies inside the image."""
        clipped = _clip_to_image(polygon, self.width, self.height)
        if clipped is None:
            return
        shape = _Shape(label, clipped, look or label)
        for name, points in decorations:
            clipped = _clip_to_image(points, self.width, self.height)
            if clipped is not None:
                shape.decorations.append((name, clipped))
        self.shapes.append(shape)

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


def _street_scene(rng: np.random.Generator, height: int, width: int, featured: str) -> list[_Shape]:
    """The polygons of one scene, in drawing order (later ones cover earlier ones)."""
    scene = _StreetScene(rng, height, width)
    camera, near, far = scene.camera, scene.near, scene.far
    scene.add("sky", [(0, 0), (width - 1, 0), (width - 1, camera.horizon + 1), (0, camera.horizon + 1)])
    scene.add("terrain" if featured == "terrain" or scene.chance(0.5) else "sidewalk",
              [(0, camera.horizon), (width - 1, camera.horizon), (width - 1, height - 1), (0, height - 1)])
    _add_skyline(scene)
    # Ground: verge (terrain), sidewalk, road, each drawn over the previous one.
    (verge_l, verge_r), (walk_l, walk_r), (road_l, road_r) = scene.verge, scene.sidewalk, scene.road
    if featured == "terrain" or scene.chance(0.5):
        for inner, outer in ((walk_l, verge_l - 0.01), (walk_r, verge_r + 0.01)):
            outer = outer + (0.8 * np.sign(outer) if abs(outer - inner) < 0.5 else 0.0)
            scene.add("terrain", camera.ground([(inner, near), (inner, far), (outer, far), (outer, near)]))
    scene.add("sidewalk", camera.ground([(walk_l, near), (walk_l, far), (walk_r, far), (walk_r, near)]))
    # Dashed lane markings every 3.4 m across the road, 3 m dashes every 9 m.
    dash_phase = scene.uniform(0, 9)
    markings = [("marking", camera.ground([(x - 0.07, z), (x - 0.07, z + 3), (x + 0.07, z + 3), (x + 0.07, z)]))
                for x in np.arange(road_l + 3.4, road_r - 1.0, 3.4) for z in np.arange(near + dash_phase, 80, 9)]
    scene.add("road", camera.ground([(road_l, near), (road_l, far), (road_r, far), (road_r, near)]),
              decorations=markings)
    if scene.chance(0.3):
        x0 = road_l if scene.chance(0.5) else road_r - 2.4
        z0 = scene.uniform(near + 2, 25)
        scene.add("parking", camera.ground([(x0, z0), (x0, z0 + scene.uniform(6, 20)),
                                            (x0 + 2.4, z0 + scene.uniform(6, 20)), (x0 + 2.4, z0)]))
    tram_x = None
    if featured == "train" or scene.chance(0.05):
        tram_x = scene.uniform(road_l + 1.5, road_r - 1.5)
        scene.add("rail track", camera.ground([(tram_x - 0.9, near), (tram_x - 0.9, far),
                                               (tram_x + 0.9, far), (tram_x + 0.9, near)]))
    # Facades hide whatever ground lies beyond them, so they come after it.
    for side in (0, 1):
        _add_facades(scene, side, open_side=featured == "terrain" and side == 0)
    if featured == "wall" or scene.chance(0.25):
        _add_barrier(scene, "wall", height_range=(0.8, 2.5))
    if featured == "fence" or scene.chance(0.3):
        _add_barrier(scene, "fence", height_range=(1.0, 2.0))
    if scene.chance(0.1):
        _add_barrier(scene, "guard rail", height_range=(0.6, 0.9), at_curb=True)

    # Things stand on the ground: collect them with their depth and draw far to near.
    things: list[tuple[float, Callable[[], None]]] = []

    def thing(z: float, draw: Callable[[], None]) -> None:
        things.append((z, draw))

    for _ in range(int(rng.integers(1, 4))):
        z = scene.uniform(near + 2, 60)
        side = int(rng.integers(0, 2))
        thing(z, lambda z=z, side=side: _add_pole(scene, side, z, light=featured == "traffic light" or scene.chance(0.35)))
    if featured == "traffic light":
        z = scene.uniform(near + 3, 20)
        thing(z, lambda z=z: _add_pole(scene, int(rng.integers(0, 2)), z, light=True))
    for _ in range(int(rng.integers(1, 4)) if scene.chance(0.7) else 0):
        z = scene.uniform(near + 3, 70)
        thing(z, lambda z=z: _add_tree(scene, int(rng.integers(0, 2)), z))
    for _ in range(int(rng.integers(1, 5)) if scene.chance(0.9) else 0):
        z = scene.uniform(near + 1.5, 70)
        thing(z, lambda z=z: _add_car(scene, z))
    for _ in range(int(rng.integers(1, 6)) if scene.chance(0.75) else 0):
        z = scene.uniform(near + 1, 45)
        thing(z, lambda z=z: _add_person(scene, z))
    for kind in ("truck", "bus"):
        if featured == kind or scene.chance(0.12):
            z = scene.uniform(near + 4, 30)
            thing(z, lambda z=z, kind=kind: _add_large_vehicle(scene, kind, z))
    if tram_x is not None:
        z = scene.uniform(max(near + 8, 15), 45)
        thing(z, lambda z=z: _add_tram(scene, tram_x, z))
    for kind in ("bicycle", "motorcycle"):
        count = 1 if featured == kind else int(scene.chance(0.3 if kind == "bicycle" else 0.15))
        for _ in range(count):
            z = scene.uniform(near + 2, 25)
            thing(z, lambda z=z, kind=kind: _add_two_wheeler(scene, kind, z, rider=kind == "motorcycle" or scene.chance(0.7)))
    for _ in range(int(rng.integers(0, 3))):
        z = scene.uniform(near + 1, 40)
        thing(z, lambda z=z: _add_small_object(scene, z))

    for _, draw in sorted(things, key=lambda item: -item[0]):
        draw()

    if scene.chance(0.85):
        rise = height * scene.uniform(0.03, 0.08)
        columns = np.linspace(0, width - 1, 9)
        bonnet = [(x, height - 1 - rise * (1 - 0.35 * ((x - width / 2) / (width / 2)) ** 2)) for x in columns]
        scene.add("ego vehicle", [(width - 1, height - 1), (0, height - 1)] + bonnet)
    if scene.chance(0.25):
        size = width * scene.uniform(0.03, 0.08)
        scene.add("rectification border", [(0, height - 1 - size), (size, height - 1), (0, height - 1)])
        scene.add("rectification border", [(width - 1, height - 1 - size), (width - 1, height - 1),
                                           (width - 1 - size, height - 1)])
    return scene.shapes


def _add_skyline(scene: _StreetScene) -> None:
    """Distant buildings and trees across the end of the street."""
    camera = scene.camera
    x = scene.uniform(-120, -80)
    while x < 120:
        length = scene.uniform(10, 35)
        if scene.chance(0.75):
            label = "building" if scene.chance(0.8) else "vegetation"
            height = scene.uniform(8, 35) if label == "building" else scene.uniform(6, 15)
            z = scene.uniform(150, 300)
            unit = _BOX if label == "building" else _jagged_top(scene, 7)
            scene.add(label, camera.front(unit, x + length / 2, z, length, height))
        x += length


def _jagged_top(scene: _StreetScene, teeth: int) -> list[tuple[float, float]]:
    top = [(u, scene.uniform(0.6, 1.0)) for u in np.linspace(0, 1, teeth)]
    return [(0, 0), (1, 0)] + top[::-1]


def _add_facades(scene: _StreetScene, side: int, open_side: bool) -> None:
    """Buildings (and now and then a park) along one side of the street."""
    camera = scene.camera
    x = scene.verge[side]
    z = scene.near
    end = scene.uniform(60, 200)
    while z < end:
        length = scene.uniform(6, 25)
        roll = scene.rng.random()
        if open_side or roll < 0.12:
            pass  # a gap: sky and terrain show through
        elif roll < 0.35:
            scene.add("vegetation", camera.side(_jagged_top(scene, 6), x, z, length, scene.uniform(3, 10)))
        else:
            height = scene.uniform(6, 24)
            unit: Sequence[tuple[float, float]] = _BOX
            if scene.chance(0.3):  # gable roof
                unit = ((0, 0), (1, 0), (1, 0.8), (0.5, 1), (0, 0.8))
            scene.add("building", camera.side(unit, x, z, length, height))
        z += length


def _add_barrier(scene: _StreetScene, label: str, height_range: tuple[float, float], at_curb: bool = False) -> None:
    side = int(scene.rng.integers(0, 2))
    x = scene.road[side] if at_curb else scene.sidewalk[side]
    z = scene.uniform(scene.near, 30)
    scene.add(label, scene.camera.side(_BOX, x, z, scene.uniform(8, 40), scene.uniform(*height_range)))


def _sidewalk_x(scene: _StreetScene, side: int) -> float:
    low, high = (scene.sidewalk[0], scene.road[0]) if side == 0 else (scene.road[1], scene.sidewalk[1])
    return scene.uniform(low + 0.3, high - 0.3)


def _add_pole(scene: _StreetScene, side: int, z: float, light: bool) -> None:
    camera = scene.camera
    x = scene.road[side] + (-0.5 if side == 0 else 0.5)
    height = scene.uniform(3.5, 7.0)
    scene.add("pole", camera.front(_BOX, x, z, scene.uniform(0.12, 0.22), height))
    if light:
        top = height - scene.uniform(0.0, 1.0)
        lit = int(scene.rng.integers(0, 3))
        lamps = [("lamp_on" if i == lit else "lamp_off", camera.front(_ellipse(0.5, v, 0.3, 0.09), x, z, 0.35, 1.0,
                                                                         base=top - 1.0))
                 for i, v in enumerate((0.8, 0.5, 0.2))]
        scene.add("traffic light", camera.front(_BOX, x, z, 0.35, 1.0, base=top - 1.0), decorations=lamps)
        height = top - 1.1
    if scene.chance(0.7) or not light:
        size = scene.uniform(0.5, 0.9)
        shape = _SIGN_SHAPES[int(scene.rng.integers(0, len(_SIGN_SHAPES)))]
        scene.add("traffic sign", camera.front(shape, x, z - 0.1, size, size, base=height - size - 0.1))


def _add_tree(scene: _StreetScene, side: int, z: float) -> None:
    camera = scene.camera
    x = scene.sidewalk[side] + (0.8 if side == 0 else -0.8)
    trunk = scene.uniform(2.0, 3.5)
    radius = scene.uniform(1.5, 3.0)
    scene.add("vegetation", camera.front(_BOX, x, z, 0.3, trunk + 0.5), look="trunk")
    crown = [(0.5 + 0.5 * r * np.cos(a), 0.5 + 0.5 * r * np.sin(a))
             for a, r in zip(np.linspace(0, 2 * np.pi, 12, endpoint=False), scene.rng.uniform(0.7, 1.0, 12))]
    scene.add("vegetation", camera.front(crown, x, z, 2 * radius, 2 * radius, base=trunk))


def _add_car(scene: _StreetScene, z: float) -> None:
    camera = scene.camera
    if scene.chance(0.3):  # parked along the curb, seen from the side
        side = int(scene.rng.integers(0, 2))
        x = scene.road[side] + (1.0 if side == 0 else -1.0)
        scene.add("car", camera.side(_CAR_SIDE, x, z, scene.uniform(3.8, 4.8), scene.uniform(1.4, 1.6)),
                  decorations=[("glass", camera.side(((0.33, 0.62), (0.66, 0.62), (0.66, 0.92), (0.36, 0.92)),
                                                     x, z, 4.3, 1.5))])
        return
    x = scene.uniform(scene.road[0] + 1.2, scene.road[1] - 1.2)
    width, height = scene.uniform(1.7, 1.95), scene.uniform(1.4, 1.65)
    decorations = [("glass", camera.front(((0.16, 0.64), (0.84, 0.64), (0.76, 0.94), (0.24, 0.94)), x, z, width, height)),
                   ("tyre", camera.front(((0.04, 0), (0.2, 0), (0.2, 0.12), (0.04, 0.12)), x, z, width, height)),
                   ("tyre", camera.front(((0.8, 0), (0.96, 0), (0.96, 0.12), (0.8, 0.12)), x, z, width, height)),
                   ("tail_light", camera.front(((0.03, 0.42), (0.16, 0.42), (0.16, 0.52), (0.03, 0.52)), x, z, width, height)),
                   ("tail_light", camera.front(((0.84, 0.42), (0.97, 0.42), (0.97, 0.52), (0.84, 0.52)), x, z, width, height))]
    scene.add("car", camera.front(_CAR_REAR, x, z, width, height), decorations=decorations)


def _add_large_vehicle(scene: _StreetScene, kind: str, z: float) -> None:
    camera = scene.camera
    height = scene.uniform(3.0, 3.8)
    windows = ((0.05, 0.55), (0.95, 0.55), (0.95, 0.85), (0.05, 0.85))
    if scene.chance(0.5):  # side view, in the next lane or parked
        side = int(scene.rng.integers(0, 2))
        x = scene.road[side] + (1.4 if side == 0 else -1.4)
        length = scene.uniform(7, 10) if kind == "truck" else scene.uniform(10, 13)
        decorations = [("glass", camera.side(windows, x, z, length, height))] if kind == "bus" else []
        scene.add(kind, camera.side(_BOX, x, z, length, height), decorations=decorations)
    else:
        x = scene.uniform(scene.road[0] + 1.4, scene.road[1] - 1.4)
        window = ((0.1, 0.6), (0.9, 0.6), (0.9, 0.9), (0.1, 0.9))
        decorations = [("glass", camera.front(window, x, z, 2.5, height))] if kind == "bus" else []
        scene.add(kind, camera.front(_BOX, x, z, 2.5, height), decorations=decorations)


def _add_tram(scene: _StreetScene, x: float, z: float) -> None:
    windows = ((0.03, 0.5), (0.97, 0.5), (0.97, 0.8), (0.03, 0.8))
    height = scene.uniform(3.3, 3.8)
    if abs(x) < 3.0:  # straight ahead: its back
        scene.add("train", scene.camera.front(_BOX, x, z, 2.6, height),
                  decorations=[("glass", scene.camera.front(windows, x, z, 2.6, height))])
        return
    # To one side: its flank, facing the camera.
    flank = x - np.sign(x) * 1.3
    length = scene.uniform(20, 35)
    scene.add("train", scene.camera.side(_BOX, flank, z, length, height),
              decorations=[("glass", scene.camera.side(windows, flank, z, length, height))])


def _add_person(scene: _StreetScene, z: float) -> None:
    camera = scene.camera
    x = _sidewalk_x(scene, int(scene.rng.integers(0, 2))) if scene.chance(0.85) else \
        scene.uniform(scene.road[0] + 0.5, scene.road[1] - 0.5)
    height = scene.uniform(1.55, 1.95)
    width = height * 0.32
    decorations = [("skin", camera.front(_PERSON_HEAD, x, z, width, height))]
    decorations += [("trousers", camera.front(leg, x, z, width, height)) for leg in _PERSON_LEGS]
    scene.add("person", camera.front(_PERSON, x, z, width, height), decorations=decorations)


def _add_two_wheeler(scene: _StreetScene, kind: str, z: float, rider: bool) -> None:
    camera = scene.camera
    side = int(scene.rng.integers(0, 2))
    if rider:  # riding along the edge of the road
        x = scene.road[side] + (1.0 if side == 0 else -1.0)
    else:  # parked on the sidewalk
        x = _sidewalk_x(scene, side)
    length, height = (1.75, 1.05) if kind == "bicycle" else (2.1, 1.15)
    unit = _BICYCLE if kind == "bicycle" else _MOTORCYCLE
    scene.add(kind, camera.side(unit, x, z, length, height))
    if rider:
        scene.add("rider", camera.side(_RIDER, x, z + 0.25 * length, 0.9, 1.25, base=0.55),
                  decorations=[("skin", camera.side(((0.48, 0.86), (0.68, 0.86), (0.68, 0.97), (0.52, 0.99)),
                                                    x, z + 0.25 * length, 0.9, 1.25, base=0.55))])


def _add_small_object(scene: _StreetScene, z: float) -> None:
    camera = scene.camera
    x = _sidewalk_x(scene, int(scene.rng.integers(0, 2)))
    label = "static" if scene.chance(0.7) else ("dynamic" if scene.chance(0.6) else "ground")
    if label == "ground":
        scene.add(label, camera.ground([(x - 0.6, z), (x - 0.6, z + 2), (x + 0.6, z + 2), (x + 0.6, z)]))
    else:
        scene.add(label, camera.front(_BOX, x, z, scene.uniform(0.4, 0.8), scene.uniform(0.5, 1.2)))


def _clip_to_image(polygon: Sequence[tuple[float, float]], width: int, height: int) -> list[tuple[int, int]] | None:
    """Clip a polygon to the image (Sutherland-Hodgman) and round it; None if nothing is left."""
    points = [(float(x), float(y)) for x, y in polygon]
    edges = ((0, 0.0, 1), (0, float(width - 1), -1), (1, 0.0, 1), (1, float(height - 1), -1))
    for axis, limit, direction in edges:
        if not points:
            return None

        def inside(p: tuple[float, float]) -> bool:
            return (p[axis] - limit) * direction >= 0

        def crossing(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
            t = (limit - a[axis]) / (b[axis] - a[axis])
            return (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))

        kept = []
        for i, current in enumerate(points):
            previous = points[i - 1]
            if inside(current):
                if not inside(previous):
                    kept.append(crossing(previous, current))
                kept.append(current)
            elif inside(previous):
                kept.append(crossing(previous, current))
        points = kept
    rounded = [(int(round(x)), int(round(y))) for x, y in points]
    # Drop consecutive duplicates; a polygon needs three distinct corners to be drawn alike everywhere.
    rounded = [p for i, p in enumerate(rounded) if p != rounded[i - 1]] if len(rounded) > 1 else rounded
    if len(set(rounded)) < 3:
        return None
    return rounded


# --------------------------------------------------------------------------- appearance

@dataclass(frozen=True)
class _Look:
    """How a class (or a decoration) looks in the photo."""
    colours: tuple[tuple[int, int, int], ...]  # one is picked per object
    jitter: float  # std of the per-object colour offset
    noise: float  # std of the per-pixel luminance noise
    texture: tuple[tuple[str, float], ...] = ()  # (texture field, amplitude) added to the luminance


_TEXTURE_FIELDS = ("smooth", "blobs", "windows", "vbars", "hbars", "tiles", "gradient")

_LOOKS: dict[str, _Look] = {
    "sky": _Look(((135, 175, 225), (185, 192, 200), (210, 205, 190), (160, 185, 215)), 10, 2,
                 (("gradient", 18), ("smooth", 6))),
    "building": _Look(((150, 140, 125), (120, 115, 110), (170, 150, 130), (100, 95, 95), (185, 178, 165),
                       (140, 100, 80)), 14, 5, (("windows", 22), ("smooth", 6))),
    "wall": _Look(((125, 120, 112), (150, 145, 135), (110, 110, 115), (165, 160, 150)), 10, 4,
                  (("hbars", 7), ("smooth", 9))),
    "fence": _Look(((110, 100, 85), (140, 140, 135), (95, 95, 85), (70, 90, 70)), 10, 5, (("vbars", 26),)),
    "guard rail": _Look(((165, 165, 170),), 8, 4, (("hbars", 14),)),
    "pole": _Look(((125, 125, 130), (90, 90, 92), (70, 80, 75)), 10, 4),
    "traffic light": _Look(((40, 40, 40), (60, 58, 50), (55, 60, 45)), 6, 5),
    "traffic sign": _Look(((200, 45, 45), (45, 75, 170), (220, 200, 45), (225, 225, 225)), 15, 6),
    "vegetation": _Look(((70, 100, 45), (55, 85, 50), (90, 112, 55), (80, 95, 70)), 10, 9, (("blobs", 28),)),
    "trunk": _Look(((85, 70, 55), (70, 65, 60)), 8, 6, (("vbars", 6),)),
    "terrain": _Look(((105, 115, 65), (120, 112, 80), (92, 108, 62), (130, 125, 95)), 10, 8, (("smooth", 14),)),
    "road": _Look(((95, 95, 100), (80, 80, 85), (110, 106, 106), (100, 98, 92)), 6, 7, (("smooth", 8),)),
    "sidewalk": _Look(((125, 120, 118), (140, 130, 125), (108, 108, 112), (150, 140, 130)), 8, 5,
                      (("tiles", 22), ("smooth", 5))),
    "person": _Look(((60, 50, 70), (150, 40, 40), (40, 60, 120), (200, 190, 170), (50, 50, 50), (110, 120, 80)),
                    22, 8, (("blobs", 8),)),
    "rider": _Look(((60, 50, 70), (150, 40, 40), (40, 60, 120), (200, 190, 170), (50, 50, 50), (220, 200, 40)),
                   22, 8, (("blobs", 8),)),
    "car": _Look(((200, 200, 205), (30, 30, 35), (150, 150, 155), (140, 30, 30), (35, 55, 110), (90, 95, 100)),
                 12, 4, (("smooth", 8),)),
    "truck": _Look(((210, 210, 210), (60, 70, 90), (140, 120, 60), (170, 50, 40)), 10, 5, (("hbars", 12),)),
    "bus": _Look(((210, 180, 40), (220, 220, 220), (180, 40, 40), (40, 120, 80)), 10, 4, (("smooth", 6),)),
    "train": _Look(((150, 155, 160), (180, 60, 50), (220, 220, 215)), 8, 4, (("smooth", 6),)),
    "motorcycle": _Look(((30, 30, 30), (120, 20, 20), (50, 50, 60), (160, 160, 170)), 10, 8),
    "bicycle": _Look(((40, 40, 40), (20, 60, 120), (120, 20, 20), (170, 170, 170)), 10, 8),
    # Void classes: they look like ordinary things, which is why they are left out of training.
    "ego vehicle": _Look(((30, 30, 35), (60, 60, 70), (150, 150, 155)), 6, 3, (("smooth", 10),)),
    "rectification border": _Look(((0, 0, 0),), 0, 1),
    "static": _Look(((100, 90, 80), (60, 110, 60), (140, 140, 130)), 12, 6),
    "dynamic": _Look(((70, 60, 60), (120, 80, 60)), 12, 6),
    "ground": _Look(((120, 110, 95),), 8, 7, (("smooth", 10),)),
    "parking": _Look(((105, 102, 104), (118, 112, 110)), 6, 7, (("smooth", 8),)),
    "rail track": _Look(((90, 80, 70), (110, 100, 90)), 6, 7, (("hbars", 18),)),
    # Decorations: appearance only, painted inside their object.
    "glass": _Look(((40, 50, 65), (70, 85, 100)), 10, 4, (("gradient", -10),)),
    "tyre": _Look(((20, 20, 20),), 4, 3),
    "tail_light": _Look(((190, 30, 30),), 15, 5),
    "skin": _Look(((225, 185, 150), (180, 130, 95), (120, 85, 60)), 10, 4),
    "trousers": _Look(((40, 45, 70), (30, 30, 30), (120, 110, 90)), 10, 5),
    "lamp_on": _Look(((240, 60, 40), (240, 190, 40), (60, 220, 90)), 10, 4),
    "lamp_off": _Look(((25, 25, 25),), 4, 3),
    "marking": _Look(((215, 215, 210),), 8, 6),
}


def _texture_fields(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``len(_TEXTURE_FIELDS) x H x W`` float32 patterns in roughly [-1, 1]."""
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]

    def noise(cell: float) -> np.ndarray:
        coarse = rng.standard_normal((max(2, int(height / cell)), max(2, int(width / cell)))).astype(np.float32)
        return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BILINEAR))

    def bars(coordinate: np.ndarray, period: float, duty: float) -> np.ndarray:
        phase = rng.uniform(0, period)
        return np.where((coordinate + phase) % period < duty * period, -1.0, 1.0).astype(np.float32)

    scale = width / 512
    window_x, window_y = max(3.0, 11 * scale), max(3.0, 12 * scale)
    tile = max(4.0, 10 * scale)
    fields = {
        "smooth": noise(24 * scale),
        "blobs": noise(max(2.0, 3 * scale)),
        # Dark window panes in a bright facade.
        "windows": np.where((bars(cols, window_x, 0.5) < 0) & (bars(rows, window_y, 0.55) < 0), -1.0, 0.4
                            ).astype(np.float32),
        "vbars": bars(cols, max(2.0, 5 * scale), 0.5),
        "hbars": bars(rows, max(2.0, 6 * scale), 0.5),
        "tiles": np.where(bars(cols, tile, 0.15) + bars(rows, tile * 0.6, 0.2) < 2, -1.0, 0.3).astype(np.float32),
        "gradient": rows / height * 2 - 1,
    }
    return np.stack([np.broadcast_to(fields[name], (height, width)) for name in _TEXTURE_FIELDS])


def _render(shapes: list[_Shape], height: int, width: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise the scene: (photo HxWx3 uint8, labelIds HxW uint8, instanceIds HxW uint16)."""
    # One index image for the annotation (shapes only, as json2labelImg draws them) and one
    # for the photo (shapes and, right after each, its decorations).
    label_index = Image.new("I", (width, height), 0)
    paint_index = Image.new("I", (width, height), 0)
    label_draw, paint_draw = ImageDraw.Draw(label_index), ImageDraw.Draw(paint_index)
    label_ids = [name2label["unlabeled"].id]
    instance_ids = [name2label["unlabeled"].id]
    looks = ["rectification border"]
    instances_so_far: dict[str, int] = {}
    for shape in shapes:
        label = name2label[shape.label]
        label_draw.polygon(shape.polygon, fill=len(label_ids))
        label_ids.append(label.id)
        if label.hasInstances:  # json2instanceImg: id * 1000 + running count per class
            count = instances_so_far.get(shape.label, 0)
            instances_so_far[shape.label] = count + 1
            instance_ids.append(label.id * 1000 + count)
        else:
            instance_ids.append(label.id)
        for look, polygon in [(shape.look, shape.polygon)] + shape.decorations:
            paint_draw.polygon(polygon, fill=len(looks))
            looks.append(look)
    label_map = np.asarray(label_index)
    paint_map = np.asarray(paint_index)

    # Per painted region: a colour, a noise level and texture amplitudes.
    colours = np.zeros((len(looks), 3), np.float32)
    noise = np.zeros(len(looks), np.float32)
    amplitudes = np.zeros((len(looks), len(_TEXTURE_FIELDS)), np.float32)
    for i, name in enumerate(looks):
        look = _LOOKS[name]
        colours[i] = np.asarray(look.colours[int(rng.integers(0, len(look.colours)))]) + rng.normal(0, look.jitter, 3)
        noise[i] = look.noise
        for field_name, amplitude in look.texture:
            amplitudes[i, _TEXTURE_FIELDS.index(field_name)] = amplitude
    fields = _texture_fields(rng, height, width)
    luminance = np.einsum("hwf,fhw->hw", amplitudes[paint_map], fields)
    photo = colours[paint_map] + luminance[..., None]
    # Soften edges as a lens would, then add sensor noise and the day's light.
    photo = np.asarray(Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
                       .filter(ImageFilter.GaussianBlur(0.6 * max(1.0, width / 512)))).astype(np.float32)
    photo += (noise[paint_map] * rng.standard_normal((height, width), dtype=np.float32))[..., None]
    photo += rng.normal(0, 5, (height, width, 3)).astype(np.float32)
    photo *= _shadows(rng, height, width)[..., None]
    photo = photo * rng.uniform(0.7, 1.2) + rng.normal(0, 8, 3)
    photo = np.clip(photo, 0, 255).astype(np.uint8)
    label_ids_map = np.asarray(label_ids, np.uint8)[label_map]
    instance_map = np.asarray(instance_ids, np.uint16)[label_map]
    return photo, label_ids_map, instance_map


def _shadows(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A brightness factor per pixel: a couple of cast shadows across the lower half."""
    shade = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(shade)
    for _ in range(int(rng.integers(0, 3))):
        top = height * rng.uniform(0.3, 0.8)
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * width)
        skew = rng.uniform(-0.3, 0.3) * width
        draw.polygon([(x0, top), (x1, top), (x1 + skew, height), (x0 + skew, height)],
                     fill=int(255 * rng.uniform(0.5, 0.8)))
    return np.asarray(shade, np.float32) / 255


def _write_sample(out: Path, split: str, city: str, stem: str, shapes: list[_Shape], height: int, width: int,
                  rng: np.random.Generator) -> None:
    photo, label_ids, instance_ids = _render(shapes, height, width, rng)
    image_dir = out / "leftImg8bit" / split / city
    label_dir = out / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    # Level 1: the noisy photo barely compresses anyway, and writing stays fast.
    Image.fromarray(photo, "RGB").save(image_dir / f"{stem}_leftImg8bit.png", compress_level=1)
    Image.fromarray(label_ids, "L").save(label_dir / f"{stem}_gtFine_labelIds.png", compress_level=1)
    Image.fromarray(instance_ids).save(label_dir / f"{stem}_gtFine_instanceIds.png", compress_level=1)
    colour = np.concatenate([_label_id_colours()[label_ids], np.full((height, width, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(colour, "RGBA").save(label_dir / f"{stem}_gtFine_color.png", compress_level=1)
    polygons = {"imgHeight": int(height), "imgWidth": int(width),
                "objects": [{"label": shape.label, "polygon": [list(p) for p in shape.polygon]} for shape in shapes]}
    (label_dir / f"{stem}_gtFine_polygons.json").write_text(json.dumps(polygons, indent=4))


def _label_id_colours() -> np.ndarray:
    """labelId -> official colour, as json2labelImg draws the _gtFine_color files.

    Built from cityscapesscripts here rather than taken from ``seg.data.labels``, which
    imports torch: the generator script then starts in a fraction of a second.
    """
    colours = np.zeros((256, 3), np.uint8)
    for label in name2label.values():
        if label.id >= 0:
            colours[label.id] = label.color
    return colours
