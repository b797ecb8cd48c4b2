"""swudi: data-free multi-task model merging with SWUDI / SWUDI-A and their baselines.

The maths library (this package, no Prefect):

- :func:`merge_matrix` merges one 2-D weight from its stacked task vectors ``[N, out, in]``;
- :func:`decompose` + :func:`merge_decomposition`: decompose once, filter many;
- :func:`select_rank`: the SWUDI-A rank rules;
- :func:`route_tensor`, :func:`merge_state_dicts`: whole-model routing and merge;
- :func:`spectral_method` / :func:`iterative_method` / :func:`elementwise_method`: add a method
  (see :mod:`swudi.methods`).
"""

from swudi.core.decomposition import Decomposition, decompose
from swudi.core.device import resolve_device
from swudi.core.rank import RANK_RULES, select_rank
from swudi.core.routing import DEFAULT_EXCLUDE, Route, route_tensor
from swudi.core.spectral import apply_filter, exponential_filter, landweber_filter, pinv_filter, truncation_filter
from swudi.core.state_dict import merge_state_dicts
from swudi.core.task_vectors import check_task_vectors, stack_task_vectors
from swudi.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    InputError,
    PublishError,
    SwudiError,
)
from swudi.methods import (
    METHODS,
    MethodParams,
    MethodSpec,
    elementwise_method,
    get_method,
    iterative_method,
    merge_decomposition,
    merge_elementwise,
    merge_matrix,
    register_method,
    registered_method,
    spectral_filter,
    spectral_method,
    unregister_method,
    validate_params,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_EXCLUDE",
    "METHODS",
    "RANK_RULES",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "Decomposition",
    "InputError",
    "MethodParams",
    "MethodSpec",
    "PublishError",
    "Route",
    "SwudiError",
    "apply_filter",
    "check_task_vectors",
    "decompose",
    "elementwise_method",
    "exponential_filter",
    "get_method",
    "iterative_method",
    "landweber_filter",
    "merge_decomposition",
    "merge_elementwise",
    "merge_matrix",
    "merge_state_dicts",
    "pinv_filter",
    "register_method",
    "registered_method",
    "resolve_device",
    "route_tensor",
    "select_rank",
    "spectral_filter",
    "spectral_method",
    "stack_task_vectors",
    "truncation_filter",
    "unregister_method",
    "validate_params",
    "__version__",
]
