"""Make docs/images/demo_contact_sheet.png: every 4th frame of the README's demo, 4x nearest-neighbour.

    self-forcing generate --prompt "a red circle and a blue square bouncing on a black background" \
        --frames 48 --raw demo.rgb            # the demo (scripts/demo.sh), raw rgb24 frames instead of an mp4
    python scripts/contact_sheet.py demo.rgb docs/images/demo_contact_sheet.png

Needs Pillow and numpy (both in the ".[test]" extra).
"""

import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE, FRAMES, EVERY, COLS, SCALE, PAD, LABEL = 64, 48, 4, 6, 4, 4, 14


def main(raw_path: str, out_path: str) -> None:
    raw = np.fromfile(raw_path, dtype=np.uint8).reshape(FRAMES, SIZE, SIZE, 3)
    picks = list(range(0, FRAMES, EVERY))
    rows = -(-len(picks) // COLS)
    tile = SIZE * SCALE
    sheet = Image.new("RGB", (COLS * tile + (COLS + 1) * PAD, rows * (tile + LABEL) + (rows + 1) * PAD),
                      (60, 60, 60))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, f in enumerate(picks):
        r, c = divmod(i, COLS)
        x, y = PAD + c * (tile + PAD), PAD + r * (tile + LABEL + PAD)
        sheet.paste(Image.fromarray(raw[f]).resize((tile, tile), Image.NEAREST), (x, y))
        draw.text((x + 2, y + tile + 1), f"frame {f}", fill=(220, 220, 220), font=font)
    sheet.save(out_path, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
