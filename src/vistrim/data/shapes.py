"""Small shapes on natural photographs: the data of test-bed 2, generated deterministically from a seed.

Every scene is a random crop of a photo (flipped and colour-jittered) with 3-5 small flat shapes
(circle, square, triangle; a few 14-px patches each, dark outline, every colour at most once)
placed apart. Questions depend on one small region:

* ``color``: "what color is the circle?" (the named kind occurs once)
* ``shape``: "what shape is the blue object?"
* ``presence``: "is there a blue triangle?" (half yes; a "no" names a present colour and, when
  possible, a present kind, so a near miss is the distractor)
* ``count``: "how many triangles are there?" (0-3)
* ``relation``: "what color is the shape left of the circle?" (exactly one shape on that side,
  every other shape at least a patch away horizontally)

Splits differ by photo (:data:`TRAIN_PHOTOS` come from scikit-image and scikit-learn, needed only for
training; :data:`TEST_PHOTOS` ship with the package) and by random stream. ``SceneItem.size`` is the
area, in patches, of the object the answer depends on (None where no object does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

IMAGE_SIZE = 336
PATCH_SIZE = 14
KINDS = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 30),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
OUTLINE = (25, 25, 25)
COUNTS = ("0", "1", "2", "3")
QTYPES = ("color", "shape", "presence", "count", "relation")
SIZE_BINS = (0.0, 3.0, 6.0, 10.0)  # object area in patches: [0, 3), [3, 6), [6, 10), [10, inf)
BLANK_COLOR = (128, 128, 128)

TRAIN_PHOTOS = (
    "astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins",
    "grass", "gravel", "brick", "moon", "page", "text", "cell", "china",
)  # fmt: skip
TEST_PHOTOS = ("chelsea", "rocket", "flower", "grace_hopper")
PHOTO_DIR = Path(__file__).resolve().parent.parent / "assets" / "photos"
_SPLIT_CODE = {"train": 1, "test": 2}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel bounds)

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image again: photo crop, flip, colour jitter, shapes."""

    photo: str
    crop: tuple[int, int, int]  # x, y, side in photo pixels
    flip: bool
    jitter: tuple[float, float, float, int]  # brightness, contrast, saturation, hue shift (of 256)
    shapes: tuple[Shape, ...]
    photo_dir: str | None = None  # a folder of <name>.jpg files instead of the named sources


@dataclass(frozen=True)
class SceneItem:
    question: str
    answer: str
    qtype: str
    scene: Scene
    size: float | None  # patches covered by the object the answer depends on
    objects: tuple[int, ...] = ()  # indices into scene.shapes of the objects holding the evidence

    def load_image(self) -> Image.Image:
        return render(self.scene)


# ------------------------------------------------------------------------------------------ photos
@functools.lru_cache(maxsize=64)
def load_photo(name: str, photo_dir: str | None = None) -> Image.Image:
    """An RGB photo: ``<photo_dir>/<name>.jpg`` if given, the shipped test photos, or the sample
    images of scikit-image / scikit-learn (training only; those packages are not dependencies)."""
    folder = Path(photo_dir) if photo_dir else PHOTO_DIR
    path = folder / f"{name}.jpg"
    if photo_dir or name in TEST_PHOTOS:
        return Image.open(path).convert("RGB")
    try:
        if name == "china":
            from sklearn.datasets import load_sample_image

            array = load_sample_image(f"{name}.jpg")
        else:
            from skimage import data

            array = getattr(data, name)()
    except ImportError as error:
        raise RuntimeError(f"training photo {name!r} needs scikit-image and scikit-learn ({error})") from None
    array = np.asarray(array)
    if array.dtype != np.uint8:  # some samples are bool or float
        array = (array.astype(np.float64) / max(array.max(), 1) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, -1)
    return Image.fromarray(array[..., :3])


# ------------------------------------------------------------------------------------------ scenes
def split_rng(split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of ``split``: the same on every machine."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], index])


def sample_scene(rng: np.random.Generator, photos: tuple[str, ...], photo_dir: str | None = None) -> Scene:
    name = photos[int(rng.integers(len(photos)))]
    width, height = load_photo(name, photo_dir).size
    side = int(min(width, height) * rng.uniform(0.4, 1.0))
    crop = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side)
    flip = bool(rng.random() < 0.5)
    jitter = (
        float(rng.uniform(0.6, 1.4)),
        float(rng.uniform(0.6, 1.4)),
        float(rng.uniform(0.5, 1.5)),
        int(rng.integers(-20, 21)),
    )
    n = int(rng.integers(3, 6))
    colors = [COLORS[i] for i in rng.permutation(len(COLORS))[:n]]
    kinds = [KINDS[int(i)] for i in rng.integers(0, len(KINDS), n)]
    while max(kinds.count(k) for k in KINDS) > len(COUNTS) - 1:  # counts stay within 0-3
        kinds = [KINDS[int(i)] for i in rng.integers(0, len(KINDS), n)]
    return Scene(name, crop, flip, jitter, place_shapes(rng, kinds, colors), photo_dir)


def place_shapes(rng: np.random.Generator, kinds: list[str], colors: list[str]) -> tuple[Shape, ...]:
    """Non-overlapping boxes (side 28-60 px, at least 6 px apart); a shape that does not fit after
    many tries shrinks."""
    boxes: list[tuple[int, int, int, int]] = []
    gap = 6
    for _ in kinds:
        side = int(rng.integers(28, 61))
        for attempt in range(400):
            if attempt and attempt % 100 == 0:
                side = max(28, side - 8)
            x0 = int(rng.integers(4, IMAGE_SIZE - side - 4))
            y0 = int(rng.integers(4, IMAGE_SIZE - side - 4))
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if all(_apart(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:  # the canvas is large enough for five 60-px shapes: never reached in practice
            raise RuntimeError("could not place the shapes")
    return tuple(Shape(k, c, b) for k, c, b in zip(kinds, colors, boxes))


def _apart(a, b, gap: int) -> bool:
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill, outline=None, width: int = 0) -> None:
    x0, y0, x1, y1 = shape.box
    if shape.kind == "circle":
        draw.ellipse(shape.box, fill=fill, outline=outline, width=width)
    elif shape.kind == "square":
        draw.rectangle(shape.box, fill=fill, outline=outline, width=width)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill, outline=outline, width=width)


def background(scene: Scene) -> Image.Image:
    """The cropped, flipped and jittered photo at ``IMAGE_SIZE``, without shapes."""
    x, y, side = scene.crop
    image = load_photo(scene.photo, scene.photo_dir).crop((x, y, x + side, y + side))
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    if scene.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    brightness, contrast, saturation, hue = scene.jitter
    image = ImageEnhance.Brightness(image).enhance(brightness)
    image = ImageEnhance.Contrast(image).enhance(contrast)
    image = ImageEnhance.Color(image).enhance(saturation)
    h, s, v = image.convert("HSV").split()
    h = h.point(lambda value: (value + hue) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def render(scene: Scene, mode: str = "scene") -> Image.Image:
    """The scene image; ``mode`` "background" leaves the shapes out, "blank" is uniform gray."""
    if mode == "blank":
        return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BLANK_COLOR)
    image = background(scene)
    if mode == "background":
        return image
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, RGB[shape.color], OUTLINE, 2)
    return image


def label_map(scene: Scene) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE) int: 0 background, 1 + i where shape i is drawn (outline included)."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for i, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape, i + 1, i + 1, 2)
    return np.asarray(canvas, dtype=np.int64)


def patch_coverage(scene: Scene) -> np.ndarray:
    """(n_shapes, grid, grid) share of every patch that each shape covers."""
    labels = label_map(scene)
    grid = IMAGE_SIZE // PATCH_SIZE
    blocks = labels.reshape(grid, PATCH_SIZE, grid, PATCH_SIZE)
    return np.stack([(blocks == i + 1).mean((1, 3)) for i in range(len(scene.shapes))])


def shape_sizes(scene: Scene) -> list[float]:
    """Area of every shape in patches (pixels drawn / patch area)."""
    labels = label_map(scene)
    return [float((labels == i + 1).sum()) / PATCH_SIZE**2 for i in range(len(scene.shapes))]


# ------------------------------------------------------------------------------------------ questions
def scene_questions(scene: Scene, rng: np.random.Generator, per_type: int = 2) -> list[SceneItem]:
    """Up to ``per_type`` questions of every type that has a well-defined answer in ``scene``."""
    shapes, sizes = scene.shapes, shape_sizes(scene)
    kind_count = {k: sum(s.kind == k for s in shapes) for k in KINDS}
    items: list[SceneItem] = []

    def add(question: str, answer: str, qtype: str, size: float | None, objects=()) -> None:
        items.append(SceneItem(question, answer, qtype, scene, size, tuple(objects)))

    unique = [i for i, s in enumerate(shapes) if kind_count[s.kind] == 1]
    for i in _pick(rng, unique, per_type):
        add(f"what color is the {shapes[i].kind}?", shapes[i].color, "color", sizes[i], [i])
    for i in _pick(rng, list(range(len(shapes))), per_type):
        add(f"what shape is the {shapes[i].color} object?", shapes[i].kind, "shape", sizes[i], [i])
    for k in range(per_type):
        if k % 2 == 0:
            i = int(rng.integers(len(shapes)))
            add(f"is there a {shapes[i].color} {shapes[i].kind}?", "yes", "presence", sizes[i], [i])
        else:
            color, kind, size = _absent_pair(rng, shapes, sizes)
            named = [j for j, s in enumerate(shapes) if s.color == color]
            add(f"is there a {color} {kind}?", "no", "presence", size, named)
    counts = sorted(set(kind_count.values()))
    for _ in range(per_type):  # a count drawn uniformly first, then a kind with it: answers spread out
        target = counts[int(rng.integers(len(counts)))]
        kind = _pick(rng, [k for k in KINDS if kind_count[k] == target], 1)[0]
        counted = [i for i, s in enumerate(shapes) if s.kind == kind]
        size = min(sizes[i] for i in counted) if counted else None
        add(f"how many {kind}s are there?", str(target), "count", size, counted)
    relations = [(i, side, j) for i in unique for side, j in _single_neighbours(shapes, i)]
    for i, side, j in _pick(rng, relations, per_type):
        question = f"what color is the shape {side} of the {shapes[i].kind}?"
        add(question, shapes[j].color, "relation", sizes[j], [j])
    return items


def _pick(rng: np.random.Generator, options: list, n: int) -> list:
    if not options:
        return []
    order = rng.permutation(len(options))[:n]
    return [options[int(i)] for i in order]


def _absent_pair(rng, shapes, sizes) -> tuple[str, str, float | None]:
    """A (colour, kind) not in the scene: a present colour on a present other kind when possible."""
    present = {(s.color, s.kind) for s in shapes}
    kinds = sorted({t.kind for t in shapes})  # sorted: set order of strings changes between processes
    near = [(s.color, k, sizes[i]) for i, s in enumerate(shapes) for k in kinds if k != s.kind]
    if near:
        return near[int(rng.integers(len(near)))]
    options = [
        (s.color, k, sizes[i]) for i, s in enumerate(shapes) for k in KINDS if (s.color, k) not in present
    ]
    return options[int(rng.integers(len(options)))]


def _single_neighbours(shapes: tuple[Shape, ...], i: int) -> list[tuple[str, int]]:
    """("left"|"right", j) when shape j is the only shape on that side of shape i and every other
    shape is at least a patch away from i horizontally."""
    x = shapes[i].center_x
    others = [j for j in range(len(shapes)) if j != i]
    if any(abs(shapes[j].center_x - x) < PATCH_SIZE for j in others):
        return []
    left = [j for j in others if shapes[j].center_x < x]
    right = [j for j in others if shapes[j].center_x > x]
    return [(side, js[0]) for side, js in (("left", left), ("right", right)) if len(js) == 1]


# ------------------------------------------------------------------------------------------ splits
def make_scenes(
    split: str, n: int, seed: int = 0, start: int = 0, photo_dir: str | None = None
) -> list[Scene]:
    photos = TEST_PHOTOS if split == "test" else TRAIN_PHOTOS
    if photo_dir:
        photos = tuple(sorted(p.stem for p in Path(photo_dir).glob("*.jpg")))
    return [sample_scene(split_rng(split, seed, i), photos, photo_dir) for i in range(start, start + n)]


def make_items(
    split: str, n_scenes: int, seed: int = 0, start: int = 0, per_type: int = 2, photo_dir: str | None = None
) -> list[SceneItem]:
    """Questions on scenes ``start..start+n_scenes-1`` of ``split``; deterministic for ``seed``."""
    items: list[SceneItem] = []
    for i, scene in enumerate(make_scenes(split, n_scenes, seed, start, photo_dir)):
        items += scene_questions(scene, split_rng(split, seed + 7919, start + i), per_type)
    return items


def eval_items(n_scenes: int = 300, seed: int = 0) -> list[SceneItem]:
    """The test split used by ``vistrim eval`` and the model card (shipped photos only)."""
    return make_items("test", n_scenes, seed)


def size_bins() -> list[str]:
    """Names of the object-size bins, smallest first: ``0-3``, ``3-6``, ``6-10``, ``>=10`` patches."""
    edges = [*SIZE_BINS[1:], None]
    return [f"{lo:g}-{hi:g}" if hi is not None else f">={lo:g}" for lo, hi in zip(SIZE_BINS, edges)]


def size_bin(size: float | None) -> str | None:
    """The bin of an area in patches (None stays None)."""
    if size is None:
        return None
    index = sum(size >= edge for edge in SIZE_BINS) - 1
    return size_bins()[max(index, 0)]


def vocabulary() -> list[str]:
    """Prompt words, question words, then the answers; deterministic order."""
    words = ["user", ":", "assistant", "what", "color", "shape", "is", "the", "object", "?", "there", "a"]
    words += ["how", "many", "are", "of", "left", "right", *KINDS, *(f"{k}s" for k in KINDS)]
    return words + [*COLORS, "yes", "no", *COUNTS]


def answer_prior(items: list[SceneItem]) -> dict:
    """Accuracy of always giving each type's most frequent answer in ``items`` (the image-blind floor)."""
    by_type = {}
    for qtype in QTYPES:
        answers = [it.answer for it in items if it.qtype == qtype]
        if answers:
            top = max(sorted(set(answers)), key=answers.count)
            by_type[qtype] = {"accuracy": answers.count(top) / len(answers), "n": len(answers), "answer": top}
    correct = sum(m["accuracy"] * m["n"] for m in by_type.values())
    return {"accuracy": correct / max(1, len(items)), "n": len(items), "by_type": by_type}
