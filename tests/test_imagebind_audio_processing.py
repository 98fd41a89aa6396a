"""ImageBind audio preprocessing against an independent re-statement of Meta's `load_and_transform_audio_data`.

The re-statement below is written from the documented algorithms (Kaldi's fbank as torchaudio.compliance.kaldi
computes it with ImageBind's arguments, torchaudio's default windowed-sinc resampler, pytorchvideo's
ConstantClipsPerVideoSampler call protocol), in plain numpy/float64 and the standard library's `wave` reader, and
shares no code with mm_llama's implementation. Audio files are generated in the tests.
"""

from __future__ import annotations

import math
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_llama.imagebind import (
    AUDIO_MEAN,
    AUDIO_STD,
    ImageBindAudioProcessor,
    MediaLoadError,
    audio_clip_sample_ranges,
    decode_audio,
    kaldi_fbank,
    load_audio,
    resample_waveform,
)

# ---- Independent re-statement ------------------------------------------------------------------------------------


def restated_fbank(x: np.ndarray, sample_rate: int = 16000, num_mel_bins: int = 128) -> np.ndarray:
    """Kaldi fbank (htk_compat, no energy, "hanning" window, dither 0, 25 ms / 10 ms) -> [mel, frames], float64."""
    window = int(sample_rate * 0.025)
    shift = int(sample_rate * 0.010)
    nfft = 1
    while nfft < window:
        nfft *= 2
    num_frames = 1 + (len(x) - window) // shift  # snip_edges: only whole windows
    frames = np.stack([x[f * shift : f * shift + window] for f in range(num_frames)]).astype(np.float64)
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # the first sample is its own predecessor
    frames = frames - 0.97 * previous  # preemphasis
    n = np.arange(window)
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * n / (window - 1)))  # Kaldi's "hanning": symmetric
    power = np.abs(np.fft.rfft(frames, n=nfft, axis=1)) ** 2  # [F, nfft / 2 + 1]

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, dtype=np.float64) / 700.0)

    low, high = mel(20.0), mel(sample_rate / 2)
    step = (high - low) / (num_mel_bins + 1)
    bin_mels = mel(np.arange(nfft // 2) * sample_rate / nfft)  # the Nyquist bin gets no weight in Kaldi
    banks = np.zeros((num_mel_bins, nfft // 2 + 1))
    for m in range(num_mel_bins):
        left, centre, right = low + m * step, low + (m + 1) * step, low + (m + 2) * step
        rising = (bin_mels - left) / (centre - left)
        falling = (right - bin_mels) / (right - centre)
        banks[m, : nfft // 2] = np.maximum(0.0, np.minimum(rising, falling))
    energies = power @ banks.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).T


def restated_resample(x: np.ndarray, orig: int, new: int, zeros: int = 6, rolloff: float = 0.99) -> np.ndarray:
    """torchaudio's default resampling as a direct sum per output sample: [C, N] -> [C, ceil(N * new / orig)]."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    cutoff = min(o, n) * rolloff
    width = math.ceil(zeros * o / cutoff)
    length = math.ceil(n * x.shape[1] / o)
    j = np.arange(length)
    taps = (j // n * o)[:, None] - width + np.arange(2 * width + o)[None, :]  # input indices per output sample
    t = np.clip((taps / o - j[:, None] / n) * cutoff, -zeros, zeros)
    h = np.sinc(t) * np.cos(np.pi * t / (2 * zeros)) ** 2 * cutoff / o
    inside = (taps >= 0) & (taps < x.shape[1])
    gathered = np.where(inside, x[:, np.clip(taps, 0, x.shape[1] - 1)], 0.0)  # zero outside the signal
    return (gathered * h).sum(axis=-1)


class RestatedConstantClipsSampler:
    """pytorchvideo's ConstantClipsPerVideoSampler as Meta drives it (called until is_last_clip)."""

    def __init__(self, clip_duration, clips_per_video):
        self.clip_duration = Fraction(clip_duration)
        self.clips = clips_per_video
        self.index = 0

    def __call__(self, duration: float):
        max_start = Fraction(max(duration - self.clip_duration, 0))
        uniform = Fraction(max_start, max(self.clips - 1, 1))
        start = uniform * self.index
        self.index += 1
        last = self.index >= self.clips or uniform * self.index > max_start
        if last:
            self.index = 0
        return start, start + self.clip_duration, last


def restated_clip_ranges(num_samples: int, rate: int = 16000, clips: int = 3, seconds=2) -> list[tuple[int, int]]:
    sampler, ranges, last = RestatedConstantClipsSampler(seconds, clips), [], False
    while not last:
        start, end, last = sampler(num_samples / rate)
        ranges.append((int(start * rate), min(int(end * rate), num_samples)))
    return ranges


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """16-bit PCM WAV -> ([C, N] float32 in [-1, 1], rate), with the standard library."""
    with wave.open(str(path), "rb") as f:
        channels, rate = f.getnchannels(), f.getframerate()
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return (pcm.reshape(-1, channels).T / 32768.0).astype(np.float32), rate


def restated_meta_audio(path: Path, target: int = 204) -> np.ndarray:
    """Meta's load_and_transform_audio_data for one file -> [3, 1, 128, target]."""
    waveform, rate = read_wav(path)
    if rate != 16000:
        waveform = restated_resample(waveform.astype(np.float64), rate, 16000).astype(np.float32)
    clips = []
    for start, stop in restated_clip_ranges(waveform.shape[1]):
        clip = waveform[:, start:stop]  # a view: Meta's in-place mean subtraction shows in later, overlapping clips
        clip -= clip.mean()
        features = restated_fbank(clip[0].astype(np.float64))
        frames = features.shape[1]
        features = np.pad(features, ((0, 0), (0, target - frames))) if frames < target else features[:, :target]
        clips.append((features - (-4.268)) / 9.138)
    return np.stack(clips)[:, None]


# ---- Test media ------------------------------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """[C, N] float in [-1, 1] -> 16-bit PCM WAV."""
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(samples.shape[0])
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.T.tobytes())
    return path


def make_signal(seconds: float, rate: int, channels: int = 1, dc: float = 0.0, seed: int = 0) -> np.ndarray:
    """Tones, noise, a loud onset and a DC offset: energy in every mel band and a clip-dependent mean."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    x = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
    x = x + 0.05 * rng.standard_normal((channels, n))
    x[:, n // 3 : n // 3 + rate // 20] *= 4
    return x + dc


# ---- Tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [400, 401, 559, 560, 12345, 32000])
def test_kaldi_fbank_matches_restatement(num_samples):
    x = make_signal(num_samples / 16000, 16000, seed=num_samples)[0].astype(np.float32)
    ours = kaldi_fbank(x)
    expected = restated_fbank(x.astype(np.float64))
    assert ours.shape == expected.shape == (128, 1 + (num_samples - 400) // 160)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-3)
    # Almost everywhere the two agree to float32 rounding; the few larger gaps are FFT roundoff in quiet bands.
    assert np.median(np.abs(ours - expected)) < 1e-5


def test_kaldi_fbank_puts_a_tone_in_its_mel_band_and_floors_silence():
    rate, tone = 16000, 1000.0
    x = np.sin(2 * np.pi * tone * np.arange(3200) / rate).astype(np.float32)
    features = kaldi_fbank(x)
    mel_tone = 1127 * math.log(1 + tone / 700)
    low, high = 1127 * math.log(1 + 20 / 700), 1127 * math.log(1 + 8000 / 700)
    centres = low + (np.arange(128) + 1) * (high - low) / 129
    assert abs(int(features.mean(axis=1).argmax()) - int(np.abs(centres - mel_tone).argmin())) <= 1
    silence = kaldi_fbank(np.zeros(3200, dtype=np.float32))
    np.testing.assert_allclose(silence, math.log(np.finfo(np.float32).eps), rtol=1e-6)


@pytest.mark.parametrize(
    "seconds",
    [0.025, 0.5, 1.999, 2.0, 2.0001, 3.3, 4.0, 4.37, 5.99, 6.0, 7.0, 10.123, 61.7],
)
def test_clip_ranges_follow_constant_clips_per_video_sampler(seconds):
    num_samples = int(round(seconds * 16000))
    assert audio_clip_sample_ranges(num_samples) == restated_clip_ranges(num_samples)


def test_clip_ranges_worked_examples():
    assert audio_clip_sample_ranges(7 * 16000) == [(0, 32000), (40000, 72000), (80000, 112000)]
    # Shorter than 6 s: the three 2 s clips overlap; their starts are spread over [0, D - 2].
    assert audio_clip_sample_ranges(4 * 16000) == [(0, 32000), (16000, 48000), (32000, 64000)]
    assert audio_clip_sample_ranges(69920) == [(0, 32000), (18960, 50960), (37920, 69920)]  # 4.37 s
    # Shorter than 2 s: every clip is the whole audio (and is padded to 204 frames later).
    assert audio_clip_sample_ranges(24000) == [(0, 24000)] * 3
    assert audio_clip_sample_ranges(32000) == [(0, 32000)] * 3
    # Every clip of audio of at least 2 s is exactly 2 s long.
    for n in (32001, 47999, 96000, 1234567):
        assert all(stop - start == 32000 for start, stop in audio_clip_sample_ranges(n))


@pytest.mark.parametrize(
    "seconds, channels, dc",
    [
        (7.0, 1, 0.0),  # disjoint clips
        (4.37, 2, 0.1),  # overlapping clips, stereo (channel 0 used), DC offset: Meta's in-place mean subtraction
        (1.5, 1, 0.05),  # shorter than a clip: three copies, each padded from 148 to 204 frames
        (2.0, 2, 0.0),  # exactly one clip long: 198 frames + 6 padded
    ],
)
def test_load_audio_matches_restated_meta_pipeline_at_16k(tmp_path, seconds, channels, dc):
    path = write_wav(tmp_path / "a.wav", make_signal(seconds, 16000, channels, dc), 16000)
    ours = load_audio(path)
    expected = restated_meta_audio(path)
    assert ours.shape == (3, 1, 128, 204) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=3e-4)


def test_load_audio_matches_restated_meta_pipeline_with_resampling(tmp_path):
    path = write_wav(tmp_path / "a.wav", make_signal(4.37, 48000, 2, 0.02), 48000)
    ours = load_audio(path)
    np.testing.assert_allclose(ours.numpy(), restated_meta_audio(path), rtol=0, atol=3e-4)


def test_padding_and_cutting_to_target_length(tmp_path):
    padded_value = (torch.zeros(()) - AUDIO_MEAN) / AUDIO_STD  # zero log-mel frames, normalised in float32
    short = load_audio(write_wav(tmp_path / "short.wav", make_signal(1.5, 16000), 16000))
    frames = 1 + (24000 - 400) // 160  # 148
    assert torch.all(short[..., frames:] == padded_value)
    assert not torch.any(short[..., frames - 1] == padded_value)
    full = load_audio(write_wav(tmp_path / "full.wav", make_signal(7.0, 16000), 16000))
    assert torch.all(full[..., 198:] == padded_value)
    # A target shorter than the clip keeps the first frames.
    cut = load_audio(tmp_path / "full.wav", target_length=100)
    assert cut.shape == (3, 1, 128, 100)
    torch.testing.assert_close(cut, full[..., :100], rtol=0, atol=0)


@pytest.mark.parametrize("orig", [44100, 22050, 8000, 48000])
def test_resampling_matches_restated_torchaudio_default(orig):
    x = make_signal(0.3, orig, channels=2, seed=orig).astype(np.float32)
    ours = resample_waveform(torch.from_numpy(x), orig, 16000)
    expected = restated_resample(x.astype(np.float64), orig, 16000)
    assert ours.shape == expected.shape == (2, math.ceil(x.shape[1] * 16000 / orig))
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-5)


def test_resampling_keeps_a_tone_and_removes_content_above_the_new_nyquist():
    rate = 44100
    t = np.arange(rate) / rate
    low = torch.from_numpy(np.sin(2 * np.pi * 1000 * t)[None].astype(np.float32))
    out = resample_waveform(low, rate, 16000)[0, 800:-800].numpy()  # away from the zero-padded edges
    expected = np.sin(2 * np.pi * 1000 * (np.arange(16000) / 16000))[800:-800]
    np.testing.assert_allclose(out, expected, atol=2e-3)
    high = torch.from_numpy(np.sin(2 * np.pi * 12000 * t)[None].astype(np.float32))  # above 8 kHz: filtered out
    assert resample_waveform(high, rate, 16000)[0, 800:-800].abs().max() < 0.01
    same = torch.randn(1, 100)
    assert resample_waveform(same, 16000, 16000) is same


def test_audio_track_of_a_video_file_is_used(tmp_path):
    av = pytest.importorskip("av")
    samples = make_signal(2.5, 16000, seed=3)
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)
    path = tmp_path / "clip.mkv"  # Matroska holds PCM, so the audio track is bit-exact
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=16000)
        audio.layout = "mono"
        for _ in range(25):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in list(audio.encode(frame)) + list(audio.encode()):
            container.mux(packet)
    waveform, rate = decode_audio(path)
    assert rate == 16000
    torch.testing.assert_close(waveform, torch.from_numpy(pcm / 32768.0).float(), rtol=0, atol=0)
    wav = write_wav(tmp_path / "same.wav", samples, 16000)
    torch.testing.assert_close(load_audio(path), load_audio(wav), rtol=0, atol=0)


def _video_without_audio(path: Path) -> Path:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
    return path


def test_bad_audio_raises_media_load_error_naming_the_file(tmp_path):
    good = write_wav(tmp_path / "good.wav", make_signal(1.0, 16000), 16000).read_bytes()
    cases = {
        "missing.wav": (None, "does not exist"),
        "empty.wav": (b"", "empty"),
        "text.wav": (b"this is not audio\n" * 20, "not a readable audio"),
        "truncated.wav": (good[:30], "not a readable audio"),  # cut inside the header
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(MediaLoadError, match=reason) as info:
            load_audio(path)
        assert name in str(info.value)

    no_samples = write_wav(tmp_path / "no_samples.wav", np.zeros((1, 0)), 16000)
    with pytest.raises(MediaLoadError, match="no samples") as info:
        load_audio(no_samples)
    assert "no_samples.wav" in str(info.value)

    tiny = write_wav(tmp_path / "tiny.wav", make_signal(0.02, 16000), 16000)  # 320 samples < one 400-sample window
    with pytest.raises(MediaLoadError, match="too short") as info:
        load_audio(tiny)
    assert "tiny.wav" in str(info.value)

    silent_video = _video_without_audio(tmp_path / "silent.mp4")
    with pytest.raises(MediaLoadError, match="no audio stream") as info:
        load_audio(silent_video)
    assert "silent.mp4" in str(info.value)


def test_shortest_usable_audio_is_one_window(tmp_path):
    # 400 samples: one frame per clip, the other 203 padded; resampled input counts after resampling.
    out = load_audio(write_wav(tmp_path / "w.wav", make_signal(400 / 16000, 16000), 16000))
    assert torch.all(out[..., 1:] == (torch.zeros(()) - AUDIO_MEAN) / AUDIO_STD)
    with pytest.raises(MediaLoadError, match="too short"):
        load_audio(write_wav(tmp_path / "r.wav", make_signal(1000 / 44100, 44100), 44100))  # 363 samples at 16 kHz


def test_processor_batches_paths_and_arrays_and_round_trips(tmp_path):
    samples = make_signal(7.0, 22050, channels=2)  # disjoint clips: the clip mean only shifts whole frames
    path = write_wav(tmp_path / "a.wav", samples, 22050)
    array, _ = read_wav(path)
    processor = ImageBindAudioProcessor()
    batch = processor(audio=[path, array, torch.from_numpy(array[0])], sampling_rate=[None, 22050, 22050])
    features = batch["input_features"]
    assert features.shape == (3, 3, 1, 128, 204)
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)
    # Channel 0 is the one Meta's fbank keeps: the mono array of channel 0 gives the same features (the clip means,
    # taken over all channels, differ but are removed again by the per-frame DC offset removal).
    torch.testing.assert_close(features[1], features[2], rtol=0, atol=1e-4)
    assert np.array_equal(array, read_wav(path)[0])  # the caller's array is not mutated by the clip loop
    single = processor(str(path))["input_features"]
    torch.testing.assert_close(single, features[:1], rtol=0, atol=0)

    processor.save_pretrained(tmp_path / "proc")
    reloaded = ImageBindAudioProcessor.from_pretrained(tmp_path / "proc")
    assert reloaded.to_dict() == processor.to_dict()
    custom = ImageBindAudioProcessor.from_pretrained(tmp_path / "proc", num_clips=2)
    assert custom(path)["input_features"].shape == (1, 2, 1, 128, 204)

    with pytest.raises(ValueError, match="sampling_rate"):
        processor(audio=array)
    with pytest.raises(ValueError, match="float samples"):
        processor(audio=np.zeros(16000, dtype=np.int16), sampling_rate=16000)
    with pytest.raises(ValueError, match="2 sampling_rate values for 1"):
        processor(audio=[array], sampling_rate=[16000, 16000])
