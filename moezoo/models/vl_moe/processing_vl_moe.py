"""``MoezooVlMoeProcessor``: image processor + tokenizer with an image token and a chat template (as LLaVA's).

``processor(images=..., text=...)`` expands every ``<image>`` of the text into ``image_seq_length`` image tokens,
checks that each text holds as many ``<image>`` as it gets images, and returns ``input_ids``, ``attention_mask``
and ``pixel_values`` for ``model(**inputs)`` / ``model.generate(**inputs)``.
"""
from __future__ import annotations

from transformers import BatchFeature, CLIPImageProcessor
from transformers.processing_utils import ProcessorMixin

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    # a newline right after a block tag would be eaten by transformers' Jinja (trim_blocks): emit it as an expression
    "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ eos_token }}{{ '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def image_processor_for(config, **kwargs) -> CLIPImageProcessor:
    """A resize + centre-crop + normalise image processor for the model's tower (``config.image_size``), with the
    tower's normalisation (timm data config; CLIP / SigLIP statistics for transformers towers)."""
    size = int(config.image_size)
    mean, std = kwargs.pop("image_mean", None), kwargs.pop("image_std", None)
    if mean is None or std is None:
        if config.vision_config is not None:
            siglip = "siglip" in config.vision_config.model_type
            mean = mean or ([0.5] * 3 if siglip else [0.48145466, 0.4578275, 0.40821073])
            std = std or ([0.5] * 3 if siglip else [0.26862954, 0.26130258, 0.27577711])
        else:
            import timm

            m = timm.create_model(config.vision_tower, pretrained=False, num_classes=0,
                                  **dict(config.vision_tower_kwargs or {}))
            data = timm.data.resolve_model_data_config(m)
            mean, std = mean or list(data["mean"]), std or list(data["std"])
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=mean, image_std=std, do_convert_rgb=True, **kwargs)


class MoezooVlMoeProcessor(ProcessorMixin):
    """Image processor + tokenizer for ``MoezooVlMoeForConditionalGeneration``.

    Args:
        image_processor: a transformers image processor producing ``pixel_values`` of the tower's size.
        tokenizer: a tokenizer that knows ``image_token`` as ONE token whose id is the model's ``image_token_id``.
        image_seq_length: image tokens per image (``model.config.image_seq_length``).
        image_token: the placeholder text (``"<image>"``).
        chat_template: Jinja chat template (default: a LLaVA-1.5-style ``USER: <image>\\n... ASSISTANT:``).
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 1, image_token: str = "<image>",
                 chat_template: str | None = None, **kwargs):
        if tokenizer is None:
            raise ValueError("MoezooVlMoeProcessor needs a tokenizer")
        vocab = tokenizer.get_vocab()
        if image_token not in vocab:
            raise ValueError(
                f"the tokenizer has no image token {image_token!r}: add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) (and resize the "
                "model's embeddings / set config.image_token_id to its id)")
        ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits {image_token!r} into {len(ids)} tokens; it must be one special token")
        if not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive int, got {image_seq_length!r}")
        self.image_token = image_token
        self.image_token_id = ids[0]
        self.image_seq_length = image_seq_length
        super().__init__(image_processor, tokenizer, chat_template=chat_template or DEFAULT_CHAT_TEMPLATE)

    @classmethod
    def for_model(cls, config, tokenizer, **kwargs) -> "MoezooVlMoeProcessor":
        """The processor matching a model config (image size, normalisation, image tokens per image); checks that the
        tokenizer's image token id is ``config.image_token_id``."""
        proc = cls(image_processor_for(config), tokenizer, image_seq_length=int(config.image_seq_length), **kwargs)
        if proc.image_token_id != config.image_token_id:
            raise ValueError(f"the tokenizer's {proc.image_token!r} has id {proc.image_token_id} but the model's "
                             f"image_token_id is {config.image_token_id}; set config.image_token_id to the tokenizer's id")
        return proc

    def __call__(self, images=None, text=None, return_tensors: str | None = "pt", padding=True, **kwargs) -> BatchFeature:
        if text is None:
            raise ValueError("text is required (with one <image> placeholder per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        # images may be given flat or one list per text
        per_text = None
        if images is not None and images and isinstance(images[0], (list, tuple)):
            per_text = [len(x) for x in images]
            images = [im for group in images for im in group]
        counts = [t.count(self.image_token) for t in texts]
        n_images = len(images) if images is not None else 0
        if per_text is not None and per_text != counts:
            raise ValueError(f"each text needs as many images as {self.image_token!r} placeholders: texts hold "
                             f"{counts}, images given {per_text}")
        if sum(counts) != n_images:
            raise ValueError(f"the texts hold {sum(counts)} {self.image_token!r} placeholder(s) but {n_images} image(s) "
                             "were given; they must match")
        expanded = [t.replace(self.image_token, self.image_token * self.image_seq_length) for t in texts]
        text_inputs = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding, **kwargs)
        data = dict(text_inputs)
        if n_images:
            data.update(self.image_processor(images, return_tensors=return_tensors))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]
