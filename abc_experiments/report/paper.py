"""The paper's reference numbers, drawn next to a sweep that is exactly the paper's setting.

Lin, Zhao & Pan, "Towards Accurate Binary Convolutional Neural Network", NIPS 2017,
arXiv 1711.11294, Table 4 -- ResNet-18 on ImageNet, top-1 accuracy (%) for M weight bases x
N activation bases. The weight-only rows (FP activations) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_FP_TOP1 = 69.3
PAPER_ABC_TOP1 = {
    (1, 1): 42.7,
    (3, 1): 49.1,
    (3, 3): 61.0,
    (3, 5): 63.1,
    (5, 1): 54.1,
    (5, 3): 62.5,
    (5, 5): 65.0,
}
# Approximate paper model sizes: torchvision's ResNet-18 parameter count, every weight stored with
# 32 bits (full precision) or M bits (M binary bases); scales and full-precision layers are ignored.
RESNET18_PARAMS = 11_689_512
BYTES_PER_KB = 1000  # as in summary.json (abc_experiments.nn.summary)


@dataclass(frozen=True)
class PaperPoint:
    """One published ABC-Net ResNet-18 ImageNet result."""

    M: int | None  # None for the full-precision network
    N: int | None
    top1: float
    size_kb: float


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def paper_reference_points(dataset: str | None, model: str | None) -> list[PaperPoint]:
    """The paper's ResNet-18 ImageNet results, only for dataset=imagenet and model=resnet18."""
    if dataset is None or model is None:
        return []
    if _normalise(dataset) != "imagenet" or _normalise(model) != "resnet18":
        return []

    def size_kb(bits_per_weight: int) -> float:
        return RESNET18_PARAMS * bits_per_weight / 8 / BYTES_PER_KB

    fp = PaperPoint(None, None, PAPER_FP_TOP1, size_kb(32))
    return [fp] + [PaperPoint(m, n, top1, size_kb(m)) for (m, n), top1 in sorted(PAPER_ABC_TOP1.items())]
