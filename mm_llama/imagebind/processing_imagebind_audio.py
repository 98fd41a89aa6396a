"""ImageBind audio preprocessing: audio files (or the audio track of video files) -> normalised log-mel clips.

Follows Meta's `imagebind.data.load_and_transform_audio_data` (torchaudio + pytorchvideo) step by step, without
either dependency:

    decode (PyAV; float samples in [-1, 1], all channels, as torchaudio.load returns them)   => [C, N] at rate R
    -> resample to 16 kHz with torchaudio's default windowed-sinc resampler (Hann window, 6 zero crossings,
       rolloff 0.99), reimplemented here                                    => [C, N'], N' = ceil(N * 16000 / R)
    -> 3 clips of 2 s placed as pytorchvideo's ConstantClipsPerVideoSampler places them: with D = N' / 16000 and
       M = max(D - 2, 0), clip i spans [i * M / 2, i * M / 2 + 2] s, i.e. samples [int(16000 * start), int(16000 * end))
       clamped to the audio. Audio shorter than 6 s gives overlapping clips; audio shorter than 2 s gives three
       copies of the whole (short) waveform.
    -> per clip, in order: subtract the clip's mean over all channels IN PLACE (Meta's `waveform -= waveform.mean()`
       acts on a view of the whole waveform, so an overlapping later clip sees the earlier clip's shift), then
       Kaldi fbank of channel 0 (torchaudio's kaldi.fbank keeps channel 0 of multi-channel input): 128 mel bins,
       25 ms Hann (symmetric) frames every 10 ms, no dither, DC offset removed per frame, preemphasis 0.97, 512-point
       power spectrum, HTK-mel triangular filters from 20 Hz to 8 kHz, log with a float32-epsilon floor   => [128, F]
    -> pad with zeros (in the log-mel domain) or cut to 204 frames (a full 2 s clip has 198 frames)
    -> (x - (-4.268)) / 9.138                                                                 => [3, 1, 128, 204]

Files are decoded with PyAV (FFmpeg): any audio file FFmpeg reads, and the best audio stream of video files.
Unusable media raise `MediaLoadError` naming the file and the problem.

Over 400 lines because decoding, resampling, clip sampling and the Kaldi fbank are the steps of one pipeline.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, TypedDict, Union

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function
from transformers.feature_extraction_utils import FeatureExtractionMixin

from .processing_imagebind import MediaLoadError, check_media_file, clip_timepoints

AUDIO_SAMPLE_RATE = 16000
AUDIO_MEAN = -4.268
AUDIO_STD = 9.138

AudioSource = Union[str, os.PathLike, np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Pure steps
# ----------------------------------------------------------------------------------------------------------------


def resample_waveform(
    waveform: torch.Tensor,
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Band-limited resampling with a Hann-windowed sinc filter, as `torchaudio.functional.resample`'s default.

    With rates reduced by their gcd to `o -> n` and cutoff `c = min(o, n) * rolloff`, output sample j is
    `sum_i x[i] * (c / o) * sinc(t) * cos(pi * t / (2 W))^2` over `t = c * (i / o - j / n)` clamped to
    `[-W, W]` (W = `lowpass_filter_width`), the input zero outside `[0, N)` and i limited to the
    `2 * ceil(W * o / c) + o` taps torchaudio uses; the output has `ceil(n * N / o)` samples. The filter is computed
    in the waveform's dtype, as torchaudio does, so that float32 input gives torchaudio's float32 numbers.

    Args:
        waveform: `[..., N]` floating-point samples.
        orig_freq, new_freq: integer sample rates in Hz.

    Returns:
        `[..., ceil(N * new_freq / orig_freq)]` (the input itself when the rates are equal).
    """
    if not waveform.is_floating_point():
        raise TypeError(f"resample_waveform needs floating-point samples, got {waveform.dtype}.")
    if int(orig_freq) != orig_freq or int(new_freq) != new_freq or orig_freq <= 0 or new_freq <= 0:
        raise ValueError(f"Sample rates must be positive integers, got {orig_freq} -> {new_freq}.")
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    dtype, device = waveform.dtype, waveform.device

    # One filter per output phase r = j mod n, over input offsets -width .. width + orig - 1 from j // n * orig.
    offsets = torch.arange(-width, width + orig, dtype=dtype, device=device) / orig  # [taps]
    phases = torch.arange(0, -new, -1, dtype=dtype, device=device)[:, None] / new  # [n, 1]
    t = ((phases + offsets) * cutoff).clamp(-lowpass_filter_width, lowpass_filter_width)  # [n, taps]
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernel = (sinc * (window * (cutoff / orig)))[:, None]  # [n, 1, taps]; torchaudio's rounding order

    shape = waveform.shape
    flat = waveform.reshape(-1, 1, shape[-1])
    padded = F.pad(flat, (width, width + orig))
    out = F.conv1d(padded, kernel, stride=orig)  # [C, n, positions]: phase r of output block k at [:, r, k]
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    length = math.ceil(new * shape[-1] / orig)
    return out[:, :length].reshape(*shape[:-1], length)


def audio_clip_sample_ranges(
    num_samples: int,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    num_clips: int = 3,
    clip_duration: float = 2.0,
) -> list[tuple[int, int]]:
    """`(start, stop)` sample indices of each clip (Meta: ConstantClipsPerVideoSampler + `int(t * sample_rate)`).

    The clip times are pytorchvideo's exact Fractions (`clip_timepoints`, shared with the video path) for a duration
    of `num_samples / sample_rate` seconds; `stop` is clamped to `num_samples` as slicing clamps it.

    Example: 7 s at 16 kHz -> [(0, 32000), (40000, 72000), (80000, 112000)]; 4 s -> [(0, 32000), (16000, 48000),
    (32000, 64000)] (overlapping); 1.5 s -> three times (0, 24000).
    """
    if num_samples <= 0:
        raise ValueError(f"Audio needs at least one sample, got {num_samples}.")
    ranges = []
    for start, end in clip_timepoints(num_samples / sample_rate, num_clips, clip_duration):
        ranges.append((int(start * sample_rate), min(int(end * sample_rate), num_samples)))
    return ranges


def fbank_frame_sizes(
    sample_rate: int, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0
) -> tuple[int, int, int]:
    """(window, shift, FFT size) in samples, Kaldi-style: 400, 160, 512 at 16 kHz."""
    window = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    return window, shift, 1 << (window - 1).bit_length()


@lru_cache(maxsize=8)
def _kaldi_mel_filters(sample_rate: int, num_mel_bins: int, fft_length: int) -> np.ndarray:
    """`[fft_length // 2 + 1, num_mel_bins]` Kaldi mel filters (HTK mel, triangles in mel space, 20 Hz to Nyquist)."""
    with warnings.catch_warnings():
        # With 128 bins at 16 kHz the lowest filters fall between FFT bins and are all zero, in Kaldi too.
        warnings.simplefilter("ignore", UserWarning)
        return mel_filter_bank(
            num_frequency_bins=fft_length // 2 + 1,
            num_mel_filters=num_mel_bins,
            min_frequency=20.0,
            max_frequency=sample_rate / 2,
            sampling_rate=sample_rate,
            norm=None,
            mel_scale="kaldi",
            triangularize_in_mel_space=True,
        )


def kaldi_fbank(
    waveform: np.ndarray,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> np.ndarray:
    """Log-mel filterbank features as `torchaudio.compliance.kaldi.fbank` computes them with ImageBind's arguments.

    (htk_compat=True, use_energy=False, window_type="hanning", dither=0, remove_dc_offset, preemphasis 0.97,
    snip_edges, power spectrum, log with float32-epsilon floor.) Built on `transformers.audio_utils`.

    Args:
        waveform: `[N]` float samples (one channel), N at least one window (400 samples at 16 kHz).

    Returns:
        `[num_mel_bins, 1 + (N - window) // shift]` float32 (mel bins first, as ImageBind transposes them).
    """
    window_length, shift, fft_length = fbank_frame_sizes(sample_rate, frame_length_ms, frame_shift_ms)
    waveform = np.asarray(waveform)
    if waveform.ndim != 1 or waveform.shape[0] < window_length:
        raise ValueError(
            f"kaldi_fbank needs a 1-D waveform of at least {window_length} samples, got shape {waveform.shape}."
        )
    return spectrogram(
        waveform,
        window_function(window_length, "hann", periodic=False),  # Kaldi's "hanning" is the symmetric Hann window
        frame_length=window_length,
        hop_length=shift,
        fft_length=fft_length,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=_kaldi_mel_filters(sample_rate, num_mel_bins, fft_length),
        mel_floor=float(np.finfo(np.float32).eps),
        log_mel="log",
        remove_dc_offset=True,
        dtype=np.float32,
    )


def pad_or_cut_frames(features: np.ndarray, target_length: int) -> np.ndarray:
    """`[mel, F]` -> `[mel, target_length]`: zeros appended at the end, or the first `target_length` frames kept."""
    frames = features.shape[1]
    if frames < target_length:
        return np.pad(features, ((0, 0), (0, target_length - frames)), mode="constant", constant_values=0.0)
    return features[:, :target_length]


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def decode_audio(path: str | os.PathLike) -> tuple[torch.Tensor, int]:
    """Decodes the best audio stream of an audio or video file with PyAV.

    Returns:
        (`[C, N]` float32 samples in [-1, 1] at the stream's own rate, that rate). Integer formats are scaled as
        FFmpeg converts them to float (s16: x / 32768), which is what torchaudio.load returns.

    Raises:
        MediaLoadError: missing, empty, unreadable or corrupt file, no audio stream, or no samples.
    """
    try:
        import av  # imported lazily: only audio decoding needs it
    except ImportError as err:
        raise ImportError("Decoding audio files needs PyAV: `pip install av` (or pass sample arrays).") from err

    path = check_media_file(path, "Audio")
    name = repr(str(path))
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise MediaLoadError(f"Audio file {name} is not a readable audio or video file ({err}).") from err
    with container:
        stream = container.streams.best("audio")
        if stream is None:
            raise MediaLoadError(
                f"File {name} has no audio stream (streams: {[s.type for s in container.streams] or 'none'})."
            )
        # Sample format conversion only (rate and channel layout are taken from the frames, i.e. kept).
        resampler = av.AudioResampler(format="fltp")
        chunks: list[np.ndarray] = []
        rate = None
        try:
            for frame in container.decode(stream):
                if rate is None:
                    rate = frame.sample_rate
                elif frame.sample_rate != rate:
                    raise MediaLoadError(
                        f"Audio file {name} changes its sample rate mid-stream ({rate} -> {frame.sample_rate} Hz)."
                    )
                chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
            if rate is not None:
                chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        except MediaLoadError:
            raise
        except (av.error.FFmpegError, ValueError) as err:
            raise MediaLoadError(f"Audio file {name} is corrupt or truncated ({err}); re-download it.") from err
    if rate is None or not chunks or sum(chunk.shape[1] for chunk in chunks) == 0:
        raise MediaLoadError(f"Audio file {name} has an audio stream but no samples (zero-length audio).")
    return torch.from_numpy(np.concatenate(chunks, axis=1).astype(np.float32, copy=False)), int(rate)


def _as_waveform(source: AudioSource, sampling_rate: int | None) -> tuple[torch.Tensor, int, str]:
    """Any accepted source -> (`[C, N]` float32 waveform, its rate, a name for error messages)."""
    if isinstance(source, (str, os.PathLike)):
        waveform, rate = decode_audio(source)
        return waveform, rate, repr(str(source))
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if not isinstance(source, torch.Tensor):
        raise TypeError(f"Unsupported audio source type {type(source).__name__}; pass a path, array or tensor.")
    if sampling_rate is None:
        raise ValueError("Audio given as an array needs its sample rate: pass sampling_rate=... (Hz).")
    if not source.is_floating_point():
        raise ValueError(f"Audio arrays must hold float samples in [-1, 1]; got dtype {source.dtype}.")
    waveform = source.detach().cpu().to(torch.float32)
    if waveform.ndim == 1:
        waveform = waveform[None]
    if waveform.ndim != 2:
        raise ValueError(f"Audio arrays must be [N] or [channels, N]; got shape {tuple(waveform.shape)}.")
    if waveform.shape[1] == 0:
        raise MediaLoadError("The audio array has no samples.")
    # Meta mutates the waveform while cutting clips; never do that to the caller's array.
    return waveform.clone(), int(sampling_rate), "audio array"


def load_audio(
    source: AudioSource,
    sampling_rate: int | None = None,
    target_sampling_rate: int = AUDIO_SAMPLE_RATE,
    num_mel_bins: int = 128,
    target_length: int = 204,
    num_clips: int = 3,
    clip_duration: float = 2.0,
    mean: float = AUDIO_MEAN,
    std: float = AUDIO_STD,
) -> torch.Tensor:
    """Loads and preprocesses one audio item exactly as ImageBind does.

    Args:
        source: an audio file, a video file with an audio stream, or samples `[N]` / `[C, N]` (float in [-1, 1],
            numpy or tensor) with `sampling_rate`.
        sampling_rate: rate of array input in Hz (ignored for files, whose stream rate is used).
        target_sampling_rate, num_mel_bins, target_length, num_clips, clip_duration, mean, std: ImageBind's values
            by default (16 kHz, 128, 204, 3, 2 s, -4.268, 9.138).

    Returns:
        `[num_clips, 1, num_mel_bins, target_length]` float32.

    Raises:
        MediaLoadError: unusable file, or audio shorter than one 25 ms analysis window.
    """
    waveform, rate, name = _as_waveform(source, sampling_rate)
    if rate != target_sampling_rate:
        waveform = resample_waveform(waveform, rate, target_sampling_rate)
    window_length = fbank_frame_sizes(target_sampling_rate)[0]
    num_samples = waveform.shape[1]
    if num_samples < window_length:
        raise MediaLoadError(
            f"Audio {name} is too short: {num_samples} samples at {target_sampling_rate} Hz "
            f"({num_samples / target_sampling_rate * 1000:.1f} ms), less than one {window_length}-sample (25 ms) "
            "analysis window, so it has no spectrogram frame."
        )
    clips = []
    for start, stop in audio_clip_sample_ranges(num_samples, target_sampling_rate, num_clips, clip_duration):
        clip = waveform[:, start:stop]
        clip -= clip.mean()  # in place on the shared waveform, as in Meta's code (see the module docstring)
        features = kaldi_fbank(clip[0].numpy(), target_sampling_rate, num_mel_bins)
        clips.append(pad_or_cut_frames(features, target_length))
    stacked = torch.from_numpy(np.stack(clips))[:, None]  # [S, 1, mel, T]
    return (stacked - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


class ImageBindAudioProcessorKwargs(TypedDict, total=False):
    """Settings of [`ImageBindAudioProcessor`] (also the keys `from_pretrained(..., **kwargs)` may override)."""

    sampling_rate: int
    num_mel_bins: int
    target_length: int
    num_clips: int
    clip_duration: float
    mean: float
    std: float


class ImageBindAudioProcessor(FeatureExtractionMixin):
    """Batches audio for [`ImageBindAudioModel`]; saved as `preprocessor_config.json`.

    `processor(audio=[...])` returns a `BatchFeature` with `input_features` `[B, num_clips, 1, num_mel_bins,
    target_length]` (`[B, 3, 1, 128, 204]` by default), ready for `ImageBindAudioModel.embed_audio`. A single item
    (not a list) is a batch of one.
    """

    valid_kwargs = ImageBindAudioProcessorKwargs
    model_input_names = ["input_features"]

    def __init__(
        self,
        sampling_rate: int = AUDIO_SAMPLE_RATE,
        num_mel_bins: int = 128,
        target_length: int = 204,
        num_clips: int = 3,
        clip_duration: float = 2.0,
        mean: float = AUDIO_MEAN,
        std: float = AUDIO_STD,
        **kwargs: Any,
    ):
        kwargs.pop("feature_extractor_type", None)  # written by to_dict(), not a setting
        super().__init__(**kwargs)
        if num_clips < 1 or target_length < 1 or num_mel_bins < 1:
            raise ValueError("num_clips, target_length and num_mel_bins must be positive.")
        self.sampling_rate = int(sampling_rate)
        self.num_mel_bins = int(num_mel_bins)
        self.target_length = int(target_length)
        self.num_clips = int(num_clips)
        self.clip_duration = float(clip_duration)
        self.mean = float(mean)
        self.std = float(std)

    def preprocess_audio(self, source: AudioSource, sampling_rate: int | None = None) -> torch.Tensor:
        """One audio item -> `[num_clips, 1, num_mel_bins, target_length]`."""
        return load_audio(
            source,
            sampling_rate=sampling_rate,
            target_sampling_rate=self.sampling_rate,
            num_mel_bins=self.num_mel_bins,
            target_length=self.target_length,
            num_clips=self.num_clips,
            clip_duration=self.clip_duration,
            mean=self.mean,
            std=self.std,
        )

    def __call__(
        self,
        audio: AudioSource | Sequence[AudioSource],
        sampling_rate: int | Sequence[int] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocesses a batch of audio items.

        Args:
            audio: one source or a list of them (file paths, or `[N]` / `[C, N]` float sample arrays).
            sampling_rate: rate(s) of array inputs in Hz, one number or one per item.
            return_tensors: "pt" (tensors are always built as torch; other values are passed to `BatchFeature`).

        Returns:
            `BatchFeature` with `input_features` `[B, num_clips, 1, num_mel_bins, target_length]`.
        """
        if kwargs:
            raise TypeError(f"ImageBindAudioProcessor got unexpected arguments {sorted(kwargs)}.")
        # A list of paths/arrays is a batch; a bare array (even 2-D: channels) is one item.
        items = list(audio) if isinstance(audio, (list, tuple)) else [audio]
        if not items:
            raise ValueError("Pass at least one audio item.")
        rates = list(sampling_rate) if isinstance(sampling_rate, (list, tuple)) else [sampling_rate] * len(items)
        if len(rates) != len(items):
            raise ValueError(f"Got {len(rates)} sampling_rate values for {len(items)} audio items.")
        features = torch.stack([self.preprocess_audio(item, rate) for item, rate in zip(items, rates)])
        return BatchFeature(data={"input_features": features}, tensor_type=return_tensors)


__all__ = [
    "AUDIO_MEAN",
    "AUDIO_SAMPLE_RATE",
    "AUDIO_STD",
    "ImageBindAudioProcessor",
    "audio_clip_sample_ranges",
    "decode_audio",
    "fbank_frame_sizes",
    "kaldi_fbank",
    "load_audio",
    "pad_or_cut_frames",
    "resample_waveform",
]
