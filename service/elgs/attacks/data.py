"""Image sets for training and evaluating patches.

Three layouts of ``--data DIR`` are understood, in this order:

1. ImageNet layout: sub-folders named by WordNet synset (``n01440764/...``); labels are the 1000
   class indices of torchvision's ImageNet weights (synsets in sorted order).
2. A flat folder of images with a ``labels.json`` written by :func:`make_sample_set` for the same model
   and input size: the recorded labels are used.
3. Any other folder of images (searched recursively): each image is labelled by the model's own clean
   top-1 prediction, so clean accuracy without a defence is 100% by construction.

Images are resized whole (no crop) to the model's input size, as the engine does.

:func:`whole_photos` yields what users upload instead of crops: scikit-image's photographs encoded
whole, at several sizes and aspect ratios, as JPEG and PNG (the false-positive set of the attack
verdict, for ``elgs attack eval`` and for calibration).
"""

from __future__ import annotations

import io
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from elgs.attacks._synsets import IMAGENET_SYNSETS
from elgs.images import SAMPLE_PHOTOS, image_to_tensor, open_image, sample_photo
from elgs.models import LoadedModel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")  # matched case-insensitively
LABELS_FILE = "labels.json"
SYNSET_PATTERN = re.compile(r"^n\d{8}$")
SYNSET_INDEX = {synset: index for index, synset in enumerate(IMAGENET_SYNSETS)}


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such data folder: {root}")
    suffixes = {s.lower() for s in IMAGE_EXTENSIONS}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


class ImageSet(Dataset):
    """Images on disk with integer labels; item ``i`` is ``((3, S, S) float in [0, 1], label)``.

    Attributes:
        paths: image files.
        labels: (N,) long class indices.
        image_size: side ``S`` the images are resized to.
        layout: ``imagenet``, ``labels.json`` or ``predicted``, for reports.
    """

    def __init__(self, paths: Sequence[Path], labels: torch.Tensor, image_size: int, layout: str) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.image_size = image_size
        self.layout = layout

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return image_to_tensor(open_image(self.paths[index]), self.image_size), int(self.labels[index])


def is_imagenet_layout(root: str | Path) -> bool:
    """Whether ``root`` has at least one sub-folder named like a WordNet synset."""
    return any(p.is_dir() and SYNSET_PATTERN.match(p.name) for p in Path(root).iterdir())


def imagenet_folder(root: str | Path, image_size: int) -> ImageSet:
    """An ImageNet-layout folder: ``root/<synset>/<image>``; labels from the synset's class index.

    Raises:
        ValueError: a synset folder is not one of the 1000 ImageNet-1k classes.
    """
    root = Path(root)
    paths, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in SYNSET_INDEX:
            raise ValueError(f"{folder} is not named by one of the 1000 ImageNet-1k synsets (e.g. n01440764)")
        files = list_images(folder)
        paths += files
        labels += [SYNSET_INDEX[folder.name]] * len(files)
    if not paths:
        raise ValueError(f"no images under {root}")
    return ImageSet(paths, torch.tensor(labels), image_size, "imagenet")


def load_batches(dataset: Dataset, batch_size: int = 32, workers: int = 0) -> torch.utils.data.DataLoader:
    """An in-order loader over ``dataset`` (for labelling and evaluation)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()  # not inference_mode: the labels are later used in autograd graphs
def predict(model: LoadedModel, images: torch.Tensor | Dataset, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's clean top-1 class and its softmax probability for every image, both (N,).

    Args:
        model: the classifier.
        images: (N, 3, S, S) pixel-space tensor, or a dataset of ``(image, _)`` items.
        batch_size: images per forward pass.
    """
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else (x for x, _ in load_batches(images, batch_size))
    classes, confidences = [], []
    for x in batches:
        probabilities = torch.softmax(model.module(model.normalize(x.to(model.device))).float(), dim=1)
        confidence, top1 = probabilities.max(dim=1)
        classes.append(top1.cpu())
        confidences.append(confidence.cpu())
    if not classes:
        return torch.empty(0, dtype=torch.long), torch.empty(0)
    return torch.cat(classes), torch.cat(confidences)


def predict_labels(model: LoadedModel, images: torch.Tensor | Dataset, batch_size: int = 32) -> torch.Tensor:
    """The model's clean top-1 class of every image, (N,) long (see :func:`predict`)."""
    return predict(model, images, batch_size)[0]


def _recorded_labels(root: Path, paths: list[Path], model: LoadedModel, image_size: int) -> torch.Tensor | None:
    """Labels from ``root/labels.json`` when it was written for this model and input size."""
    labels_path = root / LABELS_FILE
    if not labels_path.is_file():
        return None
    record = json.loads(labels_path.read_text())
    if record.get("model") != model.name or record.get("input_size") != image_size:
        return None
    by_file = record.get("labels", {})
    names = [p.relative_to(root).as_posix() for p in paths]
    if not all(name in by_file for name in names):
        return None
    return torch.tensor([by_file[name]["index"] for name in names], dtype=torch.long)


def load_image_set(root: str | Path, model: LoadedModel, image_size: int | None = None) -> ImageSet:
    """The images under ``root`` with their labels, for ``model`` (see the module docstring for layouts).

    Args:
        root: data folder.
        model: classifier that labels a flat folder.
        image_size: side the images are resized to (default: ``model.input_size``).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no images.
    """
    root = Path(root)
    image_size = image_size or model.input_size
    if not root.is_dir():
        raise FileNotFoundError(f"no such data folder: {root}")
    if is_imagenet_layout(root):
        return imagenet_folder(root, image_size)
    paths = list_images(root)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS[:4])} ...) under {root}")
    labels = _recorded_labels(root, paths, model, image_size)
    if labels is not None:
        return ImageSet(paths, labels, image_size, LABELS_FILE)
    unlabelled = ImageSet(paths, torch.zeros(len(paths), dtype=torch.long), image_size, "predicted")
    return ImageSet(paths, predict_labels(model, unlabelled), image_size, "predicted")


def load_tensors(dataset: Dataset, batch_size: int = 64, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``dataset`` in memory: images (N, 3, S, S) and labels (N,)."""
    images, labels = [], []
    for x, y in load_batches(dataset, batch_size, workers):
        images.append(x)
        labels.append(torch.as_tensor(y))
    if not images:
        raise ValueError("the data set is empty")
    return torch.cat(images), torch.cat(labels)


@dataclass(frozen=True)
class SampleSetReport:
    """What :func:`make_sample_set` wrote."""

    root: Path
    train: int
    heldout: int
    classes: int


def random_crop(image, rng: random.Random, *, min_area: float = 0.3, size: int = 224):
    """A random square-ish crop covering ``[min_area, 1]`` of the photo's area, flipped half the time,
    resized to ``size x size`` (PIL image in, PIL image out)."""
    from PIL import Image, ImageOps

    width, height = image.size
    area = rng.uniform(min_area, 1.0) * width * height
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = min(width, max(8, round(math.sqrt(area * aspect))))
    crop_h = min(height, max(8, round(math.sqrt(area / aspect))))
    left = rng.randint(0, width - crop_w)
    top = rng.randint(0, height - crop_h)
    crop = image.crop((left, top, left + crop_w, top + crop_h)).resize((size, size), Image.Resampling.BILINEAR)
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def make_sample_set(out: str | Path, model: LoadedModel, *, train: int = 200, heldout: int = 100, seed: int = 0,
                    photos: Sequence[str] = SAMPLE_PHOTOS, min_area: float = 0.3, min_confidence: float = 0.3,
                    split: str = "crops", max_draws_per_crop: int = 30) -> SampleSetReport:
    """Build an offline image set from scikit-image's photographs, labelled by ``model``.

    Writes ``out/train/*.png``, ``out/heldout/*.png`` (random crops and flips at the model's input size)
    and ``labels.json`` in each (model, input size, seed, and per file the model's top-1 index, label and
    probability), so ``--data out/train`` and ``--data out/heldout`` are ready to use.

    The labels are the model's own predictions, which mean something only where the model recognises
    the crop: a crop whose top-1 probability is below ``min_confidence`` (textures such as grass or
    gravel, where the top-1 is a guess that any occlusion flips) is drawn again. Photographs are visited
    in turn, so every photograph that yields confident crops is represented.

    Args:
        out: folder to create (may exist; files of the same name are overwritten).
        model: the classifier that labels the crops.
        train: number of training crops.
        heldout: number of held-out crops.
        seed: seeds the crops, flips and split.
        photos: scikit-image photograph names.
        min_area: smallest crop, as a fraction of the photo's area.
        min_confidence: smallest top-1 probability a crop must get to be kept (0 keeps every crop).
        split: ``crops`` (held-out crops are fresh crops of the same photos) or ``photos`` (held-out crops
            come from a disjoint quarter of the photos).
        max_draws_per_crop: give up (``ValueError``) after this many draws per requested crop.
    """
    if train < 1 or heldout < 0:
        raise ValueError(f"need train >= 1 and heldout >= 0 crops, got {train} and {heldout}")
    if split not in ("crops", "photos"):
        raise ValueError(f"split must be 'crops' or 'photos', got {split!r}")
    if not 0 <= min_confidence < 1:
        raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
    rng = random.Random(seed)
    names = list(photos)
    if split == "photos":
        shuffled = rng.sample(names, len(names))
        cut = max(1, len(names) // 4)
        pools = {"train": shuffled[cut:], "heldout": shuffled[:cut]}
    else:
        pools = {"train": names, "heldout": names}
    sources: dict[str, object] = {}  # decoded on first use: small sets touch few photos
    out = Path(out)
    counts = {}
    classes = set()
    for split_name, count in (("train", train), ("heldout", heldout)):
        folder = out / split_name
        folder.mkdir(parents=True, exist_ok=True)
        pool = pools[split_name]
        labels: dict[str, dict] = {}
        draws = 0
        while len(labels) < count:
            if draws >= max_draws_per_crop * count:
                raise ValueError(f"only {len(labels)} of {count} {split_name} crops reached a top-1 probability of "
                                 f"{min_confidence:g} in {draws} draws; lower min_confidence")
            chunk = min(32, max(8, count - len(labels)))
            chunk_names = [pool[(draws + i) % len(pool)] for i in range(chunk)]
            draws += chunk
            crops = []
            for name in chunk_names:
                if name not in sources:
                    sources[name] = sample_photo(name)
                crops.append(random_crop(sources[name], rng, min_area=min_area, size=model.input_size))
            indices, confidences = predict(model, torch.stack([image_to_tensor(c, model.input_size) for c in crops]))
            for name, crop, index, confidence in zip(chunk_names, crops, indices.tolist(), confidences.tolist()):
                if confidence < min_confidence or len(labels) == count:
                    continue
                file = f"{name}_{len(labels):04d}.png"
                crop.save(folder / file)
                labels[file] = {"index": index, "label": model.labels[index], "probability": round(confidence, 4)}
                classes.add(index)
        record = {"model": model.name, "input_size": model.input_size, "seed": seed, "split": split,
                  "min_confidence": min_confidence, "draws": draws, "labels": labels}
        (folder / LABELS_FILE).write_text(json.dumps(record, indent=1))
        counts[split_name] = count
    return SampleSetReport(root=out, train=counts["train"], heldout=counts["heldout"], classes=len(classes))


def resolve_target(target: str | int, labels: Sequence[str]) -> int:
    """A class index from an index or a class name (case-insensitive; a unique prefix also works).

    Raises:
        ValueError: no class or several classes match.
    """
    text = str(target).strip()
    if text.isdigit():
        index = int(text)
        if not 0 <= index < len(labels):
            raise ValueError(f"target index must be in [0, {len(labels)}), got {index}")
        return index
    lowered = [label.lower() for label in labels]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    matches = [i for i, label in enumerate(lowered) if label.startswith(text.lower())]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"target {text!r} is ambiguous: {', '.join(labels[i] for i in matches[:8])}")
    raise ValueError(f"unknown target class {text!r}; give an index in [0, {len(labels)}) or an ImageNet class name")


# SAMPLE_PHOTOS and four more pictures that ship inside scikit-image's wheel: 22 in all.
WHOLE_PHOTOS = (*SAMPLE_PHOTOS, "logo", "microaneurysms", "cell", "stereo_motorcycle")


@dataclass(frozen=True)
class PhotoVariant:
    """How a photograph is re-framed before it is encoded.

    Attributes:
        label: short name, part of :attr:`WholePhoto.name`.
        long_side: the longer side in pixels after resizing (Pillow bilinear, up or down); None keeps the size.
        aspect: width / height of a centred crop taken first; None keeps the photograph's own.
    """

    label: str
    long_side: int | None = None
    aspect: float | None = None


# Native size; a phone-sized and a thumbnail-sized copy; a landscape 16:9 and a portrait 3:4 crop.
WHOLE_PHOTO_VARIANTS = (
    PhotoVariant("native"),
    PhotoVariant("1024px", long_side=1024),
    PhotoVariant("320px", long_side=320),
    PhotoVariant("16x9", long_side=640, aspect=16 / 9),
    PhotoVariant("3x4", long_side=480, aspect=3 / 4),
)
WHOLE_PHOTO_FORMATS = ("JPEG", "PNG")


@dataclass(frozen=True)
class WholePhoto:
    """One encoded upload of :func:`whole_photos`.

    Attributes:
        name: ``PHOTO-VARIANT.jpg`` or ``.png``, unique within one call.
        photo: the scikit-image name.
        variant: the :class:`PhotoVariant` label.
        format: ``JPEG`` or ``PNG``.
        width, height: pixel size of the encoded image.
        data: the encoded file, as ``curl -F image=@file`` sends it.
    """

    name: str
    photo: str
    variant: str
    format: str
    width: int
    height: int
    data: bytes


def skimage_picture(name: str):
    """A picture of ``skimage.data`` in its own mode (L, RGB or RGBA; a stereo pair's left view), 8 bits.

    Unlike :func:`elgs.images.sample_photo` (RGB, ``SAMPLE_PHOTOS`` only), grey and transparent
    pictures stay so, as users upload them.

    Raises:
        FileNotFoundError: ``skimage.data`` has no picture ``name`` that ships with the wheel.
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    loader = getattr(data, name, None) if not name.startswith("_") else None
    try:
        array = loader() if callable(loader) else None
    except (ImportError, OSError, ValueError):  # pictures scikit-image would download (pooch) are not offline
        array = None
    if isinstance(array, tuple):
        array = array[0]
    if not isinstance(array, np.ndarray) or array.ndim not in (2, 3):
        raise FileNotFoundError(f"no offline skimage.data picture {name!r}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64) / max(1.0, float(array.max())), 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] not in (3, 4):
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array))  # uint8 (H, W), (H, W, 3), (H, W, 4): L, RGB, RGBA


def _reframed(image, variant: PhotoVariant):
    """``image`` centre-cropped to ``variant.aspect`` and resized to ``variant.long_side``."""
    from PIL import Image

    width, height = image.size
    if variant.aspect is not None:
        crop_w = min(width, round(height * variant.aspect))
        crop_h = min(height, round(width / variant.aspect))
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
        width, height = image.size
    if variant.long_side is not None and max(width, height) != variant.long_side:
        scale = variant.long_side / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BILINEAR)
    return image


def _encoded(image, image_format: str, jpeg_quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        if image.mode == "RGBA":  # JPEG has no alpha: flatten on white, as an image editor exports it
            from PIL import Image

            flat = Image.new("RGB", image.size, (255, 255, 255))
            flat.paste(image, mask=image.getchannel("A"))
            image = flat
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, format="PNG", compress_level=1)  # same pixels as level 6, several times faster
    return buffer.getvalue()


def whole_photos(photos: Sequence[str] = WHOLE_PHOTOS, *, variants: Sequence[PhotoVariant] = WHOLE_PHOTO_VARIANTS,
                 formats: Sequence[str] = WHOLE_PHOTO_FORMATS, jpeg_quality: int = 90) -> Iterator[WholePhoto]:
    """Whole photographs encoded as users upload them: every photo x variant x format, in that order.

    Deterministic (no randomness; the same bytes for the same Pillow). Nothing is cropped to a square
    or resized to a model's input: the service (``elgs.images.decode_for_model``) does that, so these
    are the false-positive set of the attack verdict. One photograph is decoded at a time.

    Args:
        photos: ``skimage.data`` names (:func:`skimage_picture`); default the 22 of :data:`WHOLE_PHOTOS`.
        variants: sizes and aspect ratios (:data:`WHOLE_PHOTO_VARIANTS`: native, 1024 and 320 px long
            side, a 16:9 crop at 640 px and a 3:4 crop at 480 px).
        formats: ``JPEG`` and/or ``PNG``.
        jpeg_quality: Pillow's JPEG quality (default 90, a camera's or phone's).

    Yields:
        :class:`WholePhoto` (name, photo, variant, format, width, height, encoded bytes).

    Raises:
        ValueError: an unknown format, an empty or repeated variant label.
        FileNotFoundError: a name that is no offline ``skimage.data`` picture.
    """
    unknown = [f for f in formats if f not in WHOLE_PHOTO_FORMATS]
    if unknown:
        raise ValueError(f"formats must be among {', '.join(WHOLE_PHOTO_FORMATS)}, got {', '.join(unknown)}")
    labels = [variant.label for variant in variants]
    if len(set(labels)) != len(labels) or not all(labels):
        raise ValueError(f"variant labels must be unique and non-empty, got {labels}")
    for photo in photos:
        source = skimage_picture(photo)
        for variant in variants:
            image = _reframed(source, variant)
            for image_format in formats:
                extension = "jpg" if image_format == "JPEG" else "png"
                yield WholePhoto(name=f"{photo}-{variant.label}.{extension}", photo=photo, variant=variant.label,
                                 format=image_format, width=image.width, height=image.height,
                                 data=_encoded(image, image_format, jpeg_quality))
