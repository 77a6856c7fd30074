"""AttnLRP maps of the authors' library LXT, run as its own ViT example runs it, saved as test data.

LXT's example (github ``rachtibat/LRP-eXplains-Transformers``,
``examples/vit_torch.py``; package ``lxt`` 2.1 from PyPI, with ``zennit``)
patches torchvision's ViT classes with ``monkey_patch(vision_transformer)`` and
``monkey_patch_zennit()``, registers zennit's ``Gamma`` rules on every
``Conv2d`` and ``Linear``, runs the forward, the backward of the top class
and takes ``(x * x.grad).sum(1)``. This script does exactly those steps, on
the CPU, for two models instead of the example's hub download and photo:

- ``tv``: a small torchvision ``VisionTransformer`` (64 x 64 images, patch 16,
  3 layers, width 64) with seeded random weights, on seeded random images;
- ``deit``: the embedded CIFAR-10 DeiT-Tiny, its weights copied into
  torchvision's ``vit`` layout (same maths), on the bundled images upsampled
  to 224 x 224 as the embedded model's ``forward`` does.

Writes ``tests/data/attnlrp_reference.pt``: the small model's state dict and
images, each model's classes and raw ``(N, H, W)`` heatmaps for several
``(conv_gamma, linear_gamma)`` (the DeiT's images are the first three bundled
ones, made again by the test). It needs ``lxt`` and ``zennit``, which captum_vit does not:
run it in a separate environment (torch 2.14.1, torchvision, lxt 2.1,
zennit 0.5.1, captum, timm, safetensors):

    python -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 lxt zennit \\
        captum timm safetensors
    /tmp/refenv/bin/python benchmarks/attnlrp_reference.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
#: (conv_gamma, linear_gamma): LXT's default pair here, and two corners of its example's sweep
SETTINGS = ((0.25, 0.05), (100.0, 0.0), (0.1, 1.0))
#: the DeiT's maps are 224 x 224: three bundled images and the first two settings keep the file near 1 MB
DEIT_IMAGES, DEIT_SETTINGS = 3, SETTINGS[:2]


def small_torchvision_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=16, num_layers=3, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10)
    with torch.no_grad():  # every parameter drawn, so biases and norms matter
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "ln" in name and name.endswith("weight")
                    else 0.08 * torch.randn_like(p))
    return model.eval()


def deit_as_torchvision() -> torch.nn.Module:
    """The embedded DeiT-Tiny's weights in torchvision's ``VisionTransformer``."""
    from safetensors.torch import load_file
    from torchvision.models.vision_transformer import VisionTransformer

    timm_state = {k: v.float() for k, v in load_file(ROOT / "captum_vit/assets/deit_tiny_p16_224.safetensors").items()}
    model = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768,
                              num_classes=10)
    state = {"class_token": timm_state["cls_token"], "encoder.pos_embedding": timm_state["pos_embed"],
             "conv_proj.weight": timm_state["patch_embed.proj.weight"],
             "conv_proj.bias": timm_state["patch_embed.proj.bias"],
             "encoder.ln.weight": timm_state["norm.weight"], "encoder.ln.bias": timm_state["norm.bias"],
             "heads.head.weight": timm_state["head.weight"], "heads.head.bias": timm_state["head.bias"]}
    parts = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_weight": "attn.qkv.weight",
             "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj.weight": "attn.proj.weight",
             "self_attention.out_proj.bias": "attn.proj.bias", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    for i in range(12):
        for theirs, timm_name in parts.items():
            for suffix in ("", ".weight", ".bias"):
                key = f"blocks.{i}.{timm_name}{suffix}"
                if key in timm_state and (suffix or "proj" in theirs):
                    state[f"encoder.layers.encoder_layer_{i}.{theirs}{suffix}"] = timm_state[key]
    model.load_state_dict(state)
    return model.eval()


def deit_images() -> torch.Tensor:
    sys.path.insert(0, str(ROOT))
    from captum_vit.models import default_model, sample_images

    loaded = default_model()
    pictures, _ = sample_images()
    images = torch.stack([loaded.transform(p) for p in pictures])
    return F.interpolate(images[:DEIT_IMAGES], size=(224, 224), mode="bilinear", align_corners=False)


def lxt_heatmaps(model: torch.nn.Module, images: torch.Tensor, conv_gamma: float, linear_gamma: float):
    """LXT's example loop body, one image at a time: ``(N, H, W)`` heatmaps and the classes explained."""
    import zennit.rules as z_rules
    from zennit.composites import LayerMapComposite

    for param in model.parameters():
        param.requires_grad = False
    heatmaps, classes = [], []
    for image in images:
        input_tensor = image[None].clone()
        composite = LayerMapComposite([(torch.nn.Conv2d, z_rules.Gamma(conv_gamma)),
                                       (torch.nn.Linear, z_rules.Gamma(linear_gamma))])
        composite.register(model)
        y = model(input_tensor.requires_grad_())
        top = int(y.argmax(dim=1))
        y[0, top].backward()
        composite.remove()
        heatmaps.append((input_tensor * input_tensor.grad).sum(1)[0].detach())
        classes.append(top)
    return torch.stack(heatmaps), torch.tensor(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "attnlrp_reference.pt"))
    args = parser.parse_args()
    # the models are built before LXT patches torch's classes; the patches change backward passes only
    tv, deit = small_torchvision_vit(), deit_as_torchvision()
    tv_images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images = deit_images()
    from torchvision.models import vision_transformer

    from lxt.efficient import monkey_patch, monkey_patch_zennit

    monkey_patch(vision_transformer, verbose=True)
    monkey_patch_zennit(verbose=True)
    out = {"tv/settings": SETTINGS, "deit/settings": DEIT_SETTINGS, "tv/state": tv.state_dict(),
           "tv/images": tv_images}  # the DeiT's images are the bundled ones: the test makes them again
    for name, model, x, settings in (("tv", tv, tv_images, SETTINGS), ("deit", deit, images, DEIT_SETTINGS)):
        for conv_gamma, linear_gamma in settings:
            maps, classes = lxt_heatmaps(model, x, conv_gamma, linear_gamma)
            out[f"{name}/{conv_gamma}/{linear_gamma}"] = maps
            out[f"{name}/classes"] = classes
            print(name, conv_gamma, linear_gamma, "classes", classes.tolist(), "max |R|", float(maps.abs().max()))
    torch.save(out, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
