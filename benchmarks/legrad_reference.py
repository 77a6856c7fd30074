"""LeGrad maps of its authors' repository, run unedited, saved as test data.

LeGrad's code (github ``WalBouss/LeGrad`` at a9edb03, ``legrad/wrapper.py``
and ``legrad/utils.py``) explains open_clip models only, and pins
``open_clip_torch<=2.23.0``. This script builds a small open_clip ``CLIP``
(64 x 64 images, patch 16, 3 layers, width 64, layer scale) with seeded random
weights, wraps it with their ``LeWrapper`` (``layer_index=-2``, their default,
and ``layer_index=0``, every layer), and for two random images and three
prompts runs their ``compute_legrad_clip``: per layer, the gradient of the
prompt's similarity to that layer's token mean (through ``ln_post`` and
``proj``) with respect to that layer's attention map, ReLU, averaged over
heads and query rows, upsampled 16x bilinearly, summed over layers and
min-max scaled.

Writes ``tests/data/legrad_reference.pt``: the image tower's state dict, the
prompts' text embeddings, the images and the ``(images, prompts, 64, 64)``
maps of each setting. Needs LeGrad's requirements, which captum_vit does not:

    git clone https://github.com/WalBouss/LeGrad /tmp/legrad
    python -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        'open_clip_torch==2.23.0' timm einops opencv-python-headless matplotlib requests
    /tmp/refenv/bin/python benchmarks/legrad_reference.py --repo /tmp/legrad
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a ship"]
LAYER_INDICES = (-2, 0)


def small_clip():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=3, width=64, head_width=16, mlp_ratio=2.0,
                                                        patch_size=16, image_size=64, ls_init_value=0.5),
                 text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    with torch.no_grad():  # every parameter drawn, norms near 1
        for name, p in model.named_parameters():
            if name.startswith("visual") and ("ln" in name and name.endswith("weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.startswith("visual") and name.endswith("gamma"):
                p.copy_(0.5 + 0.2 * torch.randn_like(p))
            elif name.startswith("visual"):
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="a checkout of WalBouss/LeGrad")
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "legrad_reference.pt"))
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    import open_clip

    from legrad import LeWrapper  # the authors' wrapper, unedited

    model = small_clip()
    state = {k: v.clone() for k, v in model.visual.state_dict().items()}
    text = open_clip.tokenize(PROMPTS, context_length=16)
    with torch.no_grad():
        text_embedding = model.encode_text(text, normalize=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = {"visual/state": state, "text_embedding": text_embedding, "images": images, "prompts": PROMPTS,
           "layer_indices": LAYER_INDICES}
    for layer_index in LAYER_INDICES:
        wrapped = small_clip()  # a fresh model: the wrapper edits the one it wraps
        wrapped.load_state_dict(model.state_dict())
        wrapped = LeWrapper(wrapped, layer_index=layer_index)
        maps = [wrapped.compute_legrad_clip(image=image[None], text_embedding=text_embedding)[0].detach()
                for image in images]
        out[f"maps/{layer_index}"] = torch.stack(maps)  # (images, prompts, 64, 64)
        print("layer_index", layer_index, tuple(out[f"maps/{layer_index}"].shape))
    torch.save(out, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
