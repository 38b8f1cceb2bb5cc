"""The survey report's facts as validated data: routes, scores, methods, scenarios, leaderboard.

    from automl_ad.knowledge import load_knowledge
    kb = load_knowledge()
    kb.routes["memory_bank"].scores["accuracy"].value   # 9.0
"""

from .loader import load_knowledge
from .records import (
    APPLICABILITY,
    BRANCHES,
    COMPLEXITY_LEVELS,
    COMPUTE_CLASSES,
    ROUTE_KEYS,
    SAMPLE_LEVELS,
    SCORE_DIMENSIONS,
    SPEED_CLASSES,
    SUB_BRANCHES,
    Document,
    Evidence,
    KnowledgeBase,
    KnowledgeError,
    Method,
    Precondition,
    Requirements,
    Route,
    SampleGuidance,
    Scenario,
    Score,
    ScoreDimension,
)

__all__ = [
    "APPLICABILITY",
    "BRANCHES",
    "COMPLEXITY_LEVELS",
    "COMPUTE_CLASSES",
    "ROUTE_KEYS",
    "SAMPLE_LEVELS",
    "SCORE_DIMENSIONS",
    "SPEED_CLASSES",
    "SUB_BRANCHES",
    "Document",
    "Evidence",
    "KnowledgeBase",
    "KnowledgeError",
    "Method",
    "Precondition",
    "Requirements",
    "Route",
    "SampleGuidance",
    "Scenario",
    "Score",
    "ScoreDimension",
    "load_knowledge",
]
