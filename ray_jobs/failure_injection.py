"""TESTING HOOK: make chosen shards fail, or stop a run early, to exercise retries and resume.

Never set these in a real run. Two ways to switch it on (the environment wins over the config):

* ``ray.testing.fail_shards: [1, 3]`` / ``SUBJECT_FFHQ_FAIL_SHARDS=1,3`` — the write task of
  those shards fails halfway through writing the tar, on every attempt. ``fail_mode`` (or a
  ``:mode`` suffix per shard, ``1:kill,3:raise``) says how: ``raise`` throws
  :class:`InjectedFailure` (an application error: the job retries the shard itself), ``kill``
  ends the worker process with ``os._exit`` (a crash: Ray retries the task first, and a temp
  file is left behind as a real crash would).
* ``ray.testing.stop_after_shards: N`` / ``SUBJECT_FFHQ_STOP_AFTER_SHARDS=N`` — the driver stops
  as if interrupted once N shards have finished in this run, abandoning the shards in flight.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FAIL_SHARDS_ENV = "SUBJECT_FFHQ_FAIL_SHARDS"
STOP_AFTER_ENV = "SUBJECT_FFHQ_STOP_AFTER_SHARDS"
MODES = ("raise", "kill")
KILL_EXIT_CODE = 87


class InjectedFailure(RuntimeError):
    """Raised by a shard's write task because the testing hook asked for it."""


@dataclass(frozen=True)
class FailureInjection:
    fail_shards: dict[int, str] = field(default_factory=dict)  # shard index -> mode
    stop_after_shards: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.fail_shards) or self.stop_after_shards is not None

    def mode_for(self, shard: int) -> str | None:
        return self.fail_shards.get(shard)

    def describe(self) -> str:
        parts = []
        if self.fail_shards:
            parts.append("failing shards " + ", ".join(f"{k}:{m}" for k, m in sorted(self.fail_shards.items())))
        if self.stop_after_shards is not None:
            parts.append(f"stopping after {self.stop_after_shards} shard(s)")
        return "; ".join(parts)

    @classmethod
    def from_config(cls, testing: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> FailureInjection:
        testing = dict(testing or {})
        environ = os.environ if environ is None else environ
        default_mode = str(testing.get("fail_mode") or "raise")
        if default_mode not in MODES:
            raise ValueError(f"ray.testing.fail_mode must be one of {MODES}, got {default_mode!r}")
        spec: Any = environ.get(FAIL_SHARDS_ENV) or testing.get("fail_shards") or []
        fail = parse_fail_shards(spec, default_mode)
        stop: Any = environ.get(STOP_AFTER_ENV) or testing.get("stop_after_shards")
        if stop is not None and stop != "":
            try:
                stop = int(stop)
            except (TypeError, ValueError):
                raise ValueError(f"stop_after_shards must be an integer, got {stop!r}") from None
            if stop < 0:
                raise ValueError(f"stop_after_shards must be >= 0, got {stop}")
        else:
            stop = None
        return cls(fail_shards=fail, stop_after_shards=stop)


def parse_fail_shards(spec: Any, default_mode: str = "raise") -> dict[int, str]:
    """``"1,3:kill"`` or ``[1, "3:kill"]`` -> ``{1: "raise", 3: "kill"}``."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    out: dict[int, str] = {}
    for part in parts:
        if not part:
            continue
        index, _, mode = part.partition(":")
        mode = mode or default_mode
        if not index.isdigit() or mode not in MODES:
            raise ValueError(f"bad fail-shard spec {part!r}: expected SHARD[:MODE], SHARD an index, MODE one of {MODES}")
        out[int(index)] = mode
    return out


def trigger(mode: str, shard_name: str) -> None:
    """Fail now, the way ``mode`` says."""
    if mode == "kill":
        os._exit(KILL_EXIT_CODE)
    raise InjectedFailure(f"{shard_name}: injected failure (testing hook {FAIL_SHARDS_ENV})")
