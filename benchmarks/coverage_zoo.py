"""The models of the coverage matrix (``benchmarks/coverage.py``): which ones, how each is built, its inputs.

Three zoos, random weights, nothing downloaded:

* ``torchvision``: every classification builder (``torchvision.models.list_models(module=torchvision.models)``),
  ``num_classes=10``, 64 px unless the model needs another size (see ``TORCHVISION_SETTINGS``);
* ``timm``: models across families, ``pretrained=False``, ``num_classes=10``;
* ``transformers``: encoders built from small configs; text models take their real two inputs
  (``input_ids``, ``attention_mask`` with padding), image models ``pixel_values``.

A model is named ``zoo:name`` (e.g. ``torchvision:resnet18``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ZOOS = ("torchvision", "timm", "transformers")
NUM_CLASSES = 10
IMAGE_SIZE = 64
SEQ_LEN = 16
VOCAB = 1000

#: Per-model settings that differ from the defaults (64 px, the builder's defaults), with the reason.
TORCHVISION_SETTINGS: dict[str, tuple[dict[str, Any], int, str]] = {
    "inception_v3": ({"aux_logits": False}, 96, "aux_logits=False: the auxiliary head needs 299 px inputs"),
    **{
        name: ({}, 224, "224 px: ONNX export needs the adaptive pooling input to be a multiple of its 7x7 (6x6) output")
        for name in ("alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
    },
    "maxvit_t": ({}, 224, "224 px: the block grid (7x7 windows) needs it"),
    "vit_b_16": ({"image_size": 32}, 32, "image_size=32 (2x2 patches)"),
    "vit_b_32": ({"image_size": 64}, 64, "image_size=64 (2x2 patches)"),
    "vit_l_16": ({"image_size": 32}, 32, "image_size=32 (2x2 patches)"),
    "vit_l_32": ({"image_size": 64}, 64, "image_size=64 (2x2 patches)"),
    "vit_h_14": ({"image_size": 28}, 28, "image_size=28 (2x2 patches)"),
}

#: timm models: (name, create_model kwargs, image size).
TIMM_MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, 32),
    ("cait_xxs24_224", {"img_size": 32}, 32),
    ("xcit_nano_12_p16_224", {"img_size": 32}, 32),
    ("eva02_tiny_patch14_224", {"img_size": 28}, 28),
    ("pit_ti_224", {"img_size": 64}, 64),
    ("swin_tiny_patch4_window7_224", {"img_size": 64}, 64),
    ("swinv2_cr_tiny_ns_224", {"img_size": 64}, 64),
    ("maxvit_nano_rw_256", {"img_size": 64}, 64),
    ("coatnet_nano_rw_224", {"img_size": 64}, 64),
    ("levit_128s", {"img_size": 64}, 64),
    ("efficientformerv2_s0", {"img_size": 64}, 64),
    ("efficientvit_m0", {"img_size": 64}, 64),
    ("efficientvit_b0", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("pvt_v2_b0", {}, 64),
    ("coat_lite_tiny", {"img_size": 64}, 64),
    ("convnext_atto", {}, 64),
    ("convnextv2_atto", {}, 64),
    ("inception_next_atto", {}, 64),
    ("poolformerv2_s12", {}, 64),
    ("mixer_s16_224", {"img_size": 32}, 32),
    ("resmlp_12_224", {"img_size": 32}, 32),
    ("sequencer2d_s", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("tf_efficientnetv2_b0", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("mobilenetv3_large_100", {}, 64),
    ("mobilenetv4_conv_small", {}, 64),
    ("regnetx_002", {}, 64),
    ("regnety_002", {}, 64),
    ("resnet10t", {}, 64),
    ("resnet50d", {}, 64),
    ("seresnext26d_32x4d", {}, 64),
    ("resnest14d", {}, 64),
    ("resnetv2_50x1_bit", {}, 64),
    ("nf_regnet_b0", {}, 64),
    ("repvgg_a0", {}, 64),
    ("mobileone_s0", {}, 64),
    ("fastvit_t8", {}, 64),
    ("ghostnet_100", {}, 64),
    ("rexnet_100", {}, 64),
    ("hgnetv2_b0", {}, 64),
    ("ese_vovnet19b_dw", {}, 64),
    ("dla34", {}, 64),
    ("hrnet_w18_small", {}, 64),
    ("edgenext_xx_small", {}, 64),
]

_TEXT_CORE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}
_SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

#: transformers models: (name, config class, model class, config kwargs, input kind).
HF_MODELS: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("bert", "BertConfig", "BertForSequenceClassification", {**_TEXT_CORE, "pad_token_id": 0}, "text"),
    (
        "distilbert",
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        {"vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 128, "max_position_embeddings": 64},
        "text",
    ),
    ("roberta", "RobertaConfig", "RobertaForSequenceClassification", {**_TEXT_CORE, **_SPECIAL_TOKENS}, "text"),
    ("electra", "ElectraConfig", "ElectraForSequenceClassification", {**_TEXT_CORE, "embedding_size": 64}, "text"),
    ("albert", "AlbertConfig", "AlbertForSequenceClassification", {**_TEXT_CORE, "embedding_size": 64}, "text"),
    ("deberta-v2", "DebertaV2Config", "DebertaV2ForSequenceClassification", dict(_TEXT_CORE), "text"),
    (
        "mobilebert",
        "MobileBertConfig",
        "MobileBertForSequenceClassification",
        {**_TEXT_CORE, "embedding_size": 64, "intra_bottleneck_size": 32, "true_hidden_size": 32},
        "text",
    ),
    (
        "modernbert",
        "ModernBertConfig",
        "ModernBertForSequenceClassification",
        {**_TEXT_CORE, **_SPECIAL_TOKENS, "cls_token_id": 1, "sep_token_id": 2, "global_attn_every_n_layers": 2},
        "text",
    ),
    (
        "gpt2",
        "GPT2Config",
        "GPT2ForSequenceClassification",
        {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, **_SPECIAL_TOKENS},
        "text",
    ),
    (
        "vit",
        "ViTConfig",
        "ViTForImageClassification",
        {"image_size": 32, "patch_size": 8, **{k: v for k, v in _TEXT_CORE.items() if k != "vocab_size"}},
        "image",
    ),
    (
        "swin",
        "SwinConfig",
        "SwinForImageClassification",
        {"image_size": 32, "patch_size": 4, "embed_dim": 32, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4},
        "image",
    ),
]

#: Small configurations of torchvision's attention models (the builders' ones are too slow for CI); in the
#: CI subset, not in the matrix. ``cls`` is the torchvision.models class built with ``kwargs``.
TORCHVISION_SMALL: list[tuple[str, str, dict[str, Any], int]] = [
    (
        "VisionTransformer-small",
        "VisionTransformer",
        {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128},
        32,
    ),
    (
        "SwinTransformer-small",
        "SwinTransformer",
        {"patch_size": [4, 4], "embed_dim": 32, "depths": [1, 1], "num_heads": [2, 4], "window_size": [4, 4]},
        32,
    ),
]

#: The fixed CI subset (tests/test_coverage.py): small models of the three zoos, a few seconds each.
CI_SUBSET = (
    "torchvision:mobilenet_v3_small",
    "torchvision:mnasnet0_5",
    "torchvision:VisionTransformer-small",
    "torchvision:SwinTransformer-small",
    "timm:vit_tiny_patch16_224",
    "transformers:bert",
    "transformers:gpt2",
)


@dataclass
class ModelSpec:
    """One model of the matrix and the settings it runs with.

    Example:
        >>> ModelSpec("timm", "resnet10t").id
        'timm:resnet10t'
    """

    zoo: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = IMAGE_SIZE  #: None for text models
    seq_len: int | None = None  #: text models: tokens per sample
    note: str = ""  #: why the settings differ from the defaults
    classes: tuple[str, str] | None = None  #: transformers: (config class, model class); torchvision: (class, "")

    @property
    def id(self) -> str:
        return f"{self.zoo}:{self.name}"

    @property
    def input_desc(self) -> str:
        if self.seq_len is not None:
            return f"input_ids+attention_mask, {self.seq_len} tokens"
        return f"3x{self.image_size}x{self.image_size}"


def torchvision_specs() -> list[ModelSpec]:
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        kwargs, size, note = TORCHVISION_SETTINGS.get(name, ({}, IMAGE_SIZE, ""))
        out.append(ModelSpec("torchvision", name, dict(kwargs), size, note=note))
    return out


def small_specs() -> list[ModelSpec]:
    """The small torchvision attention configurations of the CI subset (not in the matrix)."""
    return [
        ModelSpec("torchvision", name, dict(kw), size, note="small config for CI", classes=(cls, ""))
        for name, cls, kw, size in TORCHVISION_SMALL
    ]


def all_specs() -> list[ModelSpec]:
    """Every model of the matrix, zoo by zoo."""
    specs = torchvision_specs()
    specs += [ModelSpec("timm", n, dict(kw), size) for n, kw, size in TIMM_MODELS]
    for name, cfg, cls, kwargs, kind in HF_MODELS:
        if kind == "text":
            specs.append(ModelSpec("transformers", name, dict(kwargs), None, SEQ_LEN, classes=(cfg, cls)))
        else:
            specs.append(ModelSpec("transformers", name, dict(kwargs), kwargs["image_size"], classes=(cfg, cls)))
    return specs


def build(spec: ModelSpec) -> tuple[nn.Module, list[str]]:
    """The model (random weights, ``NUM_CLASSES`` outputs) and the names of its inputs, in order."""
    if spec.zoo == "torchvision":
        import torchvision

        if spec.classes is not None:
            return getattr(torchvision.models, spec.classes[0])(num_classes=NUM_CLASSES, **spec.kwargs), ["x"]
        model = torchvision.models.get_model(spec.name, weights=None, num_classes=NUM_CLASSES, **spec.kwargs)
        return model, ["x"]
    if spec.zoo == "timm":
        import timm

        return timm.create_model(spec.name, pretrained=False, num_classes=NUM_CLASSES, **spec.kwargs), ["x"]
    if spec.zoo == "transformers":
        import transformers

        assert spec.classes is not None
        config = getattr(transformers, spec.classes[0])(num_labels=NUM_CLASSES, **spec.kwargs)
        model = getattr(transformers, spec.classes[1])(config)
        names = ["input_ids", "attention_mask"] if spec.seq_len is not None else ["pixel_values"]
        return model, names
    raise ValueError(f"unknown zoo {spec.zoo!r}; zoos are {ZOOS}")


def make_inputs(spec: ModelSpec, n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` random samples of the model's inputs (text: token ids and a mask that pads some samples)."""
    if spec.seq_len is None:
        assert spec.image_size is not None
        return (torch.randn(n, 3, spec.image_size, spec.image_size, generator=generator),)
    ids = torch.randint(3, VOCAB, (n, spec.seq_len), generator=generator)
    lengths = torch.randint(spec.seq_len // 2, spec.seq_len + 1, (n,), generator=generator)
    lengths[0] = spec.seq_len
    mask = (torch.arange(spec.seq_len)[None, :] < lengths[:, None]).long()
    return ids * mask, mask  # padded positions hold the pad token (0)


def logits_of(output: Any) -> torch.Tensor:
    """The class logits in a model's output (a tensor, ``.logits`` of a ModelOutput or namedtuple, or the
    first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return logits_of(output[0])
    raise TypeError(f"cannot find logits in a {type(output).__name__}")


def select(
    specs: list[ModelSpec],
    zoos: list[str] | None = None,
    only: list[str] | None = None,
    subset: str | None = None,
) -> list[ModelSpec]:
    """Filter by zoo, by name/id patterns (``fnmatch``) and by a named subset (``"ci"``)."""
    from fnmatch import fnmatch

    if zoos:
        bad = sorted(set(zoos) - set(ZOOS))
        if bad:
            raise ValueError(f"unknown zoo(s) {bad}; zoos are {list(ZOOS)}")
        specs = [s for s in specs if s.zoo in zoos]
    if only:
        specs = [s for s in specs if any(fnmatch(s.id, p) or fnmatch(s.name, p) for p in only)]
    if subset is not None:
        if subset != "ci":
            raise ValueError(f"unknown subset {subset!r}; the only subset is 'ci'")
        specs = [s for s in [*specs, *small_specs()] if s.id in CI_SUBSET]
    return specs


def find(model_id: str) -> ModelSpec:
    """The spec of ``zoo:name`` (a matrix model or a small CI configuration)."""
    for s in [*all_specs(), *small_specs()]:
        if s.id == model_id:
            return s
    raise KeyError(f"no model {model_id!r} in the coverage matrix")
