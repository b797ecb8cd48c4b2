"""How storage calls are retried: one policy, translated into s3fs / botocore settings.

S3 requests go through two retry layers that already exist; swudi configures them instead of
adding a third:

- **botocore** (inside every s3fs call) retries a request that fails before its response body is
  handed over: connection refused or reset, connect and read timeouts, HTTP 500/502/503/504, and
  throttling (``SlowDown``, ``503``). swudi selects botocore's ``standard`` mode (exponential
  backoff with full jitter, ``rand() * 2**attempt`` seconds capped at 20 s) with
  ``total_max_attempts = attempts`` and passes ``connect_timeout`` / ``read_timeout``.
- **s3fs** wraps each call (request *and* reading its body) and repeats it on errors botocore
  cannot see: a body cut short (``IncompleteRead``, ``ClientPayloadError``) or a stall while the
  body streams. Its own default is 5 repeats, each of which would run botocore's attempts again
  (25 attempts per call); swudi sets it to :data:`BODY_RETRIES` (2), so a call makes at most
  ``2 * attempts`` requests.

The worst case of one storage call is therefore bounded (:meth:`RetryPolicy.deadline_s`):
``2 * attempts * (connect_timeout_s + read_timeout_s)`` plus the backoff sleeps. After that the
error reaches swudi, which reports it in one line (:mod:`swudi.storage.faults`).

The policy travels with the storage options, under the key :data:`RETRY_KEY`, so that every
filesystem built from a merge config (Prefect tasks, Dask workers) uses it; :func:`s3_layer_options`
turns it into s3fs keyword arguments and never hands the key itself to fsspec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["RETRY_KEY", "BODY_RETRIES", "RetryPolicy", "s3_layer_options", "pop_policy", "bound_body_retries"]

#: Storage-options key that carries a :class:`RetryPolicy` as a mapping (not a secret).
RETRY_KEY = "swudi_retry"
#: s3fs-level repeats of a whole call (request + body); botocore's attempts run inside each.
BODY_RETRIES = 2
#: botocore standard mode's cap on one backoff sleep, seconds.
_MAX_BACKOFF_S = 20.0


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts and timeouts of one storage request (defaults suit a busy S3 or MinIO)."""

    attempts: int = 5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RetryPolicy:
        return cls(**dict(data or {}))

    def as_mapping(self) -> dict[str, Any]:
        return asdict(self)

    def s3fs_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``s3fs.S3FileSystem`` that apply this policy."""
        return {
            "config_kwargs": {
                "connect_timeout": self.connect_timeout_s,
                "read_timeout": self.read_timeout_s,
                "retries": {"total_max_attempts": self.attempts, "mode": "standard"},
            },
        }

    def deadline_s(self) -> float:
        """Upper bound of the seconds one storage call spends before its error is raised."""
        requests = BODY_RETRIES * self.attempts
        sleeps = BODY_RETRIES * sum(min(2.0**k, _MAX_BACKOFF_S) for k in range(self.attempts - 1))
        body_sleeps = sum(min(1.7**k * 0.1, 15.0) for k in range(BODY_RETRIES))  # s3fs's own backoff
        return requests * (self.connect_timeout_s + self.read_timeout_s) + sleeps + body_sleeps

    def describe(self) -> str:
        return (
            f"{self.attempts} attempts x {BODY_RETRIES}, connect timeout {self.connect_timeout_s:g} s, "
            f"read timeout {self.read_timeout_s:g} s"
        )


def bound_body_retries(fs: Any) -> Any:
    """Set s3fs's own repeats of a call to :data:`BODY_RETRIES` on ``fs`` (and a wrapped ``fs.fs``).

    s3fs takes this number as a class attribute, not a constructor argument; every filesystem swudi
    builds gets it set on the instance (cached instances included, the value is always the same).
    """
    for layer in (fs, getattr(fs, "fs", None)):
        if layer is not None and type(layer).__module__.startswith("s3fs"):
            layer.retries = BODY_RETRIES
    return fs


def pop_policy(options: dict[str, Any]) -> RetryPolicy:
    """Remove :data:`RETRY_KEY` from ``options`` (in place) and return its policy (default if absent)."""
    raw = options.pop(RETRY_KEY, None)
    return raw if isinstance(raw, RetryPolicy) else RetryPolicy.from_mapping(raw)


def s3_layer_options(defaults: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """s3fs keyword arguments: ``defaults``, then the retry policy, then the user's own options.

    A user's ``config_kwargs`` entries win over the policy key by key (``config_kwargs.retries`` as a
    whole).
    """
    user = dict(options)
    policy = pop_policy(user)
    policy_kwargs = policy.s3fs_kwargs()
    config_kwargs = {**policy_kwargs["config_kwargs"], **dict(user.pop("config_kwargs", None) or {})}
    return {**defaults, **policy_kwargs, **user, "config_kwargs": config_kwargs}
