"""The table of docs/models.md (supported models), by running every method on every family.

Each cell is measured, not declared: the method runs on a small randomly
initialised model of the family (``families.py``) and its raw maps are
compared with the literal reference written there from the family's own
sub-modules; a refusal shows the first clause of its message.
``test_families.py`` checks docs/models.md against it, and writes it when
``CAPTUM_VIT_WRITE_SUPPORT_TABLE=1`` (``python benchmarks/support_table.py``).
"""

from __future__ import annotations

import warnings

import families
import torch

from captum_vit import AttentionGuidedGradCAM, AttentionRollout, GradientRollout, LayerReciproCAM

BEGIN, END = "<!-- support-table:begin -->", "<!-- support-table:end -->"
TOLERANCE = 1e-5


def _cell(run, reference) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, note = run()
    except (TypeError, ValueError) as err:
        reason = str(err).split(":")[0].split(";")[0]
        if "attend within (shifted) windows" in str(err):
            reason = "refused: window attention has no class-token row"
        elif "class token joins only in the class-attention blocks" in str(err):
            reason = "refused: no class token in these blocks (it joins in class attention at the end)"
        elif "pool the grid to a smaller one" in str(err):
            reason = "refused: the grid changes between stages"
        elif "reads patch tokens only" in str(err):
            reason = "refused: the head never reads the class token"
        elif "has no class token" in str(err):
            reason = "refused: the model has no class token"
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

        grid = families.grid_of(name, index)
        return run, lambda b: families.literal_reciprocam(model, blocks[index], images[b], P, grid=grid)[targets[b]]

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


def page_table(page: str) -> str:
    return page.split(BEGIN)[1].split(END)[0].strip()


def with_table(page: str, table: str) -> str:
    """``page`` with ``table`` between its markers."""
    return page.split(BEGIN)[0] + BEGIN + "\n" + table + "\n" + END + page.split(END)[1]
