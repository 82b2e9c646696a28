"""A judgment: each constraint's verdict over the generated tokens."""

from __future__ import annotations

from dataclasses import dataclass

from models.decode import TokenTrace
from models.heads import HeadsConfig


@dataclass
class Verdict:
    constraint: str
    score: float  # score at the last judged token
    min_score: float
    min_position: int  # sequence position of the lowest-scoring judged token
    threshold: float
    passed: bool  # score >= threshold


@dataclass
class Judgment:
    verdicts: list[Verdict]
    flagged: bool  # True when any verdict failed


def assemble_judgment(output_trace: list[TokenTrace], prompt_trace: list[TokenTrace], config: HeadsConfig) -> Judgment:
    """Judge the generated tokens; with no generated token, judge the prompt's last token."""
    judged = output_trace or prompt_trace[-1:]
    if not judged:
        raise ValueError("cannot judge an empty sequence: no prompt or output tokens")
    verdicts = []
    for constraint in config.constraints:
        lowest = min(judged, key=lambda trace: trace.scores[constraint])
        score, threshold = judged[-1].scores[constraint], config.threshold(constraint)
        verdicts.append(Verdict(constraint, score, lowest.scores[constraint], lowest.position, threshold,
                                score >= threshold))
    return Judgment(verdicts, flagged=any(not verdict.passed for verdict in verdicts))
