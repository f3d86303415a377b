"""Triton kernels (installed as vllm_bastion.kernels).

Every kernel sits beside a pure-torch reference of the same function. The
package imports without Triton or a GPU (HAS_TRITON is then False and only
the references run); on a CPU-only machine the Triton kernels run under
Triton's interpreter when TRITON_INTERPRET=1 is set before these modules are
first imported.

`vllm_bastion.kernels.tree_attention` stays the *submodule* (so that
`import vllm_bastion.kernels.tree_attention as m` works); its kernel entry
point is re-exported here as `tree_attention_triton`, or import it as
`from vllm_bastion.kernels.tree_attention import tree_attention`.
"""

from .kv_compaction import (
    KVPointerTable,
    compact_kv,
    compact_kv_reference,
    make_kv_pointer_table,
)
from .tree_attention import (
    HAS_TRITON,
    ancestor_mask,
    pack_ancestor_bits,
    suggest_num_splits,
    tree_attention_reference,
    tree_attention_workspace,
    unpack_ancestor_bits,
)
from .tree_attention import tree_attention as tree_attention_triton

__all__ = [
    "HAS_TRITON",
    "KVPointerTable",
    "ancestor_mask",
    "compact_kv",
    "compact_kv_reference",
    "make_kv_pointer_table",
    "pack_ancestor_bits",
    "suggest_num_splits",
    "tree_attention_reference",
    "tree_attention_triton",
    "tree_attention_workspace",
    "unpack_ancestor_bits",
]
