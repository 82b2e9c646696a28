"""Constraint policies: per constraint, a minimum score and what happens when a token falls below it.

- ``flag``: generate normally and mark the judgment flagged.
- ``stop``: end the generation at the first token scoring below the minimum
  (finish reason ``constraint``).
- ``withhold``: generate and record everything, but return the judgment
  without the text (finish reason ``constraint``).

Only generated tokens are checked; the prompt's scores never trigger a rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.decode import TokenTrace


class PolicyRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_score: float = Field(ge=0.0, le=1.0, description="A generated token scoring below this triggers the action.")
    action: Literal["flag", "stop", "withhold"] = Field(description="flag, stop or withhold; see the README.")


Policy = dict[str, PolicyRule]


class UnknownConstraintError(ValueError):
    """A policy names a constraint that the loaded heads do not score."""

    def __init__(self, names: list[str], known: list[str], source: str):
        self.names, self.source = names, source
        super().__init__(f"{source} names {', '.join(repr(n) for n in names)}, which the loaded heads do not score; "
                         f"use one of {', '.join(known)}")


def check_policy(policy: Policy, constraints: list[str], source: str) -> Policy:
    unknown = [name for name in policy if name not in constraints]
    if unknown:
        raise UnknownConstraintError(unknown, constraints, source)
    return policy


def effective_policy(requested: Policy | None, default: Policy) -> Policy:
    """Merge the server default with the request's rules, which win for the constraints they name."""
    return default | (requested or {})


def stop_scores(policy: Policy) -> dict[str, float]:
    """Return the minimum scores that end a generation, for the decode loop."""
    return {name: rule.min_score for name, rule in policy.items() if rule.action == "stop"}


@dataclass
class PolicyOutcome:
    rules: Policy
    triggered: list[dict]  # per triggered rule: constraint, action, position, score, min_score
    withheld: bool  # the text is kept from the client

    def as_dict(self) -> dict:
        return {"rules": {name: rule.model_dump() for name, rule in self.rules.items()},
                "triggered": self.triggered, "withheld": self.withheld}


def apply_policy(policy: Policy, output_trace: list[TokenTrace]) -> PolicyOutcome:
    """Find, for each rule, the first generated token that fell below its minimum.

    For a stop rule that token is the last one generated: the decode loop ended there.
    """
    triggered = []
    for name, rule in policy.items():
        first = next((token for token in output_trace if token.scores[name] < rule.min_score), None)
        if first is not None:
            triggered.append({"constraint": name, "action": rule.action, "position": first.position,
                              "score": first.scores[name], "min_score": rule.min_score})
    withheld = any(item["action"] == "withhold" for item in triggered)
    return PolicyOutcome(policy, triggered, withheld)
