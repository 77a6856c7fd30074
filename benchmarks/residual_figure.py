"""How the three official ViT-ReciproCAM codes differ, on the embedded model and the bundled images.

Each as its authors run it (docs/methods.md 1.1): their repository
(block -2, ``residual="unmasked"``: the skip connection keeps the block input;
softmax; captum_vit's default), OpenVINO Training Extensions 1.x (the last
block, ``residual="normalized"``: the masked normalised input; softmax) and
OpenVINO XAI 1.1 (the last block, ``residual="input"``: the masked block
input; logits). For each bundled image the figure shows the three maps of
the predicted class (raw ranges in the captions) and their Pearson
correlation with the first; it also prints the correlations and writes them
as JSON.

    python benchmarks/residual_figure.py --out benchmarks/results/reciprocam_residuals.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captum_vit import LayerReciproCAM  # noqa: E402
from captum_vit.data import denormalize  # noqa: E402
from captum_vit.metrics import pearson  # noqa: E402
from captum_vit.models import default_model, sample_images  # noqa: E402
from captum_vit.visualization import pyplot, display_image, draw_overlay  # noqa: E402

#: title -> (block, attribute options)
VARIANTS = {
    "authors' repository\nblock -2, unmasked, softmax": (-2, dict(residual="unmasked", scores="softmax")),
    "OpenVINO Training Extensions\nlast block, normalized, softmax": (-1, dict(residual="normalized", scores="softmax")),
    "OpenVINO XAI\nlast block, input, logits": (-1, dict(residual="input", scores="logits")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reciprocam_residuals.png"))
    args = parser.parse_args()
    loaded = default_model()
    pictures, labels = sample_images()
    images = torch.cat([loaded.preprocess(p) for p in pictures])
    with torch.no_grad():
        predicted = loaded.forward(images).argmax(1)
    maps = {name: LayerReciproCAM(loaded.forward, loaded.vit.blocks[block]).attribute(
                images, target=predicted, normalize=False, **kw)
            for name, (block, kw) in VARIANTS.items()}
    names = list(VARIANTS)
    correlation = {
        other: pearson(maps[names[0]], maps[other])[0].tolist() for other in names[1:]
    }
    plt = pyplot()
    fig, axes = plt.subplots(len(pictures), len(names) + 1, figsize=(3.3 * (len(names) + 1), 3.2 * len(pictures)),
                             squeeze=False)
    for i in range(len(pictures)):
        image = display_image(denormalize(images[i]))
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"true {loaded.class_names[labels[i]]}, "
                             f"predicted {loaded.class_names[int(predicted[i])]}", fontsize=8)
        axes[i, 0].axis("off")
        for j, name in enumerate(names):
            title = name if j == 0 else f"{name}\nr = {correlation[name][i]:+.2f} with the first"
            draw_overlay(axes[i, j + 1], image, maps[name][i], title)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, bbox_inches="tight", pad_inches=0.05)
    summary = {
        other: {"per_image": [round(r, 4) for r in rs], "median": float(torch.tensor(rs).median()),
                "min": min(rs)}
        for other, rs in correlation.items()
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    for other, s in summary.items():
        print(f"Pearson r of {names[0]!r} with {other!r}: median {s['median']:+.3f}, min {s['min']:+.3f}; "
              f"per image {s['per_image']}")
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
