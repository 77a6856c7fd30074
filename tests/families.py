"""Small randomly initialised models of every supported family, and literal references.

The references are written here from each family's own sub-modules, one image
and one masked copy at a time (ReciproCAM) or one explicit attention matrix at
a time (AGCAM, rollouts), independently of captum_vit's adapters. They are
shared by ``test_families.py`` and ``benchmarks/support_table.py`` (which
writes the table of supported models in docs/models.md).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 64  # 64x64 images, patch 16: a 4x4 grid
DIM, HEADS, DEPTH, CLASSES = 64, 4, 3, 10


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every parameter (biases, norms, layer scales) so no term can hide; norm weights (BatchNorm's too)
    and XCiT's attention temperatures near 1, as trained models have them, so the image reaches the head."""
    g = torch.Generator().manual_seed(seed)
    batch_norms = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            last = name.split(".")[-1]
            if ("norm" in name or "ln" in name) and last == "weight" or name in batch_norms or last == "temperature":
                p.copy_(1.0 + 0.2 * noise)
            elif last in ("gamma", "gamma_1", "gamma_2", "gamma1", "gamma2", "gamma3", "lambda1") or ".ls" in name:
                p.copy_(0.5 + 0.2 * noise)
            elif "position_bias_table" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


class Headed(nn.Module):
    """A backbone that returns an embedding, with a user's linear head."""

    def __init__(self, backbone: nn.Module, features: Callable[[Any], torch.Tensor], width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.features = features
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x):
        return self.head(self.features(self.backbone(x)))


# -- factories -----------------------------------------------------------------
def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                             num_classes=CLASSES, qkv_bias=True, reg_tokens=2)


def timm_deit_distilled():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                      num_classes=CLASSES)


def timm_vit_avgpool():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                             num_classes=CLASSES, global_pool="avg")


def timm_naflexvit():
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    cfg = NaFlexVitCfg(patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, global_pool="token",
                       class_token=True, reg_tokens=1)
    return NaFlexVit(cfg, num_classes=CLASSES, img_size=SIZE)


def timm_eva02():
    from timm.models.eva import Eva

    return Eva(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
               global_pool="token", use_rot_pos_emb=True, ref_feat_shape=(4, 4), swiglu_mlp=True, scale_mlp=True,
               init_values=0.5, qkv_fused=False)


def timm_vit_rope():
    from timm.models.eva import Eva

    return Eva(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
               global_pool="avg", use_rot_pos_emb=True, num_reg_tokens=1, qkv_fused=True, qk_norm=True,
               init_values=0.5)


def timm_beit():
    from timm.models.beit import Beit

    return Beit(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
                global_pool="token", use_rel_pos_bias=True, init_values=0.5, use_abs_pos_emb=False)


def timm_vit_relpos():
    """Class token, per-block MLP relative-position bias, q/k norms."""
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return VisionTransformerRelPos(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                   num_classes=CLASSES, class_token=True, global_pool="token", qkv_bias=True,
                                   qk_norm=True, init_values=0.5, rel_pos_type="mlp")


def timm_vit_srelpos():
    """No prefix token at all, one relative-position bias shared by every block, average pool."""
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return VisionTransformerRelPos(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                                   num_classes=CLASSES, class_token=False, global_pool="avg", qkv_bias=True,
                                   init_values=0.5, rel_pos_type="bias", shared_rel_pos=True)


def timm_cait():
    """Three talking-heads self-attention blocks on the patches, then two class-attention blocks."""
    from timm.models.cait import Cait

    return Cait(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
                depth_token_only=2, init_values=0.5)


def timm_xcit():
    """Three cross-covariance blocks (attention, local patch interaction, MLP), then two class-attention blocks."""
    from timm.models.xcit import Xcit

    return Xcit(img_size=SIZE, patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, num_classes=CLASSES,
                cls_attn_layers=2, eta=0.5)


def timm_pit():
    """Two stages: a 7x7 grid (two blocks), pooled by a strided convolution to 4x4 (one block)."""
    from timm.models.pit import PoolingVisionTransformer

    return PoolingVisionTransformer(img_size=SIZE, patch_size=16, stride=8, base_dims=[16, 16], depth=[2, 1],
                                    heads=[2, 4], mlp_ratio=2.0, num_classes=CLASSES)


def timm_swin():
    """Two stages: an 8x8 grid (window 4, the second block shifted by 2), then 4x4 (the window covers it)."""
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                           num_classes=CLASSES)


def torchvision_swin():
    """As timm_swin; torchvision's windows and merging pad, so any image size runs."""
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[8, 8], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=CLASSES)


def hf_swin():
    """As timm_swin, in transformers: SwinForImageClassification."""
    from transformers import SwinConfig, SwinForImageClassification

    return SwinForImageClassification(SwinConfig(image_size=SIZE, patch_size=8, embed_dim=32, depths=[2, 2],
                                                 num_heads=[2, 4], window_size=4, num_labels=CLASSES))


def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=SIZE, patch_size=16, num_layers=DEPTH, num_heads=HEADS, hidden_dim=DIM,
                             mlp_dim=2 * DIM, num_classes=CLASSES)


def _hf_kw():
    return dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=2 * DIM,
                image_size=SIZE, patch_size=16, num_labels=CLASSES)


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(**_hf_kw()))


def hf_deit_teacher():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return DeiTForImageClassificationWithTeacher(DeiTConfig(**_hf_kw()))


def hf_dinov2_registers():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification

    kw = _hf_kw()
    kw.pop("intermediate_size")
    return Dinov2WithRegistersForImageClassification(Dinov2WithRegistersConfig(num_register_tokens=2, **kw))


def hf_dinov2():
    from transformers import Dinov2Config, Dinov2ForImageClassification

    kw = _hf_kw()
    kw.pop("intermediate_size")
    return Dinov2ForImageClassification(Dinov2Config(**kw))


def hf_clip_vision_head():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    kw = _hf_kw()
    kw.pop("num_labels")
    return Headed(CLIPVisionModel(CLIPVisionConfig(**kw)), lambda out: out.pooler_output, DIM)


def open_clip_vit():
    from open_clip.transformer import VisionTransformer

    tower = VisionTransformer(image_size=SIZE, patch_size=16, width=DIM, layers=DEPTH, heads=HEADS, mlp_ratio=2.0,
                              ls_init_value=0.5, output_dim=32)
    return Headed(tower, lambda e: e, 32)


PROMPTS = [f"a photo of a {c}" for c in ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")]


def open_clip_zero_shot():
    """A small open_clip CLIP explained through its prompts (captum_vit.clip): CLASSES prompts, CLASSES logits."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from open_clip.tokenizer import SimpleTokenizer

    from captum_vit.clip import ZeroShotClassifier

    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=DEPTH, width=DIM, head_width=DIM // HEADS, mlp_ratio=2.0,
                                                        patch_size=16, image_size=SIZE, ls_init_value=0.5),
                 text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    return ZeroShotClassifier.from_open_clip(model.eval(), PROMPTS, SimpleTokenizer(context_length=16))


def word_tokenizer(texts, padding=True, return_tensors="pt"):
    """A stand-in for CLIPTokenizer (whose vocabulary is a download): one id per word, 0 pads, 1 and 2 bracket."""
    ids = [[1, *(3 + sum(map(ord, word)) % 90 for word in text.split()), 2] for text in texts]
    longest = max(map(len, ids))
    ids = torch.tensor([row + [0] * (longest - len(row)) for row in ids])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def hf_clip_model():
    from transformers import CLIPConfig, CLIPModel

    kw = _hf_kw()
    kw.pop("num_labels")
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=kw, projection_dim=32)).eval()


def hf_clip_zero_shot():
    """A small transformers CLIPModel explained through its prompts (captum_vit.clip)."""
    from captum_vit.clip import ZeroShotClassifier

    return ZeroShotClassifier.from_transformers(hf_clip_model(), PROMPTS, word_tokenizer)


#: name -> (factory, the blocks of the built model, library)
FAMILIES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[nn.Module], List[nn.Module]], str]] = {
    "timm ViT (2 registers)": (timm_vit, lambda m: list(m.blocks), "timm"),
    "timm DeiT distilled": (timm_deit_distilled, lambda m: list(m.blocks), "timm"),
    "timm ViT, avg pool (MAE-style)": (timm_vit_avgpool, lambda m: list(m.blocks), "timm"),
    "timm NaFlexViT": (timm_naflexvit, lambda m: list(m.blocks), "timm"),
    "timm EVA-02 (RoPE, SwiGLU)": (timm_eva02, lambda m: list(m.blocks), "timm"),
    "timm RoPE ViT (qk-norm, avg pool)": (timm_vit_rope, lambda m: list(m.blocks), "timm"),
    "timm BEiT (relative position bias)": (timm_beit, lambda m: list(m.blocks), "timm"),
    "timm relative-position ViT (MLP bias, qk-norm)": (timm_vit_relpos, lambda m: list(m.blocks), "timm"),
    "timm relative-position ViT (shared bias, no prefix token)": (timm_vit_srelpos, lambda m: list(m.blocks), "timm"),
    "timm CaiT (class attention after the blocks)": (timm_cait, lambda m: list(m.blocks), "timm"),
    "timm XCiT (cross-covariance attention)": (timm_xcit, lambda m: list(m.blocks), "timm"),
    "timm PiT (the grid pooled between stages)": (
        timm_pit, lambda m: [*m.transformers[0].blocks, *m.transformers[1].blocks], "timm"),
    "timm Swin (two stages, shifted windows)": (timm_swin, lambda m: [*m.layers[0].blocks, *m.layers[1].blocks], "timm"),
    "torchvision ViT": (torchvision_vit, lambda m: list(m.encoder.layers), "torchvision"),
    "torchvision Swin (two stages, shifted windows)": (
        torchvision_swin, lambda m: [*m.features[1], *m.features[3]], "torchvision"),
    "transformers ViTForImageClassification": (hf_vit, lambda m: list(m.vit.layers), "transformers"),
    "transformers DeiTForImageClassificationWithTeacher": (hf_deit_teacher, lambda m: list(m.deit.layers), "transformers"),
    "transformers Dinov2ForImageClassification": (hf_dinov2, lambda m: list(m.dinov2.encoder.layer), "transformers"),
    "transformers Dinov2WithRegisters (2 registers)": (
        hf_dinov2_registers, lambda m: list(m.dinov2_with_registers.encoder.layer), "transformers"),
    "transformers SwinForImageClassification (two stages, shifted windows)": (
        hf_swin, lambda m: [*m.swin.encoder.layers[0].blocks, *m.swin.encoder.layers[1].blocks], "transformers"),
    "transformers CLIPVisionModel + linear head": (
        hf_clip_vision_head, lambda m: list(m.backbone.encoder.layers), "transformers"),
    "open_clip VisionTransformer + linear head": (
        open_clip_vit, lambda m: list(m.backbone.transformer.resblocks), "open_clip"),
    "open_clip CLIP zero-shot (prompts as classes)": (
        open_clip_zero_shot, lambda m: list(m.image_encoder.transformer.resblocks), "open_clip"),
    "transformers CLIPModel zero-shot (prompts as classes)": (
        hf_clip_zero_shot, lambda m: list(m.image_encoder.encoder.layers), "transformers"),
}


def build(name: str, seed: int = 0) -> Tuple[nn.Module, List[nn.Module], torch.Tensor]:
    factory, blocks, _ = FAMILIES[name]
    torch.manual_seed(seed)
    model = randomize(factory(), seed)
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 1))
    return model, blocks(model), images


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


#: Prefix tokens of each family as built above, written out (not read from the library).
PREFIX = {
    "timm ViT (2 registers)": 3, "timm DeiT distilled": 2, "timm ViT, avg pool (MAE-style)": 1, "timm NaFlexViT": 2,
    "timm EVA-02 (RoPE, SwiGLU)": 1, "timm RoPE ViT (qk-norm, avg pool)": 2, "timm BEiT (relative position bias)": 1,
    "timm relative-position ViT (MLP bias, qk-norm)": 1, "timm relative-position ViT (shared bias, no prefix token)": 0,
    "timm Swin (two stages, shifted windows)": 0, "torchvision Swin (two stages, shifted windows)": 0,
    "timm CaiT (class attention after the blocks)": 0, "timm XCiT (cross-covariance attention)": 0,
    "transformers SwinForImageClassification (two stages, shifted windows)": 0,
    "timm PiT (the grid pooled between stages)": 1,
    "torchvision ViT": 1, "transformers ViTForImageClassification": 1,
    "transformers DeiTForImageClassificationWithTeacher": 2, "transformers Dinov2ForImageClassification": 1,
    "transformers Dinov2WithRegisters (2 registers)": 3, "transformers CLIPVisionModel + linear head": 1,
    "open_clip VisionTransformer + linear head": 1, "open_clip CLIP zero-shot (prompts as classes)": 1,
    "transformers CLIPModel zero-shot (prompts as classes)": 1,
}
#: Families whose head never reads the class token: attention methods must refuse.
PATCH_POOLED = {"timm ViT, avg pool (MAE-style)", "timm RoPE ViT (qk-norm, avg pool)",
                "timm relative-position ViT (shared bias, no prefix token)"}
#: Families whose head reads more than prefix tokens: the ReciproCAM fast path computes every row of the last block.
READS_PATCH_ROWS = PATCH_POOLED | {"transformers Dinov2ForImageClassification",
                                   "transformers Dinov2WithRegisters (2 registers)"}

#: Windowed families: every block's attention is within windows, so the attention methods refuse, and the
#: window attention has no explicit form, so ViT-ReciproCAM runs its general path only.
WINDOWED = {"timm Swin (two stages, shifted windows)", "torchvision Swin (two stages, shifted windows)",
            "transformers SwinForImageClassification (two stages, shifted windows)"}
#: Families whose explained blocks have no class token (it joins in class-attention blocks at the end) and whose
#: attention has no explicit form here: attention methods refuse, ViT-ReciproCAM runs its general path.
CLASS_ATTENTION = {"timm CaiT (class attention after the blocks)", "timm XCiT (cross-covariance attention)"}
#: Families whose grid shrinks between stages: attention methods refuse (their matrices do not compose).
POOLED_STAGES = {"timm PiT (the grid pooled between stages)"}
#: The grid each block acts on, written out (64x64 images): 4x4 in every plain ViT here.
GRIDS = {name: [(8, 8), (8, 8), (4, 4), (4, 4)] for name in WINDOWED}
GRIDS["timm PiT (the grid pooled between stages)"] = [(7, 7), (7, 7), (4, 4)]


def grid_of(name: str, index: int) -> Tuple[int, int]:
    return GRIDS[name][index] if name in GRIDS else (4, 4)


BINOMIAL = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]


def literal_masks(h: int, w: int, P: int, kernel: str, keep_prefix: bool) -> torch.Tensor:
    """Masks written out cell by cell (methods.md 1.2), independent of the library."""
    masks = []
    for i in range(h):
        for j in range(w):
            m = [1.0 if keep_prefix else 0.0] * P + [0.0] * (h * w)
            if kernel == "dirac":
                m[P + i * w + j] = 1.0
            else:
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        ii, jj = i + di, j + dj
                        if 0 <= ii < h and 0 <= jj < w:
                            m[P + ii * w + jj] = BINOMIAL[di + 1][dj + 1] / 16.0
            masks.append(m)
    return torch.tensor(masks)


# -- each block kind, written out from its own sub-modules -----------------------
def _kind(block: nn.Module) -> str:
    name, module = type(block).__name__, type(block).__module__
    if name == "SwinTransformerBlock":
        return "timm swin" if module.startswith("timm") else "torchvision swin"
    return "beit" if name == "Block" and module.endswith("beit") else name


def literal_norm1(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kind = _kind(block)
    if kind in ("Block", "EvaBlock", "beit", "RelPosBlock", "Dinov2Layer", "Dinov2WithRegistersLayer", "timm swin",
                "torchvision swin", "LayerScaleBlock", "XCABlock"):
        return block.norm1(x)
    if kind in ("EncoderBlock", "ResidualAttentionBlock"):
        return block.ln_1(x)
    if kind in ("ViTLayer", "DeiTLayer", "SwinLayer"):
        return block.layernorm_before(x)
    return block.layer_norm1(x)  # CLIPEncoderLayer


def timm_window_attention(block: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """timm Swin's attention branch on an ``(N, h, w, D)`` grid: roll, windows, masked attention, back."""
    from timm.models.swin_transformer import window_partition, window_reverse

    N, h, w, D = z.shape
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    assert h % wh == 0 and w % ww == 0  # no padding in the grids built here
    shifted = torch.roll(z, shifts=(-sh, -sw), dims=(1, 2))
    windows = window_partition(shifted, (wh, ww)).reshape(-1, wh * ww, D)
    attended = block.attn(windows, mask=block.attn_mask).reshape(-1, wh, ww, D)
    return torch.roll(window_reverse(attended, (wh, ww), h, w), shifts=(sh, sw), dims=(1, 2))


def hf_window_attention(block: nn.Module, z: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """transformers SwinLayer's attention branch on ``(N, h*w, D)`` tokens: zero-pad the grid to whole windows,
    roll, windows, masked attention, back, crop."""
    (h, w), (N, _, D) = grid, z.shape
    s, shift = block.window_size, block.shift_size
    H, W = h + (-h) % s, w + (-w) % s
    padded = torch.nn.functional.pad(z.view(N, h, w, D), (0, 0, 0, W - w, 0, H - h))
    rolled = torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2))
    windows = rolled.view(N, H // s, s, W // s, s, D).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, D)
    out = block.attention(windows, block.get_attn_mask(H, W, dtype=z.dtype, device=z.device))[0]
    out = out.view(N, H // s, W // s, s, s, D).permute(0, 1, 3, 2, 4, 5).reshape(N, H, W, D)
    return torch.roll(out, shifts=(shift, shift), dims=(1, 2))[:, :h, :w].reshape(N, h * w, D)


def literal_block(block: nn.Module, z: torch.Tensor, r: torch.Tensor, kwargs: Dict[str, Any]) -> Any:
    """``y = r + branch1(z); y + branch2(y)`` for each block kind."""
    kind = _kind(block)
    if kind == "LayerScaleBlock":  # CaiT
        y = r + block.gamma_1 * block.attn(z)
        return y + block.gamma_2 * block.mlp(block.norm2(y))
    if kind == "XCABlock":
        H, W = kwargs["positional"]
        y = r + block.gamma1 * block.attn(z)
        y = y + block.gamma3 * block.local_mp(block.norm3(y), H, W)
        return y + block.gamma2 * block.mlp(block.norm2(y))
    if kind == "SwinLayer":  # transformers: the grid comes with the call; the output is a tuple
        y = r + hf_window_attention(block, z, kwargs["positional"][0])
        return y + block.mlp(block.layernorm_after(y)), None
    if kind == "timm swin":
        y = r + timm_window_attention(block, z)
        return y + block.mlp(block.norm2(y))
    if kind == "torchvision swin":
        y = r + block.attn(z)
        return y + block.mlp(block.norm2(y))
    if kind == "Block":
        y = r + block.ls1(block.attn(z))
        return y + block.ls2(block.mlp(block.norm2(y)))
    if kind == "EvaBlock":
        y = r + block.gamma_1 * block.attn(z, rope=kwargs.get("rope"))
        return y + block.gamma_2 * block.mlp(block.norm2(y))
    if kind == "beit":
        y = r + block.gamma_1 * block.attn(z, shared_rel_pos_bias=kwargs.get("shared_rel_pos_bias"))
        return y + block.gamma_2 * block.mlp(block.norm2(y))
    if kind == "RelPosBlock":
        y = r + block.ls1(block.attn(z, shared_rel_pos=kwargs.get("shared_rel_pos")))
        return y + block.ls2(block.mlp(block.norm2(y)))
    if kind == "EncoderBlock":
        y = r + block.self_attention(z, z, z, need_weights=False)[0]
        return y + block.mlp(block.ln_2(y))
    if kind in ("ViTLayer", "DeiTLayer"):
        y = r + block.attention(z)[0]
        return y + block.mlp(block.layernorm_after(y))
    if kind in ("Dinov2Layer", "Dinov2WithRegistersLayer"):
        y = r + block.layer_scale1(block.attention(z)[0])
        return y + block.layer_scale2(block.mlp(block.norm2(y)))
    if kind == "CLIPEncoderLayer":
        y = r + block.self_attn(hidden_states=z)[0]
        return y + block.mlp(block.layer_norm2(y))
    if kind == "ResidualAttentionBlock":
        y = r + block.ls_1(block.attn(z, z, z, need_weights=False)[0])
        return y + block.ls_2(block.mlp(block.ln_2(y)))
    raise KeyError(kind)


def _block_input(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def masked(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t * mask`` token by token: ``(1, T, D)`` tokens, or an ``(1, h, w, D)`` grid (Swin) in row-major order."""
    return t * mask.view(*t.shape[1:-1], 1)


def literal_residual(x: torch.Tensor, z_masked: torch.Tensor, mask: torch.Tensor, residual: str) -> torch.Tensor:
    """The explained block's residual for one copy (docs/methods.md 1.3), written out."""
    if residual == "unmasked":  # the authors' repository: norm1's output replaced, the skip connection untouched
        return x
    return z_masked if residual == "normalized" else masked(x, mask)


def literal_reciprocam(model, block, image, P, kernel="gaussian", keep_prefix=True, residual="unmasked",
                       scores="softmax", grid=(4, 4)):
    """``(C, h, w)`` scores: one image, one masked copy at a time, the rest of the model as it is."""
    out = []
    for mask in literal_masks(*grid, P, kernel, keep_prefix):

        def replace(module, args, kwargs, output):
            x = _block_input(args, kwargs)
            z = masked(literal_norm1(module, x), mask)
            return literal_block(module, z, literal_residual(x, z, mask, residual), {**kwargs, "positional": args[1:]})

        handle = block.register_forward_hook(replace, with_kwargs=True)
        try:
            with torch.no_grad():
                logits = logits_of(model(image[None]))[0]
        finally:
            handle.remove()
        out.append(logits.softmax(-1) if scores == "softmax" else logits)
    return torch.stack(out).T.reshape(-1, *grid)


# -- each attention kind, with explicit matrices ---------------------------------
def attention_module(block: nn.Module) -> nn.Module:
    for name in ("attn", "self_attention", "attention", "self_attn"):
        if hasattr(block, name):
            return getattr(block, name)
    raise KeyError(type(block).__name__)


def _heads(t, H):
    B, T, _ = t.shape
    return t.reshape(B, T, H, -1).transpose(1, 2)


def literal_attention(module: nn.Module, x: torch.Tensor, kwargs: Dict[str, Any]):
    """``(out, S, A)`` of one attention module, written from its parameters."""
    name = type(module).__name__
    B, T, D = x.shape
    bias = None
    if name == "MultiheadAttention":
        H = module.num_heads
        q, k, v = (_heads(t, H) for t in F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1))
        scale, finish = q.shape[-1] ** -0.5, module.out_proj
    elif hasattr(module, "q_proj") and type(module).__module__.startswith("transformers"):
        H = getattr(module, "num_attention_heads", None) or module.num_heads
        q, k, v = _heads(module.q_proj(x), H), _heads(module.k_proj(x), H), _heads(module.v_proj(x), H)
        scale = q.shape[-1] ** -0.5
        finish = getattr(module, "o_proj", None) or module.out_proj
    else:  # timm Attention, EvaAttention, BEiT Attention
        H = module.num_heads
        if getattr(module, "qkv", None) is None:
            q, k, v = _heads(module.q_proj(x), H), _heads(module.k_proj(x), H), _heads(module.v_proj(x), H)
        elif getattr(module, "q_bias", None) is not None:
            qkv = F.linear(x, module.qkv.weight, torch.cat((module.q_bias, module.k_bias, module.v_bias)))
            q, k, v = (_heads(t, H) for t in qkv.chunk(3, -1))
        else:
            q, k, v = (_heads(t, H) for t in module.qkv(x).chunk(3, -1))
        if hasattr(module, "q_norm"):
            q, k = module.q_norm(q), module.k_norm(k)
        if kwargs.get("rope") is not None:
            from timm.layers import apply_rot_embed_cat

            P = module.num_prefix_tokens
            q = torch.cat([q[:, :, :P], apply_rot_embed_cat(q[:, :, P:], kwargs["rope"])], dim=2)
            k = torch.cat([k[:, :, :P], apply_rot_embed_cat(k[:, :, P:], kwargs["rope"])], dim=2)
        if getattr(module, "relative_position_bias_table", None) is not None:
            bias = module._get_rel_pos_bias()
        if kwargs.get("shared_rel_pos_bias") is not None:
            bias = kwargs["shared_rel_pos_bias"] if bias is None else bias + kwargs["shared_rel_pos_bias"]
        if getattr(module, "rel_pos", None) is not None:  # RelPosAttention: its own bias, else the shared one
            bias = module.rel_pos.get_bias()
        elif kwargs.get("shared_rel_pos") is not None:
            bias = kwargs["shared_rel_pos"]
        scale = module.scale

        def finish(o, m=module, x=x):
            o = m.norm(o) if hasattr(m, "norm") else o
            if getattr(m, "gate", None) is not None:
                o = o * m.gate(x).sigmoid()
            return m.proj(o)

    s = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    a = s.softmax(-1)
    o = (a @ v).transpose(1, 2).reshape(B, T, -1)
    return finish(o), s, a


def literal_attention_pass(model, blocks, image, detach_input: bool, grad: bool):
    """Logits and every block's ``(S, A)`` of one image, each attention computed explicitly."""
    scores, weights, handles = [], [], []
    for block in blocks:
        module = attention_module(block)

        def replace(mod, args, kwargs, output):
            x = _block_input(args, kwargs)
            x = x.detach() if detach_input else x
            out, s, a = literal_attention(mod, x, kwargs)
            scores.append(s)
            weights.append(a)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handles.append(module.register_forward_hook(replace, with_kwargs=True))
    try:
        image = image[None].clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            logits = logits_of(model(image))[0]
    finally:
        for h in handles:
            h.remove()
    return logits, scores, weights


def literal_agcam(model, blocks, chosen, image, target, P, grid=(4, 4)):
    logits, scores, weights = literal_attention_pass(model, blocks, image, detach_input=True, grad=True)
    grads = torch.autograd.grad(logits[target], [weights[i] for i in chosen])
    cam = sum((scores[i][0, :, 0, P:].sigmoid() * g[0, :, 0, P:].relu()).sum(0) for i, g in zip(chosen, grads))
    return cam.reshape(grid).detach()


def literal_rollout(model, blocks, chosen, image, P, grid=(4, 4)):
    _, _, weights = literal_attention_pass(model, blocks, image, detach_input=False, grad=False)
    T = weights[0].shape[-1]
    rollout = torch.eye(T)
    for i in chosen:
        a = weights[i][0].mean(0) + torch.eye(T)
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    return rollout[0, P:].reshape(grid)


def literal_gradient_rollout(model, blocks, chosen, image, target, P, grid=(4, 4)):
    """Chefer et al. ICCV 2021, Eq. 5: ``mean_h(relu(grad * A))``, ``R += Abar @ R``."""
    logits, _, weights = literal_attention_pass(model, blocks, image, detach_input=False, grad=True)
    grads = torch.autograd.grad(logits[target], [weights[i] for i in chosen])
    T = weights[0].shape[-1]
    relevance = torch.eye(T)
    for i, g in zip(chosen, grads):
        relevance = relevance + (g[0] * weights[i][0]).clamp(min=0).mean(0) @ relevance
    return relevance[0, P:].reshape(grid).detach()


def literal_gradcam(forward, layer, x, target, grid, P=0):
    """Grad-CAM of one image on a layer's patch tokens (``(1, P + h*w, D)``, or Swin's ``(1, h, w, D)``):
    ``relu(sum_d mean_hw(dy/dF_d) F_d)`` on the ``h x w`` grid, written out."""
    kept = {}

    def keep(module, args, output):
        kept["features"] = output

    handle = layer.register_forward_hook(keep)
    try:
        score = forward(x)[0, target]
    finally:
        handle.remove()
    grad = torch.autograd.grad(score, kept["features"])[0]  # nothing is left on the parameters
    features, grads = (t[0].reshape(-1, t.shape[-1])[P:].reshape(*grid, t.shape[-1]) for t in (kept["features"], grad))
    return (grads.mean(dim=(0, 1)) * features).sum(-1).clamp(min=0).detach()
