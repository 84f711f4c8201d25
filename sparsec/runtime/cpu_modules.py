"""The CPU kernel layers by the plan's backend name, for the passes that choose and build them."""
from sparsec.runtime.bitmask_linear import BitmaskLinear
from sparsec.runtime.condensed_linear import CondensedLinear
from sparsec.runtime.csr_linear import CsrLinear

CPU_KERNEL_MODULES = {cls.kernel_backend: cls for cls in (CondensedLinear, BitmaskLinear, CsrLinear)}
