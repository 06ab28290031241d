"""``Router``: send each request to the cheapest candidate that will answer it well enough.

Dynamic execution one level above the model. Candidates are ordered cheap to strong (different
models, or variants of one model: elastic levels, early-exit settings); the router decides per
prompt:

- ``"cascade"``: run the cheapest candidate; escalate to the next while its confidence
  (``max_prob``, ``entropy`` or ``logprob``, see ``candidates.py``) is on the wrong side of
  the threshold. It pays the cheap model on every prompt and knows the answer's confidence.
  Over a *nested* chain (``ExitCandidates``: exits of one model, then the full model) an
  escalated prompt continues where the previous exit stopped, so it pays only the deepest
  candidate it reached. ``confidence="learned"``: the deferral rule is a small MLP over the
  cheap answer's uncertainty features (``Answers.features``), trained on self-induced labels
  (``train_router(..., router="cascade")``): whether low confidence means "escalate" or "the
  strong model will fail too" is learned, not assumed.
- ``"classifier"``: a small MLP over the prompt's sentence embedding (MiniLM, ``embed.py``)
  predicts the probability that the cheap answer will *not* be good enough; above the
  threshold the prompt goes to the strong candidate, else to the cheap one. Only one model
  runs per prompt (plus the embedding). Trained by :func:`dynexec_compile.routing.train_router`.
- ``"random"``: the baseline; each prompt goes to the strong candidate with probability
  ``threshold`` (the rate).

Every router is a need score per prompt and a threshold ("go strong when the score is above
it"); :meth:`Router.calibrate` picks the threshold that keeps a stated fraction of the strong
candidate's quality at the lowest cost on a calibration set, and says what it means in words.
Saved as safetensors (the classifier's weights) with its settings as JSON metadata; no pickle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynexec_compile.routing.candidates import CONFIDENCES, Answers, check_candidate, nested_chain
from dynexec_compile.weights_io import read_with_config, save_with_config

ROUTERS = ("cascade", "classifier", "random")
FORMAT_VERSION = 1
METADATA_KEY = "dynexec_router"
LEARNED = "learned"
_CONFIDENCE_WORDS = {"max_prob": "max probability", "entropy": "entropy", "logprob": "mean token log-probability"}


class RouterClassifier(nn.Module):
    """``P(the cheap answer will not be good enough | prompt embedding)``: standardise, MLP.

    x: [N, D] embeddings -> [N] probabilities.
    """

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std).squeeze(-1)  # [N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))  # [N]


@dataclass
class Routed:
    """A router's answers: ``outputs[i]`` from candidate ``chosen[i]``; ``cost`` the summed cost
    of every candidate run (a cascade pays each model it tried, a nested chain the deepest it
    reached; None without ``costs``)."""

    outputs: list[Any]
    chosen: list[int]
    cost: float | None

    def strong_share(self, strong: int) -> float:
        return sum(c == strong for c in self.chosen) / max(len(self.chosen), 1)


@dataclass
class RouterCalibration:
    """What :meth:`Router.calibrate` chose and measured on the calibration set."""

    threshold: float
    strong_share: float  # share of prompts answered by the strongest candidate
    quality: float  # mean quality of the routed answers
    target: float  # the quality asked for: quality * q_strong
    q_candidates: list[float]  # mean quality of each candidate alone
    cost_saved: float | None  # 1 - routed cost / cost of always calling the strongest
    description: str

    def __str__(self) -> str:
        return self.description


def _check_costs(costs: Sequence[float] | None, n: int) -> list[float] | None:
    if costs is None:
        return None
    costs = [float(c) for c in costs]
    if len(costs) != n:
        raise ValueError(f"costs has {len(costs)} entries for {n} candidates; give one cost per candidate")
    if any(not math.isfinite(c) or c <= 0 for c in costs):
        raise ValueError(f"costs must be positive finite numbers, got {costs}")
    if any(b <= a for a, b in zip(costs, costs[1:])):
        raise ValueError(
            f"costs must increase strictly from the cheapest candidate to the strongest, got {costs}: "
            "order candidates cheap to strong"
        )
    return costs


def _to_json_float(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


class Router:
    """Route prompts between ``candidates`` (cheapest first, strongest last).

    Args:
        candidates: callables ``prompts -> Answers`` (``ClassifierCandidate``, ``GeneratorCandidate``
            or your own), ordered cheap to strong; at least two.
        costs: cost of one call of each candidate (any unit: seconds, FLOPs, dollars), strictly
            increasing; None: unknown (calibration then minimises the strong-call share).
        router: one of :data:`ROUTERS`.
        confidence: the cascade's confidence, one of ``CONFIDENCES``, or ``"learned"`` (a
            trained deferral rule over the cheap answer's features; two candidates).
        threshold: the need score above which a prompt goes to the stronger candidate; None
            until :meth:`calibrate` sets it. Cascade: in the confidence's own unit (escalate
            when ``max_prob``/``logprob`` is below it, ``entropy`` above it; ``learned``: a
            probability); classifier: a probability; random: the rate.
        classifier, embedder: the classifier router's trained model and prompt embedder
            (:func:`train_router` builds both); a learned cascade's classifier reads
            ``Answers.features`` and has no embedder.
        seed: the random router's generator seed.
    """

    def __init__(
        self,
        candidates: Sequence[Callable[[Sequence[Any]], Answers]],
        costs: Sequence[float] | None = None,
        router: str = "cascade",
        *,
        confidence: str = "max_prob",
        threshold: float | None = None,
        classifier: RouterClassifier | None = None,
        embedder: Any = None,
        seed: int = 0,
    ):
        if router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; valid routers: {', '.join(ROUTERS)}")
        if confidence not in CONFIDENCES + (LEARNED,):
            raise ValueError(f"unknown confidence {confidence!r}; valid: {', '.join(CONFIDENCES + (LEARNED,))}")
        candidates = list(candidates)
        if len(candidates) < 2:
            raise ValueError(f"a router needs at least two candidates (cheap ... strong), got {len(candidates)}")
        for i, c in enumerate(candidates):
            check_candidate(c, i)
        if router != "cascade" and len(candidates) != 2:
            raise NotImplementedError(
                f"router={router!r} chooses between two candidates; got {len(candidates)}. "
                "Use router='cascade' for a chain of more"
            )
        if router == "classifier" and (classifier is None or embedder is None):
            raise ValueError(
                "router='classifier' needs a trained classifier and its embedder: build one with "
                "dynexec_compile.routing.train_router(cheap, strong, prompts, metric), or Router.load a saved one"
            )
        if router == "cascade" and confidence == LEARNED and (classifier is None or len(candidates) != 2):
            raise ValueError(
                "a learned cascade (confidence='learned') needs its trained deferral classifier and exactly two candidates: "
                "build one with train_router(cheap, strong, prompts, metric, router='cascade'), or Router.load a saved one"
            )
        if router == "random" and threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the random router's threshold is its rate, a probability in [0, 1]; got {threshold}")
        self.chain = nested_chain(candidates) if router == "cascade" else None
        if self.chain is not None and confidence in ("logprob", LEARNED):
            raise ValueError(
                "a cascade over a nested chain (ExitCandidates) exits by the early-exit rules: confidence='max_prob' "
                "or 'entropy' (for a classifier, logprob ranks answers exactly like max_prob)"
            )
        self.candidates = candidates
        self.costs = _check_costs(costs, len(candidates))
        self.router, self.confidence, self.threshold = router, confidence, threshold
        self.classifier, self.embedder, self.seed = classifier, embedder, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.calibration: RouterCalibration | None = None

    @property
    def strong(self) -> int:
        return len(self.candidates) - 1

    # ------------------------------------------------------------------ need scores

    @torch.no_grad()
    def need_from_answers(self, answers: Answers) -> torch.Tensor:
        """Cascade need score ``[N]`` (higher = escalate): -confidence, the entropy, or the
        learned P(cheap answer not good enough)."""
        if self.confidence == LEARNED:
            if answers.features is None:
                raise ValueError("a learned cascade reads Answers.features; this candidate's answers have none")
            self.classifier.eval()
            return self.classifier(answers.features.float()).double()
        c = answers.confidence[self.confidence].double()
        return c if self.confidence == "entropy" else -c

    @torch.no_grad()
    def need_from_prompts(self, prompts: Sequence[Any]) -> torch.Tensor:
        """Classifier need score ``[N]``: P(cheap not good enough); random: uniform draws."""
        if self.router == "classifier":
            self.classifier.eval()
            return self.classifier(self.embedder(prompts)).double()
        if self.router == "random":
            return torch.rand(len(prompts), generator=self.generator, dtype=torch.float64)
        raise ValueError("the cascade's need score comes from the cheap candidate's answers (need_from_answers)")

    def _need_threshold(self) -> float:
        if self.threshold is None:
            raise ValueError(
                f"this {self.router} router has no threshold yet: call router.calibrate(data, quality=0.95) "
                "or pass threshold= to Router"
            )
        if self.router == "cascade":
            return self.threshold if self.confidence in ("entropy", LEARNED) else -self.threshold
        if self.router == "random":
            return 1.0 - self.threshold  # u ~ U(0, 1): u > 1 - rate with probability rate
        return self.threshold

    # ------------------------------------------------------------------ routing

    def __call__(self, prompts: Sequence[Any]) -> Routed:
        """Answer ``prompts``, each by the candidate the router picks."""
        prompts = list(prompts)
        t = self._need_threshold()
        n = len(prompts)
        outputs: list[Any] = [None] * n
        chosen = [0] * n
        cost = 0.0
        if self.chain is not None:
            answers, chosen = self.chain.cascade(prompts, [c.chain_index for c in self.candidates], self.confidence, self.threshold)
            cost = sum(self.costs[k] for k in chosen) if self.costs else 0.0
            return Routed(answers.outputs, chosen, cost if self.costs else None)
        if self.router == "cascade":
            pending = list(range(n))
            for m, candidate in enumerate(self.candidates):
                if not pending:
                    break
                answers = candidate([prompts[i] for i in pending])
                cost += len(pending) * (self.costs[m] if self.costs else 0.0)
                go_on = self.need_from_answers(answers) > t if m < self.strong else torch.zeros(len(pending), dtype=torch.bool)
                still = []
                for j, i in enumerate(pending):
                    outputs[i], chosen[i] = answers.outputs[j], m
                    if go_on[j]:
                        still.append(i)
                pending = still
        else:
            strong = (self.need_from_prompts(prompts) > t).tolist()
            for m in (0, self.strong):
                idx = [i for i in range(n) if bool(strong[i]) == (m == self.strong)]
                if not idx:
                    continue
                answers = self.candidates[m]([prompts[i] for i in idx])
                cost += len(idx) * (self.costs[m] if self.costs else 0.0)
                for j, i in enumerate(idx):
                    outputs[i], chosen[i] = answers.outputs[j], m
        return Routed(outputs, chosen, cost if self.costs else None)

    # ------------------------------------------------------------------ calibration

    def describe(self, threshold: float | None = None) -> str:
        """The routing rule in words."""
        t = self.threshold if threshold is None else threshold
        if t is None:
            return f"{self.router} router, not calibrated"
        if self.router == "random":
            return f"send each call to the strong model with probability {t:.3g}"
        if self.router == "classifier":
            return f"call the strong model when the router's P(cheap answer not good enough) > {t:.3g}"
        if self.confidence == LEARNED:
            return f"escalate when the learned deferral rule's P(cheap answer not good enough) > {t:.3g}"
        word = _CONFIDENCE_WORDS[self.confidence]
        cmp = ">" if self.confidence == "entropy" else "<"
        if not math.isfinite(t):
            never = (t == math.inf) == (self.confidence == "entropy")
            return "never escalate" if never else "always escalate"
        return f"escalate when the cheap model's {word} {cmp} {t:.3g}"

    def calibrate(
        self,
        data: Sequence[tuple[Any, Any]],
        quality: float = 0.95,
        metric: Callable[[Any, Any], float] | None = None,
        verbose: bool = False,
    ) -> RouterCalibration:
        """Pick the threshold that keeps ``quality`` x the strong candidate's mean quality on
        ``data`` at the lowest cost (the lowest strong-call share without ``costs``).

        Args:
            data: ``(prompt, reference)`` pairs; every candidate answers every prompt once.
            quality: the fraction of the strongest candidate's quality to keep, in (0, 1].
            metric: ``metric(output, reference) -> float``, higher is better; default: 1.0 when
                the output equals the reference, else 0.0.
            verbose: print the description.

        Returns:
            The :class:`RouterCalibration`, whose ``description`` says what the threshold means,
            e.g. "escalate when the cheap model's max probability < 0.83: 31% of calls go to the
            strong model on the calibration set ...". Sets ``self.threshold``.
        """
        if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not 0.0 < quality <= 1.0:
            raise ValueError(f"quality is a fraction of the strong model's quality in (0, 1], got {quality!r}")
        data = list(data)
        if not data:
            raise ValueError("calibrate needs at least one (prompt, reference) pair")
        metric = metric or (lambda output, reference: float(output == reference))
        prompts = [p for p, _ in data]
        answers = [candidate(prompts) for candidate in self.candidates]
        q = torch.tensor(
            [[float(metric(a.outputs[i], ref)) for a in answers] for i, (_, ref) in enumerate(data)], dtype=torch.float64
        )  # [N, M]
        if self.router == "cascade":
            need = torch.stack([self.need_from_answers(a) for a in answers[:-1]], dim=1)  # [N, M - 1]
        elif self.router == "classifier":
            need = self.need_from_prompts(prompts).unsqueeze(1)  # [N, 1]
        else:
            need = None
        return self._choose_threshold(q, need, quality, verbose)

    def sweep(
        self, q: torch.Tensor, need: torch.Tensor | None, quality: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every distinct threshold on recorded qualities ``q: [N, M]`` (each candidate on each
        prompt) and need scores ``need: [N, M - 1]`` (None for random, whose expected quality is
        linear in its rate: the one rate that reaches ``quality`` x the strongest's quality).

        Returns ``(thresholds, mean quality, mean cost, strong share)``, each ``[T]``; thresholds
        are need-score thresholds (go stronger when ``need > t``; -inf: always), costs in the
        units of ``costs`` (without them: the strong-call share).
        """
        n, m = q.shape
        q_mean = q.mean(0)  # [M]
        unit = torch.tensor(self.costs if self.costs else [0.0] * (m - 1) + [1.0], dtype=torch.float64)  # [M]
        if need is None:
            target = quality * float(q_mean[-1])
            gap = float(q_mean[-1] - q_mean[0])  # > 0 whenever the cheap one misses the target
            rate = 0.0 if float(q_mean[0]) >= target else min((target - float(q_mean[0])) / gap, 1.0)
            mean_q = ((1 - rate) * q_mean[0] + rate * q_mean[-1]).reshape(1)
            mean_cost = ((1 - rate) * unit[0] + rate * unit[-1]).reshape(1)
            rates = torch.tensor([rate], dtype=torch.float64)
            return rates, mean_q, mean_cost, rates.clone()
        # candidate thresholds: every distinct score (go strong when need > t) and -inf (always)
        values = torch.unique(need.flatten())
        thresholds = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), values])  # [T]
        escalate = need.unsqueeze(0) > thresholds.view(-1, 1, 1)  # [T, N, M - 1]
        stop = torch.cat([~escalate, torch.ones(len(thresholds), n, 1, dtype=torch.bool)], dim=2)  # [T, N, M]
        pick = stop.double().argmax(dim=2)  # [T, N] first candidate not escalated from
        mean_q = q.gather(1, pick.T).T.mean(1)  # [T]
        # a cascade pays every model it ran; over a nested chain only the deepest (the others are its prefix)
        per_call = unit.cumsum(0) if self.router == "cascade" and self.chain is None else unit
        mean_cost = per_call[pick].mean(1)  # [T]
        share = (pick == m - 1).double().mean(1)  # [T]
        return thresholds, mean_q, mean_cost, share

    def _choose_threshold(
        self, q: torch.Tensor, need: torch.Tensor | None, quality: float, verbose: bool
    ) -> RouterCalibration:
        """The cheapest threshold of :meth:`sweep` that keeps ``quality`` x the strongest's quality."""
        n, _ = q.shape
        q_mean = q.mean(0)  # [M]
        target = quality * float(q_mean[-1])
        thresholds, mean_q, mean_cost, share = self.sweep(q, need, quality)
        strongest = float(self.costs[-1]) if self.costs else 1.0
        ok = (mean_q >= target - 1e-12).nonzero().flatten()
        best = ok[torch.argmin(mean_cost[ok] - 1e-9 * mean_q[ok])]  # cheapest; ties: the better one
        need_t = float(thresholds[best])
        if self.router == "random":
            threshold = need_t
        elif self.router == "cascade":
            threshold = need_t if self.confidence in ("entropy", LEARNED) else -need_t
        else:
            threshold = need_t
        cost_saved = 1.0 - float(mean_cost[best]) / strongest if self.costs else None
        words = self.describe(threshold)
        base = "expected" if self.router == "random" else "on the calibration set"
        desc = (
            f"{words}: {float(share[best]):.0%} of calls go to the strong model {base} "
            f"({n} prompts; quality {float(mean_q[best]):.4g} vs strong {float(q_mean[-1]):.4g}, "
            f"cheap {float(q_mean[0]):.4g}; target {quality:.0%} of strong = {target:.4g}"
            + (f"; cost saved {cost_saved:.0%} against always calling the strong model)" if cost_saved is not None else ")")
        )
        self.threshold = threshold
        self.calibration = RouterCalibration(
            threshold, float(share[best]), float(mean_q[best]), target, q_mean.tolist(), cost_saved, desc
        )
        if verbose:
            print(desc)
        return self.calibration

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> None:
        """Write the router (settings, threshold, calibration, classifier weights) as safetensors
        + JSON metadata. Candidates are not saved: pass them again to :meth:`load`."""
        config = {
            "format_version": FORMAT_VERSION,
            "router": self.router,
            "confidence": self.confidence,
            "threshold": None if self.threshold is None else _to_json_float(self.threshold),
            "costs": self.costs,
            "num_candidates": len(self.candidates),
            "seed": self.seed,
            "classifier": None if self.classifier is None else {"dim": self.classifier.dim, "hidden": self.classifier.hidden},
            "embedder": None if self.embedder is None else _embedder_config(self.embedder),
            "calibration": None if self.calibration is None else self.calibration.description,
        }
        save_with_config(self.classifier if self.classifier is not None else nn.Module(), path, METADATA_KEY, config)

    @classmethod
    def load(
        cls, path: str | os.PathLike, candidates: Sequence[Callable[[Sequence[Any]], Answers]], embedder: Any = None
    ) -> Router:
        """A router saved by :meth:`save`, routing between ``candidates`` (the same kinds, same
        order). ``embedder``: the classifier router's prompt embedder; None rebuilds the saved
        default (MiniLM) — pass yours again if you trained with another."""
        config, tensors = read_with_config(path, METADATA_KEY, "router", FORMAT_VERSION)
        if len(candidates) != config["num_candidates"]:
            raise ValueError(f"{path} routes between {config['num_candidates']} candidates; got {len(candidates)}")
        classifier = None
        if config["classifier"] is not None:
            classifier = RouterClassifier(config["classifier"]["dim"], config["classifier"]["hidden"])
            classifier.load_state_dict(tensors, strict=True)
            classifier.eval()
            if embedder is None and config["router"] == "classifier":
                embedder = _embedder_from_config(config["embedder"])
        threshold = config["threshold"]
        router = cls(
            candidates, config["costs"], config["router"], confidence=config["confidence"],
            threshold=None if threshold is None else float(threshold), classifier=classifier,
            embedder=embedder, seed=config["seed"],
        )
        return router


def _embedder_config(embedder: Any) -> dict[str, Any]:
    return embedder.config() if hasattr(embedder, "config") else {"name": type(embedder).__name__}


def _embedder_from_config(config: dict[str, Any] | None) -> Any:
    from dynexec_compile.routing.embed import DEFAULT_EMBEDDER, SentenceEmbedder

    if not config or config.get("name") != DEFAULT_EMBEDDER:
        name = (config or {}).get("name")
        raise ValueError(
            f"this router was trained on embeddings from {name!r}; pass that embedder again: Router.load(path, candidates, embedder=...)"
        )
    return SentenceEmbedder(max_length=config["max_length"], layers=config.get("layers"))
