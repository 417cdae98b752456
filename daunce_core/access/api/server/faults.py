"""Fault injection for tests and drills: rate limits, server errors, delays, dropped connections.

The settings (`FaultSettings`) come from the command line and can be replaced at run time
through ``PUT /admin/faults``; `Faults` holds them with the state they need (a seeded random
stream, the requests of the last second, how many of the next jobs must still fail).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, fields

from daunce_core.errors import DaunceError


@dataclass(frozen=True)
class FaultSettings:
    """What goes wrong on purpose (all off by default).

    Attributes:
        rate_limit: at most this many ``/v1`` requests per second; the excess is answered 429
            with a ``Retry-After`` header. 0: no limit.
        error_rate: fraction of ``/v1`` requests answered 500 or 503 (seeded by ``fault_seed``).
        delay: seconds slept before answering each ``/v1`` request.
        fail_jobs: fraction of new fine-tuning jobs that fail while running (``server_error``).
        fail_first_jobs: the next N fine-tuning jobs created after this is set fail while
            running (deterministic, for tests).
        drop_rate: fraction of ``/v1`` requests whose connection is closed without an answer.
        step_delay: seconds slept after each training step (keeps a job running for a while).
        lose_job_replies: the next N fine-tuning jobs are created, then answered 500 as if a
            gateway lost the answer (a client that simply retries creates a second job).
        fault_seed: seed of the random draws behind ``error_rate``, ``fail_jobs`` and
            ``drop_rate``.
    """

    rate_limit: float = 0.0
    error_rate: float = 0.0
    delay: float = 0.0
    fail_jobs: float = 0.0
    fail_first_jobs: int = 0
    drop_rate: float = 0.0
    step_delay: float = 0.0
    lose_job_replies: int = 0
    fault_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("error_rate", "fail_jobs", "drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DaunceError(f"fault {name} is a fraction in [0, 1]; got {value!r}.")
        for name in ("rate_limit", "delay", "fail_first_jobs", "step_delay", "lose_job_replies"):
            if getattr(self, name) < 0:
                raise DaunceError(f"fault {name} must be >= 0; got {getattr(self, name)!r}.")

    @classmethod
    def parse(cls, values: dict, base: FaultSettings | None = None) -> FaultSettings:
        """Settings from a JSON object (names as the attributes), over ``base``'s values.

        Raises:
            DaunceError: an unknown name or a value of the wrong type.
        """
        kinds = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise DaunceError(f"unknown fault(s) {unknown}; the faults are {sorted(kinds)}.")
        merged = asdict(base or cls())
        for name, value in values.items():
            integral = kinds[name] == "int"
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DaunceError(f"fault {name} takes a number; got {value!r}.")
            if integral and value != int(value):
                raise DaunceError(f"fault {name} takes an integer; got {value!r}.")
            merged[name] = int(value) if integral else float(value)
        return cls(**merged)


@dataclass(frozen=True)
class Verdict:
    """What to do with one request: answer it (``status`` None), an error status, or drop it."""

    status: int | None = None
    retry_after: float = 0.0
    drop: bool = False
    delay: float = 0.0


class Faults:
    """The current fault settings and the state behind them (thread-safe)."""

    def __init__(self, settings: FaultSettings) -> None:
        self._lock = threading.Lock()
        self._recent: deque[float] = deque()
        self.replace(settings)

    def replace(self, settings: FaultSettings) -> None:
        """Use ``settings`` from now on (restarts the seeded draws and the failing-jobs count)."""
        with self._lock:
            self.settings = settings
            self._random = random.Random(settings.fault_seed)
            self._jobs_random = random.Random(settings.fault_seed + 1)
            self._jobs_to_fail = settings.fail_first_jobs
            self._replies_to_lose = settings.lose_job_replies

    def update(self, values: dict) -> None:
        """Change the settings named in ``values`` (a ``PUT /admin/faults`` body).

        The seeded draws restart only when ``fault_seed`` is given, and the count of jobs to
        fail only when ``fail_first_jobs`` is given; other settings leave both as they are.

        Raises:
            DaunceError: an unknown name or a bad value.
        """
        settings = FaultSettings.parse(values, base=self.settings)
        with self._lock:
            self.settings = settings
            if "fault_seed" in values:
                self._random = random.Random(settings.fault_seed)
                self._jobs_random = random.Random(settings.fault_seed + 1)
            if "fail_first_jobs" in values:
                self._jobs_to_fail = settings.fail_first_jobs
            if "lose_job_replies" in values:
                self._replies_to_lose = settings.lose_job_replies

    def lose_reply(self) -> bool:
        """Whether the answer to a job just created is to be lost (``lose_job_replies``)."""
        with self._lock:
            if self._replies_to_lose > 0:
                self._replies_to_lose -= 1
                return True
            return False

    def request(self) -> Verdict:
        """The verdict on one ``/v1`` request (counts it against the rate limit if admitted)."""
        with self._lock:
            s = self.settings
            if s.rate_limit > 0:
                now = time.monotonic()
                while self._recent and now - self._recent[0] >= 1.0:
                    self._recent.popleft()
                if len(self._recent) >= s.rate_limit:
                    wait = 1.0 - (now - self._recent[0])
                    return Verdict(status=429, retry_after=max(wait, 0.001))
                self._recent.append(now)
            if s.drop_rate > 0 and self._random.random() < s.drop_rate:
                return Verdict(drop=True, delay=s.delay)
            if s.error_rate > 0 and self._random.random() < s.error_rate:
                return Verdict(status=self._random.choice((500, 503)), delay=s.delay)
            return Verdict(delay=s.delay)

    def job_fails(self) -> bool:
        """Whether a job created now is to fail while running (fail_first_jobs, fail_jobs)."""
        with self._lock:
            if self._jobs_to_fail > 0:
                self._jobs_to_fail -= 1
                return True
            rate = self.settings.fail_jobs
            return rate > 0 and self._jobs_random.random() < rate

    def as_dict(self) -> dict:
        """The settings as JSON, with how many of the first jobs must still fail."""
        with self._lock:
            return {**asdict(self.settings), "jobs_left_to_fail": self._jobs_to_fail}


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) and ``retry-after-ms`` headers."""
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(int(seconds * 1000)),
    }
