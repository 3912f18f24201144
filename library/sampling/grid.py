"""A labelled image grid (A1111's X/Y/Z plot layout): X values across, Y values down, one block per Z value
side by side, with labels drawn in the default font at a readable size."""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def label_font(cell_size: int, size: int | None = None) -> ImageFont.ImageFont:
    """Pillow's built-in font (no font files needed) at a size that reads at the cells' scale."""
    return ImageFont.load_default(size=size or max(14, min(48, cell_size // 12)))


def wrap(text: str, font, width: int) -> list[str]:
    """Break `text` into lines no wider than `width` pixels (long words are cut by characters)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}".strip()
            if font.getlength(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while font.getlength(line) > width and len(line) > 1:  # a word wider than the column
                cut = len(line) - 1
                while cut > 1 and font.getlength(line[:cut]) > width:
                    cut -= 1
                # file names read better broken after a separator: "my_lora-" / "000002"
                breaks = [i + 1 for i, ch in enumerate(line[:cut]) if ch in "-_.,/" and i > 0]
                cut = breaks[-1] if breaks else cut
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


@dataclass(frozen=True)
class GridLayout:
    """Where everything goes. Cells are cell_w x cell_h; the left strip holds Y labels, the top strip the X
    labels and, above them, the Z label of each block."""

    cell_w: int
    cell_h: int
    columns: int
    rows: int
    blocks: int
    left: int  # Y-label strip width
    top: int  # Z + X label strip height
    z_height: int  # part of `top` holding the Z label (0 without Z labels)
    gap: int  # between Z blocks

    @property
    def block_width(self) -> int:
        return self.left + self.columns * self.cell_w

    @property
    def size(self) -> tuple[int, int]:
        width = self.blocks * self.block_width + (self.blocks - 1) * self.gap
        return width, self.top + self.rows * self.cell_h

    def cell_box(self, x: int, y: int, z: int = 0) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of cell (x, y) in block z."""
        left = z * (self.block_width + self.gap) + self.left + x * self.cell_w
        top = self.top + y * self.cell_h
        return left, top, left + self.cell_w, top + self.cell_h


def _text_height(lines: list[str], font, spacing: int) -> int:
    if not lines or lines == [""]:
        return 0
    ascent, descent = font.getmetrics()
    return len(lines) * (ascent + descent) + (len(lines) - 1) * spacing


def _draw_centered(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], lines: list[str], font,
                   spacing: int) -> None:
    left, top, right, bottom = box
    ascent, descent = font.getmetrics()
    y = top + (bottom - top - _text_height(lines, font, spacing)) // 2
    for line in lines:
        x = left + (right - left - font.getlength(line)) / 2
        draw.text((x, y), line, fill=INK, font=font)
        y += ascent + descent + spacing


def layout_grid(cell_size: tuple[int, int], x_labels: list[str], y_labels: list[str], z_labels: list[str],
                font) -> tuple[GridLayout, list[list[str]], list[list[str]], list[list[str]]]:
    """The layout and the wrapped X, Y and Z labels."""
    cell_w, cell_h = cell_size
    pad = max(4, font.size // 3)
    spacing = max(2, font.size // 6)
    has_y = any(y_labels)
    left = min(max(cell_w, 160), max((int(font.getlength(t)) for t in y_labels), default=0) + 2 * pad) if has_y else 0
    xs = [wrap(t, font, cell_w - 2 * pad) for t in x_labels]
    ys = [wrap(t, font, left - 2 * pad) if has_y else [] for t in y_labels]
    block_w = left + len(x_labels) * cell_w
    zs = [wrap(t, font, block_w - 2 * pad) for t in z_labels]
    x_height = max((_text_height(lines, font, spacing) for lines in xs), default=0)
    z_height = max((_text_height(lines, font, spacing) for lines in zs), default=0)
    x_strip = x_height + 2 * pad if any(x_labels) else 0
    z_strip = z_height + 2 * pad if any(z_labels) else 0
    layout = GridLayout(cell_w, cell_h, len(x_labels), len(y_labels), len(z_labels), left, x_strip + z_strip,
                        z_strip, gap=2 * pad if len(z_labels) > 1 else 0)
    return layout, xs, ys, zs


def make_grid(cells: dict[tuple[int, int, int], Image.Image], x_labels: list[str], y_labels: list[str],
              z_labels: list[str] | None = None, font_size: int | None = None) -> tuple[Image.Image, GridLayout]:
    """Paste cells[(x, y, z)] into a labelled grid. Every label list gives that axis's length; an axis that is
    not used has one empty label. Cells share one size (the first cell's)."""
    z_labels = z_labels or [""]
    first = next(iter(cells.values()))
    font = label_font(min(first.size), font_size)
    layout, xs, ys, zs = layout_grid(first.size, x_labels, y_labels, z_labels, font)
    spacing = max(2, font.size // 6)
    grid = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for z in range(layout.blocks):
        block_left = z * (layout.block_width + layout.gap)
        if layout.z_height:
            _draw_centered(draw, (block_left, 0, block_left + layout.block_width, layout.z_height), zs[z], font,
                           spacing)
        for x in range(layout.columns):
            left, top, right, _ = layout.cell_box(x, 0, z)
            _draw_centered(draw, (left, layout.z_height, right, top), xs[x], font, spacing)
        for y in range(layout.rows):
            _, top, _, bottom = layout.cell_box(0, y, z)
            _draw_centered(draw, (block_left, top, block_left + layout.left, bottom), ys[y], font, spacing)
            for x in range(layout.columns):
                image = cells[(x, y, z)]
                if image.size != first.size:
                    image = image.resize(first.size, Image.Resampling.LANCZOS)
                grid.paste(image.convert("RGB"), layout.cell_box(x, y, z)[:2])
    return grid, layout
