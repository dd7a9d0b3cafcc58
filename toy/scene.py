"""What a toy-world scene is: its constants, its description (dataclasses), its prompt and how it is sampled.

The rules of the world (``toy.world`` has the overview; ``toy.render`` turns a scene into frames):

- one to three shapes (circle, square, triangle) of distinct saturated colours move with constant velocity in
  an *arena* larger than the visible frame and reflect exactly off the arena's walls, so they leave the frame
  and come back later, where the physics says;
- every object has its own depth: nearer objects are drawn over farther ones (occlusion);
- the camera (a window of one frame side) pans slowly and smoothly over the arena (a sinusoid per axis);
- the whole picture is lit by a slow brightness cycle (``lighting``, 0.7 to 1), and the background colour
  drifts slowly towards a tint and back (``drift``);
- the prompt names the objects' colours and shapes and the background colour, as before: arena, depth,
  pan, lighting and drift are hidden state that a long video has to keep consistent.

Units: positions, sizes and velocities are in frame sides (a 64 px frame has sizes of 8-16 px), times in frames.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

# Colours in [0, 1] RGB. Shape colours are saturated (white aside); backgrounds are dark and plain.
SHAPE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.25, 0.25, 0.25),
    "navy": (0.0, 0.0, 0.35),
    "brown": (0.35, 0.2, 0.1),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MAX_OBJECTS = 3
# Sizes (circle diameter, square side, triangle side) and world speeds, in frame sides (per frame).
MIN_SIZE, MAX_SIZE = 8 / 64, 16 / 64
MIN_SPEED, MAX_SPEED = 0.75 / 64, 2.5 / 64
# Each velocity component is at least this fraction of the speed (no endless crawl along one axis).
MIN_AXIS_FRACTION = 0.4
# The arena extends beyond the frame by this much on each side (x, y) when the camera is centred.
ARENA_MARGIN_X, ARENA_MARGIN_Y = (0.1, 0.3), (0.05, 0.15)
# Camera pan: a sinusoid per axis, amplitude up to the arena margin, peak speed at most MAX_PAN_SPEED.
PAN_PERIOD = (240.0, 720.0)
MAX_PAN_SPEED = 0.25 / 64
# Lighting: brightness 1 - depth * (1 - cos(2 pi t / period + phase)) / 2, so in [1 - depth, 1].
LIGHTING_DEPTH, LIGHTING_PERIOD = (0.1, 0.3), (200.0, 600.0)
MIN_LIGHT = 1.0 - LIGHTING_DEPTH[1]
# Background drift: albedo (1 - s) * background + s * tint, s = amount * (1 - cos(2 pi t / period + phase)) / 2.
DRIFT_AMOUNT, DRIFT_PERIOD = (0.04, 0.12), (300.0, 900.0)
DRIFT_TINTS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
TRI_HEIGHT = math.sqrt(3) / 2  # height of an equilateral triangle of side 1


def colour_rgb(name: str) -> tuple[float, float, float]:
    """[0, 1] RGB of a shape or background colour name."""
    if name in SHAPE_COLOURS:
        return SHAPE_COLOURS[name]
    if name in BACKGROUND_COLOURS:
        return BACKGROUND_COLOURS[name]
    raise ValueError(f"unknown colour {name!r}; known colours: "
                     f"{sorted(SHAPE_COLOURS) + sorted(BACKGROUND_COLOURS)}")


def half_extent(shape: str, size: float) -> tuple[float, float]:
    """Half width and half height of a shape's bounding box (the triangle is shorter than wide)."""
    return size / 2, (size * TRI_HEIGHT if shape == "triangle" else size) / 2


def shape_area(shape: str, size: float) -> float:
    if shape == "circle":
        return math.pi * size ** 2 / 4
    if shape == "square":
        return size ** 2
    return size ** 2 * TRI_HEIGHT / 2


def centroid_offset(shape: str, size: float) -> float:
    """How far below its bounding-box centre a shape's centroid lies (the triangle's apex is up)."""
    return half_extent(shape, size)[1] / 3 if shape == "triangle" else 0.0


@dataclass(frozen=True)
class ToyObject:
    """One moving shape: ``x``/``y`` its bounding-box centre at frame 0 in arena coordinates, ``vx``/``vy`` per
    frame; ``depth`` its distance from the camera (farther objects are drawn first; ties: larger first)."""

    shape: str
    colour: str
    size: float
    x: float
    y: float
    vx: float
    vy: float
    depth: float = 0.0

    @property
    def half_extent(self) -> tuple[float, float]:
        return half_extent(self.shape, self.size)

    @property
    def area(self) -> float:
        return shape_area(self.shape, self.size)


@dataclass(frozen=True)
class Camera:
    """Offset of the frame's top-left corner in the arena: ``(arena - 1) / 2 + pan * sin(2 pi t / period + phase)``
    per axis (no pan by default)."""

    pan_x: float = 0.0
    pan_y: float = 0.0
    period_x: float = 1.0
    period_y: float = 1.0
    phase_x: float = 0.0
    phase_y: float = 0.0

    @property
    def max_speed(self) -> float:
        return max(2 * math.pi * self.pan_x / self.period_x, 2 * math.pi * self.pan_y / self.period_y)


@dataclass(frozen=True)
class Lighting:
    """Brightness ``1 - depth * (1 - cos(2 pi t / period + phase)) / 2`` multiplying the whole picture."""

    depth: float = 0.0
    period: float = 1.0
    phase: float = 0.0

    def at(self, t: float) -> float:
        return 1 - self.depth * (1 - math.cos(2 * math.pi * t / self.period + self.phase)) / 2


@dataclass(frozen=True)
class Drift:
    """Background albedo ``(1 - s) * background + s * tint`` with ``s = amount * (1 - cos(2 pi t / period +
    phase)) / 2``."""

    tint: str = "red"
    amount: float = 0.0
    period: float = 1.0
    phase: float = 0.0

    def at(self, t: float) -> float:
        return self.amount * (1 - math.cos(2 * math.pi * t / self.period + self.phase)) / 2


@dataclass(frozen=True)
class PromptAttributes:
    """What a prompt says: the background colour and the (colour, shape) of each object, in order."""

    background: str
    objects: tuple[tuple[str, str], ...]

    @property
    def num_objects(self) -> int:
        return len(self.objects)


@dataclass(frozen=True)
class Scene:
    """A scene: the prompt's attributes plus the hidden state. ``Scene(background, objects)`` alone is the
    first toy world (arena = frame, fixed camera, constant light, no drift)."""

    background: str
    objects: tuple[ToyObject, ...]
    arena: tuple[float, float] = (1.0, 1.0)
    camera: Camera = Camera()
    lighting: Lighting = Lighting()
    drift: Drift = Drift()

    def __post_init__(self):
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"unknown background {self.background!r}; use one of {sorted(BACKGROUND_COLOURS)}")
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        aw, ah = self.arena
        if not (aw >= 1 and ah >= 1):
            raise ValueError(f"the arena {self.arena} must be at least the frame (1 x 1)")
        for o in self.objects:
            if o.shape not in SHAPES:
                raise ValueError(f"unknown shape {o.shape!r}; use one of {list(SHAPES)}")
            if o.colour not in SHAPE_COLOURS:
                raise ValueError(f"unknown shape colour {o.colour!r}; use one of {sorted(SHAPE_COLOURS)}")
            hx, hy = o.half_extent
            if not (0 < 2 * hx < 1 and 0 < 2 * hy < 1):
                raise ValueError(f"object size {o.size} must be in (0, 1) frame units")
            if not (hx <= o.x <= aw - hx and hy <= o.y <= ah - hy):
                raise ValueError(f"object {o.colour} {o.shape} starts outside the arena at ({o.x}, {o.y})")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"objects of one scene need distinct colours, got {colours}")
        c = self.camera
        if c.period_x <= 0 or c.period_y <= 0 or not (0 <= c.pan_x <= (aw - 1) / 2 + 1e-12
                                                      and 0 <= c.pan_y <= (ah - 1) / 2 + 1e-12):
            raise ValueError(f"camera {c} must pan within the arena {self.arena} with positive periods")
        if not (0 <= self.lighting.depth < 1 and self.lighting.period > 0):
            raise ValueError(f"lighting depth must be in [0, 1) and its period positive, got {self.lighting}")
        if self.drift.tint not in SHAPE_COLOURS or not (0 <= self.drift.amount <= 1 and self.drift.period > 0):
            raise ValueError(f"drift needs a shape colour tint, an amount in [0, 1] and a positive period, "
                             f"got {self.drift}")

    @property
    def attributes(self) -> PromptAttributes:
        return PromptAttributes(self.background, tuple((o.colour, o.shape) for o in self.objects))

    @property
    def prompt(self) -> str:
        return make_prompt(self.attributes)


def make_prompt(attributes: PromptAttributes) -> str:
    """'a red circle and a blue square bouncing on a black background'."""
    things = " and ".join(f"a {c} {s}" for c, s in attributes.objects)
    return f"{things} bouncing on a {attributes.background} background"


def parse_prompt(prompt: str) -> PromptAttributes:
    """Inverse of :func:`make_prompt` (case and surrounding spaces are ignored)."""
    how = "expected e.g. 'a red circle and a blue square bouncing on a black background'"
    words = prompt.lower().replace(",", " ").split()
    tail = ["bouncing", "on", "a"]
    if len(words) < 7 or words[-1] != "background" or words[-5:-2] != tail:
        raise ValueError(f"cannot parse toy prompt {prompt!r}: {how}")
    background = words[-2]
    if background not in BACKGROUND_COLOURS:
        raise ValueError(f"unknown background colour {background!r} in {prompt!r}; "
                         f"use one of {sorted(BACKGROUND_COLOURS)}")
    body = words[:-5]
    if (len(body) + 1) % 4:
        raise ValueError(f"cannot parse the objects of toy prompt {prompt!r}: {how}")
    objects = []
    for i in range(0, len(body), 4):
        group = body[i:i + 3]
        joiner = body[i + 3] if i + 3 < len(body) else "and"
        if group[0] != "a" or joiner != "and":
            raise ValueError(f"cannot parse the objects of toy prompt {prompt!r}: {how}")
        colour, shape = group[1], group[2]
        if colour not in SHAPE_COLOURS:
            raise ValueError(f"unknown shape colour {colour!r} in {prompt!r}; use one of {sorted(SHAPE_COLOURS)}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r} in {prompt!r}; use one of {list(SHAPES)}")
        objects.append((colour, shape))
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"toy prompts name at most {MAX_OBJECTS} objects, {prompt!r} names {len(objects)}")
    if len({c for c, _ in objects}) != len(objects):
        raise ValueError(f"the objects of a toy prompt have distinct colours: {prompt!r}")
    return PromptAttributes(background, tuple(objects))


# ------------------------------------------------------------------------------------------ sampling
def _velocity(speed: float, u: float) -> tuple[float, float]:
    """Velocity of ``speed`` in a direction from ``u`` in [0, 1): uniform over the four quadrants, each
    component at least MIN_AXIS_FRACTION of the speed."""
    lo = math.asin(MIN_AXIS_FRACTION)
    q, frac = divmod(4 * u, 1.0)
    angle = q * math.pi / 2 + lo + frac * (math.pi / 2 - 2 * lo)
    return speed * math.cos(angle), speed * math.sin(angle)


def _hidden_state(rng: random.Random, n: int):
    """Arena, depths (a permutation), camera, lighting and drift of a scene of ``n`` objects."""
    mx, my = rng.uniform(*ARENA_MARGIN_X), rng.uniform(*ARENA_MARGIN_Y)
    arena = (1 + 2 * mx, 1 + 2 * my)
    depths = list(range(n))
    rng.shuffle(depths)
    pan = []
    for margin in (mx, my):
        period = rng.uniform(*PAN_PERIOD)
        amp = min(margin, MAX_PAN_SPEED * period / (2 * math.pi)) * rng.uniform(0.5, 1.0)
        pan.append((amp, period, rng.uniform(0, 2 * math.pi)))
    camera = Camera(pan[0][0], pan[1][0], pan[0][1], pan[1][1], pan[0][2], pan[1][2])
    lighting = Lighting(rng.uniform(*LIGHTING_DEPTH), rng.uniform(*LIGHTING_PERIOD), rng.uniform(0, 2 * math.pi))
    drift = Drift(rng.choice(DRIFT_TINTS), rng.uniform(*DRIFT_AMOUNT), rng.uniform(*DRIFT_PERIOD),
                  rng.uniform(0, 2 * math.pi))
    return arena, depths, camera, lighting, drift


def _build(rng: random.Random, hidden_rng: random.Random, background: str,
           objects: list[tuple[str, str | None]]) -> Scene:
    arena, depths, camera, lighting, drift = _hidden_state(hidden_rng, len(objects))
    out = []
    for j, (colour, shape) in enumerate(objects):
        shape = shape if shape is not None else rng.choice(SHAPES)
        size = rng.uniform(MIN_SIZE, MAX_SIZE)
        hx, hy = half_extent(shape, size)
        x, y = rng.uniform(hx, arena[0] - hx), rng.uniform(hy, arena[1] - hy)
        speed, u = rng.uniform(MIN_SPEED, MAX_SPEED), rng.uniform(0, 1)
        vx, vy = _velocity(speed, u)
        out.append(ToyObject(shape, colour, size, x, y, vx, vy, float(depths[j])))
    return Scene(background, tuple(out), arena, camera, lighting, drift)


def sample_scene(seed: int, num_objects: int | None = None) -> Scene:
    """A random scene, fully determined by ``seed`` (and ``num_objects``: 1-3, random when None).

    The prompt of a seed is the same as in the first toy world (same draws for the attributes).
    """
    rng = random.Random(int(seed))
    n = rng.randint(1, MAX_OBJECTS) if num_objects is None else int(num_objects)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be 1..{MAX_OBJECTS}, got {num_objects}")
    background = rng.choice(sorted(BACKGROUND_COLOURS))
    colours = rng.sample(sorted(SHAPE_COLOURS), n)
    return _build(rng, random.Random(int(seed) ^ 0x70F_2ED), background, [(c, None) for c in colours])


def scene_for(attributes: PromptAttributes | str, seed: int) -> Scene:
    """A random scene showing exactly what a prompt (or its attributes) says; hidden state and motion from
    ``seed``."""
    attrs = parse_prompt(attributes) if isinstance(attributes, str) else attributes
    rng = random.Random(int(seed) * 7919 + 17)
    return _build(rng, random.Random(int(seed) ^ 0x5CE_4E), attrs.background, list(attrs.objects))
