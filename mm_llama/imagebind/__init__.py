"""ImageBind's vision encoder (Meta's `imagebind_huge`) as a Hugging Face model, with its preprocessing.

Importing this package registers `ImageBindVisionConfig` / `ImageBindVisionModel` / `ImageBindProcessor` with
`AutoConfig` / `AutoModel` / `AutoImageProcessor` (the MM-LLaMA processor loads its image processor through it).
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_imagebind import IMAGEBIND_VISION_PRESETS, ImageBindVisionConfig
from .conversion_imagebind import (
    convert_imagebind_checkpoint,
    convert_imagebind_state_dict,
    load_imagebind_checkpoint,
    official_vision_shapes,
)
from .download_imagebind import IMAGEBIND_HUGE_URL, DownloadError, download_imagebind_checkpoint
from .modeling_imagebind import ImageBindVisionModel, ImageBindVisionModelOutput, ImageBindVisionPreTrainedModel
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

AutoConfig.register(ImageBindVisionConfig.model_type, ImageBindVisionConfig, exist_ok=True)
AutoModel.register(ImageBindVisionConfig, ImageBindVisionModel, exist_ok=True)
AutoImageProcessor.register(ImageBindVisionConfig, slow_image_processor_class=ImageBindProcessor, exist_ok=True)

__all__ = [
    "DownloadError",
    "IMAGEBIND_HUGE_URL",
    "IMAGEBIND_MEAN",
    "IMAGEBIND_STD",
    "IMAGEBIND_VISION_PRESETS",
    "ImageBindProcessor",
    "ImageBindVisionConfig",
    "ImageBindVisionModel",
    "ImageBindVisionModelOutput",
    "ImageBindVisionPreTrainedModel",
    "MediaLoadError",
    "check_media_file",
    "clip_frame_indices",
    "clip_timepoints",
    "convert_imagebind_checkpoint",
    "convert_imagebind_state_dict",
    "crop_offsets",
    "download_imagebind_checkpoint",
    "load_image",
    "load_video",
    "load_imagebind_checkpoint",
    "official_vision_shapes",
    "video_crop_boxes",
]
