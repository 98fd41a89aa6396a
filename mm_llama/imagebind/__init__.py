"""ImageBind's vision and audio encoders (Meta's `imagebind_huge`) as Hugging Face models, with their preprocessing.

Importing this package registers `ImageBindVisionConfig` / `ImageBindVisionModel` and `ImageBindAudioConfig` /
`ImageBindAudioModel` with `AutoConfig` / `AutoModel`, `ImageBindProcessor` with `AutoImageProcessor` (the MM-LLaMA
processor loads its image processor through it) and `ImageBindAudioProcessor` with `AutoFeatureExtractor`.
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoImageProcessor, AutoModel

from .configuration_imagebind import IMAGEBIND_VISION_PRESETS, ImageBindVisionConfig
from .configuration_imagebind_audio import IMAGEBIND_AUDIO_PRESETS, ImageBindAudioConfig
from .conversion_imagebind import (
    convert_imagebind_audio_state_dict,
    convert_imagebind_checkpoint,
    convert_imagebind_state_dict,
    load_imagebind_audio_checkpoint,
    load_imagebind_checkpoint,
    official_audio_shapes,
    official_vision_shapes,
)
from .download_imagebind import IMAGEBIND_HUGE_URL, DownloadError, download_imagebind_checkpoint
from .modeling_imagebind import ImageBindVisionModel, ImageBindVisionModelOutput, ImageBindVisionPreTrainedModel
from .modeling_imagebind_audio import ImageBindAudioModel, ImageBindAudioModelOutput, ImageBindAudioPreTrainedModel
from .processing_imagebind import (
    IMAGEBIND_MEAN,
    IMAGEBIND_STD,
    ImageBindProcessor,
    MediaLoadError,
    check_media_file,
    clip_frame_indices,
    clip_timepoints,
    crop_offsets,
    load_image,
    load_video,
    video_crop_boxes,
)
from .processing_imagebind_audio import (
    AUDIO_MEAN,
    AUDIO_SAMPLE_RATE,
    AUDIO_STD,
    ImageBindAudioProcessor,
    audio_clip_sample_ranges,
    decode_audio,
    kaldi_fbank,
    load_audio,
    resample_waveform,
)

AutoConfig.register(ImageBindVisionConfig.model_type, ImageBindVisionConfig, exist_ok=True)
AutoModel.register(ImageBindVisionConfig, ImageBindVisionModel, exist_ok=True)
AutoImageProcessor.register(ImageBindVisionConfig, slow_image_processor_class=ImageBindProcessor, exist_ok=True)
AutoConfig.register(ImageBindAudioConfig.model_type, ImageBindAudioConfig, exist_ok=True)
AutoModel.register(ImageBindAudioConfig, ImageBindAudioModel, exist_ok=True)
AutoFeatureExtractor.register(ImageBindAudioConfig, ImageBindAudioProcessor, exist_ok=True)

__all__ = [
    "AUDIO_MEAN",
    "AUDIO_SAMPLE_RATE",
    "AUDIO_STD",
    "DownloadError",
    "IMAGEBIND_AUDIO_PRESETS",
    "IMAGEBIND_HUGE_URL",
    "IMAGEBIND_MEAN",
    "IMAGEBIND_STD",
    "IMAGEBIND_VISION_PRESETS",
    "ImageBindAudioConfig",
    "ImageBindAudioModel",
    "ImageBindAudioModelOutput",
    "ImageBindAudioPreTrainedModel",
    "ImageBindAudioProcessor",
    "ImageBindProcessor",
    "ImageBindVisionConfig",
    "ImageBindVisionModel",
    "ImageBindVisionModelOutput",
    "ImageBindVisionPreTrainedModel",
    "MediaLoadError",
    "audio_clip_sample_ranges",
    "check_media_file",
    "clip_frame_indices",
    "clip_timepoints",
    "convert_imagebind_audio_state_dict",
    "convert_imagebind_checkpoint",
    "convert_imagebind_state_dict",
    "crop_offsets",
    "decode_audio",
    "download_imagebind_checkpoint",
    "kaldi_fbank",
    "load_audio",
    "load_image",
    "load_video",
    "load_imagebind_audio_checkpoint",
    "load_imagebind_checkpoint",
    "official_audio_shapes",
    "official_vision_shapes",
    "resample_waveform",
    "video_crop_boxes",
]
