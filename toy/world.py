"""The toy world: a procedural, deterministic world of bouncing shapes with long-range structure, for
training and for measuring what long videos get wrong.

Videos are float tensors in [-1, 1], shaped [3, T, H, W] (batches [B, 3, T, H, W]). A scene holds one to
three shapes (circle, square, triangle) of distinct saturated colours on a dark background; its prompt says
what they are::

    a red circle and a blue square bouncing on a black background

The rules (``toy.scene`` has the numbers):

- *physics*: every shape moves with constant velocity and reflects exactly off the walls of an **arena**
  larger than the visible frame, so its next position is predictable from its past;
- *leave and return*: shapes leave the frame into the arena's margins and come back later, where the
  reflections put them, with the same colour and shape;
- *occlusion*: each shape has a depth; nearer shapes cover farther ones, in the same order all video long;
- *slow hidden state*: the camera pans slowly over the arena, a lighting cycle dims and brightens the whole
  picture (brightness 0.7-1, periods of hundreds of frames) and the background colour drifts towards a tint
  and back; none of it is in the prompt, so a long video must remember it beyond its attention window.

Every frame of an unlimited video is a closed-form function of its index (``toy.render``), so any frame
renders directly; :func:`object_states` gives the ground truth per frame (positions, velocities,
visibility, identity, background and lighting). ``toy.metrics`` measures generated videos against it.
Positions, sizes and velocities are in units of the frame's side (a 64 px frame has sizes of 8-16 px).
"""

from __future__ import annotations

import random
from typing import Iterator

import torch

from .render import (bounce, bounce_velocity, draw_order, dynamics, frame_grid, object_centres,  # noqa: F401
                     object_states, render, render_batch)
from .scene import (ARENA_MARGIN_X, ARENA_MARGIN_Y, BACKGROUND_COLOURS, DRIFT_AMOUNT, DRIFT_PERIOD,  # noqa: F401
                    DRIFT_TINTS, LIGHTING_DEPTH, LIGHTING_PERIOD, MAX_OBJECTS, MAX_PAN_SPEED, MAX_SIZE, MAX_SPEED,
                    MIN_AXIS_FRACTION, MIN_LIGHT, MIN_SIZE, MIN_SPEED, PAN_PERIOD, SHAPE_COLOURS, SHAPES, Camera,
                    Drift, Lighting, PromptAttributes, Scene, ToyObject, centroid_offset, colour_rgb, make_prompt,
                    parse_prompt, sample_scene, scene_for)


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
