"""Write the README's "Supported models" table by running every method on every family.

Each cell is measured, not declared: the method runs on a small randomly
initialised model of the family (``tests/families.py``) and its raw maps are
compared with the literal reference written there from the family's own
sub-modules; a refusal shows the first clause of its message.

    python benchmarks/support_table.py            # print the table
    python benchmarks/support_table.py --check    # exit 1 if README.md's table differs
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import families  # noqa: E402
from captum_vit import AttentionGuidedGradCAM, AttentionRollout, GradientRollout, LayerReciproCAM  # noqa: E402

BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"
TOLERANCE = 1e-5


def _cell(run, reference) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, note = run()
    except (TypeError, ValueError) as err:
        reason = str(err).split(":")[0].split(";")[0]
        if "reads patch tokens only" in str(err):
            reason = "refused: the head never reads the class token"
        return reason if reason.startswith("refused") else f"refused: {reason}"
    error = max(float((got[b] - reference(b)).abs().max()) for b in range(got.shape[0]))
    mark = "exact" if error <= TOLERANCE else f"**differs by {error:.1e}**"
    return f"{mark}{note}"


def family_row(name: str) -> str:
    model, blocks, images = families.build(name)
    P, targets = families.PREFIX[name], torch.tensor([3, 7])
    last, L = len(blocks) - 1, len(blocks)

    def reciprocam(index):
        def run():
            cam = LayerReciproCAM(model, blocks[index])
            maps = cam.attribute(images, target=targets, normalize=False)[:, 0]
            return maps, f" ({cam.last_path} path)"

        return run, lambda b: families.literal_reciprocam(model, blocks[index], images[b], P)[targets[b]]

    def attention(cls, literal):
        def run():
            return cls(model).attribute(images, target=targets, normalize=False)[:, 0], ""

        return run, literal

    every = list(range(L))
    cells = [
        reciprocam(last),
        reciprocam(last - 1),
        reciprocam(0),
        attention(AttentionGuidedGradCAM,
                  lambda b: families.literal_agcam(model, blocks, every, images[b], int(targets[b]), P)),
        attention(AttentionRollout, lambda b: families.literal_rollout(model, blocks, every, images[b], P)),
        attention(GradientRollout,
                  lambda b: families.literal_gradient_rollout(model, blocks, every, images[b], int(targets[b]), P)),
    ]
    return f"| {name} | {P} | " + " | ".join(_cell(*c) for c in cells) + " |"


def support_table() -> str:
    header = (
        "| family (small random model) | prefix tokens | ViT-ReciproCAM, last block | ViT-ReciproCAM, second-last "
        "block | ViT-ReciproCAM, first block | AGCAM | Attention Rollout | Gradient Rollout |\n"
        "|---|---:|---|---|---|---|---|---|"
    )
    rows = []
    for name, (_, _, library) in families.FAMILIES.items():
        try:
            __import__(library)
        except ImportError:
            rows.append(f"| {name} | | not measured: `{library}` is not installed | | | | | |")
            continue
        rows.append(family_row(name))
    return "\n".join([header, *rows])


def readme_table(readme: str) -> str:
    return readme.split(BEGIN)[1].split(END)[0].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with README.md instead of printing")
    args = parser.parse_args()
    table = support_table()
    if not args.check:
        print(table)
        return 0
    current = readme_table((ROOT / "README.md").read_text())
    if current != table:
        print("README.md's supported-models table is out of date; regenerate it with "
              "python benchmarks/support_table.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
