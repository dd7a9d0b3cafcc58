"""A procedural "toy world" of bouncing shapes, with known rules, for training and measuring drift.

Videos are float tensors in [-1, 1], shaped [3, T, H, W] (batches [B, 3, T, H, W]). Every scene holds one
to three shapes (circle, square, triangle) in distinct saturated colours on a plain dark background. Each
shape moves with constant velocity and reflects exactly off the frame's walls; positions are closed-form
(triangle wave), so any frame of an unlimited video can be rendered directly. Edges are antialiased by
supersampling. A prompt is generated from the attributes and parsed back by :func:`parse_prompt`::

    a red circle and a blue square bouncing on a black background

Geometry is resolution independent: positions, sizes and velocities are in units of the frame's side
(a 64 px frame has sizes of 8-16 px).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

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
# Sizes (circle diameter, square side, triangle side) and speeds, in units of the frame side.
MIN_SIZE, MAX_SIZE = 8 / 64, 16 / 64
MIN_SPEED, MAX_SPEED = 0.5 / 64, 2.5 / 64
SUPERSAMPLE = 4
_TRI_HEIGHT = math.sqrt(3) / 2  # height of an equilateral triangle of side 1


def colour_rgb(name: str) -> tuple[float, float, float]:
    """[0, 1] RGB of a shape or background colour name."""
    if name in SHAPE_COLOURS:
        return SHAPE_COLOURS[name]
    if name in BACKGROUND_COLOURS:
        return BACKGROUND_COLOURS[name]
    raise ValueError(f"unknown colour {name!r}; known colours: "
                     f"{sorted(SHAPE_COLOURS) + sorted(BACKGROUND_COLOURS)}")


@dataclass(frozen=True)
class ToyObject:
    """One moving shape. ``x``/``y`` are its bounding-box centre at frame 0, ``vx``/``vy`` per frame."""

    shape: str
    colour: str
    size: float
    x: float
    y: float
    vx: float
    vy: float

    @property
    def half_extent(self) -> tuple[float, float]:
        """Half width and half height of the bounding box (the triangle is shorter than wide)."""
        h = self.size * _TRI_HEIGHT if self.shape == "triangle" else self.size
        return self.size / 2, h / 2

    @property
    def area(self) -> float:
        if self.shape == "circle":
            return math.pi * self.size ** 2 / 4
        if self.shape == "square":
            return self.size ** 2
        return self.size ** 2 * _TRI_HEIGHT / 2


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
    background: str
    objects: tuple[ToyObject, ...]

    def __post_init__(self):
        if self.background not in BACKGROUND_COLOURS:
            raise ValueError(f"unknown background {self.background!r}; use one of {sorted(BACKGROUND_COLOURS)}")
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        for o in self.objects:
            if o.shape not in SHAPES:
                raise ValueError(f"unknown shape {o.shape!r}; use one of {list(SHAPES)}")
            if o.colour not in SHAPE_COLOURS:
                raise ValueError(f"unknown shape colour {o.colour!r}; use one of {sorted(SHAPE_COLOURS)}")
            hx, hy = o.half_extent
            if not (0 < 2 * hx < 1 and 0 < 2 * hy < 1):
                raise ValueError(f"object size {o.size} must be in (0, 1) frame units")
            if not (hx <= o.x <= 1 - hx and hy <= o.y <= 1 - hy):
                raise ValueError(f"object {o.colour} {o.shape} starts outside the frame at ({o.x}, {o.y})")
        colours = [o.colour for o in self.objects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"objects of one scene need distinct colours, got {colours}")

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
    return PromptAttributes(background, tuple(objects))


def sample_scene(seed: int, num_objects: int | None = None) -> Scene:
    """A random scene, fully determined by ``seed`` (and ``num_objects``: 1-3, random when None)."""
    rng = random.Random(int(seed))
    n = rng.randint(1, MAX_OBJECTS) if num_objects is None else int(num_objects)
    if not 1 <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be 1..{MAX_OBJECTS}, got {num_objects}")
    background = rng.choice(sorted(BACKGROUND_COLOURS))
    colours = rng.sample(sorted(SHAPE_COLOURS), n)
    objects = []
    for colour in colours:
        shape = rng.choice(SHAPES)
        size = rng.uniform(MIN_SIZE, MAX_SIZE)
        hx, hy = ToyObject(shape, colour, size, 0.5, 0.5, 0, 0).half_extent
        x, y = rng.uniform(hx, 1 - hx), rng.uniform(hy, 1 - hy)
        speed, angle = rng.uniform(MIN_SPEED, MAX_SPEED), rng.uniform(0, 2 * math.pi)
        objects.append(ToyObject(shape, colour, size, x, y, speed * math.cos(angle), speed * math.sin(angle)))
    return Scene(background, tuple(objects))


def bounce(start: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor,
           low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Closed-form position at time ``t`` of a point moving in [low, high] with exact reflection.

    Unfolded, the motion is linear; folding it back is a triangle wave of period 2 * (high - low).
    """
    span = high - low
    u = torch.remainder(start - low + velocity * t, 2 * span)
    return low + span - (u - span).abs()


def _scene_params(scenes: Sequence[Scene], device, dtype) -> dict[str, torch.Tensor]:
    """Pack scenes into [B, K] tensors, objects sorted by area (largest drawn first, smallest on top)."""
    rows = []
    for scene in scenes:
        objs = sorted(scene.objects, key=lambda o: -o.area)
        row = []
        for k in range(MAX_OBJECTS):
            if k < len(objs):
                o = objs[k]
                hx, hy = o.half_extent
                row.append([o.x, o.y, o.vx, o.vy, hx, hy, SHAPES.index(o.shape), 1.0, *colour_rgb(o.colour)])
            else:  # empty slot: a zero-size object that is never drawn
                row.append([0.5, 0.5, 0.0, 0.0, 0.25, 0.25, 0, 0.0, 0.0, 0.0, 0.0])
        rows.append(row)
    p = torch.tensor(rows, dtype=torch.float64, device=device)  # [B, K, 11]
    names = ("x", "y", "vx", "vy", "hx", "hy", "shape", "present")
    out = {n: p[..., i] for i, n in enumerate(names)}
    out["rgb"] = p[..., 8:11].to(dtype)
    out["background"] = torch.tensor([colour_rgb(s.background) for s in scenes], dtype=dtype, device=device)
    return out


def _frame_grid(scenes: Sequence[Scene], start_frame, num_frames: int, device) -> torch.Tensor:
    """Absolute frame indices [B, T] (float64) from one start frame or one per scene."""
    starts = [int(start_frame)] * len(scenes) if isinstance(start_frame, int) else [int(s) for s in start_frame]
    if len(starts) != len(scenes):
        raise ValueError(f"got {len(starts)} start frames for {len(scenes)} scenes")
    base = torch.tensor(starts, dtype=torch.float64, device=device)
    return base[:, None] + torch.arange(num_frames, dtype=torch.float64, device=device)[None, :]


def _centres(p: dict[str, torch.Tensor], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = t[:, None, :]  # [B, 1, T]
    cx = bounce(p["x"][..., None], p["vx"][..., None], t, p["hx"][..., None], 1 - p["hx"][..., None])
    cy = bounce(p["y"][..., None], p["vy"][..., None], t, p["hy"][..., None], 1 - p["hy"][..., None])
    return cx, cy


def object_centres(scenes: Sequence[Scene], start_frame: int | Sequence[int], num_frames: int,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding-box centres (x, y), each [B, K, T] float64, of every object slot, in draw order.

    Slots are sorted by area (largest first); empty slots of scenes with fewer objects hold 0.5.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    p = _scene_params(scenes, device, torch.float64)
    return _centres(p, _frame_grid(scenes, start_frame, num_frames, device))


def _coverage(shape: torch.Tensor, cx, cy, hx, hy, xs, ys) -> torch.Tensor:
    """Inside masks of one object slot for a batch: shape/hx/hy [B], cx/cy [B, T], xs/ys grid [S] -> [B,T,S,S]."""
    dx = xs[None, None, None, :] - cx[..., None, None]
    dy = ys[None, None, :, None] - cy[..., None, None]
    hx = hx[:, None, None, None]
    hy = hy[:, None, None, None]
    circle = dx * dx + dy * dy <= hx * hx
    square = (dx.abs() <= hx) & (dy.abs() <= hy)
    # Equilateral triangle, apex up (image y grows downwards): width grows linearly from the apex.
    triangle = (dy.abs() <= hy) & (dx.abs() <= hx * (dy + hy) / (2 * hy))
    kind = shape[:, None, None, None]
    return torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))


def render_batch(scenes: Sequence[Scene], start_frame: int | Sequence[int], num_frames: int, size: int = 64,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Render frames [start, start + num_frames) of each scene -> [B, 3, T, size, size] in [-1, 1].

    ``start_frame`` is one int for all scenes or one per scene. Positions are computed in float64 from
    the absolute frame index, so a frame renders identically whatever clip it is part of.
    """
    if num_frames < 1 or size < 1 or supersample < 1:
        raise ValueError(f"num_frames, size and supersample must be >= 1, got {num_frames}, {size}, {supersample}")
    if not scenes:
        raise ValueError("render_batch needs at least one scene")
    device = torch.device("cpu") if device is None else torch.device(device)
    # Positions in float64 on the CPU (tiny; exact for very long videos), geometry in float32 on device.
    cpu = torch.device("cpu")
    p = _scene_params(scenes, cpu, torch.float64)
    cx, cy = _centres(p, _frame_grid(scenes, start_frame, num_frames, cpu))
    geo = {k: v.to(device=device, dtype=torch.float32) for k, v in p.items() if k not in ("rgb", "background")}
    cx, cy = cx.to(device=device, dtype=torch.float32), cy.to(device=device, dtype=torch.float32)
    rgb = p["rgb"].to(device=device, dtype=torch.float32)
    s = size * supersample
    grid = (torch.arange(s, device=device, dtype=torch.float32) + 0.5) / s
    B, T = len(scenes), num_frames
    background = p["background"].to(device=device, dtype=torch.float32)
    img = background[:, :, None, None, None].expand(B, 3, T, size, size).clone()
    for k in range(MAX_OBJECTS):
        present = geo["present"][:, k] > 0
        if not bool(present.any()):
            continue
        inside = _coverage(geo["shape"][:, k], cx[:, k], cy[:, k], geo["hx"][:, k], geo["hy"][:, k], grid, grid)
        alpha = inside.to(torch.float32).view(B, T, size, supersample, size, supersample).mean(dim=(3, 5))
        alpha = alpha * present.to(torch.float32)[:, None, None, None]
        colour = rgb[:, k][:, :, None, None, None]
        img = img * (1 - alpha[:, None]) + colour * alpha[:, None]
    return (img * 2 - 1).to(dtype)


def render(scene: Scene, start_frame: int = 0, num_frames: int = 16, size: int = 64,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
           supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Render one scene -> [3, num_frames, size, size] in [-1, 1]; deterministic for any start frame."""
    return render_batch([scene], start_frame, num_frames, size, device, dtype, supersample)[0]


def item_seed(seed: int, index: int) -> int:
    """The scene seed of item ``index`` of a dataset seeded with ``seed``."""
    return (int(seed) * 1_000_003 + int(index)) % (2 ** 63)


class ToyVideoDataset(torch.utils.data.Dataset):
    """Map-style dataset of (video [3, T, H, W], prompt); item i is a pure function of (seed, i).

    Each item starts at a random frame in [0, max_start_frame] so clips cover all phases of the motion.
    """

    def __init__(self, num_frames: int = 16, size: int = 64, length: int = 100_000, seed: int = 0,
                 max_start_frame: int = 1000, num_objects: int | None = None):
        if num_frames < 1 or length < 1 or max_start_frame < 0:
            raise ValueError("num_frames and length must be >= 1 and max_start_frame >= 0")
        self.num_frames, self.size, self.length, self.seed = num_frames, size, length, seed
        self.max_start_frame, self.num_objects = max_start_frame, num_objects

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, int]:
        """The scene and start frame of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        s = item_seed(self.seed, index)
        start = random.Random(s ^ 0x5EED).randint(0, self.max_start_frame)
        return sample_scene(s, self.num_objects), start

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        scene, start = self.scene(index)
        return render(scene, start, self.num_frames, self.size), scene.prompt


def iterate_batches(batch_size: int, num_frames: int = 16, size: int = 64, seed: int = 0,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                    max_start_frame: int = 1000, num_objects: int | None = None,
                    ) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Endless deterministic batches (videos [B, 3, T, H, W] on ``device``, prompts), rendered in one go.

    Batch j holds items j*B .. j*B+B-1 of ``ToyVideoDataset(..., seed=seed)``, so a start frame and
    scene are the same whichever way they are drawn.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = ToyVideoDataset(num_frames, size, 2 ** 62, seed, max_start_frame, num_objects)
    index = 0
    while True:
        items = [ds.scene(index + b) for b in range(batch_size)]
        index += batch_size
        videos = render_batch([s for s, _ in items], [t for _, t in items], num_frames, size, device, dtype)
        yield videos, [scene.prompt for scene, _ in items]
