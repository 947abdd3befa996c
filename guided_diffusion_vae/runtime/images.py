"""Pictures: uint8 ``(N, H, W, C)`` arrays laid out on grids and saved as PNG.

Sample grids, training previews, TensorBoard images, VAE comparisons and the
report's figures all use :func:`image_grid` (:func:`grid_tiles` takes one
apart again); image folders and spectrogram arrays are brought to the
training size by :func:`resize_short_side`.
"""

import io

import numpy as np
import torch
from PIL import Image

from .files import atomic_write_bytes


def image_grid(images, columns=None, pad=2, background=255):
    """(N, H, W, C) uint8 -> one (rows*H', cols*W', C) uint8 picture."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), background, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    return grid


def grid_tiles(grid, rows, columns=None, pad=2, background=255):
    """The tiles of a picture :func:`image_grid` laid out: ``rows`` lists of
    (h, w, C) arrays, or None when the picture is not such a grid (its size
    does not divide, or a gutter between tiles is not all ``background``).

    The tile height follows from ``rows``; the width from ``columns``, else
    the tiles are taken as square (as every grid of spectrograms here is).
    """
    grid = np.asarray(grid)
    grid = grid[..., None] if grid.ndim == 2 else grid
    height, width = grid.shape[:2]
    tile_h, rest_h = divmod(height - pad, rows)
    tile_h -= pad
    if columns:
        tile_w, rest_w = divmod(width - pad, columns)
        tile_w -= pad
    else:
        tile_w = tile_h
        columns, rest_w = divmod(width - pad, tile_h + pad) if tile_h > 0 else (0, 1)
    if rest_h or rest_w or tile_h < 1 or tile_w < 1 or columns < 1:
        return None
    gutter = np.ones((height, width), bool)
    tiles = []
    for r in range(rows):
        top = pad + r * (tile_h + pad)
        tiles.append([])
        for c in range(columns):
            left = pad + c * (tile_w + pad)
            tiles[-1].append(grid[top:top + tile_h, left:left + tile_w])
            gutter[top:top + tile_h, left:left + tile_w] = False
    if pad and not (grid[gutter] == background).all():
        return None
    return tiles


def to_pil(image):
    """(H, W, C) uint8 with C in 1, 3, 4 -> PIL image."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def png_bytes(image):
    """(H, W, C) uint8 as the bytes of a PNG file."""
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(path, image):
    atomic_write_bytes(path, png_bytes(image))


def resize_short_side(img, short):
    """A PIL image (8-bit or float, mode ``F``) scaled so its short side is
    ``short``: 2x box reductions while it is at least twice too large (fast,
    and no aliasing), then one bicubic resize. Image folders and arrays share it."""
    while min(img.size) >= 2 * short:
        img = img.reduce(2)
    w, h = img.size
    if w <= h:
        size = (short, max(short, round(h * short / w)))
    else:
        size = (max(short, round(w * short / h)), short)
    if size != img.size:
        img = img.resize(size, resample=Image.Resampling.BICUBIC)
    return img


def to_uint8_images(images):
    """(N, C, H, W) float tensor in [-1, 1] -> (N, H, W, C) uint8 numpy array."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
