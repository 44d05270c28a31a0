"""Processors for the tiny models vistrim builds, and loading a saved one without torchvision.

transformers' video processors need torchvision, and a processor class that takes a video
processor (Qwen2-VL, LLaVA-OneVision, InternVL, SmolVLM, ...) refuses to be built without one
even for images only. Where torchvision is missing (this CPU environment, and some user ones),
``image_only`` builds the family's *own* processor class without a video processor: a subclass
created here whose only change is that it does not list ``video_processor`` among its parts; all
processing (placeholder expansion, ``mm_token_type_ids``, chat templates) is transformers'
unchanged code. Videos need torchvision, or, for Qwen-style processors, ``with_frame_videos``:
frames through the family's image processor.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ..errors import VistrimError


def video_processors_available() -> bool:
    """True when transformers can build video processors (torchvision importable)."""
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


@functools.cache
def _image_only_class(cls: type) -> type:
    from transformers import ProcessorMixin

    every = cls.get_attributes()
    kept = [name for name in every if name != "video_processor"]

    class Parts(ProcessorMixin):
        """Between the family's class and ProcessorMixin: the family's ``__init__`` hands its parts
        on positionally in its own order (video processor included, maybe first)."""

        def __init__(self, *args, **kwargs):
            named = dict(zip(every, args))
            named.pop("video_processor", None)
            kwargs.pop("video_processor", None)
            super().__init__(**named, **kwargs)

    def get_attributes(subclass):
        return kept

    def to_dict(self):
        # A ``FrameVideoProcessor`` (``with_frame_videos``) is not part of what is saved.
        output = cls.to_dict(self)
        output.pop("video_processor", None)
        return output

    # Same name, so what it saves names the family's own class.
    methods = {"get_attributes": classmethod(get_attributes), "to_dict": to_dict}
    return type(cls.__name__, (cls, Parts), methods)


def image_only(cls: type, **parts):
    """An instance of processor class ``cls`` built from ``parts`` (image_processor, tokenizer,
    chat_template, ...), without a video processor when the class takes one and none is given."""
    if "video_processor" in cls.get_attributes() and parts.get("video_processor") is None:
        parts.pop("video_processor", None)
        return _image_only_class(cls)(**parts)
    return cls(**parts)


def load_processor(source: str, local_files_only: bool):
    """``AutoProcessor.from_pretrained`` (never running code from the folder); where that fails
    only because video processors need torchvision, or because the folder was saved by an
    image-only processor (no video processor in it), the same processor class assembled from the
    folder's tokenizer, image processor and chat template (images only)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import processor_class_from_name

    try:
        return AutoProcessor.from_pretrained(
            source, local_files_only=local_files_only, trust_remote_code=False
        )
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as error:
        if video_processors_available() and not _saved_without_video_processor(source):
            raise
        original = error
    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only, trust_remote_code=False)
    name = _processor_class_name(source, config)
    cls = processor_class_from_name(name) if name else None
    if cls is None:
        from . import _first_line

        raise VistrimError(f"cannot build the processor of {source}: {_first_line(original)}") from None
    tokenizer = AutoTokenizer.from_pretrained(
        source, local_files_only=local_files_only, trust_remote_code=False
    )
    image_processor = AutoImageProcessor.from_pretrained(
        source, local_files_only=local_files_only, trust_remote_code=False, backend="pil"
    )
    template = Path(source, "chat_template.jinja")
    chat_template = template.read_text() if template.is_file() else getattr(tokenizer, "chat_template", None)
    settings = _saved_settings(source, cls)
    return image_only(
        cls, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **settings
    )


def _saved_without_video_processor(source: str) -> bool:
    """A local folder whose processor was saved without a video processor (``image_only``)."""
    import json

    folder = Path(source)
    if not folder.is_dir() or Path(folder, "video_preprocessor_config.json").is_file():
        return False
    config = Path(folder, "processor_config.json")
    return not (config.is_file() and "video_processor" in json.loads(config.read_text()))


def _saved_settings(source: str, cls: type) -> dict:
    """The processor's own settings saved with it (patch_size, num_image_tokens, ...): the entries of
    processor_config.json that name a parameter of the class, other than its parts."""
    import inspect
    import json

    path = Path(source, "processor_config.json")
    if not path.is_file():
        return {}
    parameters = inspect.signature(cls.__init__).parameters
    parts = {*cls.get_attributes(), "chat_template"}
    saved = json.loads(path.read_text())
    return {key: value for key, value in saved.items() if key in parameters and key not in parts}


def _processor_class_name(source: str, config) -> str | None:
    import json

    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        path = Path(source, name)
        if path.is_file():
            found = json.loads(path.read_text()).get("processor_class")
            if found:
                return found
    return getattr(config, "processor_class", None)


class FrameVideoProcessor:
    """A video processor for Qwen-style processors (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) that needs no
    torchvision: videos given as already-sampled frames go through the family's own image processor
    one frame at a time, and ``temporal_patch_size`` consecutive frames make one temporal patch (the
    last frame repeated to fill the last one), in the flat patch layout of transformers' Qwen2-VL
    video processor. Frames are resized within the image processor's pixel range (a real video
    processor has its own range and samples frames itself). ``fps`` is the rate the frames were
    sampled at; Qwen2.5-VL and Qwen3-VL read it for their time positions and timestamps.
    """

    def __init__(self, image_processor, fps: float = 2.0) -> None:
        self.image_processor = image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.fps = fps

    def __call__(self, videos, return_metadata: bool = False, return_tensors=None, **kwargs) -> dict:
        import torch
        from transformers.video_utils import VideoMetadata, make_batched_videos

        patches, grids, metadata = [], [], []
        step, pixels = self.temporal_patch_size, self.patch_size**2
        for video in make_batched_videos(videos):
            frames = list(video)
            frames += frames[-1:] * (-len(frames) % step)
            out = self.image_processor(frames, temporal_patch_size=1, return_tensors="pt")
            _, grid_h, grid_w = (int(v) for v in out["image_grid_thw"][0])
            # (frames, cells, C*p*p) -> (t, step, cells, C, p*p) -> (t, cells, C, step, p*p)
            flat = out["pixel_values"].view(len(frames) // step, step, grid_h * grid_w, -1, pixels)
            patches.append(flat.permute(0, 2, 3, 1, 4).reshape(-1, flat.shape[3] * step * pixels))
            grids.append([len(frames) // step, grid_h, grid_w])
            indices = list(range(len(video)))
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=self.fps, frames_indices=indices))
        data = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
        if return_metadata:
            data["video_metadata"] = metadata
        return data


def with_frame_videos(processor, fps: float = 2.0):
    """``processor`` (an ``image_only`` Qwen-style processor) taking videos as frames too, through a
    ``FrameVideoProcessor`` of its own image processor; placeholder expansion, timestamps and
    ``mm_token_type_ids`` stay the processor's code."""
    processor.video_processor = FrameVideoProcessor(processor.image_processor, fps)
    return processor
