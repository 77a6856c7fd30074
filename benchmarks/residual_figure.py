"""How the two official ViT-ReciproCAM variants differ, on the embedded model and the bundled images.

``residual="normalized"`` (the authors' first code, the specification, our
default) feeds the masked normalised input ``Z*M`` as the explained block's
residual and scores with softmax; ``residual="input", scores="logits"`` (the
authors' later OpenVINO XAI code) feeds the masked block input ``X*M`` and
returns raw logits. For each bundled image the figure shows both maps of the
predicted class (raw ranges in the captions) and their Pearson correlation;
it also prints the correlations and writes them as JSON.

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

VARIANTS = {
    "residual='normalized' (softmax)": dict(residual="normalized", scores="softmax"),
    "residual='input' (logits)": dict(residual="input", scores="logits"),
    "residual='input' (softmax)": dict(residual="input", scores="softmax"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reciprocam_residuals.png"))
    args = parser.parse_args()
    loaded = default_model()
    pictures, labels = sample_images()
    images = torch.cat([loaded.preprocess(p) for p in pictures])
    cam = LayerReciproCAM(loaded.forward, loaded.vit.blocks[-1])
    with torch.no_grad():
        predicted = loaded.forward(images).argmax(1)
    maps = {name: cam.attribute(images, target=predicted, normalize=False, **kw) for name, kw in VARIANTS.items()}
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
        print(f"Pearson r of {names[0]} with {other}: median {s['median']:+.3f}, min {s['min']:+.3f}; "
              f"per image {s['per_image']}")
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
