"""Relevance maps of Chefer et al.'s own code on the embedded model, saved as test data.

Builds the authors' ``VisionTransformer`` (github
``hila-chefer/Transformer-Explainability``, ``baselines/ViT/ViT_LRP.py`` with
``modules/layers_ours.py``, unedited, outside this project) with the shape of
the embedded CIFAR-10 DeiT-Tiny, loads its weights, and for every bundled
image (upsampled to 224 x 224 as the model's ``forward`` does) runs what their
``ViT_explanation_generator.LRP.generate_LRP`` does: the forward, the backward
of the target logit, and ``relprop(one_hot, method="transformer_attribution",
alpha=1)``. Their ``generate_LRP`` itself moves the one-hot to CUDA and makes
it float32, so it is driven here step by step, on the CPU, with a one-hot of
the model's dtype. Writes ``tests/data/chefer_reference.npz``: float64 and
float32 maps and the classes explained. ``tests/test_relevance.py`` compares
``TransformerAttribution`` with them.

    git clone https://github.com/hila-chefer/Transformer-Explainability /tmp/chefer
    pip install einops                  # their code needs it; not a captum_vit dependency
    python benchmarks/chefer_reference.py --repo /tmp/chefer
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.models import default_model, sample_images  # noqa: E402


def their_maps(model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor, size: int) -> np.ndarray:
    dtype = next(model.parameters()).dtype
    maps = []
    for image, c in zip(images, classes):
        # upsampled in the model's dtype, as the embedded model's forward does: rounding the input decides these maps
        x = F.interpolate(image[None].to(dtype), size=(size, size), mode="bilinear", align_corners=False)
        output = model(x)
        one_hot = torch.zeros(1, output.shape[-1], dtype=dtype)
        one_hot[0, c] = 1
        model.zero_grad()
        (one_hot * output).sum().backward(retain_graph=True)
        cam = model.relprop(one_hot, method="transformer_attribution", alpha=1)  # (1, h*w)
        maps.append(cam.detach().double().reshape(size // 16, size // 16).numpy())
    return np.stack(maps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="a checkout of hila-chefer/Transformer-Explainability")
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "chefer_reference.npz"))
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    from baselines.ViT.ViT_LRP import VisionTransformer  # the authors' model with their LRP rules

    loaded = default_model()
    vit = loaded.vit
    theirs = VisionTransformer(img_size=224, patch_size=16, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                               num_heads=vit.blocks[0].attn.num_heads, mlp_ratio=4, qkv_bias=True,
                               num_classes=vit.num_classes)
    missing, unexpected = theirs.load_state_dict(vit.state_dict(), strict=False)
    assert not missing, f"their model has parameters the embedded one lacks: {missing}"
    theirs.eval()
    pictures, labels = sample_images()
    images = torch.cat([loaded.preprocess(p) for p in pictures])
    with torch.no_grad():
        classes = loaded.forward(images).argmax(1)
    arrays = {"images": images.numpy(), "classes": classes.numpy()}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        arrays[f"{name}/map"] = their_maps(copy.deepcopy(theirs).to(dtype), images, classes, loaded.forward.img_size)
    a, b = arrays["float32/map"], arrays["float64/map"]
    spread = (np.abs(a - b).reshape(len(a), -1).max(1) / np.ptp(b.reshape(len(b), -1), axis=1))
    print(f"their float32 vs float64: max |difference| / range per image {np.round(spread, 4).tolist()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"unexpected keys ignored: {unexpected}; written to {out}")


if __name__ == "__main__":
    main()
