"""Routing and cascades: per request, the cheapest candidate model or variant that will do.

See ``router.py`` for the routers, ``train.py`` for training a classifier router on your own
pair of models, ``metrics.py`` for RouteLLM's measures (PGR, APGR, CPT).
"""

from dynexec_compile.routing.candidates import (
    CONFIDENCES,
    Answers,
    ClassifierCandidate,
    ExitCandidates,
    GeneratorCandidate,
    confidence_from_logits,
    uncertainty_features,
)
from dynexec_compile.routing.embed import SentenceEmbedder
from dynexec_compile.routing.metrics import (
    Curve,
    curve,
    edit_similarity,
    exact_match,
    random_curve,
    token_accuracy,
)
from dynexec_compile.routing.router import (
    ROUTERS,
    Routed,
    Router,
    RouterCalibration,
    RouterClassifier,
)
from dynexec_compile.routing.train import (
    RouterLabels,
    fit_router_classifier,
    label_prompts,
    train_router,
)

__all__ = [
    "CONFIDENCES",
    "ROUTERS",
    "Answers",
    "ClassifierCandidate",
    "Curve",
    "ExitCandidates",
    "GeneratorCandidate",
    "Routed",
    "Router",
    "RouterCalibration",
    "RouterClassifier",
    "RouterLabels",
    "SentenceEmbedder",
    "confidence_from_logits",
    "curve",
    "edit_similarity",
    "exact_match",
    "fit_router_classifier",
    "label_prompts",
    "random_curve",
    "token_accuracy",
    "train_router",
    "uncertainty_features",
]
