"""Prediction overlays: test images with true (green) and predicted (red) outlines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tumorseg.config import TrainConfig
from tumorseg.data import Split
from tumorseg.inference import predict_masks

TRUE_RGB = (40, 220, 60)
PRED_RGB = (235, 50, 50)


def outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a {0,1} mask (foreground pixels with a background 4-neighbour)."""
    m = np.pad(mask.astype(bool), 1)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~interior


def overlay(image: np.ndarray, true_mask: np.ndarray, pred_mask: np.ndarray) -> Image.Image:
    """Outlines over the image (over its first channel when it has several)."""
    image = np.asarray(image, np.uint8)
    rgb = np.repeat((image[0] if image.ndim == 3 else image)[..., None], 3, axis=2)
    rgb[outline(true_mask)] = TRUE_RGB
    rgb[outline(pred_mask)] = PRED_RGB
    return Image.fromarray(rgb)


def pick_spread(scores: np.ndarray, count: int) -> list[int]:
    """Indices of the worst, best and evenly spaced ranks in between (best first)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    positions = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    return [int(order[p]) for p in positions]


def wrap_to_width(draw: ImageDraw.ImageDraw, text: str, width_px: int) -> list[str]:
    """``text`` broken into lines no wider than ``width_px`` (at spaces, or mid-word for long names)."""
    lines, line = [], ""
    for char in text:
        if draw.textlength(line + char) > width_px and line:
            cut = line.rfind(" ")
            lines.append(line[:cut] if cut > 0 else line)
            line = (line[cut + 1:] if cut > 0 else "") + char
        else:
            line += char
    return lines + [line] if line else lines


def caption(tile: Image.Image, text: str, margin_px: int = 4) -> None:
    """Yellow text on a dark band at the top of ``tile``, wrapped so it never runs off the edge."""
    draw = ImageDraw.Draw(tile)
    lines = wrap_to_width(draw, text, tile.width - 2 * margin_px)
    line_px = 11
    draw.rectangle((0, 0, tile.width, margin_px + line_px * len(lines)), fill=(0, 0, 0))
    for k, line in enumerate(lines):
        draw.text((margin_px, margin_px // 2 + k * line_px), line, fill=(255, 255, 0))


def prediction_tiles(model, split: Split, cfg: TrainConfig, indices: list[int], labels: list[str]) -> list[Image.Image]:
    """Overlays at training resolution, predicted with ``cfg.threshold`` (``tumorseg.inference``)."""
    masks = predict_masks(model, split.images[indices], cfg)
    tiles = []
    for i, index in enumerate(indices):
        tile = overlay(split.images[index], split.masks[index], masks[i]).resize((192, 192), Image.Resampling.NEAREST)
        caption(tile, labels[i])
        tiles.append(tile)
    return tiles


def grid(tiles: list[Image.Image], columns: int = 4) -> Image.Image:
    width, height = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, ((i % columns) * width, (i // columns) * height))
    return canvas


def save_prediction_grid(path: Path, model, split: Split, cfg: TrainConfig, dice: np.ndarray, count: int = 12) -> list[int]:
    """A grid of ``count`` test images from best to worst Dice, with outlines; returns the indices."""
    indices = pick_spread(dice, count)
    labels = [f"#{i} dice {dice[i]:.2f}" for i in indices]
    grid(prediction_tiles(model, split, cfg, indices, labels)).save(path)
    return indices
