"""ImageBind preprocessing: sampling rules (expected values worked out by hand here), real JPEG/PNG/mp4 files made in
the test, corrupt and empty files, and the batching processor."""

from __future__ import annotations

import math
import sys

import av
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from mm_llama.imagebind import (
    IMAGEBIND_MEAN,
    IMAGEBIND_STD,
    ImageBindProcessor,
    MediaLoadError,
    clip_frame_indices,
    crop_offsets,
    load_image,
    load_video,
    video_crop_boxes,
)
from mm_llama.imagebind.processing_imagebind import center_crop_offset, image_resize_size, video_resize_size

MEAN = torch.tensor(IMAGEBIND_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGEBIND_STD).view(3, 1, 1)


def write_mp4(path, frames: np.ndarray, fps: int = 10) -> None:
    """uint8 [T, H, W, 3] -> H.264 mp4 via PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "0"}  # near-lossless, so decoded grey levels identify frames
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def numbered_frames(count: int, height: int, width: int, step: int = 5) -> np.ndarray:
    """Frame i is a flat grey of level step * i: the level tells which frame was decoded."""
    return np.stack([np.full((height, width, 3), step * i, np.uint8) for i in range(count)])


def denormalised_level(view: torch.Tensor) -> torch.Tensor:
    """[3, T, S, S] normalised view -> mean 0..255 level per frame [T]."""
    mean, std = MEAN.unsqueeze(1), STD.unsqueeze(1)
    return ((view * std + mean) * 255).mean(dim=(0, 2, 3))


# ---- Pure rules -------------------------------------------------------------------------------------------------


def test_clip_indices_landscape_4_5_s_at_10_fps():
    # D = 4.5 s, M = 2.5 s, starts 0, 0.625, 1.25, 1.875, 2.5 -> first ceil(10 s), stop min(ceil(10 (s + 2)), 45):
    # [0, 20), [7, 27), [13, 33), [19, 39), [25, 45); the first and last frame of each are kept.
    assert clip_frame_indices(45, 10.0) == [[0, 19], [7, 26], [13, 32], [19, 38], [25, 44]]


def test_clip_indices_portrait_10_s_at_30_fps():
    # D = 10 s, M = 8 s: clips [0, 2], [2, 4], ..., [8, 10] -> frames [60 i, 60 i + 60)
    assert clip_frame_indices(300, 30.0) == [[60 * i, 60 * i + 59] for i in range(5)]


def test_clip_indices_of_a_1_2_s_video_use_all_frames_for_every_clip():
    # D = 1.2 s < 2 s: every clip is [0, 2] -> frames [0, min(20, 12)) -> first 0, last 11.
    assert clip_frame_indices(12, 10.0) == [[0, 11]] * 5


def test_clip_indices_at_ntsc_rate_match_an_independent_float_computation():
    n, fps = 250, 29.97
    duration = n / fps
    expected = []
    for i in range(5):
        start = i * max(duration - 2, 0) / 4
        first, stop = math.ceil(fps * start), min(math.ceil(fps * (start + 2)), n)
        expected.append([first, stop - 1])
    assert clip_frame_indices(n, fps) == expected


def test_clip_indices_with_more_frames_per_clip_are_a_truncated_linspace():
    # 20 frames per clip, 4 kept: linspace(0, 19, 4) = 0, 6.33, 12.67, 19 -> 0, 6, 12, 19
    assert clip_frame_indices(45, 10.0, frames_per_clip=4)[0] == [0, 6, 12, 19]


def test_crop_offsets_and_boxes_landscape_portrait_square():
    # Landscape 640x360: short side 360 -> 224, long floor(640 / 360 * 224) = floor(398.2) = 398.
    assert video_resize_size(360, 640, 224) == (224, 398)
    assert crop_offsets(398, 224) == [0, 87, 174]  # ceil(174 / 2) = 87
    assert video_crop_boxes(224, 398, 224) == [(0, 0), (0, 87), (0, 174)]
    # Portrait 240x320 (w x h): long side 320 / 240 * 224 = 298.67 -> 298, crops move down: ceil(74 / 2) = 37.
    assert video_resize_size(320, 240, 224) == (298, 224)
    assert video_crop_boxes(298, 224, 224) == [(0, 0), (37, 0), (74, 0)]
    # Odd remainder rounds the centre up; one crop is the centre; square gives three identical crops.
    assert crop_offsets(299, 224) == [0, 38, 75]
    assert crop_offsets(299, 224, num_crops=1) == [38]
    assert video_crop_boxes(224, 224, 224) == [(0, 0)] * 3
    with pytest.raises(ValueError, match="1 or 3"):
        crop_offsets(300, 224, num_crops=2)


def test_image_resize_and_centre_crop_rules():
    assert image_resize_size(480, 640, 224) == (224, 298)  # int(224 * 640 / 480) = int(298.67)
    assert image_resize_size(640, 480, 224) == (298, 224)
    assert center_crop_offset(298, 224) == 37
    assert center_crop_offset(225, 224) == 0  # round(0.5) = 0: halves round to even, as torchvision does
    assert center_crop_offset(227, 224) == 2  # round(1.5) = 2


# ---- Images -----------------------------------------------------------------------------------------------------


def striped_image(height: int, width: int) -> np.ndarray:
    """Left third red, middle green, right third blue."""
    image = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    image[:, :third, 0] = 255
    image[:, third : 2 * third, 1] = 255
    image[:, 2 * third :, 2] = 255
    return image


def test_png_matches_a_by_hand_pipeline_and_every_source_type(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)  # portrait 90 x 120
    path = tmp_path / "photo.png"
    PIL.Image.fromarray(array).save(path)
    pixels = load_image(path, image_size=32)
    # By hand: 90 x 120 -> 32 x int(32 * 120 / 90) = 32 x 42, bicubic; crop top round(10 / 2) = 5.
    resized = PIL.Image.fromarray(array).resize((32, 42), PIL.Image.BICUBIC)
    expected = torch.from_numpy(np.array(resized)[5:37]).permute(2, 0, 1).float() / 255
    expected = (expected - MEAN) / STD
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)
    for source in (str(path), PIL.Image.open(path), array, torch.from_numpy(array).permute(2, 0, 1)):
        assert torch.equal(load_image(source, image_size=32), pixels)


def test_jpeg_keeps_its_layout_after_resize_and_crop(tmp_path):
    path = tmp_path / "stripes.jpg"
    PIL.Image.fromarray(striped_image(480, 640)).save(path, quality=95)
    pixels = load_image(path)  # 224 x 298, centre crop drops 37 columns on each side
    assert pixels.shape == (3, 224, 224)
    colours = (pixels * STD + MEAN)[:, 112, [10, 112, 214]]  # [3 channels, left/middle/right]
    assert colours.argmax(dim=0).tolist() == [0, 1, 2]  # red, green, blue from left to right


def test_rgba_and_greyscale_pngs_become_rgb(tmp_path):
    PIL.Image.new("RGBA", (50, 40), (10, 200, 30, 0)).save(tmp_path / "alpha.png")
    PIL.Image.new("L", (50, 40), 128).save(tmp_path / "grey.png")
    rgb = load_image(tmp_path / "alpha.png", image_size=28) * STD + MEAN
    torch.testing.assert_close(rgb[:, 0, 0] * 255, torch.tensor([10.0, 200.0, 30.0]), rtol=0, atol=1e-3)
    grey = load_image(tmp_path / "grey.png", image_size=28) * STD + MEAN
    torch.testing.assert_close(grey[:, 5, 5] * 255, torch.full((3,), 128.0), rtol=0, atol=1e-3)


def test_bad_image_files_raise_media_load_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(MediaLoadError, match=r"missing\.jpg.*does not exist"):
        load_image(missing)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(MediaLoadError, match=r"empty\.jpg.*empty \(0 bytes\)"):
        load_image(empty)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(MediaLoadError, match=r"garbage\.jpg.*not a readable image"):
        load_image(garbage)
    good = tmp_path / "good.jpg"
    PIL.Image.fromarray(striped_image(200, 300)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MediaLoadError, match=r"truncated\.jpg.*corrupt or truncated"):
        load_image(truncated)
    with pytest.raises(MediaLoadError, match="is a directory"):
        load_image(tmp_path)
    assert issubclass(MediaLoadError, ValueError)


# ---- Videos -----------------------------------------------------------------------------------------------------


def test_mp4_landscape_picks_the_rule_frames_and_crops(tmp_path):
    path = tmp_path / "landscape.mp4"
    write_mp4(path, numbered_frames(45, 240, 320), fps=10)
    video = load_video(path)
    assert video.shape == (15, 3, 2, 224, 224) and video.dtype == torch.float32
    expected_frames = [[0, 19], [7, 26], [13, 32], [19, 38], [25, 44]]  # see test_clip_indices_landscape_...
    for clip, frames in enumerate(expected_frames):
        for crop in range(3):
            levels = denormalised_level(video[3 * clip + crop])
            torch.testing.assert_close(levels, 5.0 * torch.tensor(frames, dtype=torch.float32), rtol=0, atol=2.0)


def test_array_frames_follow_the_geometry_rules_exactly(tmp_path):
    # Portrait frames with a vertical gradient, given as an array (no codec): compare with an explicit pipeline.
    height, width = 320, 240
    column = np.linspace(0, 255, height).astype(np.uint8)[:, None, None]
    frames = np.broadcast_to(column, (12, height, width, 3)).copy()
    frames[:, :, :, 1] = np.arange(12, dtype=np.uint8)[:, None, None] * 20  # green tells the frame
    video = load_video(frames, fps=10)  # 1.2 s: every clip holds frames 0 and 11
    clip = torch.from_numpy(frames[[0, 11]]).permute(3, 0, 1, 2).float() / 255  # [3, 2, H, W]
    clip = F.interpolate(clip, size=(298, 224), mode="bilinear", align_corners=False)
    clip = (clip - MEAN.unsqueeze(1)) / STD.unsqueeze(1)
    for crop, top in enumerate([0, 37, 74]):
        for clip_index in range(5):
            torch.testing.assert_close(video[3 * clip_index + crop], clip[:, :, top : top + 224], rtol=0, atol=1e-6)
    # Top crop darker than bottom crop (red follows the gradient), also when decoded from a portrait mp4.
    assert video[0, 0].mean() < video[1, 0].mean() < video[2, 0].mean()
    write_mp4(tmp_path / "portrait.mp4", frames, fps=10)
    decoded = load_video(tmp_path / "portrait.mp4")
    assert decoded.shape == (15, 3, 2, 224, 224)
    torch.testing.assert_close(decoded, video, rtol=0, atol=0.08)  # codec error only (chroma subsampling)
    assert decoded[0, 0].mean() < decoded[1, 0].mean() < decoded[2, 0].mean()


def test_short_mp4_and_decord_match_the_array_path(tmp_path):
    frames = numbered_frames(12, 96, 128, step=20)
    path = tmp_path / "short.mp4"
    write_mp4(path, frames, fps=10)
    from_file = load_video(path, image_size=64)
    assert from_file.shape == (15, 3, 2, 64, 64)
    for view in from_file:
        torch.testing.assert_close(denormalised_level(view), torch.tensor([0.0, 220.0]), rtol=0, atol=2.0)
    from_array = load_video(torch.from_numpy(frames), image_size=64, fps=10)
    torch.testing.assert_close(from_file, from_array, rtol=0, atol=0.05)


def test_bad_video_files_raise_media_load_error(tmp_path):
    with pytest.raises(MediaLoadError, match=r"nothing\.mp4.*does not exist"):
        load_video(tmp_path / "nothing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaLoadError, match=r"empty\.mp4.*empty \(0 bytes\)"):
        load_video(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaLoadError, match=r"garbage\.mp4.*could not be decoded"):
        load_video(garbage)
    with pytest.raises(MediaLoadError, match="zero frames"):
        load_video(np.zeros((0, 32, 32, 3), np.uint8), fps=10)
    with pytest.raises(ValueError, match="fps"):
        load_video(np.zeros((4, 32, 32, 3), np.uint8))


# ---- Processor --------------------------------------------------------------------------------------------------


def test_processor_batches_images_and_videos_and_round_trips(tmp_path):
    PIL.Image.fromarray(striped_image(60, 80)).save(tmp_path / "a.png")
    video = numbered_frames(25, 48, 64)
    processor = ImageBindProcessor(image_size=28)
    images = [tmp_path / "a.png", PIL.Image.open(tmp_path / "a.png")]
    batch = processor(images=images, videos=[video, video], video_fps=10)
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert batch["video_pixel_values"].shape == (2, 15, 3, 2, 28, 28)
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert torch.equal(batch["video_pixel_values"][0], load_video(video, image_size=28, fps=10))
    single = processor(images=tmp_path / "a.png")
    assert single["pixel_values"].shape == (1, 3, 28, 28) and "video_pixel_values" not in single

    processor.save_pretrained(tmp_path / "proc")
    reloaded = ImageBindProcessor.from_pretrained(tmp_path / "proc")
    assert reloaded.to_dict() == processor.to_dict()
    assert ImageBindProcessor.from_pretrained(tmp_path / "proc", num_crops=1).num_crops == 1
    one_crop = ImageBindProcessor(image_size=28, num_crops=1)(videos=video, video_fps=10)
    assert one_crop["video_pixel_values"].shape == (1, 5, 3, 2, 28, 28)


def test_processor_errors():
    processor = ImageBindProcessor(image_size=28)
    with pytest.raises(ValueError, match="images=.*videos="):
        processor()
    with pytest.raises(ValueError, match="video_fps"):
        processor(videos=[np.zeros((4, 32, 32, 3), np.uint8)] * 2, video_fps=[10])
    with pytest.raises(ValueError, match="num_crops"):
        ImageBindProcessor(num_crops=2)


def test_decoder_noise_is_silenced_and_the_error_said_once(tmp_path, capfd):
    """decord's C++ logger writes 'ERROR opening: ...' straight to file descriptor 2 before failing; the user sees
    only our MediaLoadError (pytest's capfd captures the descriptor itself, not just sys.stderr)."""
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(MediaLoadError, match="bad.mp4"):
        load_video(bad)
    print("after", file=sys.stderr)  # Python's stderr works again after the silenced block
    assert capfd.readouterr().err == "after\n"
