"""The figures of an evaluation by hand (kept, fooled, restored by confidence), and the whole photographs."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from elgs.attacks.data import WHOLE_PHOTOS, PhotoVariant, whole_photos
from elgs.attacks.evaluate import PatchSpec, evaluate
from elgs.attacks.figures import Records, Reference, Share, attacked_figures, clean_figures, setting_row


def test_share_counts_within_a_mask():
    assert Share.of(np.array([True, False, True, True])) == Share(count=3, total=4, rate=0.75)
    assert Share.of(np.array([True, False, True]), within=np.array([False, True, True])) == Share(1, 2, 0.5)
    assert Share.of(np.array([True]), within=np.array([False])) == Share(0, 0, None)


def _records(original, defended, final, score=None, attacked=None, confidence=None):
    n = len(original)
    return Records.build(original, confidence or [0.9] * n, defended, final, score or [0.0] * n, attacked)


def test_kept_fooled_and_restored_by_hand():
    # Six images, clean answers 0..5 (target 2: image 2 is not eligible); the first three are confident.
    answer = np.arange(6)
    confident = np.array([True, True, True, False, False, False])
    clean = _records(original=[0, 1, 2, 3, 4, 5], defended=[0, 1, 2, 9, 4, 9], final=[0, 1, 2, 3, 4, 9],
                     attacked=[False, False, False, False, False, True])
    # Patched: images 0, 1, 3, 4 fooled (top-1 = 2); the defence restores 0 and 3, final restores 0 and 4.
    patched = _records(original=[2, 2, 2, 2, 2, 7], defended=[0, 2, 2, 3, 2, 7], final=[0, 2, 2, 2, 4, 7],
                       attacked=[True, False, True, True, True, False])
    everything = np.ones(6, dtype=bool)
    assert clean_figures(clean, answer, everything).kept == Share(4, 6, 4 / 6)
    assert clean_figures(clean, answer, everything).final_kept == Share(5, 6, 5 / 6)
    assert clean_figures(clean, answer, confident).kept == Share(3, 3, 1.0)
    assert clean_figures(clean, answer, confident).flagged == Share(0, 3, 0.0)
    every = attacked_figures(patched, answer, 2, everything)
    assert every.images == 5 and every.fooled == Share(4, 5, 0.8)
    assert every.restored == Share(2, 4, 0.5) and every.final_restored == Share(2, 4, 0.5)
    assert every.final_correct == Share(2, 5, 0.4)  # images 0 and 4
    assert every.flagged == Share(3, 5, 0.6)
    sure = attacked_figures(patched, answer, 2, confident)
    assert sure.images == 2 and sure.fooled == Share(2, 2, 1.0) and sure.restored == Share(1, 2, 0.5)
    row = setting_row("lgs", 3.5, Reference(labels=answer, answer=answer, confidence=np.array([0.9] * 3 + [0.2] * 3)),
                      clean, {"p": patched}, {"p": 2}, saliency_method=None, attack_threshold=0.1,
                      images_per_second=10.0).to_dict()
    assert row["lambda"] == 3.5 and row["by_confidence"]["confident"]["images"] == 3
    assert row["attacks"]["p"]["restored_rate"] == 0.5 and row["attacks"]["p"]["per_image"]["attacked"][0] is True
    assert row["attacks"]["p"]["by_confidence"]["all"]["fooled"] == {"count": 4, "total": 5, "rate": 0.8}


def test_records_decided_at_a_threshold_use_the_single_path_rule():
    records = _records(original=[1, 1, 1], defended=[2, 2, 2], final=[2, 2, 2], score=[0.1, 0.5, 0.9])
    decided = records.decided_at(0.4)
    assert decided.attacked.tolist() == [False, True, True] and decided.final.tolist() == [1, 2, 2]
    assert records.decided_at(None).attacked is None and records.decided_at(None).final.tolist() == [2, 2, 2]
    assert Records.from_dict(decided.to_dict()).to_dict() == decided.to_dict()


def test_whole_photos_are_whole_deterministic_and_as_uploaded():
    assert len(WHOLE_PHOTOS) == 22
    variants = [PhotoVariant("native"), PhotoVariant("64px", long_side=64), PhotoVariant("16x9", 96, 16 / 9)]
    first = list(whole_photos(["chelsea", "logo", "camera"], variants=variants))
    again = list(whole_photos(["chelsea", "logo", "camera"], variants=variants))
    assert [p.data for p in first] == [p.data for p in again]  # deterministic, byte for byte
    assert [p.name for p in first[:6]] == ["chelsea-native.jpg", "chelsea-native.png", "chelsea-64px.jpg",
                                           "chelsea-64px.png", "chelsea-16x9.jpg", "chelsea-16x9.png"]
    assert len({p.name for p in first}) == len(first) == 3 * 3 * 2
    by_name = {p.name: p for p in first}
    assert (by_name["chelsea-native.png"].width, by_name["chelsea-native.png"].height) == (451, 300)  # not cropped
    assert (by_name["chelsea-64px.jpg"].width, by_name["chelsea-64px.jpg"].height) == (64, 43)
    assert (by_name["chelsea-16x9.png"].width, by_name["chelsea-16x9.png"].height) == (96, 54)
    for photo in first:
        image = Image.open(io.BytesIO(photo.data))
        assert image.format == photo.format and image.size == (photo.width, photo.height)
    assert Image.open(io.BytesIO(by_name["camera-native.png"].data)).mode == "L"  # grey stays grey
    assert Image.open(io.BytesIO(by_name["logo-native.png"].data)).mode == "RGBA"  # PNG keeps its alpha
    assert Image.open(io.BytesIO(by_name["logo-native.jpg"].data)).mode == "RGB"
    with pytest.raises(FileNotFoundError, match="no offline skimage.data picture 'nothing'"):
        next(whole_photos(["nothing"]))
    with pytest.raises(ValueError, match="formats must be among"):
        next(whole_photos(["chelsea"], formats=["GIF"]))


def test_evaluation_flags_whole_photos_at_its_threshold():
    """Through the engine: a threshold of 0 flags every photograph whose top-1 the defence changes and the removal
    check does not keep (the engine's verdict), 2 none."""
    from elgs.attacks.data import predict_labels
    from elgs.images import SAMPLE_PHOTOS, image_to_tensor, sample_photo
    from tests.conftest import make_tiny_model

    model = make_tiny_model()
    images = torch.stack([image_to_tensor(sample_photo(name), 32) for name in SAMPLE_PHOTOS[:6]])
    data = (images, predict_labels(model, images))
    spec = PatchSpec(path=pathlib.Path("p.png"), patch=torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)),
                     shape="square", target=2, name="p")
    photos = list(whole_photos(["chelsea", "coins"], variants=[PhotoVariant("native"), PhotoVariant("64px", 64)]))
    rows = {threshold: evaluate(model, data, [spec], methods=["lgs"], lambdas=[3.5], batch_size=4, progress=False,
                                photos=photos, attack_threshold=threshold).to_dict()["rows"][0]
            for threshold in (0.0, 2.0)}
    always, never = rows[0.0]["whole_photos"], rows[2.0]["whole_photos"]
    per_image = always["per_image"]
    expected = [s > 0 and d != o and r != o for s, o, d, r in
                zip(per_image["score"], per_image["original"], per_image["defended"], per_image["removal"])]
    assert always["images"] == 8 and always["flagged"]["count"] == sum(expected)
    assert sum(s > 0 and d != o for s, o, d in zip(per_image["score"], per_image["original"], per_image["defended"])) > 0
    assert always["flagged_by_format"]["JPEG"]["total"] == 4
    assert sorted(always["flagged_names"]) == sorted(p.name for p, flag in zip(photos, expected) if flag)
    assert never["flagged"] == {"count": 0, "total": 8, "rate": 0.0} and never["final_changed"]["count"] == 0
    # Labels are the clean answers: 'kept' over all images is Table 1's clean accuracy.
    assert rows[2.0]["by_confidence"]["all"]["kept"]["rate"] == pytest.approx(rows[2.0]["clean_accuracy"])
