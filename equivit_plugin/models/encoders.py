"""The pathology foundation models by name: one ``@register_encoder`` entry per model.

Names are TRIDENT's (``encoder_factory("uni_v1", weights_path=...)``), so a MIL user's
configuration reads the same here: ``equivit extract-features SLIDES --model uni_v1 --weights
pytorch_model.bin``. Each entry records what the model's own card and code say, because
getting any of it wrong fails silently (features of the right shape, but not the model's):

* the architecture and its constructor arguments (a timm name and kwargs, or the
  ``transformers`` configuration a released folder must have);
* the file layout it is released in (a timm state dict, a ``transformers`` folder with
  ``config.json``, or a package of its own);
* the embedding rule (class token; class token + mean of the patch tokens without registers;
  ``pooler_output``), the input normalisation, input size, recommended resolution, width and
  licence, and where each setting was read.

This module is data only (standard library): listing the registry (``equivit encoders``)
imports nothing heavy. :mod:`.foundation` builds and loads an entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EMBEDDING_RULES", "LAYOUTS", "EncoderSpec", "Ref", "encoder_names",
           "get_encoder", "is_encoder", "register_encoder"]

EMBEDDING_RULES: dict[str, str] = {
    "cls": "class token after the final norm",
    "cls+mean": "class token concatenated with the mean of the patch tokens (registers excluded)",
    "pooler_output": "transformers' pooler_output (DINOv2: the final-norm class token)",
    "encode_image": "the package's encode_image (its own pooling)",
}
"""How a tile's embedding is made from the backbone's output tokens ``(B, N, C)``."""

LAYOUTS: dict[str, str] = {
    "timm": "a timm state dict (pytorch_model.bin / .pth / .safetensors, or a folder with one)",
    "transformers": "a transformers folder (config.json + model.safetensors or "
                    "pytorch_model.bin, as save_pretrained writes it)",
    "package": "the weights file of the model's own package",
}
"""The file layouts the models are released in."""

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

TRIDENT = "TRIDENT trident/patch_encoder_models/load.py"
EVA = "kaiko eva src/eva/vision/models/networks/backbones/pathology"


@dataclass(frozen=True)
class Ref:
    """A class named by its import path (``timm.layers.SwiGLUPacked``), resolved when the
    model is built, so this module stays free of torch and timm."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that makes a foundation model's features its own.

    Attributes:
        name: the registry name (TRIDENT's).
        title: the model as its authors call it.
        layout: ``"timm"``, ``"transformers"`` or ``"package"`` (:data:`LAYOUTS`).
        architecture: the timm model name; for ``transformers``, the ``model_type`` its
            ``config.json`` must have; for ``package``, the package's model name.
        kwargs: ``timm.create_model`` arguments (classes as :class:`Ref`), or
            ``from_pretrained`` arguments for ``transformers``.
        config: ``config.json`` values a ``transformers`` folder must have (checked on load).
        width: ``C``, the width of the backbone's tokens.
        reg_tokens: register tokens between the class token and the patch tokens.
        patch_size: the ViT patch side, pixels.
        embedding: the rule of :data:`EMBEDDING_RULES`.
        mean, std: the input normalisation of ``[0, 1]`` RGB.
        input_size: the tile side the model embeds, pixels.
        mpp: the recommended resolution, micrometres per pixel.
        licence: the weights' licence, as the card gives it.
        weights_url: where the released weights are.
        weights_files: the file names a folder is searched for (in order).
        trust_remote_code: the card loads the folder's own modelling code
            (``transformers``'s ``trust_remote_code=True``; the code comes with the folder).
        requires: the package a ``package`` layout needs, and how to install it.
        sources: where the settings were read.
        notes: anything else a user must know (preprocessing the card does differently).
    """

    name: str
    title: str
    layout: str
    architecture: str
    width: int
    embedding: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    weights_url: str
    sources: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    reg_tokens: int = 0
    patch_size: int = 16
    input_size: int = 224
    mpp: float = 0.5
    weights_files: tuple[str, ...] = ("pytorch_model.bin", "model.safetensors")
    trust_remote_code: bool = False
    requires: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.embedding not in EMBEDDING_RULES:
            raise ValueError(f"{self.name}: embedding {self.embedding!r} is not one of "
                             f"{list(EMBEDDING_RULES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout {self.layout!r} is not one of "
                             f"{list(LAYOUTS)}")

    @property
    def embed_dim(self) -> int:
        """``D``, the width of a tile's embedding."""
        return 2 * self.width if self.embedding == "cls+mean" else self.width

    @property
    def normalisation_label(self) -> str:
        """``"ImageNet"``, ``"0.5 / 0.5"`` or ``"own (mean ...)"``, for tables."""
        known = {IMAGENET: "ImageNet", HALF: "0.5 / 0.5"}
        return known.get((self.mean, self.std),
                         f"own (mean {', '.join(f'{v:g}' for v in self.mean)})")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token and the registers."""
        return 1 + self.reg_tokens

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the entry (what checkpoints and feature files keep)."""
        return {"encoder": self.name, "architecture": self.architecture,
                "layout": self.layout, "embedding": self.embedding,
                "embedding_rule": EMBEDDING_RULES[self.embedding],
                "num_prefix_tokens": self.num_prefix_tokens, "embed_dim": self.embed_dim,
                "mean": list(self.mean), "std": list(self.std),
                "input_size": self.input_size, "mpp": self.mpp}


_ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(entry: Callable[[], EncoderSpec]) -> Callable[[], EncoderSpec]:
    """Register the :class:`EncoderSpec` that ``entry()`` returns under its ``name``."""
    spec = entry()
    if spec.name in _ENCODERS:
        raise ValueError(f"encoder {spec.name!r} is registered twice")
    _ENCODERS[spec.name] = spec
    return entry


def encoder_names() -> list[str]:
    """The registered names, in registry order."""
    return list(_ENCODERS)


def is_encoder(name: object) -> bool:
    """Whether ``name`` is a registered foundation model."""
    return isinstance(name, str) and name in _ENCODERS


def get_encoder(name: str) -> EncoderSpec:
    """The entry called ``name``.

    Raises:
        KeyError: not registered (the message lists the names).
    """
    try:
        return _ENCODERS[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a registered foundation model; registered: "
                       f"{', '.join(_ENCODERS)}") from None


SWIGLU = {"mlp_layer": Ref("timm.layers.SwiGLUPacked"), "act_layer": Ref("torch.nn.SiLU")}


@register_encoder
def uni_v1() -> EncoderSpec:
    return EncoderSpec(
        name="uni_v1", title="UNI (ViT-L/16, DINOv2, Mass-100K)", layout="timm",
        architecture="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                "dynamic_img_size": True},
        width=1024, embedding="cls", mean=IMAGENET[0], std=IMAGENET[1],
        licence="CC-BY-NC-ND-4.0",
        weights_url="https://huggingface.co/MahmoodLab/UNI (gated: pytorch_model.bin)",
        sources=f"card huggingface.co/MahmoodLab/UNI; {TRIDENT} UNIInferenceEncoder")


@register_encoder
def uni_v2() -> EncoderSpec:
    return EncoderSpec(
        name="uni_v2", title="UNI2-h (ViT-H/14, 8 registers, SwiGLU)", layout="timm",
        architecture="vit_giant_patch14_224",
        kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                "num_classes": 0, "no_embed_class": True, **SWIGLU, "reg_tokens": 8,
                "dynamic_img_size": True},
        width=1536, reg_tokens=8, patch_size=14, embedding="cls", mean=IMAGENET[0],
        std=IMAGENET[1], licence="CC-BY-NC-ND-4.0",
        weights_url="https://huggingface.co/MahmoodLab/UNI2-h (gated: pytorch_model.bin)",
        sources=f"card huggingface.co/MahmoodLab/UNI2-h; {TRIDENT} UNIv2InferenceEncoder; "
                f"{EVA}/mahmood.py")


def _virchow(name: str, title: str, reg_tokens: int, licence: str, repo: str) -> EncoderSpec:
    kwargs: dict[str, Any] = {"img_size": 224, "init_values": 1e-5, "num_classes": 0,
                              "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
                              **SWIGLU}
    if reg_tokens:
        kwargs["reg_tokens"] = reg_tokens
    return EncoderSpec(
        name=name, title=title, layout="timm", architecture="vit_huge_patch14_224",
        kwargs=kwargs, width=1280, reg_tokens=reg_tokens, patch_size=14, embedding="cls+mean",
        mean=IMAGENET[0], std=IMAGENET[1], licence=licence,
        weights_url=f"https://huggingface.co/paige-ai/{repo} (gated: pytorch_model.bin)",
        sources=f"card huggingface.co/paige-ai/{repo} (embedding = concat(class token, mean "
                f"of patch tokens)); {TRIDENT} {repo}InferenceEncoder",
        notes="the class token alone (the first half of the embedding) is the card's "
              "alternative for some tasks")


@register_encoder
def virchow() -> EncoderSpec:
    return _virchow("virchow", "Virchow (ViT-H/14, SwiGLU)", 0, "Apache-2.0", "Virchow")


@register_encoder
def virchow2() -> EncoderSpec:
    return _virchow("virchow2", "Virchow2 (ViT-H/14, 4 registers, SwiGLU)", 4,
                    "CC-BY-NC-ND-4.0", "Virchow2")


def _hoptimus(name: str, title: str, repo: str, licence: str) -> EncoderSpec:
    return EncoderSpec(
        name=name, title=title, layout="timm", architecture="vit_giant_patch14_reg4_dinov2",
        kwargs={"num_classes": 0, "img_size": 224, "global_pool": "token",
                "init_values": 1e-5, "dynamic_img_size": True},
        width=1536, reg_tokens=4, patch_size=14, embedding="cls", mean=HOPTIMUS[0],
        std=HOPTIMUS[1], licence=licence,
        weights_url=f"https://huggingface.co/bioptimus/{repo} (gated: pytorch_model.bin)",
        sources=f"card huggingface.co/bioptimus/{repo} (its own mean/std); {TRIDENT} "
                f"HOptimus{name[-1]}InferenceEncoder; {EVA}/bioptimus.py")


@register_encoder
def hoptimus0() -> EncoderSpec:
    return _hoptimus("hoptimus0", "H-optimus-0 (ViT-g/14, 4 registers)", "H-optimus-0",
                     "Apache-2.0")


@register_encoder
def hoptimus1() -> EncoderSpec:
    return _hoptimus("hoptimus1", "H-optimus-1 (ViT-g/14, 4 registers)", "H-optimus-1",
                     "see the card (gated; its own terms)")


@register_encoder
def gigapath() -> EncoderSpec:
    return EncoderSpec(
        name="gigapath", title="Prov-GigaPath tile encoder (ViT-g, patch 16)", layout="timm",
        architecture="vit_giant_patch14_dinov2",
        kwargs={"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536,
                "depth": 40, "num_heads": 24, "mlp_ratio": 5.33334, "num_classes": 0,
                "dynamic_img_size": True},
        width=1536, patch_size=16, embedding="cls", mean=IMAGENET[0], std=IMAGENET[1],
        licence="Apache-2.0 (research use only, per the card)",
        weights_url="https://huggingface.co/prov-gigapath/prov-gigapath (gated: "
                    "pytorch_model.bin)",
        sources=f"card huggingface.co/prov-gigapath/prov-gigapath (timm config); {TRIDENT} "
                f"GigaPathInferenceEncoder",
        notes="the card resizes a 256 px tile to 256 and centre-crops 224; this package reads "
              "224 px tiles at --mpp directly (the crop's field of view, no resampling)")


def _phikon(name: str, title: str, repo: str, model_type: str, width: int,
            kwargs: Mapping[str, Any], source: str) -> EncoderSpec:
    return EncoderSpec(
        name=name, title=title, layout="transformers", architecture=model_type,
        kwargs=kwargs, config={"model_type": model_type, "hidden_size": width,
                               "patch_size": 16},
        width=width, patch_size=16, embedding="cls", mean=IMAGENET[0], std=IMAGENET[1],
        licence="Owkin non-commercial licence (see the card)",
        weights_url=f"https://huggingface.co/owkin/{repo} (the folder: config.json + weights)",
        weights_files=("model.safetensors", "pytorch_model.bin"),
        sources=f"card huggingface.co/owkin/{repo} (last_hidden_state[:, 0]); {TRIDENT} "
                f"{source}")


@register_encoder
def phikon() -> EncoderSpec:
    return _phikon("phikon", "Phikon (ViT-B/16, iBOT)", "phikon", "vit", 768,
                   {"add_pooling_layer": False}, "PhikonInferenceEncoder")


@register_encoder
def phikon_v2() -> EncoderSpec:
    return _phikon("phikon_v2", "Phikon-v2 (ViT-L/16, DINOv2)", "phikon-v2", "dinov2", 1024,
                   {}, "Phikonv2InferenceEncoder")


def _kaiko(name: str, architecture: str, width: int, patch_size: int,
           img_size: int = 224, reg_tokens: int = 0) -> EncoderSpec:
    model = name.removeprefix("kaiko-")
    kwargs: dict[str, Any] = {"num_classes": 0, "dynamic_img_size": True}
    if img_size != 224:
        kwargs["img_size"] = img_size
    return EncoderSpec(
        name=name, title=f"kaiko.ai {model.upper()}", layout="timm",
        architecture=architecture, kwargs=kwargs, width=width, reg_tokens=reg_tokens,
        patch_size=patch_size, embedding="cls", mean=HALF[0], std=HALF[1],
        licence="Kaiko Non-Commercial Public License v1",
        weights_url=f"https://github.com/kaiko-ai/towards_large_pathology_fms/releases/"
                    f"download/0.0.1/{model}.pth (or the timm copy on huggingface.co/1aurent)",
        weights_files=(f"{model}.pth", "model.safetensors", "pytorch_model.bin"),
        sources=f"kaiko-ai/towards_large_pathology_fms hubconf.py and README (0.5/0.5, 224 px); "
                f"{TRIDENT} Kaiko{model[3:].upper()}InferenceEncoder; {EVA}/kaiko.py",
        notes="ViT-L/14 is built at 518 px (its position-embedding grid) and embeds 224 px "
              "tiles by interpolation (dynamic_img_size), as its hub code and TRIDENT do"
        if img_size != 224 else "")


@register_encoder
def kaiko_vits8() -> EncoderSpec:
    return _kaiko("kaiko-vits8", "vit_small_patch8_224", 384, 8)


@register_encoder
def kaiko_vits16() -> EncoderSpec:
    return _kaiko("kaiko-vits16", "vit_small_patch16_224", 384, 16)


@register_encoder
def kaiko_vitb8() -> EncoderSpec:
    return _kaiko("kaiko-vitb8", "vit_base_patch8_224", 768, 8)


@register_encoder
def kaiko_vitb16() -> EncoderSpec:
    return _kaiko("kaiko-vitb16", "vit_base_patch16_224", 768, 16)


@register_encoder
def kaiko_vitl14() -> EncoderSpec:
    return _kaiko("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024, 14, img_size=518,
                  reg_tokens=4)


@register_encoder
def lunit_vits8() -> EncoderSpec:
    return EncoderSpec(
        name="lunit-vits8", title="Lunit DINO ViT-S/8", layout="timm",
        architecture="vit_small_patch8_224",
        kwargs={"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
        width=384, patch_size=8, embedding="cls", mean=LUNIT[0], std=LUNIT[1],
        licence="Lunit non-commercial public licence (research use only)",
        weights_url="https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/"
                    "pretrained-weights/dino_vit_small_patch8_ep200.torch",
        weights_files=("dino_vit_small_patch8_ep200.torch", "model.safetensors",
                       "pytorch_model.bin"),
        sources=f"lunit-io/benchmark-ssl-pathology README (ViT-S/8, 224 px); its mean/std as "
                f"{EVA}/lunit.py records them; {TRIDENT} LunitS8InferenceEncoder",
        notes="TRIDENT takes the normalisation from timm's config of the local "
              "vit_small_patch8_224 (0.5/0.5) when given a local file; Lunit trained with "
              "the statistics used here")


def _hibou(name: str, title: str, repo: str, width: int) -> EncoderSpec:
    return EncoderSpec(
        name=name, title=title, layout="transformers", architecture="dinov2 with registers",
        config={"hidden_size": width, "patch_size": 14}, width=width, reg_tokens=4,
        patch_size=14, embedding="pooler_output", mean=HIBOU[0], std=HIBOU[1],
        licence="Apache-2.0", trust_remote_code=True,
        weights_url=f"https://huggingface.co/histai/{repo} (the folder, with its modelling code)",
        weights_files=("model.safetensors", "pytorch_model.bin"),
        sources=f"card huggingface.co/histai/{repo} (AutoModel, trust_remote_code=True); "
                f"github.com/HistAI/hibou README; {TRIDENT} HibouLInferenceEncoder "
                f"(pooler_output, its mean/std); {EVA}/histai.py (4 registers)")


@register_encoder
def hibou_b() -> EncoderSpec:
    return _hibou("hibou_b", "Hibou-B (ViT-B/14, 4 registers)", "hibou-b", 768)


@register_encoder
def hibou_l() -> EncoderSpec:
    return _hibou("hibou_l", "Hibou-L (ViT-L/14, 4 registers)", "hibou-L", 1024)


@register_encoder
def midnight12k() -> EncoderSpec:
    return EncoderSpec(
        name="midnight12k", title="kaiko.ai Midnight-12k (ViT-g/14)", layout="transformers",
        architecture="dinov2", config={"model_type": "dinov2", "hidden_size": 1536,
                                       "patch_size": 14},
        width=1536, patch_size=14, embedding="cls+mean", mean=HALF[0], std=HALF[1],
        licence="MIT (see the card)",
        weights_url="https://huggingface.co/kaiko-ai/midnight (the folder: config.json + "
                    "model.safetensors)",
        weights_files=("model.safetensors", "pytorch_model.bin"),
        sources=f"card huggingface.co/kaiko-ai/midnight (classification embedding: "
                f"concat(class token, mean of patch tokens), 0.5/0.5, 224 px); {TRIDENT} "
                f"Midnight12kInferenceEncoder",
        notes="TRIDENT and eva default to the class token alone (1536 dims); the card's "
              "classification embedding, used here, is 3072 dims")


@register_encoder
def conch_v1() -> EncoderSpec:
    return EncoderSpec(
        name="conch_v1", title="CONCH v1 vision tower (ViT-B/16)", layout="package",
        architecture="conch_ViT-B-16", width=512, patch_size=16, embedding="encode_image",
        mean=OPENAI_CLIP[0], std=OPENAI_CLIP[1], input_size=448,
        licence="CC-BY-NC-ND-4.0",
        weights_url="https://huggingface.co/MahmoodLab/CONCH (gated: pytorch_model.bin)",
        requires="conch (pip install git+https://github.com/Mahmoodlab/CONCH.git)",
        sources=f"card huggingface.co/MahmoodLab/CONCH (encode_image(proj_contrast=False, "
                f"normalize=False), 448 px, OpenAI CLIP mean/std); {TRIDENT} "
                f"Conchv1InferenceEncoder",
        notes="its vision tower ends in CoCa's attentional pooler, which only the conch "
              "package builds")
