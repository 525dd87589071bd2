"""Pure, differentiable reference functions: the oracle every fast path in losskit is tested against.

``functional`` never takes an ``impl`` argument and never imports ``losskit.kernels``. Reductions live in
``functional.reduce`` (the only place a mean is taken); the cross-entropy family in
``functional.cross_entropy``. Other submodules (policy, diffusion, temporal) are imported by name.
"""

import losskit.functional.cross_entropy as _cross_entropy_module
import losskit.functional.reduce as _reduce_module
from losskit.functional.cross_entropy import *
from losskit.functional.reduce import *

# The public names are the two submodules' own lists (each kept where its functions are).
__all__ = _cross_entropy_module.__all__ + _reduce_module.__all__
