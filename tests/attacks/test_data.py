"""Data layouts, labelling and the offline sample set."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from elgs.attacks._synsets import IMAGENET_SYNSETS
from elgs.attacks.data import load_image_set, make_sample_set, predict_labels, resolve_target
from elgs.models import imagenet_labels


def _write_png(path, colour, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_synsets_are_the_sorted_imagenet_ids():
    assert len(IMAGENET_SYNSETS) == len(set(IMAGENET_SYNSETS)) == 1000
    assert list(IMAGENET_SYNSETS) == sorted(IMAGENET_SYNSETS)
    assert IMAGENET_SYNSETS[0] == "n01440764" and IMAGENET_SYNSETS[859] == "n04442312"  # tench, toaster


def test_resolve_target_by_index_name_and_prefix():
    labels = imagenet_labels()
    assert resolve_target("toaster", labels) == 859
    assert resolve_target("Toaster", labels) == 859
    assert resolve_target("859", labels) == 859
    assert resolve_target(3, ["a", "b", "c", "d"]) == 3
    assert resolve_target("baseb", labels) == labels.index("baseball")
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_target("tab", labels)
    with pytest.raises(ValueError, match="'no such class'"):
        resolve_target("no such class", labels)
    with pytest.raises(ValueError, match="1000"):
        resolve_target("1000", labels)


def test_imagenet_layout_labels_come_from_synset_folders(tmp_path, tiny_model):
    _write_png(tmp_path / "n04442312" / "a.JPEG", (255, 0, 0))
    _write_png(tmp_path / "n04442312" / "b.png", (0, 255, 0))
    _write_png(tmp_path / "n01440764" / "c.jpg", (0, 0, 255))
    dataset = load_image_set(tmp_path, tiny_model)
    assert dataset.layout == "imagenet"
    assert [p.name for p in dataset.paths] == ["c.jpg", "a.JPEG", "b.png"]
    assert dataset.labels.tolist() == [0, 859, 859]
    image, label = dataset[1]
    assert image.shape == (3, 32, 32) and label == 859
    assert torch.allclose(image[0], torch.ones(32, 32), atol=0.02) and image[1:].max() < 0.02  # red (JPEG)
    (tmp_path / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        load_image_set(tmp_path, tiny_model)


def test_flat_folder_is_labelled_by_the_models_clean_prediction(tmp_path, tiny_model, photos):
    for index, (name, image) in enumerate(photos.items()):
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / f"{index}_{name}.png")
    dataset = load_image_set(tmp_path, tiny_model)
    assert dataset.layout == "predicted"
    expected = predict_labels(tiny_model, torch.stack([dataset[i][0] for i in range(len(dataset))]))
    assert dataset.labels.tolist() == expected.tolist()


def test_missing_or_empty_folder_errors(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_set(tmp_path / "nowhere", tiny_model)
    with pytest.raises(ValueError, match="no images"):
        load_image_set(tmp_path, tiny_model)


def test_make_sample_set_writes_labelled_splits(tmp_path, tiny_model):
    photos = ("chelsea", "coffee", "camera")
    report = make_sample_set(tmp_path / "s", tiny_model, train=6, heldout=3, seed=1, photos=photos)
    assert (report.train, report.heldout) == (6, 3)
    train_files = sorted(p.name for p in (tmp_path / "s" / "train").glob("*.png"))
    assert len(train_files) == 6 and len(list((tmp_path / "s" / "heldout").glob("*.png"))) == 3
    record = json.loads((tmp_path / "s" / "train" / "labels.json").read_text())
    assert record["model"] == "tiny" and record["input_size"] == 32 and record["seed"] == 1
    dataset = load_image_set(tmp_path / "s" / "train", tiny_model)
    assert dataset.layout == "labels.json"
    assert dataset.labels.tolist() == [record["labels"][p.name]["index"] for p in dataset.paths]
    # The recorded labels are the model's predictions on the saved crops.
    assert dataset.labels.tolist() == predict_labels(tiny_model, dataset).tolist()
    # Same seed, same crops; another seed, other crops.
    again = make_sample_set(tmp_path / "t", tiny_model, train=6, heldout=3, seed=1, photos=photos)
    other = make_sample_set(tmp_path / "u", tiny_model, train=6, heldout=3, seed=2, photos=photos)
    first = (tmp_path / "s" / "train" / train_files[0]).read_bytes()
    assert (again.root / "train" / train_files[0]).read_bytes() == first
    assert (other.root / "train" / train_files[0]).read_bytes() != first


def test_sample_split_by_photos_keeps_heldout_photos_apart(tmp_path, tiny_model):
    photos = ("chelsea", "coffee", "camera", "astronaut")
    make_sample_set(tmp_path, tiny_model, train=6, heldout=2, seed=0, photos=photos, split="photos")
    train = {p.name.rsplit("_", 1)[0] for p in (tmp_path / "train").glob("*.png")}
    heldout = {p.name.rsplit("_", 1)[0] for p in (tmp_path / "heldout").glob("*.png")}
    assert len(heldout) == 1 and len(train) == 3 and not train & heldout


def test_sample_set_keeps_only_confident_crops(tmp_path, tiny_model):
    photos = ("chelsea", "coffee", "camera")
    make_sample_set(tmp_path / "all", tiny_model, train=8, heldout=0, seed=0, photos=photos, min_confidence=0.0)
    everything = json.loads((tmp_path / "all" / "train" / "labels.json").read_text())["labels"]
    threshold = sorted(entry["probability"] for entry in everything.values())[4]  # a cut that rejects some
    make_sample_set(tmp_path / "kept", tiny_model, train=8, heldout=0, seed=0, photos=photos,
                    min_confidence=threshold)
    record = json.loads((tmp_path / "kept" / "train" / "labels.json").read_text())
    assert len(record["labels"]) == 8 and record["draws"] > 8
    assert all(entry["probability"] >= threshold for entry in record["labels"].values())
    with pytest.raises(ValueError, match="lower min_confidence"):
        make_sample_set(tmp_path / "none", tiny_model, train=4, heldout=0, photos=photos, min_confidence=0.9999999,
                        max_draws_per_crop=2)
