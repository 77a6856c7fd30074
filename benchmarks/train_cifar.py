"""Retrain the CIFAR-10 ViTs of ../shared/models with the recipe of its README.

    python benchmarks/train_cifar.py --arch deit_tiny_p16_224 --epochs 40 --batch 256 --device cuda
    python benchmarks/train_cifar.py --arch vit_tiny_p4_32 --epochs 100 --batch 512 --device cuda

Recipe: AdamW (lr 1e-3, weight decay 0.05), linear warm-up over the first 5%
of steps then cosine decay, label smoothing 0.1, gradient clipping at 1.0,
bfloat16 autocast; augmentation: reflect-pad 4 and random 32x32 crop,
horizontal flip. Inputs are normalised 32x32 tensors; the 224-pixel model
upsamples them (bilinear) inside ``CIFARClassifier``. Writes fp16
safetensors with ``test_acc`` and ``img_size`` metadata. Needs a GPU for the
full recipe (the shared checkpoints were trained on one H100); ``--epochs 1
--limit 2048`` is a quick CPU smoke run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit.data import CIFAR10JPEG  # noqa: E402
from captum_vit.models import CIFAR_ARCHITECTURES, CIFARClassifier  # noqa: E402


def augment(x: torch.Tensor) -> torch.Tensor:
    """Reflect-pad 4, random 32x32 crop, random horizontal flip (per image)."""
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    B = x.shape[0]
    i = torch.randint(0, 9, (B,))
    j = torch.randint(0, 9, (B,))
    crops = torch.stack([padded[b, :, i[b] : i[b] + 32, j[b] : j[b] + 32] for b in range(B)])
    flip = torch.rand(B) < 0.5
    crops[flip] = crops[flip].flip(-1)
    return crops


def evaluate(model, loader, device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for x, y in loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += y.shape[0]
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CIFAR_ARCHITECTURES), required=True)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke runs)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    train = CIFAR10JPEG(args.data, "train")
    test = CIFAR10JPEG(args.data, "test")
    if args.limit:
        train = Subset(train, torch.randperm(len(train))[: args.limit].tolist())
    train_loader = DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers)
    test_loader = DataLoader(test, batch_size=512, num_workers=args.workers)

    vit = CIFAR_ARCHITECTURES[args.arch]()
    img_size = vit.patch_embed.img_size[0]
    model = CIFARClassifier(vit, img_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = args.epochs * len(train_loader)
    warmup = max(1, int(0.05 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    for epoch in range(args.epochs):
        model.train()
        for x, y in train_loader:
            x, y = augment(x).to(device), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}", flush=True)
    accuracy = evaluate(model, test_loader, device)
    print(f"test accuracy {accuracy:.4f}")
    from safetensors.torch import save_file

    out = Path(args.out or f"{args.arch}.safetensors")
    state = {k: v.detach().half().cpu().contiguous() for k, v in vit.state_dict().items()}
    save_file(state, str(out), metadata={"test_acc": f"{accuracy:.4f}", "img_size": str(img_size)})
    print(f"written {out}")


if __name__ == "__main__":
    main()
