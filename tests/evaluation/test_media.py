"""Turntable videos, contact sheets, PNGs and logger grids (asd3d.evaluation.media)."""

from __future__ import annotations

import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np
import pytest
import torch

from asd3d.evaluation.media import contact_sheet, image_grid, save_png, to_uint8, write_turntable


def _frames(views=6, height=20, width=24):
    # Distinct frames (a bar moving across a gradient): GIF writers merge identical frames.
    frames = torch.linspace(0, 1, width).expand(views, 3, height, width).clone()
    for v in range(views):
        frames[v, :, :, v * 2 : v * 2 + 3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    return frames


def test_turntable_mp4_roundtrip(tmp_path):
    frames = _frames()
    path = write_turntable(frames, tmp_path / "turn.mp4", fps=30)
    assert path == tmp_path / "turn.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turn.mp4"]
    reader = iio2.get_reader(path, format="FFMPEG")
    try:
        meta = reader.get_meta_data()
        decoded = [frame for frame in reader]
    finally:
        reader.close()
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(30.0)
    assert len(decoded) == 6
    assert decoded[0].shape == (20, 24, 3)
    # Lossy but close: crf 18 keeps the picture.
    error = np.abs(decoded[3].astype(float) - to_uint8(frames[3]).astype(float)).mean()
    assert error < 8


def test_turntable_mp4_odd_size_is_padded_to_even(tmp_path):
    path = write_turntable(_frames(views=3, height=15, width=21), tmp_path / "odd.mp4", fps=10)
    reader = iio2.get_reader(path, format="FFMPEG")
    try:
        decoded = [frame for frame in reader]
    finally:
        reader.close()
    assert len(decoded) == 3 and decoded[0].shape == (16, 22, 3)


def test_turntable_gif_roundtrip(tmp_path):
    path = write_turntable(_frames(views=5), tmp_path / "turn.gif", fps=20)
    frames = iio.imread(path, index=None)
    assert frames.shape == (5, 20, 24, 3)
    assert iio.immeta(path)["duration"] == 50  # ms per frame
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turn.gif"]


def test_turntable_rejects_unknown_suffix_and_bad_shape(tmp_path):
    with pytest.raises(ValueError, match=".mp4 or .gif"):
        write_turntable(_frames(), tmp_path / "turn.avi")
    with pytest.raises(ValueError, match="V x 3 x H x W"):
        write_turntable(torch.zeros(0, 3, 4, 4), tmp_path / "turn.gif")
    assert list(tmp_path.iterdir()) == []


def test_turntable_failure_leaves_no_file(tmp_path, monkeypatch):
    import asd3d.evaluation.media as media

    def broken(frames, path, fps):
        path.write_bytes(b"partial")
        raise RuntimeError("ffmpeg died")

    monkeypatch.setattr(media, "_write_mp4", broken)
    with pytest.raises(RuntimeError, match="ffmpeg died"):
        write_turntable(_frames(), tmp_path / "turn.mp4")
    assert list(tmp_path.iterdir()) == []


def test_to_uint8_rounds_and_clamps():
    image = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 5).expand(3, 1, 5)
    array = to_uint8(image)
    assert array.shape == (1, 5, 3) and array.dtype == np.uint8
    assert array[0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_contact_sheet_shape_without_labels():
    images = torch.rand(5, 3, 8, 10)
    sheet = contact_sheet(images, ncols=3, pad=2)
    # 2 rows x 3 cols of 8 x 10 cells with 2 px between and around.
    assert sheet.shape == (2 + 2 * (8 + 2), 2 + 3 * (10 + 2), 3)
    assert sheet.dtype == np.uint8
    np.testing.assert_array_equal(sheet[2:10, 2:12], to_uint8(images[0]))
    assert (sheet[:2] == 255).all()  # white padding


def test_contact_sheet_labels_are_drawn_and_truncated():
    images = [torch.ones(3, 16, 40), torch.ones(3, 12, 30)]  # white images; lists may vary in size
    plain = contact_sheet(images, ncols=2)
    labelled = contact_sheet(images, ncols=2, labels=["a red cube", "x" * 200])
    assert plain.shape == (2 + 16 + 2, 2 + 2 * (40 + 2), 3)
    assert labelled.shape[1] == plain.shape[1] and labelled.shape[0] > plain.shape[0]
    strip = labelled[2 + 16 : -2]
    assert (strip < 128).any()  # some dark text pixels under the images
    assert (labelled[: 2 + 16] == 255).all()  # text never spills onto the images or the top
    with pytest.raises(ValueError, match="labels"):
        contact_sheet(images, ncols=2, labels=["one"])


def test_image_grid_matches_layout():
    images = torch.rand(4, 3, 6, 5)
    grid = image_grid(images, nrow=2)
    assert grid.shape == (3, 2 + 2 * (6 + 2), 2 + 2 * (5 + 2))
    torch.testing.assert_close(
        grid[:, 2 + 6 + 2 : 2 + 6 + 2 + 6, 2 + 5 + 2 : 2 + 5 + 2 + 5], images[3]
    )
    assert image_grid(images, nrow=10).shape == (3, 2 + 6 + 2, 2 + 4 * (5 + 2))


def test_save_png_roundtrip(tmp_path):
    image = torch.rand(3, 7, 9)
    path = save_png(image, tmp_path / "view.png")
    np.testing.assert_array_equal(iio.imread(path), to_uint8(image))
    sheet = contact_sheet([image, image], ncols=2)
    save_png(sheet, tmp_path / "sheet.png")
    np.testing.assert_array_equal(iio.imread(tmp_path / "sheet.png"), sheet)
    save_png(torch.rand(1, 4, 4), tmp_path / "mask.png")
    assert iio.imread(tmp_path / "mask.png").shape == (4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png", "sheet.png", "view.png"]
