"""A study's images as pixels: a frontal or lateral chest drawn from the study's site levels, with
pose, exposure and noise jitter and the detector's lead markers.

Coordinates: y from -1 (top) to 1 (bottom), x scaled alike; frontal images show the patient's
right on the image's left. Intensities are X-ray-like: air dark, fluid and soft tissue bright.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from datamodules.synthetic.population import DEVICES, FINDING_BY_NAME, ImageRecord, Study


def _ellipse(x, y, cx, cy, rx, ry, edge=0.08):
    """1 inside, 0 outside, with a soft rim of relative width ``edge``."""
    r2 = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return np.clip((1 - r2) / edge, 0, 1)


def _segment(x, y, start, end, width):
    """1 within width/2 of the segment, fading to 0 at ``width``."""
    (sx, sy), (ex, ey) = start, end
    dx, dy = ex - sx, ey - sy
    t = np.clip(((x - sx) * dx + (y - sy) * dy) / (dx * dx + dy * dy), 0, 1)
    distance = np.hypot(x - sx - t * dx, y - sy - t * dy)
    return np.clip((width - distance) / (width / 2), 0, 1)


def _texture(rng, rows, columns, cells=16) -> np.ndarray:
    """Smooth zero-mean noise with features about 1/cells of the image."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((columns, rows), Image.Resampling.BICUBIC))


def _paint(image, mask, value):
    image += (value - image) * mask


LUNG_CX, LUNG_CY, LUNG_RX, LUNG_RY = 0.4, -0.08, 0.3, 0.6
HEART_HALF_WIDTH = (0.25, 0.34, 0.42, 0.5)  # by cardiomegaly level: a 3 px step per side at 64 px
FLUID_HEIGHT = (0.16, 0.32, 0.52)  # effusion height by level, for a lung of half-height LUNG_RY
POCKET_WIDTH = (0.07, 0.14, 0.24)  # pneumothorax rim width by level


def _draw_frontal(study: Study, x, y, rng, texture) -> np.ndarray:
    ap = study.view == "AP"
    # Portable AP films are taken supine at shallower inspiration: smaller lungs, higher clavicles,
    # scapulae over the lungs. The heart is drawn the same size so cardiomegaly stays readable.
    lung_ry = LUNG_RY * (0.9 if ap else 1.0)
    image = np.full(x.shape, 0.04, np.float32)
    image += 0.4 * _ellipse(x, y, 0, 0.15, 0.95 if ap else 0.9, 1.25, edge=0.05)
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):
        cx = sign * LUNG_CX
        lung = _ellipse(x, y, cx, LUNG_CY, LUNG_RX, lung_ry, edge=0.06)
        hilum = np.exp(-((x - sign * 0.17) ** 2 + (y + 0.02) ** 2) / 0.03)
        _paint(image, lung, 0.13 + 0.035 * texture + 0.1 * hilum)
        pocket_level = study.level(FINDING_BY_NAME["pneumothorax"], side)
        if pocket_level:
            # Air between chest wall and collapsed lung: dark, no lung markings, a thin pleural line.
            # The collapsed lung keeps its medial edge and base; the pocket is lateral and apical.
            width = POCKET_WIDTH[pocket_level - 1]
            inner_rx, inner_ry = LUNG_RX - width, lung_ry - 0.8 * width
            inner_cx, inner_cy = cx - sign * width, LUNG_CY + 0.8 * width
            inner = _ellipse(x, y, inner_cx, inner_cy, inner_rx, inner_ry, edge=0.03)
            _paint(image, lung * (1 - inner), 0.02)
            radius = np.sqrt(((x - inner_cx) / inner_rx) ** 2 + ((y - inner_cy) / inner_ry) ** 2)
            pocket_side = (sign * (x - inner_cx) / inner_rx - (y - inner_cy) / inner_ry) > 0
            image += 0.35 * lung * pocket_side * np.clip(1 - np.abs(radius - 1) * inner_rx / 0.025, 0, 1)
        lungs[side] = lung
    cardiomegaly = study.level(FINDING_BY_NAME["cardiomegaly"], "")
    _paint(image, _ellipse(x, y, 0.07, 0.24, HEART_HALF_WIDTH[cardiomegaly], 0.3, edge=0.06), 0.52)
    _paint(image, _segment(x, y, (0, -1.1), (0, -0.45), 0.08), 0.22)  # trachea
    image += 0.07 * (np.abs(x) < 0.06)  # spine behind the mediastinum
    clavicle_y = -0.84 if ap else -0.72
    for sign in (-1, 1):
        image += 0.15 * _segment(x, y, (sign * 0.1, clavicle_y), (sign * 0.72, clavicle_y - 0.08), 0.05)
        if ap:
            image += 0.08 * _ellipse(x, y, sign * 0.74, -0.4, 0.13, 0.3)

    for side, sign in (("right", -1), ("left", 1)):
        cx, lung = sign * LUNG_CX, lungs[side]
        effusion = study.level(FINDING_BY_NAME["pleural effusion"], side)
        if effusion:
            # Fluid fills the costophrenic angle; its meniscus climbs the lateral chest wall.
            lateral = np.clip(sign * (x - cx) / LUNG_RX, 0, 1)
            top = LUNG_CY + lung_ry - FLUID_HEIGHT[effusion - 1] * lung_ry / LUNG_RY - 0.12 * lateral
            region = _ellipse(x, y, cx, LUNG_CY, LUNG_RX * 1.05, lung_ry * 1.05, edge=0.04)
            _paint(image, region * np.clip((y - top) / 0.03, 0, 1), 0.58)
        if study.level(FINDING_BY_NAME["atelectasis"], side):
            tilt = sign * 0.15
            u = (x - cx) * np.cos(tilt) + (y - 0.3 * lung_ry / LUNG_RY) * np.sin(tilt)
            v = -(x - cx) * np.sin(tilt) + (y - 0.3 * lung_ry / LUNG_RY) * np.cos(tilt)
            image += 0.3 * lung * _ellipse(u, v, 0, 0, 0.2, 0.04, edge=0.5)
        for height in ("upper", "lower"):
            zone_x = cx + rng.normal(0, 0.03)
            zone_y = (-0.34 if height == "upper" else 0.14) * lung_ry / LUNG_RY + rng.normal(0, 0.03)
            if study.level(FINDING_BY_NAME["lung opacity"], f"{side} {height}"):
                blob = np.exp(-((x - zone_x) ** 2 + (y - zone_y) ** 2) / (2 * 0.12**2))
                image += 0.38 * lung * blob * (0.75 + 0.25 * texture)
            if study.level(FINDING_BY_NAME["consolidation"], f"{side} {height}"):
                image += 0.4 * lung * _ellipse(x, y, zone_x, zone_y, 0.15, 0.13, edge=0.35)

    if study.level(DEVICES, "endotracheal tube"):
        _paint(image, _segment(x, y, (0.0, -1.1), (0.0, -0.42), 0.03), 0.95)
    if study.level(DEVICES, "central line"):
        line = np.maximum(
            _segment(x, y, (-0.55, -1.0), (-0.22, -0.72), 0.025),
            _segment(x, y, (-0.22, -0.72), (-0.1, -0.22), 0.025),
        )
        _paint(image, line, 0.9)
    return image


def _draw_lateral(study: Study, x, y, texture) -> np.ndarray:
    """Patient facing the image's left: sternum left, spine right, heart anterior and low."""
    findings = study.findings
    image = np.full(x.shape, 0.04, np.float32)
    image += 0.4 * _ellipse(x, y, 0, 0.12, 0.88, 1.25, edge=0.05)
    lung = _ellipse(x, y, 0.02, -0.06, 0.56, 0.6, edge=0.06)
    _paint(image, lung, 0.2 + 0.04 * texture)
    cardiomegaly = study.level(FINDING_BY_NAME["cardiomegaly"], "")
    _paint(image, _ellipse(x, y, -0.24, 0.3, 0.22 + 0.07 * cardiomegaly, 0.28, edge=0.06), 0.5)
    image += 0.15 * ((x > 0.56) & (x < 0.72)) * (0.8 + 0.2 * np.sin(y * 28))  # vertebrae
    image += 0.12 * _segment(x, y, (-0.62, -0.6), (-0.58, 0.3), 0.05)  # sternum
    if FINDING_BY_NAME["pleural effusion"] in findings:
        level = findings[FINDING_BY_NAME["pleural effusion"]][0]
        # Fluid collects first in the posterior costophrenic sulcus.
        top = 0.54 - FLUID_HEIGHT[level - 1] - 0.15 * np.clip((x - 0.02) / 0.56, 0, 1)
        region = _ellipse(x, y, 0.02, -0.06, 0.59, 0.63, edge=0.04)
        _paint(image, region * np.clip((y - top) / 0.03, 0, 1), 0.58)
    for name, amount in (("lung opacity", 0.2), ("consolidation", 0.35)):
        sites = findings.get(FINDING_BY_NAME[name], (0, ()))[1]
        for height, zone_y in (("upper", -0.3), ("lower", 0.15)):
            if any(site.endswith(height) for site in sites):
                image += amount * lung * _ellipse(x, y, 0.05, zone_y, 0.18, 0.14, edge=0.5)
    if FINDING_BY_NAME["atelectasis"] in findings:
        image += 0.25 * lung * _ellipse(x, y, 0.1, 0.3, 0.22, 0.035, edge=0.5)
    if study.level(DEVICES, "endotracheal tube"):
        _paint(image, _segment(x, y, (-0.3, -1.1), (-0.2, -0.45), 0.03), 0.95)
    return image


def _markers(view: str, frame_x, frame_y) -> list[np.ndarray]:
    """Detector-fixed lead markers (they do not move with the patient): one shape per view."""

    def box(x0, x1, y0, y1):
        return (frame_x > x0) & (frame_x < x1) & (frame_y > y0) & (frame_y < y1)

    if view == "PA":
        return [box(0.76, 0.86, 0.04, 0.13)]
    if view == "AP":
        return [box(0.14, 0.24, 0.04, 0.13), box(0.14, 0.3, 0.15, 0.18)]
    return [box(0.8, 0.84, 0.04, 0.2)]


def render_image(study: Study, image: ImageRecord, rng: np.random.Generator) -> np.ndarray:
    """The image's pixels, (rows, columns) uint8, with pose, exposure and noise jitter."""
    frame_y, frame_x = np.mgrid[0 : image.rows, 0 : image.columns].astype(np.float32)
    frame_y, frame_x = (frame_y + 0.5) / image.rows, (frame_x + 0.5) / image.columns
    angle, scale = rng.normal(0, 0.035), rng.uniform(0.94, 1.06)
    shift_x, shift_y = rng.normal(0, 0.03, size=2)
    x0 = (frame_x * 2 - 1) * image.columns / image.rows - shift_x
    y0 = frame_y * 2 - 1 - shift_y
    x = (np.cos(angle) * x0 + np.sin(angle) * y0) / scale
    y = (-np.sin(angle) * x0 + np.cos(angle) * y0) / scale
    texture = _texture(rng, image.rows, image.columns)
    if image.view == "LATERAL":
        pixels = _draw_lateral(study, x, y, texture)
    else:
        pixels = _draw_frontal(study, x, y, rng, texture)
    for marker in _markers(image.view, frame_x, frame_y):
        _paint(pixels, marker, 0.97)
    pixels = gaussian_filter(pixels, sigma=image.rows / 220)
    contrast, brightness, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.04, 0.04), rng.uniform(0.8, 1.25)
    pixels = np.clip((pixels - 0.35) * contrast + 0.35 + brightness, 0, 1) ** gamma
    pixels += rng.normal(0, rng.uniform(0.015, 0.035), size=pixels.shape)
    return (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)
