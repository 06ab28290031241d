"""``dynexec bench routing``: routers against random, measured RouteLLM's way.

Two tasks, each with cheap and strong candidates, every router trained and calibrated on data
the evaluation never sees:

(a) classification: the committed MiniLM-L6 SST-2 classifier (strong = the full model) and cheap
    variants of the same weights (``--routing-cheap``): ``elastic-L`` (its elastic level L,
    importance-reordered; an independent model), ``exit-B`` (the committed trained exit head
    after block B: a *nested* pair, ``ExitCandidates``: the cascade escalates by running on from
    block B+1 in the early-exit runtime, and a prompt pays only the deepest candidate it
    reached), ``exits-B1,B2,...`` (a nested chain over several exits: cascade only). Quality =
    accuracy against the gold label. Routers are trained on SST-2 *training* sentences the
    classifier was not fine-tuned on, calibrated on others, evaluated on the 872 validation
    sentences.
(b) generation: line completion on the held-out standard-library files (never trained on):
    each prompt is 128 tokens ending at a line break, the answer the next line (greedy tokens up
    to the first newline), cheap = the demo draft LM, strong = the demo target; quality = edit
    similarity of the line to the file's (CodeXGLUE's line-level "Edit Sim"; exact match is
    reported too). Files are split into router-train, calibration and evaluation files.
    The same task on the real pretrained model (``--routing-lms smollm2``): strong =
    SmolLM2-135M-Instruct, cheap = its elastic levels (``--routing-smollm2-cheap``, e.g.
    ``0.5+lora``: level 0.5 of the importance-reordered weights with its committed LoRA;
    ``dx.elastic_draft``, prefix views of the same weights, no copy).

Why line completion and not the token accuracy of 16 greedy tokens (the first version of this
suite): positional agreement with the file drops to zero after the first inserted or skipped
token, so per prompt it measured alignment luck more than quality (draft 0.05 vs target 0.07),
and no router, learned or not, could rank prompts by it (a learned deferral rule trained on the
router-training files reached APGR 0.44-0.46 on the calibration files by that metric; random 0.50).

Per task and setting, routers: cascades on max probability / entropy / mean token
log-probability, the learned cascade (generation: an MLP over the cheap answer's uncertainty
features, trained on the same self-induced labels), the MiniLM classifier routers, random.
Reported: the quality-vs-strong-share curve on the evaluation set (PGR, APGR, CPT(50%),
CPT(80%)), and the threshold ``Router.calibrate(quality=0.95)`` picks on the calibration set
applied to the evaluation set (realised quality, strong share, cost saved). Costs are
*measured*: median seconds per prompt of each candidate on one batch (interleaved rounds, same
process); the classifier router's own embedding cost is reported apart (RouteLLM leaves router
overhead out; here the router's encoder is no smaller than the models it routes). For nested
cascades the routed call itself is also timed against the strong model (wall-clock, runtime
overheads included). PNG: PGR against strong-call share, and quality against measured cost.

``--quick``: the same pipeline on a few hundred prompts with the committed models (no timing:
parameter-count costs), seconds to a minute.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dynexec_compile.bench.common import SuiteResult, interleaved_medians
from dynexec_compile.routing import (
    CONFIDENCES,
    Answers,
    ClassifierCandidate,
    ExitCandidates,
    GeneratorCandidate,
    Router,
    SentenceEmbedder,
    curve,
    edit_similarity,
    exact_match,
    fit_router_classifier,
    label_prompts,
    random_curve,
)

GOALS = {"classification": 0.5, "generation": 0.3}  # cost saved at 95% of the strong model's quality
CHEAP_CHOICES = ("elastic-0.25", "exit-0", "exit-1", "exits-0,1,2,3,4")
METRICS = {"edit_sim": edit_similarity, "exact_match": exact_match}
GENERATION_LMS = ("demo", "smollm2")  # the demo draft/target pair; SmolLM2's elastic levels vs the full model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("routing suite")
    g.add_argument("--routing-tasks", nargs="+", choices=("classification", "generation"), default=None,
                   help="tasks to run (default both)")
    g.add_argument("--routing-cheap", nargs="+", default=None,
                   help=f"cheap SST-2 variants: elastic-LEVEL, exit-BLOCK and/or exits-B1,B2,... (default {' '.join(CHEAP_CHOICES)})")
    g.add_argument("--routing-lowering", choices=("eager", "inductor"), default="eager",
                   help="lowering of every candidate (the strong model: torch.compile with it, or eager)")
    g.add_argument("--routing-data", default=None, help="folder holding sst2/ (default $DYNEXEC_DATA_DIR or ../shared/data)")
    g.add_argument("--routing-train-size", type=int, default=4000, help="SST-2 sentences to train the router on")
    g.add_argument("--routing-calib-size", type=int, default=1500, help="SST-2 sentences to calibrate the threshold on")
    g.add_argument("--routing-windows", type=int, default=100,
                   help="line-completion prompts per held-out file (twice as many in the router-training files)")
    g.add_argument("--routing-embedder-layers", type=int, nargs="+", default=[6, 2],
                   help="one classifier router per MiniLM depth (its embedding is paid on every prompt)")
    g.add_argument("--routing-lms", nargs="+", choices=GENERATION_LMS, default=None,
                   help="generation pairs: demo (draft LM -> target), smollm2 (SmolLM2 elastic levels -> full; loads SmolLM2); "
                        "default both (--quick: demo)")
    g.add_argument("--routing-smollm2-cheap", nargs="+", default=["0.5+lora"],
                   help="SmolLM2 cheap candidates: LEVEL or LEVEL+lora (its committed LoRA), default 0.5+lora")
    g.add_argument("--routing-smollm2-windows", type=int, default=30,
                   help="SmolLM2 line-completion prompts per held-out file (twice as many in the router-training files)")
    g.add_argument("--routing-prompt-tokens", type=int, default=128, help="tokens per code prompt")
    g.add_argument("--routing-new-tokens", type=int, default=32,
                   help="greedy tokens generated per prompt (the answer is cut at the first newline; lines longer are not asked)")
    g.add_argument("--routing-metric", choices=tuple(METRICS), default="edit_sim", help="line-completion quality")
    g.add_argument("--routing-quality", type=float, default=0.95, help="fraction of the strong model's quality to keep")


class Memo:
    """A candidate (or embedder) that answers each distinct prompt once: the benchmark asks the
    same prompts for labels, calibration, routing and curves."""

    def __init__(self, fn: Callable[[Sequence[Any]], Any], embedder: bool = False, cache: dict | None = None):
        self.fn, self.embedder, self.cache = fn, embedder, {} if cache is None else cache
        if getattr(fn, "chain", None) is not None:  # a nested chain's candidate stays one to the router
            self.chain, self.chain_index = fn.chain, fn.chain_index

    def __call__(self, prompts: Sequence[Any], progress: bool = False) -> Any:
        todo = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if todo:
            got = self.fn(todo, progress=progress) if self.embedder else self.fn(todo)
            for i, p in enumerate(todo):
                self.cache[p] = got[i] if self.embedder else (
                    got.outputs[i], {k: got.confidence[k][i] for k in CONFIDENCES}, None if got.features is None else got.features[i]
                )
        if self.embedder:
            return torch.stack([self.cache[p] for p in prompts]) if prompts else torch.zeros(0)
        rows = [self.cache[p] for p in prompts]
        features = torch.stack([r[2] for r in rows]) if rows and rows[0][2] is not None else None
        return Answers(
            [r[0] for r in rows],
            {k: torch.stack([r[1][k] for r in rows]) if rows else torch.zeros(0) for k in CONFIDENCES},
            features,
        )


def _say(what: str) -> None:
    print(f"[bench routing {time.strftime('%H:%M:%S')}] {what}", flush=True)


def _params(model: torch.nn.Module) -> int:
    """Parameters a forward multiplies with: all but the input word embeddings (a lookup),
    which count once more when the output head shares them (a tied LM head)."""
    total = sum(p.numel() for p in model.parameters())
    if not hasattr(model, "get_input_embeddings"):
        return total
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = out is not None and out.weight is emb
    return total - (0 if tied else emb.numel())


# ----------------------------------------------------------------------------- one task


def _evaluate(
    result: SuiteResult, task: str, setting: str, cheap: Callable, strong: Callable,
    embedders: dict[str, tuple[Callable, float]], train: tuple[list, list], calib: list[tuple],
    evaluation: list[tuple], metric: Callable, costs: list[float], quality: float, learned: bool = False,
    timing: list | None = None,
) -> dict[str, Any]:
    """Train, calibrate and evaluate every router on one (cheap, strong) pair (``Memo``-wrapped:
    each model answers each prompt once); ``embedders``: name -> (embedder, its cost per prompt),
    one classifier router each; ``learned``: also a learned cascade over the cheap answers'
    features; ``timing``: prompts on which a nested cascade's routed call is timed against the
    strong model. Appends rows + metrics; returns what the plot needs."""
    nested = getattr(cheap, "chain", None) is not None and getattr(cheap, "chain", None) is getattr(strong, "chain", None)
    confidences = ("max_prob", "entropy") if nested else CONFIDENCES  # a nested chain exits by the early-exit rules
    routers = {f"cascade ({c}{', resumes' if nested else ''})": Router([cheap, strong], costs, "cascade", confidence=c)
               for c in confidences}
    overheads = {}
    if embedders or learned:
        _say(f"{setting}: labelling {len(train[0])} training prompts by running both models")
        labels = label_prompts(cheap, strong, train[0], metric, train[1])
    if learned:
        _say(f"{setting}: training the learned cascade on the cheap answers' features")
        clf = fit_router_classifier(labels.cheap.features.float(), labels.needs_strong, hidden=16, epochs=200, progress=False)
        routers["cascade (learned)"] = Router([cheap, strong], costs, "cascade", confidence="learned", classifier=clf)
    for label, (embedder, overhead) in embedders.items():
        _say(f"{setting}: embedding them ({label}) and training the classifier router")
        clf = fit_router_classifier(embedder(train[0], progress=True), labels.needs_strong)
        routers[f"classifier ({label})"] = Router([cheap, strong], costs, "classifier", classifier=clf, embedder=embedder)
        overheads[f"classifier ({label})"] = overhead
    routers["random"] = Router([cheap, strong], costs, "random", seed=0)
    prompts = [p for p, _ in evaluation]
    refs = [r for _, r in evaluation]
    _say(f"{setting}: calibrating on {len(calib)} prompts, evaluating on {len(prompts)}")
    a_cheap, a_strong = cheap(prompts), strong(prompts)
    q_cheap = torch.tensor([metric(o, r) for o, r in zip(a_cheap.outputs, refs)], dtype=torch.float64)
    q_strong = torch.tensor([metric(o, r) for o, r in zip(a_strong.outputs, refs)], dtype=torch.float64)
    qc, qs = float(q_cheap.mean()), float(q_strong.mean())
    curves = {}
    key = f"{task}/{setting}"
    for name, router in routers.items():
        cal = router.calibrate(calib, quality=quality, metric=metric)
        routed = router(prompts)
        q_routed = sum(metric(o, r) for o, r in zip(routed.outputs, refs)) / len(refs)
        share = routed.strong_share(1)
        pays_cheap = router.router == "cascade" and router.chain is None  # an independent cascade runs both
        extra = overheads.get(name, 0.0)
        saved = 1 - routed.cost / len(prompts) / costs[1]
        if router.router == "random":
            c = random_curve(q_cheap, q_strong)
        elif router.router == "cascade":
            c = curve(router.need_from_answers(a_cheap), q_cheap, q_strong)
        else:
            c = curve(router.need_from_prompts(prompts), q_cheap, q_strong)
        curve_costs = c.cost(costs[0], costs[1], pays_cheap)
        best = c.cheapest_at(quality * qs, curve_costs)
        best_saved = 1 - float(curve_costs[best]) / costs[1] if best is not None else 0.0
        curves[name] = (c, curve_costs / costs[1], pays_cheap)
        row = {
            "task": task, "cheap": setting, "router": name, "APGR": round(c.apgr, 4),
            "CPT(50%)": round(c.cpt(0.5), 4), "CPT(80%)": round(c.cpt(0.8), 4),
            "calibrated rule": router.describe(), "eval strong share": round(share, 4),
            "eval quality / strong": round(q_routed / qs, 4), "eval cost saved": round(saved, 4),
            "eval cost saved incl. router": round(saved - extra / costs[1], 4),
            "best cost saved at target (eval curve)": round(best_saved, 4),
        }
        if router.chain is not None and timing:
            row["wall-clock saved (routed call vs strong)"] = round(_wallclock_saved(router, strong, timing), 4)
        result.rows.append(row)
        slug = name.split(" ")[0] + ("_" + router.confidence if router.router == "cascade" else "")
        if router.router == "classifier":
            slug += f"_{router.embedder.fn.layers}layers"
        result.metric(f"{key}/{slug}/apgr", c.apgr, "tolerance", "higher", tol=0.02)
        result.metric(f"{key}/{slug}/cpt50", c.cpt(0.5), "tolerance", "lower", tol=0.03)
        result.metric(f"{key}/{slug}/cpt80", c.cpt(0.8), "tolerance", "lower", tol=0.03)
        result.metric(f"{key}/{slug}/eval_cost_saved", saved, "tolerance", "higher", tol=0.03)
        result.metric(f"{key}/{slug}/eval_quality_ratio", q_routed / qs, "tolerance", "higher", tol=0.01)
        result.notes.append(f"{key} {name}: calibrated: {cal.description}")
    _goal_note(result, task, setting, quality, {k: v[0].apgr for k, v in curves.items()})
    result.metric(f"{key}/q_cheap", qc, "tolerance", "equal", tol=0.005)
    result.metric(f"{key}/q_strong", qs, "tolerance", "equal", tol=0.005)
    return {"curves": curves, "qc": qc, "qs": qs, "quality": quality, "title": f"{task}: {setting}"}


def _goal_note(result: SuiteResult, task: str, setting: str, quality: float, apgr: dict[str, float] | None) -> None:
    """The goal verdict of one setting: best cost saved at the target on the evaluation curve and
    with the calibrated threshold; whether every router trained on data (classifier routers, the
    learned cascade) and every router at all ranks above random."""
    mine = [r for r in result.rows if r["cheap"] == setting and r["task"] == task]
    learned = [r for r in mine if r["router"] != "random"]
    on_curve = max(learned, key=lambda r: r["best cost saved at target (eval curve)"])
    met = [r for r in learned if r["eval quality / strong"] >= quality - 1e-9]
    calibrated = max(met, key=lambda r: r["eval cost saved"]) if met else None
    goal = GOALS[task]
    above = ""
    if apgr is not None:
        rnd = apgr["random"]
        trained = [k for k in apgr if k.startswith("classifier") or k == "cascade (learned)"]
        above = (f"; every trained router (classifier, learned cascade) above random in APGR: "
                 f"{'yes' if all(apgr[k] > rnd for k in trained) else 'NO'}; every router above random: "
                 f"{'yes' if all(v > rnd for k, v in apgr.items() if k != 'random') else 'NO'}")
    result.notes.append(
        f"goal {'met' if on_curve['best cost saved at target (eval curve)'] >= goal else 'NOT met'} on {task}/{setting} "
        f"(>= {goal:.0%} of the cost saved at {quality:.0%} of the strong model's quality, model costs only): "
        f"best point on the evaluation curve {on_curve['best cost saved at target (eval curve)']:.0%} ({on_curve['router']}); "
        + (f"with the threshold calibrated on the calibration set, best router that kept the target on the evaluation set "
           f"{calibrated['eval cost saved']:.0%} ({calibrated['router']})" if calibrated else
           "no calibrated threshold kept the target on the evaluation set")
        + above
    )


def _wallclock_saved(router: Router, strong: Callable, prompts: list) -> float:
    """1 - wall-clock of the routed call / the strong model's on ``prompts`` (interleaved medians):
    a nested cascade's saving with the early-exit runtime's own overheads in it."""
    fn = getattr(strong, "fn", strong)  # time the model, not a Memo's cache
    times = interleaved_medians({"routed": lambda: router(prompts), "strong": lambda: fn(prompts)}, repeats=5, warmup=1)
    return 1 - times["routed"] / times["strong"]


def _evaluate_chain(
    result: SuiteResult, setting: str, chain: list, calib: list[tuple], evaluation: list[tuple],
    metric: Callable, costs: list[float], quality: float, timing: list | None,
) -> dict[str, Any]:
    """A cascade over a nested chain of more than two candidates: calibrated on ``calib``,
    applied to ``evaluation``; the evaluation curve is every threshold's (cost, quality)."""
    task = "classification"
    router = Router(chain, costs, "cascade", confidence="max_prob")
    name = "cascade (max_prob, resumes)"
    _say(f"{setting}: calibrating on {len(calib)} prompts, evaluating on {len(evaluation)}")
    cal = router.calibrate(calib, quality=quality, metric=metric)
    prompts, refs = [p for p, _ in evaluation], [r for _, r in evaluation]
    answers = [c(prompts) for c in chain]
    q = torch.tensor([[metric(a.outputs[i], r) for a in answers] for i, r in enumerate(refs)], dtype=torch.float64)  # [N, M]
    need = torch.stack([router.need_from_answers(a) for a in answers[:-1]], 1)  # [N, M - 1]
    _, mean_q, mean_cost, share = router.sweep(q, need)
    qs = float(q[:, -1].mean())
    ok = (mean_q >= quality * qs - 1e-9).nonzero().flatten()
    best_saved = 1 - float(mean_cost[ok].min()) / costs[-1] if len(ok) else 0.0
    routed = router(prompts)
    q_routed = sum(metric(o, r) for o, r in zip(routed.outputs, refs)) / len(refs)
    saved = 1 - routed.cost / len(prompts) / costs[-1]
    stops = torch.bincount(torch.tensor(routed.chosen), minlength=len(chain)).double() / len(prompts)
    row = {
        "task": task, "cheap": setting, "router": name, "APGR": None, "CPT(50%)": None, "CPT(80%)": None,
        "calibrated rule": router.describe(), "eval strong share": round(routed.strong_share(len(chain) - 1), 4),
        "eval quality / strong": round(q_routed / qs, 4), "eval cost saved": round(saved, 4),
        "eval cost saved incl. router": round(saved, 4), "best cost saved at target (eval curve)": round(best_saved, 4),
    }
    if timing:
        row["wall-clock saved (routed call vs strong)"] = round(_wallclock_saved(router, chain[-1], timing), 4)
    result.rows.append(row)
    key = f"{task}/{setting}"
    result.metric(f"{key}/cascade_max_prob/eval_cost_saved", saved, "tolerance", "higher", tol=0.03)
    result.metric(f"{key}/cascade_max_prob/eval_quality_ratio", q_routed / qs, "tolerance", "higher", tol=0.01)
    result.notes.append(f"{key} {name}: calibrated: {cal.description}; evaluation prompts answered per candidate: "
                        + ", ".join(f"{getattr(c, 'fn', c).name} {float(x):.0%}" for c, x in zip(chain, stops)))
    _goal_note(result, task, setting, quality, None)
    order = torch.argsort(mean_cost)
    return {"sweep": (mean_cost[order] / costs[-1], mean_q[order]), "qc": float(q[:, 0].mean()), "qs": qs,
            "quality": quality, "title": f"{task}: {setting}"}


def _embedders(args: argparse.Namespace, max_length: int) -> dict[str, SentenceEmbedder]:
    return {
        f"MiniLM, {n} layers": SentenceEmbedder(max_length=max_length, layers=n) for n in args.routing_embedder_layers
    }


def _measure(fns: dict[str, Callable[[], Any]], per: int, repeats: int) -> dict[str, float]:
    return {k: v / per for k, v in interleaved_medians(fns, repeats=repeats, warmup=2, progress="timing").items()}


# ----------------------------------------------------------------------------- (a) SST-2


def _sst2_splits(args: argparse.Namespace, quick: bool) -> tuple[list, list, list]:
    """(router-train, calibration, evaluation) ``(sentence, label)`` lists: training sentences
    the classifier was not fine-tuned on (examples/finetune_sst2.py drew 40,000 with seed 0),
    of at least 6 words (the validation set is whole sentences, the training set also phrases)."""
    from dynexec_compile.data import load_sst2

    train = load_sst2("train", args.routing_data)
    used = set(random.Random(0).sample(range(len(train)), 40000))
    seen = {train[i][0] for i in used}
    rest = [row for i, row in enumerate(train) if i not in used and row[0] not in seen and len(row[0].split()) >= 6]
    rest = list(dict.fromkeys(rest))
    random.Random(1).shuffle(rest)
    n_train, n_cal = (300, 200) if quick else (args.routing_train_size, args.routing_calib_size)
    if n_train + n_cal > len(rest):
        raise ValueError(f"only {len(rest)} unused SST-2 training sentences; ask for fewer (--routing-train-size/--routing-calib-size)")
    val = load_sst2("validation", args.routing_data)
    return rest[:n_train], rest[n_train : n_train + n_cal], val[:200] if quick else val


def _exit_params(stock: torch.nn.Module, heads: Any, block: int) -> int:
    """Parameters a forward up to the exit after ``block`` multiplies with."""
    layers = stock.config.num_hidden_layers
    per_layer = _params(stock.bert.encoder.layer[0])
    used = _params(stock) - (layers - block - 1) * per_layer - _params(stock.bert.pooler) - _params(stock.classifier)
    return used + _params(heads[str(block)])


def _sst2_setting(spec: str, stock: torch.nn.Module, tokenizer: Any, lowering: str, calib_rows: list) -> tuple[list, list[int]]:
    """The candidates of the SST-2 setting ``spec`` (without the strong model for ``elastic-L``:
    the shared one serves; with the chain's own full model for ``exit-B`` / ``exits-...``) and
    the parameters each uses."""
    from dynexec_compile.bench.elastic import _calibration, _compile, _sub_model_mb
    from dynexec_compile.demo_models import load_sst2_exit_heads
    from dynexec_compile.elastic import lookup_plan, reorder_by_importance
    from dynexec_compile.exit_heads import attach_exit_heads

    kind, _, value = spec.partition("-")
    model = copy.deepcopy(stock)
    if kind == "elastic":
        level = float(value)
        reorder_by_importance(model, _calibration(tokenizer, calib_rows, 32, 64), method="taylor", progress=False)
        compiled = _compile(model, [1.0, level], 0, lowering)
        cand = ClassifierCandidate(compiled, tokenizer, level=level, batch_size=16, pad_to_max_length=True, name=spec)
        return [cand], [_sub_model_mb_params(model, lookup_plan(model), level, _sub_model_mb)]
    if kind in ("exit", "exits"):
        try:
            blocks = [int(b) for b in value.split(",")]
        except ValueError:
            blocks = []
        if not blocks or (kind == "exit" and len(blocks) != 1):
            raise ValueError(f"--routing-cheap {spec!r}: expected exit-BLOCK (e.g. exit-0) or exits-B1,B2,... (e.g. exits-0,1,2,3,4)")
        heads = load_sst2_exit_heads()
        attach_exit_heads(model, heads)  # our own copy
        chain = ExitCandidates(model, tokenizer, blocks, heads="trained", lowering=lowering, batch_size=16, max_length=64)
        return chain.candidates, [_exit_params(stock, heads, b) for b in blocks] + [_params(stock)]
    raise ValueError(f"--routing-cheap {spec!r}: expected elastic-LEVEL (e.g. elastic-0.25), exit-BLOCK (e.g. exit-0) or exits-B1,B2,...")


def _sub_model_mb_params(model: torch.nn.Module, plan: Any, level: float, sub_mb: Callable) -> int:
    from dynexec_compile.elastic import level_param_slices

    every = int(sub_mb(model, level_param_slices(model, plan, level, 0)) * 2**20 / 4)  # fp32 parameters kept
    return every - model.get_input_embeddings().weight.numel()


def _run_classification(args: argparse.Namespace, result: SuiteResult, quick: bool) -> list[dict]:
    from dynexec_compile.demo_models import load_sst2_classifier

    train, calib, val = _sst2_splits(args, quick)
    stock, tokenizer = load_sst2_classifier()
    lowering = args.routing_lowering
    strong_model = stock if lowering == "eager" else torch.compile(stock, backend=lowering)
    strong = ClassifierCandidate(strong_model, tokenizer, batch_size=16, pad_to_max_length=True, name="full")
    embedders = _embedders(args, 64)
    strong_memo = Memo(strong)
    memos = {k: Memo(e, embedder=True) for k, e in embedders.items()}
    timing = [s for s, _ in val[:16]]
    wallclock = None if quick else [s for s, _ in val[:128]]
    metric = lambda o, r: float(o == r)  # noqa: E731
    plots = []
    for spec in args.routing_cheap or CHEAP_CHOICES:
        _say(f"classification: building the candidates of {spec} ({lowering})")
        cands, params = _sst2_setting(spec, stock, tokenizer, lowering, train[:256])
        if len(cands) == 1:  # an independent cheap model: the shared strong one
            cands = cands + [strong]
            params = params + [_params(stock)]
        memo = [Memo(c) for c in cands[:-1]] + [Memo(cands[-1], cache=strong_memo.cache)]  # the full model answers once
        names = [f"c{i}" for i in range(len(cands))]
        with torch.no_grad():
            if quick:
                costs = [float(p) for p in params]
                overhead = {k: float(_params(e.model)) for k, e in embedders.items()}
            else:
                fns = {n: (lambda c=c: c(timing)) for n, c in zip(names, cands)}
                fns.update({k: lambda e=e: e(timing) for k, e in embedders.items()})
                measured = _measure(fns, len(timing), args.repeats or 15)
                costs = [measured[n] for n in names]
                overhead = {k: measured[k] for k in embedders}
            ratio = ", ".join(f"{getattr(c, 'name', n)} {c_ / costs[-1]:.3f}" for n, c, c_ in zip(names, cands, costs))
            p_ratio = ", ".join(f"{p / params[-1]:.3f}" for p in params)
            result.notes.append(
                f"classification/{spec}: costs relative to the full model ({'parameters used' if quick else f'measured s, batch {len(timing)} x 64 tokens, {lowering}'}): "
                f"{ratio}; parameters used relative to the full model: {p_ratio} (full {params[-1] / 1e6:.2f}M); router embedders "
                + ", ".join(f"{k} {_params(e.model) / 1e6:.2f}M" for k, e in embedders.items())
            )
            if len(cands) > 2:
                plots.append(_evaluate_chain(result, spec, memo, calib, val, metric, costs, args.routing_quality, wallclock))
                continue
            nested = getattr(cands[0], "chain", None) is not None
            plots.append(_evaluate(
                result, "classification", spec, memo[0], memo[1],
                {k: (m, overhead[k]) for k, m in memos.items()},
                ([s for s, _ in train], [y for _, y in train]), calib, val, metric,
                costs, args.routing_quality, timing=wallclock if nested else None,
            ))
            if not quick:
                result.notes.append(f"classification/{spec} with parameter-count costs: " + _param_cost_note(plots[-1], params[0] / params[1]))
    return plots


# ----------------------------------------------------------------------------- (b) code


def _line_windows(tokenizer: Any, files: list[Path], per_file: int, prompt: int, max_line: int) -> tuple[list[tuple[str, str]], int]:
    """``(prompt text, next line)`` windows evenly spread over each file's code (from its first
    def/class): the prompt is ``prompt`` tokens ending with a token that holds a line break, the
    reference the text of the next line (non-blank, at most ``max_line`` tokens, up to the token
    that holds its own line break). Windows whose text does not re-tokenise to the same ids are
    dropped (the models must see the file's own tokens). Returns the windows and that count."""
    from dynexec_compile.models import _code_start

    out, dropped = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        start = _code_start(text)
        if start is None:
            continue
        ids = tokenizer(text[start:], add_special_tokens=False)["input_ids"]
        pieces = [tokenizer.decode([i]) for i in ids]
        breaks = [i for i, piece in enumerate(pieces) if "\n" in piece]
        lines = []  # (first token of the line, the token holding its break)
        for a, b in zip(breaks, breaks[1:]):
            if a + 1 >= prompt and 1 <= b - a - 1 <= max_line and tokenizer.decode(ids[a + 1 : b]).strip():
                lines.append((a + 1, b))
        count = min(per_file, len(lines))
        for k in range(count):
            first, end = lines[(len(lines) * k) // count]
            p_ids = ids[first - prompt : first]
            p_text = tokenizer.decode(p_ids)
            if tokenizer(p_text, add_special_tokens=False)["input_ids"] != p_ids:
                dropped += 1
                continue
            out.append((p_text, tokenizer.decode(ids[first:end]) + pieces[end].split("\n", 1)[0]))
    return out, dropped


def _generation_candidates(lm: str, args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """``(strong model, tokenizer, {setting: cheap model})`` of one generation pair family."""
    from dynexec_compile.models import load_demo_lm, load_elastic_lm

    if lm == "demo":
        strong, tokenizer = load_demo_lm("target")
        return strong, tokenizer, {"draft LM": load_demo_lm("draft")[0]}
    import dynexec_compile as dx

    specs = [smollm2_cheap_spec(spec) for spec in args.routing_smollm2_cheap]
    strong, tokenizer, loras = load_elastic_lm("smollm2-135m-instruct")
    cheap = {}
    for spec, (level, with_lora) in zip(args.routing_smollm2_cheap, specs):
        if with_lora and level not in loras:
            raise ValueError(f"no committed LoRA for SmolLM2 level {level}: committed levels {sorted(loras)} "
                             "(train one with benchmarks/bench_elastic_lm_lora.py --level LEVEL)")
        cheap[f"SmolLM2 level {spec}"] = dx.elastic_draft(strong, level, lora=loras[level] if with_lora else None)
    return strong, tokenizer, cheap


def smollm2_cheap_spec(spec: str) -> tuple[float, bool]:
    """``"0.5+lora"`` -> ``(0.5, True)``; ``"0.75"`` -> ``(0.75, False)``."""
    level_text, _, extra = spec.partition("+")
    try:
        level = float(level_text)
    except ValueError:
        level = -1.0
    if not 0.0 < level < 1.0 or extra not in ("", "lora"):
        raise ValueError(f"--routing-smollm2-cheap takes LEVEL or LEVEL+lora with 0 < LEVEL < 1 (e.g. 0.5+lora), got {spec!r}")
    return level, extra == "lora"


def _run_generation(args: argparse.Namespace, result: SuiteResult, quick: bool, lm: str) -> list[dict]:
    """Line completion on the held-out stdlib files for one family of (cheap, strong) pairs:
    ``demo`` (the demo draft LM vs the demo target) or ``smollm2`` (SmolLM2-135M-Instruct's
    elastic levels, importance-reordered prefix views of its weights, vs the full model)."""
    from dynexec_compile.models import heldout_files

    strong_model, tokenizer, cheap_models = _generation_candidates(lm, args)
    strong_name = "target" if lm == "demo" else "SmolLM2 full"
    files = heldout_files()
    split = {name: [f for i, f in enumerate(files) if i % 3 == k] for k, name in enumerate(("train", "calib", "eval"))}
    per_file = 6 if quick else (args.routing_windows if lm == "demo" else args.routing_smollm2_windows)
    new = args.routing_new_tokens
    windows, dropped = {}, 0
    for name, fs in split.items():  # the router trains on twice as many windows per file
        n = 2 * per_file if name == "train" else per_file
        windows[name], d = _line_windows(tokenizer, fs, n, args.routing_prompt_tokens, new - 2)
        dropped += d
    strong = GeneratorCandidate(strong_model, tokenizer, max_new_tokens=new, batch_size=16, name=strong_name, stop="\n")
    cheaps = {k: GeneratorCandidate(m, tokenizer, max_new_tokens=new, batch_size=16, name=k, stop="\n") for k, m in cheap_models.items()}
    embedders = _embedders(args, 128)
    timing = [p for p, _ in windows["eval"][:16]]
    params = {k: float(_params(m)) for k, m in cheap_models.items()}
    params["strong"] = float(_params(strong_model))
    params.update({k: float(_params(e.model)) for k, e in embedders.items()})
    metric = METRICS[args.routing_metric]
    plots = []
    with torch.no_grad():
        if quick:
            costs, kind = params, "parameters"
        else:
            fns = {"strong": lambda: strong(timing)}
            fns.update({k: lambda c=c: c(timing) for k, c in cheaps.items()})
            fns.update({k: lambda e=e: e(timing) for k, e in embedders.items()})
            costs = _measure(fns, len(timing), args.repeats or 7)
            kind = f"measured s, HF generate greedy, batch {len(timing)}, {args.routing_prompt_tokens}+{new} tokens, eager"
        result.notes.append(
            f"generation ({lm}): {len(split['train'])}/{len(split['calib'])}/{len(split['eval'])} held-out files for router training/"
            f"calibration/evaluation: {len(windows['train'])}/{len(windows['calib'])}/{len(windows['eval'])} line-completion prompts of "
            f"{args.routing_prompt_tokens} tokens ({dropped} windows dropped: their text re-tokenises differently); quality "
            f"{args.routing_metric}; costs ({kind}): "
            + ", ".join(f"{k} {costs[k] / costs['strong']:.3f}" for k in cheap_models) + f" of {strong_name}; "
            f"parameters {strong_name} {params['strong'] / 1e6:.2f}M, "
            + ", ".join(f"{k} {params[k] / 1e6:.2f}M (ratio {params[k] / params['strong']:.3f})" for k in cheap_models)
            + ", router embedders " + ", ".join(f"{k} {params[k] / 1e6:.2f}M" for k in embedders)
        )
        strong_memo = Memo(strong)
        embed_memos = {k: (Memo(e, embedder=True), costs[k]) for k, e in embedders.items()}
        train = ([p for p, _ in windows["train"]], [r for _, r in windows["train"]])
        prompts, refs = [p for p, _ in windows["eval"]], [r for _, r in windows["eval"]]
        memos = {}
        for setting, cheap in cheaps.items():
            memos[setting] = Memo(cheap)
            plots.append(_evaluate(
                result, "generation", setting, memos[setting], strong_memo, embed_memos, train, windows["calib"], windows["eval"],
                metric, [costs[setting], costs["strong"]], args.routing_quality, learned=True,
            ))
            if not quick:  # the same curves priced by parameter count
                ratio = params[setting] / params["strong"]
                result.notes.append(f"generation/{setting} with parameter-count costs (ratio {ratio:.3f}): " + _param_cost_note(plots[-1], ratio))
        for which, memo in ((strong_name, strong_memo), *memos.items()):
            outs = memo(prompts).outputs
            em = sum(exact_match(o, r) for o, r in zip(outs, refs)) / len(refs)
            es = sum(edit_similarity(o, r) for o, r in zip(outs, refs)) / len(refs)
            result.notes.append(f"generation ({lm}): {which} on the evaluation lines: edit similarity {es:.4f}, exact match {em:.4f}")
    return plots


def _param_cost_note(plot: dict, ratio: float) -> str:
    parts = []
    for name, (c, _, is_cascade) in plot["curves"].items():
        costs = c.cost(ratio, 1.0, is_cascade)
        best = c.cheapest_at(plot["quality"] * plot["qs"], costs)
        parts.append(f"{name} {1 - float(costs[best]) if best is not None else 0.0:.0%}")
    return "best cost saved at the target on the evaluation curve: " + ", ".join(parts)


# ----------------------------------------------------------------------------- plot + run


def plot(path: Path, plots: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plots), 2, figsize=(12, 4.2 * len(plots)), squeeze=False)
    for row, p in zip(axes, plots):
        if "sweep" in p:  # a chain of more than two candidates: no strong-share curve
            cost, quality = p["sweep"]
            row[0].axis("off")
            row[0].text(0.5, 0.5, f"{p['title']}:\ncascade over every exit (resumes);\nsee the quality-cost curve", ha="center", va="center")
            row[1].plot(cost.numpy(), quality.numpy(), ".", markersize=2, label="cascade (max_prob, resumes): every threshold")
        for name, (c, rel_cost, _) in p.get("curves", {}).items():
            style = "--" if name == "random" else "-"
            row[0].plot(c.share.numpy(), c.pgr.numpy(), style, label=f"{name} (APGR {c.apgr:.3f})", linewidth=1.2)
            row[1].plot(rel_cost.numpy(), c.quality.numpy(), style, label=name, linewidth=1.2)
        if "curves" in p:
            row[0].set_xlabel("share of calls to the strong model")
            row[0].set_ylabel("performance gap recovered")
            row[0].axhline(0.5, color="gray", linewidth=0.6, linestyle=":")
            row[0].axhline(0.8, color="gray", linewidth=0.6, linestyle=":")
            row[0].set_title(f"{p['title']}: PGR (RouteLLM)", fontsize=9)
            row[0].grid(alpha=0.3)
            row[0].legend(fontsize=7)
        row[1].axhline(p["qs"], color="black", linewidth=0.8)
        row[1].axhline(p["quality"] * p["qs"], color="gray", linewidth=0.8, linestyle="--")
        row[1].axhline(p["qc"], color="gray", linewidth=0.8)
        row[1].set_xlabel("mean model cost per prompt / strong model's (router overhead apart)")
        row[1].set_ylabel("quality")
        row[1].set_title(f"{p['title']}: quality vs cost (dashed: {p['quality']:.0%} of strong)", fontsize=9)
        row[1].grid(alpha=0.3)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> SuiteResult:
    result = SuiteResult("routing")
    if not 0 < args.routing_quality <= 1:
        raise ValueError(f"--routing-quality must be in (0, 1], got {args.routing_quality}")
    torch.manual_seed(0)
    tasks = args.routing_tasks or ("classification", "generation")
    lms = (args.routing_lms or (("demo",) if args.quick else GENERATION_LMS)) if "generation" in tasks else ()
    if "smollm2" in lms:  # bad input and a missing model file fail before any model runs
        from dynexec_compile.models import lm_folder

        for spec in args.routing_smollm2_cheap:
            smollm2_cheap_spec(spec)
        lm_folder("smollm2-135m-instruct")
    plots = []
    # every candidate and cascade threshold is a compile of one forward: room for all of them
    with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64)):
        if "classification" in tasks:
            plots += _run_classification(args, result, args.quick)
        if "generation" in tasks:
            for lm in lms:
                plots += _run_generation(args, result, args.quick, lm)
    path = Path(args.out or "runs/bench-routing.json").with_suffix(".png")
    plot(path, plots)
    result.notes.append(f"plot written to {path}")
    return result
