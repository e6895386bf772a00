"""Binary activation bases (ABC-Net, Lin, Zhao & Pan, NIPS 2017, arXiv 1711.11294, Section 3.2): the
names of the modules below, kept in one place so that ``from abc_experiments.nn.activations import
...`` keeps working. One topic per module:

- :mod:`.staircase_reference`: the eager reference Σₙ βₙ H_{vₙ}(x) and its STE gradients;
- :mod:`.staircase_bucket`: the "bucket" kernel (one table lookup per element);
- :mod:`.staircase_native`: the "native" kernel's C++ operators (built by :mod:`.native`);
- :mod:`.staircase_dispatch`: :func:`staircase_ste`, choosing the kernel (:data:`KERNELS`);
- :mod:`.activation_binarizer`: the :class:`ActivationBinarizer` module;
- :mod:`.lloyd_max`: :func:`fit_activation_bases`, the calibration fit.
"""

from .activation_binarizer import ActivationBinarizer, default_shifts
from .lloyd_max import fit_activation_bases
from .staircase_bucket import (
    BUCKET_MIN_NUMEL,
    BUCKETS,
    bucket_ends,
    bucket_ids,
    bucket_supported,
    bucket_tables,
    staircase_bucket,
    staircase_grad_bucket,
)
from .staircase_dispatch import KERNELS, resolve_kernel, staircase_ste
from .staircase_native import native_supported, staircase_grad_native, staircase_native
from .staircase_reference import (
    CHUNK,
    heaviside_bases,
    staircase,
    staircase_blocked,
    staircase_grad,
    staircase_grad_blocked,
)

__all__ = [
    "BUCKETS", "BUCKET_MIN_NUMEL", "CHUNK", "KERNELS", "ActivationBinarizer", "bucket_ends", "bucket_ids",
    "bucket_supported", "bucket_tables", "default_shifts", "fit_activation_bases", "heaviside_bases",
    "native_supported", "resolve_kernel", "staircase", "staircase_blocked", "staircase_bucket",
    "staircase_grad", "staircase_grad_blocked", "staircase_grad_bucket", "staircase_grad_native",
    "staircase_native", "staircase_ste",
]
