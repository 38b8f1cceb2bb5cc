"""Route recommendation: the report's scores weighted by the user's priorities, adjusted by rules kept as data."""

from automl_ad.recommend.engine import Recommendation, RouteCandidate, load_rules, recommend

__all__ = ["Recommendation", "RouteCandidate", "load_rules", "recommend"]
