"""Line plots written as PNG with the standard library only (zlib + struct): a small RGB
rasterizer (lines, axes, ticks, a 3×5 digit font) and a PNG encoder. Used for `loss.png`."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence

# 3×5 glyphs, each row 3 bits (MSB = left column).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 2, 2),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0), "k": (4, 5, 6, 5, 5),
}

Color = tuple[int, int, int]


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """An 8-bit RGB PNG of `rgb` (row-major, 3 bytes per pixel, no filter)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"rgb must hold width*height*3 = {width * height * 3} bytes, got {len(rgb)}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    stride = width * 3
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


class Canvas:
    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, thickness: int = 1) -> None:
        """Straight segment, one sample per pixel along its longer axis."""
        n = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        r = thickness // 2
        for i in range(n + 1):
            x = round(x0 + (x1 - x0) * i / n)
            y = round(y0 + (y1 - y0) * i / n)
            for dx in range(-r, thickness - r):
                for dy in range(-r, thickness - r):
                    self.set(x + dx, y + dy, color)

    def text(self, x: int, y: int, s: str, color: Color, scale: int = 2) -> None:
        """Draws `s` (digits, '.', '-', 'e', 'k') with its top-left corner at (x, y)."""
        for ch in s:
            for row, bits in enumerate(_FONT.get(ch, _FONT[" "])):
                for col in range(3):
                    if bits & (4 >> col):
                        for sx in range(scale):
                            for sy in range(scale):
                                self.set(x + col * scale + sx, y + row * scale + sy, color)
            x += 4 * scale

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels)


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.0e}"
    if abs(v) >= 1000 and v % 1000 == 0:
        return f"{int(v) // 1000}k"
    return f"{v:.3g}"


def plot_lines(
    series: Sequence[tuple[Sequence[float], Sequence[float], Color]],
    width: int = 640,
    height: int = 400,
) -> bytes:
    """PNG of line plots sharing axes: each series is (xs, ys, colour); a series of one point is
    drawn as a dot;
    series of at most 20 points get a dot at each point. Axes with numbered ticks; non-finite values are skipped."""
    pts = [(x, y) for xs, ys, _ in series for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 20, height - 40
    xlo, xhi = (min(p[0] for p in pts), max(p[0] for p in pts)) if pts else (0.0, 1.0)
    ylo, yhi = (min(p[1] for p in pts), max(p[1] for p in pts)) if pts else (0.0, 1.0)
    if xhi <= xlo:
        xhi = xlo + 1.0
    pad = (yhi - ylo) * 0.05 or 0.5
    ylo, yhi = ylo - pad, yhi + pad

    def px(x: float) -> float:
        return left + (x - xlo) / (xhi - xlo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    grid, axis = (230, 230, 230), (60, 60, 60)
    for t in _nice_ticks(ylo, yhi):
        canvas.line(left, py(t), right, py(t), grid)
        canvas.line(left - 5, py(t), left, py(t), axis)
        s = _label(t)
        canvas.text(left - 10 - 8 * len(s), round(py(t)) - 5, s, axis)
    for t in _nice_ticks(xlo, xhi):
        canvas.line(px(t), top, px(t), bottom, grid)
        canvas.line(px(t), bottom, px(t), bottom + 5, axis)
        s = _label(t)
        canvas.text(round(px(t)) - 4 * len(s), bottom + 10, s, axis)
    canvas.line(left, top, left, bottom, axis)
    canvas.line(left, bottom, right, bottom, axis)

    for xs, ys, color in series:
        p = [(px(x), py(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
        if len(p) <= 20:  # few points (evaluations): mark each one
            for x, y in p:
                canvas.line(x, y, x, y, color, thickness=5)
        for (x0, y0), (x1, y1) in zip(p, p[1:]):
            canvas.line(x0, y0, x1, y1, color, thickness=2)
    return canvas.png()
