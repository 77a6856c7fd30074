"""Loading models: timm names, local checkpoints and the embedded default.

The embedded default is a DeiT-Tiny trained on CIFAR-10 (see
``captum_vit/assets/MODEL_CARD.md``), so everything works offline. A timm
model name loads with ``pretrained=True`` wherever timm can fetch weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "deit_tiny_p16_224.safetensors"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _deit_tiny_cifar() -> nn.Module:
    import timm

    return timm.create_model("deit_tiny_patch16_224", num_classes=10, pretrained=False)


def _vit_tiny_p4_32() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=9, num_heads=3, num_classes=10)


#: Architectures of the CIFAR-10 checkpoints trained for this project, by file stem
#: (constructors as in the training recipe).
CIFAR_ARCHITECTURES: Dict[str, Callable[[], nn.Module]] = {
    "deit_tiny_p16_224": _deit_tiny_cifar,
    "vit_tiny_p4_32": _vit_tiny_p4_32,
}


class CheckpointNotFoundError(FileNotFoundError):
    """A local checkpoint path that does not exist."""


class ModelSpecError(ValueError):
    """A model request this module cannot resolve (e.g. a checkpoint of unknown architecture)."""


class WeightsUnavailableError(OSError):
    """Pretrained weights neither cached nor downloadable (no network)."""


def _hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


@contextlib.contextmanager
def _hub_offline_unless_reachable(timeout: float = 3.0) -> Iterator[bool]:
    """Yield whether the model hub answers; if not, put huggingface_hub in offline mode meanwhile.

    Offline, the hub client retries each file for about a minute and prints
    every retry; in offline mode it reads the local cache only and fails at once.
    """
    from huggingface_hub import constants

    reachable = not constants.HF_HUB_OFFLINE
    if reachable:
        try:
            socket.create_connection((_hub_host(), 443), timeout=timeout).close()
        except OSError:
            reachable = False
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or not reachable
    try:
        yield reachable
    finally:
        constants.HF_HUB_OFFLINE = previous


class CIFARClassifier(nn.Module):
    """A CIFAR-10 ViT taking normalised 32x32 images.

    Inputs are normalised with `CIFAR10_MEAN` / `CIFAR10_STD`
    (the model's input space: baseline 0 is the mean colour); inputs of
    another size are resized bilinearly to the ViT's own input size, as in
    training (the 224-pixel DeiT sees CIFAR upsampled after normalising).
    """

    def __init__(self, vit: nn.Module, img_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.img_size = int(img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return self.vit(x)


@dataclass
class LoadedModel:
    """A model ready to explain, and how to feed it."""

    forward: nn.Module  # forward_func for the explainers
    vit: nn.Module  # the timm VisionTransformer inside it
    mean: Sequence[float]
    std: Sequence[float]
    class_names: Optional[Sequence[str]]
    name: str
    info: Dict[str, str]
    #: timm's data config (``resolve_data_config``): input size, crop, interpolation, mean, std
    data_config: Dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """timm's evaluation transform for `data_config` (resize, centre crop, normalise)."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def preprocess(self, image) -> torch.Tensor:
        """A PIL image (or path) -> a normalised ``(1, 3, H, W)`` tensor, through timm's transform.

        Raises ``ValueError`` naming the file when it is not a readable image.
        """
        from PIL import Image

        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except (OSError, ValueError) as err:
                raise ValueError(f"{image} is not a readable image ({type(err).__name__}).") from None
        return self.transform(image.convert("RGB"))[None]


def load_cifar_checkpoint(path: str | Path, arch: Optional[str] = None) -> LoadedModel:
    """Load one of this project's CIFAR-10 ``.safetensors`` checkpoints (fp16 -> fp32)."""
    from safetensors import safe_open

    path = Path(path)
    stem = arch or path.stem
    if stem not in CIFAR_ARCHITECTURES:
        raise ModelSpecError(
            f"unknown architecture for {path.name}: name it with one of {', '.join(CIFAR_ARCHITECTURES)} "
            "(or pass a timm model name as arch for other checkpoints)."
        )
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
        raise ModelSpecError(f"{path} is not a .safetensors checkpoint ({_first_words(err)}); accepted: "
                             f"{ACCEPTED_CHECKPOINTS}.") from None
    state = {k: v.float() for k, v in read_safetensors(path).items()}
    vit = CIFAR_ARCHITECTURES[stem]()
    vit.load_state_dict(state)
    vit.eval()
    img_size = int(metadata.get("img_size", vit.patch_embed.img_size[0]))
    return LoadedModel(
        forward=CIFARClassifier(vit, img_size).eval(),
        vit=vit,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        class_names=CIFAR10_CLASSES,
        name=stem,
        info=metadata,
        # CIFAR images are 32x32 already; other pictures keep their aspect (resize, centre crop)
        data_config=dict(input_size=(3, 32, 32), interpolation="bicubic", mean=CIFAR10_MEAN, std=CIFAR10_STD,
                         crop_pct=1.0, crop_mode="center"),
    )


def default_model() -> LoadedModel:
    """The embedded DeiT-Tiny trained on CIFAR-10 (no download)."""
    return load_cifar_checkpoint(DEFAULT_CHECKPOINT)


def load_timm_model(name: str, checkpoint: Optional[str | Path] = None, num_classes: Optional[int] = None) -> LoadedModel:
    """A timm model by name: ``pretrained=True``, or weights from a local checkpoint.

    Preprocessing comes from timm's ``resolve_data_config``; class names from
    timm's ImageNet info when the model has 1000 classes.
    """
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
        hint = f"; close matches: {', '.join(close)}" if close else " (timm.list_models('*deit*') lists them)"
        raise ModelSpecError(f"unknown model {name!r}: not a timm model name nor a checkpoint file{hint}.")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is None:
        with _hub_offline_unless_reachable() as reachable:
            try:
                vit = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as err:  # noqa: BLE001 - hub clients raise many types when offline
                if reachable:
                    raise
                raise WeightsUnavailableError(
                    f"pretrained weights for {name!r} are not in the local cache and {_hub_host()} cannot be "
                    "reached (offline?): download them once online, or load a local checkpoint "
                    "(load_model(path, arch=name); CLI: --model PATH --arch NAME), or use the embedded default."
                ) from err
    else:
        vit = _timm_model_from_checkpoint(name, Path(checkpoint), num_classes)
    vit.eval()
    config = resolve_data_config({}, model=vit)
    class_names = None
    if getattr(vit, "num_classes", None) == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            class_names = [info.index_to_description(i) for i in range(1000)]
        except Exception:  # noqa: BLE001 - names are a nicety, never a reason to fail
            class_names = None
    return LoadedModel(vit, vit, config["mean"], config["std"], class_names, name, {}, config)


def _timm_model_from_checkpoint(name: str, path: Path, num_classes: Optional[int]) -> nn.Module:
    """timm model ``name`` with a local checkpoint's weights; its class count read from the checkpoint's head.

    A fine-tuned checkpoint has its own number of classes: the architecture is
    built with the rows of the checkpoint's classifier weight (timm's
    ``default_cfg["classifier"]``), unless ``num_classes`` is given. Keys or
    shapes that do not fit are named in one line.
    """
    import timm

    state = _read_state_dict(path)
    if num_classes is None:
        probe = timm.create_model(name, pretrained=False)
        heads = probe.default_cfg.get("classifier", "head")
        head = heads[0] if isinstance(heads, (tuple, list)) else heads
        weight = state.get(f"{head}.weight")
        num_classes = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else probe.num_classes
    vit = timm.create_model(name, pretrained=False, num_classes=num_classes)
    own = vit.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ModelSpecError(
            f"{path.name} does not fit the timm architecture {name!r}: {len(missing)} key(s) missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}); is --arch the architecture "
            "it was trained with?"
        )
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if shapes:
        raise ModelSpecError(f"{path.name}'s shapes do not fit {name!r} (checkpoint vs architecture): "
                             f"{'; '.join(shapes[:3])}; is --arch the architecture it was trained with?")
    vit.load_state_dict(state)
    return vit


#: what `load_model` accepts, for the error of a file that is none of it
ACCEPTED_CHECKPOINTS = ("a state dict saved with torch.save (.pth, .pt, .bin) or a .safetensors file of tensors; "
                        "or a timm model name")


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = _torch_load(path)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSpecError(f"{path} holds no state dict of tensors; accepted: {ACCEPTED_CHECKPOINTS}.")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or one line saying it is not one."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged header
        raise ModelSpecError(f"{path} is not a .safetensors checkpoint ({_first_words(err)}); accepted: "
                             f"{ACCEPTED_CHECKPOINTS}.") from None


def _torch_load(path: Path) -> object:
    """``torch.load`` with weights only; a file that is no torch checkpoint, or one holding pickled objects
    beyond tensors (a whole model), is refused in one line."""
    import pickle

    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic not in (b"PK", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):  # zip (torch.save) or pickle
        raise ModelSpecError(f"{path} is not a checkpoint (no torch.save or pickle header); accepted: "
                             f"{ACCEPTED_CHECKPOINTS}.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelSpecError(f"{path} holds pickled Python objects besides tensors (a whole model saved with "
                             "torch.save(model)?), which are not loaded because unpickling can run code; save "
                             "model.state_dict() instead.") from None


def _first_words(err: BaseException) -> str:
    return str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__


def load_model(spec: str, arch: Optional[str] = None, num_classes: Optional[int] = None) -> LoadedModel:
    """``"default"``, a local ``.safetensors``/``.pth`` file, or a timm model name."""
    if spec in ("default", "", None):
        return default_model()
    path = Path(spec)
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        if not path.exists():
            raise CheckpointNotFoundError(f"checkpoint {spec} does not exist.")
        if (arch or path.stem) in CIFAR_ARCHITECTURES and path.suffix == ".safetensors":
            return load_cifar_checkpoint(path, arch)
        if arch is None:
            _read_state_dict(path)  # a file that is no checkpoint is said first: --arch would not help
            raise ModelSpecError(f"give the timm architecture of {path.name} with --arch (e.g. deit_small_patch16_224).")
        return load_timm_model(arch, path, num_classes)
    return load_timm_model(spec, None, num_classes)


def sample_images() -> Tuple[list, list]:
    """The bundled CIFAR-10 test images: ``(PIL images, labels)``."""
    from PIL import Image

    index = json.loads((ASSETS / "samples" / "samples.json").read_text())
    images = [Image.open(ASSETS / "samples" / item["file"]).convert("RGB") for item in index]
    return images, [item["label"] for item in index]
