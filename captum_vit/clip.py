"""CLIP zero-shot predictions as a classifier whose classes are text prompts.

A CLIP model scores an image against each prompt by the cosine similarity of
their embeddings, times the model's logit scale (plus a logit bias for
open_clip's SigLIP models). `ZeroShotClassifier` holds the image tower and the
prompts' embeddings, computed once, and returns those scores as
`(B, num_prompts)` logits, so every method of captum_vit (and Captum's own)
explains a zero-shot prediction with the prompt's index as the target:

    classifier = ZeroShotClassifier.from_open_clip(model, ["a photo of a cat", "a photo of a dog"], tokenizer)
    cam = LayerReciproCAM(classifier, classifier.image_encoder.transformer.resblocks[-2])
    maps = cam.attribute(images, target=0)          # (B, 1, h, w): where the image looks like "a photo of a cat"

The image tower is the model's own module (not a copy): the explainers hook
its blocks as they hook any ViT and leave it as they found it.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ZeroShotClassifier(nn.Module):
    r"""CLIP zero-shot classification: images in, one logit per prompt out.

    \[
        \mathrm{logits}_{b,k} = s \, \frac{f(x_b)}{\lVert f(x_b) \rVert} \cdot
        \frac{t_k}{\lVert t_k \rVert} + c
    \]

    with \(f\) the image tower (and its projection), \(t_k\) the embedding of
    prompt \(k\), \(s\) the logit scale (CLIP's `logit_scale.exp()`) and \(c\)
    the logit bias (open_clip's SigLIP models; 0 for CLIP): the model's own
    `logits_per_image`.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_embeddings: Tensor,
        *,
        logit_scale: Union[float, Tensor],
        logit_bias: Union[float, Tensor, None] = None,
        projection: Optional[nn.Module] = None,
        prompts: Optional[Sequence[str]] = None,
    ) -> None:
        r"""
        Args:
            image_encoder: the image tower, `(B, 3, H, W)` images to
                `(B, D)` embeddings, or to a transformers output whose
                `pooler_output` is that (then `projection` maps it to `D`).
            prompt_embeddings: `(K, D)` text embeddings of the K prompts
                (normalised here).
            logit_scale: the multiplier \(s\) (for CLIP, `model.logit_scale.exp()`).
            logit_bias: the additive \(c\) of SigLIP-style models, or None.
            projection: applied to the image tower's output before the
                similarity (transformers' `visual_projection`), or None.
            prompts: the K prompts, kept as `class_names` for figures.
        """
        super().__init__()
        if prompt_embeddings.dim() != 2 or prompt_embeddings.shape[0] == 0:
            raise ValueError(
                f"prompt_embeddings must be (num_prompts, dim) with at least one prompt; got shape "
                f"{tuple(prompt_embeddings.shape)}."
            )
        if prompts is not None and len(prompts) != prompt_embeddings.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {prompt_embeddings.shape[0]} prompt embeddings.")
        self.image_encoder = image_encoder
        self.projection = projection
        self.class_names: Optional[List[str]] = list(prompts) if prompts is not None else None
        self.register_buffer("prompt_embeddings", F.normalize(prompt_embeddings.detach(), dim=-1))
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=prompt_embeddings.dtype).detach())
        bias = 0.0 if logit_bias is None else logit_bias
        self.register_buffer("logit_bias", torch.as_tensor(bias, dtype=prompt_embeddings.dtype).detach())

    @property
    def num_prompts(self) -> int:
        return self.prompt_embeddings.shape[0]

    def forward(self, images: Tensor) -> Tensor:
        """`(B, 3, H, W)` images -> `(B, num_prompts)` logits."""
        features = self.image_encoder(images)
        if hasattr(features, "pooler_output"):  # transformers' vision model returns a ModelOutput
            features = features.pooler_output
        if self.projection is not None:
            features = self.projection(features)
        similarity = F.normalize(features, dim=-1) @ self.prompt_embeddings.to(features.dtype).T
        return self.logit_scale.to(features.dtype) * similarity + self.logit_bias.to(features.dtype)

    @classmethod
    def from_open_clip(
        cls, model: nn.Module, prompts: Sequence[str], tokenizer: Callable[[List[str]], Tensor]
    ) -> "ZeroShotClassifier":
        """The zero-shot classifier of an open_clip `CLIP` model.

        Args:
            model: an open_clip model (`open_clip.create_model_and_transforms`).
            prompts: the K class prompts, e.g. `["a photo of a cat", ...]`.
            tokenizer: `open_clip.get_tokenizer(model_name)`.
        """
        _check_prompts(prompts)
        if not hasattr(model, "encode_text") or not hasattr(model, "visual"):
            raise TypeError(
                f"from_open_clip needs an open_clip CLIP model (with .visual and .encode_text); got "
                f"{type(model).__name__}. For transformers' CLIPModel use ZeroShotClassifier.from_transformers."
            )
        tokens = tokenizer(list(prompts)).to(_device_of(model))
        with torch.no_grad():
            text = model.encode_text(tokens)
        return cls(model.visual, text, logit_scale=model.logit_scale.exp(), logit_bias=getattr(model, "logit_bias", None),
                   prompts=prompts)

    @classmethod
    def from_transformers(cls, model: nn.Module, prompts: Sequence[str], tokenizer: Callable[..., Any]) -> "ZeroShotClassifier":
        """The zero-shot classifier of a transformers `CLIPModel`.

        Args:
            model: e.g. `CLIPModel.from_pretrained("openai/clip-vit-base-patch32")`.
            prompts: the K class prompts.
            tokenizer: the model's tokenizer or processor
                (`AutoTokenizer.from_pretrained(...)`), called as
                `tokenizer(prompts, padding=True, return_tensors="pt")`.
        """
        _check_prompts(prompts)
        if not hasattr(model, "get_text_features") or not hasattr(model, "vision_model"):
            raise TypeError(
                f"from_transformers needs a transformers CLIPModel (with .vision_model and "
                f".get_text_features); got {type(model).__name__}. For open_clip use ZeroShotClassifier.from_open_clip."
            )
        inputs = tokenizer(list(prompts), padding=True, return_tensors="pt")
        inputs = {k: v.to(_device_of(model)) for k, v in dict(inputs).items()}
        with torch.no_grad():
            text = model.get_text_features(**inputs)
        text = getattr(text, "pooler_output", text)  # transformers 5 returns a ModelOutput
        return cls(model.vision_model, text, logit_scale=model.logit_scale.exp(),
                   logit_bias=getattr(model, "logit_bias", None), projection=getattr(model, "visual_projection", None),
                   prompts=prompts)


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a non-empty list of strings, e.g. ['a photo of a cat', 'a photo of a dog']; "
                        f"got {prompts!r}.")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
