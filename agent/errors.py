"""The error tree of actfleet's core.

::

    ActfleetError
     +-- SpecError            a task spec is invalid (caller's fault; carries every problem)
     +-- SetupError           the task's setup_code raised inside the sandbox (caller's fault)
     +-- GradingError         an answer could not be graded (an unusable pattern, too large)
     +-- InfrastructureError  our fault or a dependency's; the task may be retried
          +-- LLMError        the model server failed after the adapter's own retries
          |    +-- LLMRejected  the server refused the request (4xx): retrying will not help
          +-- SandboxError    a sandbox could not be started or its runner broke the protocol
               +-- SandboxRefused  the task asks for what the server does not allow

A model's mistakes (bad code, wrong answer, running out of turns) are never exceptions: they
are observations and failed statuses.
"""

from __future__ import annotations


class ActfleetError(Exception):
    """Base of every error actfleet raises on purpose."""


class SpecError(ActfleetError):
    """A task spec is invalid. ``problems`` lists every problem as ``"field: what to fix"``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class SetupError(ActfleetError):
    """The task's ``setup_code`` (or its files) failed inside the sandbox."""


class GradingError(ActfleetError):
    """An answer could not be graded: the grader refused its input or gave up on it."""


class InfrastructureError(ActfleetError):
    """A fault outside the agent's control; the task may be retried with backoff."""

    retryable = True


class LLMError(InfrastructureError):
    """The model server could not answer (after the adapter's own retries)."""


class LLMRejected(LLMError):
    """The model server refused the request (bad model name, context too long, ...)."""

    retryable = False


class SandboxError(InfrastructureError):
    """A sandbox could not be started, or its runner broke the protocol."""


class SandboxRefused(SandboxError):
    """The task asks for an image or network access this server does not allow."""

    retryable = False
