"""Processors for the tiny models vistrim builds, and loading a saved one without torchvision.

transformers' video processors need torchvision, and a processor class that takes a video
processor (Qwen2-VL, LLaVA-OneVision, InternVL, SmolVLM, ...) refuses to be built without one
even for images only. Where torchvision is missing (this CPU environment, and some user ones),
``image_only`` builds the family's *own* processor class without a video processor: a subclass
created here whose only change is that it does not list ``video_processor`` among its parts; all
processing (placeholder expansion, ``mm_token_type_ids``, chat templates) is transformers'
unchanged code. Videos need torchvision (or pixel values made by the family's image processor).
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

    # Same name, so what it saves names the family's own class.
    return type(cls.__name__, (cls, Parts), {"get_attributes": classmethod(get_attributes)})


def image_only(cls: type, **parts):
    """An instance of processor class ``cls`` built from ``parts`` (image_processor, tokenizer,
    chat_template, ...), without a video processor when the class takes one and none is given."""
    if "video_processor" in cls.get_attributes() and parts.get("video_processor") is None:
        parts.pop("video_processor", None)
        return _image_only_class(cls)(**parts)
    return cls(**parts)


def load_processor(source: str, local_files_only: bool):
    """``AutoProcessor.from_pretrained`` (never running code from the folder); where that fails
    only because video processors need torchvision, the same processor class assembled from the
    folder's tokenizer, image processor and chat template (images only)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import processor_class_from_name

    try:
        return AutoProcessor.from_pretrained(
            source, local_files_only=local_files_only, trust_remote_code=False
        )
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as error:
        if video_processors_available():
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
