"""Generated image tasks for the offline main job: a source task to pre-train
a small ViT on, and a target task in another imaging domain to adapt it to.

Both are rendered with seeded numpy, vectorized over the batch, as float32
RGB in `[0, 255]`, shape `(n, size, size, 3)`, with balanced int32 labels.
Everything is drawn from `numpy.random.default_rng(seed)`: the same seed
gives the same images.

**Source task** (`source_task`, the pre-training data): one filled shape per
image, 8 classes by shape (`SOURCE_CLASSES`: circle, square, triangle, cross,
ring, bar, half disc, frame), each in a random saturated colour, at a random
position, size and tilt (at most `MAX_TILT`), on a smooth gradient between
two random colours, with mild pixel noise. The label is the geometry only, so
the model learns shape features invariant to colour.

**Target task** (`target_task`): 6 of the source shapes (`TARGET_CLASSES`)
imaged in another domain, like a stained microscopy slide: one dark "ink"
shape (the tint jittered per image, never the clean saturated colours of the
source), a little larger than in the source, on a blotchy pink/purple
background made of two scales of smooth noise and crossed by faint oriented
"fibres" (a texture the source never shows, and that edge features of the
pre-trained model respond to), with pixel noise more than twice as strong. The gap is in appearance (palette, background texture,
noise, scale), not in what a class means: the situation of the papers'
VTAB-1k specialized and MedFM tasks (same kind of recognition, other
imaging), small enough for two CPU cores. It is a controlled toy, not a
benchmark.
"""

import numpy as np

SOURCE_CLASSES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "bar",
    "half_disc",
    "frame",
)

# Images rendered per vectorized numpy pass (bounds the temporary memory).
CHUNK = 2048
# Shapes are tilted by at most this angle (radians): objects are roughly upright.
MAX_TILT = np.pi / 6

# The target task's classes: 6 of the source shapes, imaged in another domain.
TARGET_CLASSES = ("circle", "square", "triangle", "cross", "ring", "bar")
# Its palette (RGB): background between a light and a dark stain, shapes in ink.
STAIN_LIGHT = np.asarray([235, 170, 200], np.float32)
STAIN_DARK = np.asarray([150, 80, 160], np.float32)
STAIN_INK = np.asarray([70, 30, 110], np.float32)
# Amplitude of the faint fibre texture on the target background.
FIBRE_CONTRAST = 15.0


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
def _check_count(num_images):
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"`num_images` must be a positive integer, got {num_images!r}.")
    return int(num_images)


def _check_size(image_size):
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < 16
    ):
        raise ValueError(
            f"`image_size` must be an integer of at least 16 (pixels per side), got "
            f"{image_size!r}."
        )
    return int(image_size)


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------
def _grid(size):
    """Pixel-centre coordinates in `[-1, 1]`, shape `(1, size, size)` each."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return y[None], x[None]


def _shape_masks(kinds, cy, cx, radius, angle, size):
    """Boolean masks `(n, size, size)` of shapes `kinds` (indices into
    `SOURCE_CLASSES`), centred at `(cy, cx)` with radius `radius` (all in
    `[-1, 1]` image units), rotated by `angle` radians."""
    y, x = _grid(size)
    kinds = np.asarray(kinds)
    columns = [np.asarray(a, np.float32) for a in (cy, cx, radius, angle)]
    out = np.zeros((len(kinds), size, size), dtype=bool)
    for index, name in enumerate(SOURCE_CLASSES):
        chosen = np.flatnonzero(kinds == index)
        if chosen.size == 0:
            continue
        cy_, cx_, radius_, angle_ = (c[chosen, None, None] for c in columns)
        dy, dx = y - cy_, x - cx_
        cos, sin = np.cos(angle_), np.sin(angle_)
        u = (cos * dx + sin * dy) / radius_  # unit-radius rotated coordinates
        v = (-sin * dx + cos * dy) / radius_
        out[chosen] = _UNIT_SHAPES[name](u, v)
    return out


# Unit-radius shapes in rotated coordinates `(u, v)`.
def _circle(u, v):
    return u * u + v * v < 1.0


def _square(u, v):
    return np.maximum(np.abs(u), np.abs(v)) < 0.8


def _triangle(u, v):
    """Equilateral, unit circumradius: three half-planes."""
    root3 = np.float32(np.sqrt(3.0))
    return (v < 0.5) & (root3 * u - v < 1.0) & (-root3 * u - v < 1.0)


def _cross(u, v):
    au, av = np.abs(u), np.abs(v)
    return ((au < 0.3) & (av < 1.0)) | ((av < 0.3) & (au < 1.0))


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 < 1.0) & (r2 > 0.3)


def _bar(u, v):
    return (np.abs(u) < 1.0) & (np.abs(v) < 0.35)


def _half_disc(u, v):
    return (u * u + v * v < 1.0) & (v > -0.15)


def _frame(u, v):
    box = np.maximum(np.abs(u), np.abs(v))
    return (box < 0.85) & (box > 0.5)


_UNIT_SHAPES = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "bar": _bar,
    "half_disc": _half_disc,
    "frame": _frame,
}


def _smooth_noise(rng, n, size, cells):
    """Low-frequency noise in `[0, 1]`: a random `cells x cells` grid,
    bilinearly upsampled to `(n, size, size)`."""
    coarse = rng.random((n, cells + 1, cells + 1), dtype=np.float32)
    pos = np.linspace(0.0, cells, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(int), cells - 1)
    frac = pos - i0
    rows = coarse[:, i0, :] * (1 - frac)[None, :, None] + coarse[:, i0 + 1, :] * frac[None, :, None]
    return rows[:, :, i0] * (1 - frac)[None, None, :] + rows[:, :, i0 + 1] * frac[None, None, :]


def _balanced_labels(rng, num_images, num_classes):
    labels = np.arange(num_images) % num_classes
    rng.shuffle(labels)
    return labels.astype(np.int32)


def _render_in_chunks(render, rng, labels, size):
    """`render(rng, labels_chunk, size)` over chunks of `CHUNK` images, into
    one float32 array: bounded temporary memory for large `n`."""
    out = np.empty((len(labels), size, size, 3), np.float32)
    for start in range(0, len(labels), CHUNK):
        out[start : start + CHUNK] = render(rng, labels[start : start + CHUNK], size)
    return out


def _finish(images, rng, noise):
    images = images + rng.normal(0.0, noise, images.shape).astype(np.float32)
    return np.clip(images, 0.0, 255.0).astype(np.float32)


# --------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------
def source_task(num_images, *, seed=0, image_size=32):
    """The generated pre-training task: one solid shape per image, 8 classes.

    Args:
        num_images: number of images (labels are balanced: class `i % 8`,
            shuffled).
        seed: numpy seed; the same seed gives the same images. Defaults to 0.
        image_size: pixels per side, at least 16. Defaults to 32.

    Returns:
        `(images, labels, class_names)`: float32 `(n, size, size, 3)` in
        `[0, 255]`, int32 `(n,)`, and `SOURCE_CLASSES`.

    Example:
    ```python
    images, labels, names = source_task(1000, seed=0)
    ```
    """
    n, size = _check_count(num_images), _check_size(image_size)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, len(SOURCE_CLASSES))
    return _render_in_chunks(_render_source, rng, labels, size), labels, SOURCE_CLASSES


def _render_source(rng, labels, size):
    n = len(labels)
    radius = rng.uniform(0.35, 0.7, n)
    cy, cx = (rng.uniform(-1, 1, (2, n)) * (1.0 - radius)).astype(np.float32)
    angle = rng.uniform(-MAX_TILT, MAX_TILT, n)
    mask = _shape_masks(labels, cy, cx, radius, angle, size)[..., None]
    # Background: a gradient between two random colours along a random direction.
    y, x = _grid(size)
    theta = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    t = (np.cos(theta) * x + np.sin(theta) * y) * 0.5 + 0.5
    c0, c1 = rng.uniform(0, 255, (2, n, 1, 1, 3)).astype(np.float32)
    background = c0 + (c1 - c0) * t[..., None]
    # Shape: a saturated colour, pushed away from the background's mean.
    colour = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
    mean = 0.5 * (c0 + c1)
    far = np.where(mean > 127.5, 0.0, 255.0)
    colour = np.where(np.abs(colour - mean) < 80, 0.5 * (colour + far), colour)
    images = np.where(mask, colour, background)
    return _finish(images, rng, noise=6.0)


def target_task(num_images, *, seed=0, image_size=32):
    """The generated target task: 6 of the source shapes (`TARGET_CLASSES`)
    imaged in another domain.

    Each image holds one shape, filled with a dark stain "ink" (its tint
    jittered per image), slightly larger than in the source task, on a
    blotchy pink/purple background (two scales of smooth noise, like a
    stained slide) crossed by faint "fibres" (a sine grating of random
    direction, amplitude `FIBRE_CONTRAST`), with strong pixel noise.

    Args:
        num_images: number of images (labels are balanced: class `i % 6`,
            shuffled).
        seed: numpy seed; the same seed gives the same images. Defaults to 0.
        image_size: pixels per side, at least 16. Defaults to 32.

    Returns:
        `(images, labels, class_names)`: float32 `(n, size, size, 3)` in
        `[0, 255]`, int32 `(n,)`, and `TARGET_CLASSES`.
    """
    n, size = _check_count(num_images), _check_size(image_size)
    rng = np.random.default_rng(seed)
    labels = _balanced_labels(rng, n, len(TARGET_CLASSES))
    return _render_in_chunks(_render_target, rng, labels, size), labels, TARGET_CLASSES


def _render_target(rng, labels, size):
    n = len(labels)
    shapes = np.asarray([SOURCE_CLASSES.index(name) for name in TARGET_CLASSES])[labels]
    radius = rng.uniform(0.45, 0.75, n)
    cy, cx = (rng.uniform(-1, 1, (2, n)) * (1.0 - radius)).astype(np.float32)
    angle = rng.uniform(-MAX_TILT, MAX_TILT, n)
    mask = _shape_masks(shapes, cy, cx, radius, angle, size)[..., None]
    blotch = _smooth_noise(rng, n, size, cells=4)[..., None]
    grain = _smooth_noise(rng, n, size, cells=12)[..., None]
    background = STAIN_LIGHT + (STAIN_DARK - STAIN_LIGHT) * (0.6 * blotch + 0.4 * grain)
    # Faint "fibres": a sine grating of random direction and period.
    y, x = _grid(size)
    period = rng.uniform(0.25, 0.45, n)[:, None, None]
    phi = rng.uniform(0, np.pi, n)[:, None, None]
    fibres = np.sin(2 * np.pi * (np.cos(phi) * x + np.sin(phi) * y) / period)
    background = background - FIBRE_CONTRAST * fibres[..., None]
    jitter = rng.uniform(-20, 20, (n, 1, 1, 3)).astype(np.float32)
    images = np.where(mask, STAIN_INK + jitter, background + jitter)
    return _finish(images, rng, noise=14.0)
