"""The method registry (:mod:`swudi.methods.registry`) and every built-in method as one declaration
(:mod:`swudi.methods.declarations`), with the merge entry points generic over the registry."""

from swudi.methods.declarations import (
    METHODS,
    MethodKind,
    MethodParams,
    MethodSpec,
    elementwise_method,
    get_method,
    iterative_method,
    merge_decomposition,
    merge_elementwise,
    merge_matrix,
    method_choices,
    methods_markdown,
    register_method,
    registered_method,
    spectral_filter,
    spectral_method,
    unregister_method,
    validate_params,
)

__all__ = [
    "MethodKind",
    "MethodParams",
    "MethodSpec",
    "METHODS",
    "elementwise_method",
    "get_method",
    "iterative_method",
    "merge_decomposition",
    "merge_elementwise",
    "merge_matrix",
    "method_choices",
    "methods_markdown",
    "register_method",
    "registered_method",
    "spectral_filter",
    "spectral_method",
    "unregister_method",
    "validate_params",
]
