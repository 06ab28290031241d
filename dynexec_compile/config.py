"""Settings for the dynexec backend: frozen dataclasses and the one function that parses
``torch.compile(..., options={...})`` into them.

Defaults live here and only here. Change a setting with ``dataclasses.replace``. Unknown
keys and bad values raise ``ValueError`` naming what is valid, so a typo never silently
turns a feature off.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

LOWERINGS = ("inductor", "eager", "tensorrt")
PARTITIONS = ("auto", "blocks", "none")
EXIT_RULES = ("entropy", "max_prob", "patience")
EXIT_HEADS = ("auto", "shared", "trained")
DECODING_CACHES = ("static", "dynamic")
DECODING_LOWERINGS = ("inductor", "eager")


@dataclass(frozen=True)
class EarlyExitConfig:
    """Early exit after transformer blocks.

    Args:
        rule: ``"entropy"`` (exit when the softmax entropy of the exit head's logits is below
            ``threshold``, DeeBERT), ``"max_prob"`` (exit when the top probability is at
            least ``threshold``, CALM's softmax response) or ``"patience"`` (exit when the
            prediction has stayed the same for ``patience`` consecutive exits, PABEE).
        threshold: entropy in nats (>= 0) for ``"entropy"``; a probability in (0, 1] for
            ``"max_prob"``; unused by ``"patience"``.
        patience: consecutive agreeing exits needed by ``"patience"`` (>= 1).
        layers: ``"all"`` (an exit after every block but the last) or block indices
            (0-based) after which an exit is placed.
        heads: ``"auto"`` (the default: the trained off-ramps when the model has them
            attached with ``attach_exit_heads``, else the shared head; resolved when the
            model is compiled, by ``exit_heads.resolve_heads``), ``"shared"`` (the model's own
            head applied to the intermediate hidden state) or ``"trained"`` (the attached
            off-ramps; an error without them).
    """

    rule: str = "entropy"
    threshold: float = 0.1
    patience: int = 2
    layers: str | tuple[int, ...] = "all"
    heads: str = "auto"


ELASTIC_LORA = ("auto", "required", "off")


@dataclass(frozen=True)
class ElasticConfig:
    """Elastic sub-models: prefix slices of importance-ordered heads and neurons.

    Args:
        levels: fractions of heads/neurons kept, each in (0, 1]; 1.0 is the full model.
        anchor_layers: number of layers kept whole at every level, or ``"auto"`` to choose
            them from layer importance.
        lora: per-level LoRAs attached with ``attach_level_loras``: ``"auto"`` (a level runs
            with its LoRA when one is attached), ``"required"`` (a level below 1.0 without one
            is an error when it is first called) or ``"off"`` (plain levels).
        slo_ms: latency target in milliseconds per call: a call that names no level runs at
            the largest level whose estimated latency for its input shapes meets it (each level
            is profiled on this machine the first time a shape needs it, and the estimates
            follow the load measured on the calls served since); ``None``: the largest level. Precedence per call: ``with elastic_level(r)``, ``with elastic_slo(ms)``,
            ``set_elastic_level``'s default, this target, the largest level.
        slo_quantile: which quantile of a level's profiled call times must meet ``slo_ms``.
        profile_repeats: timed calls per level and input shape when profiling.
        precompile: lower every level at compile time; by default a level is lowered the
            first time it runs (compile time and memory only for levels in use).
    """

    levels: tuple[float, ...] = (1.0, 0.75, 0.5)
    anchor_layers: int | str = 0
    lora: str = "auto"
    slo_ms: float | None = None
    slo_quantile: float = 0.9
    profile_repeats: int = 10
    precompile: bool = False


@dataclass(frozen=True)
class DecodingConfig:
    """How ``.generate`` decodes: ``options={"decoding": {...}}`` of :func:`dynexec_compile.compile`
    (or of ``torch.compile(backend="dynexec")`` read by :func:`dynexec_compile.wrap_generate`),
    and the ``decoding=`` argument of :func:`dynexec_compile.hf_generate`.

    Args:
        strategy: a strategy of :func:`dynexec_compile.generate` (``"greedy"``, ``"sample"``,
            ``"lookahead"``, ``"speculative"``, ``"self_speculative"``, ``"draft_heads"``), or
            ``None``: chosen per call from the Hugging Face arguments (``assistant_model`` ->
            speculative, ``prompt_lookup_num_tokens`` -> lookahead, ``assistant_early_exit`` ->
            self_speculative, else greedy or sample by ``do_sample``).
        compile: compile the decoding step (``False`` runs it eagerly: tests, debugging).
        mode: ``torch.compile`` mode of the step (e.g. ``"max-autotune"``).
        cache: ``"static"`` (dynexec's slot cache) or ``"dynamic"`` (greedy/sample only).
        options: the strategy's own options (lookahead's ``window``, ``ngram``, ...; speculative's
            ``num_draft``, ``tree``, ...), written flat beside the keys above in the options dict.
    """

    strategy: str | None = None
    compile: bool = True
    mode: str | None = None
    cache: str = "static"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DynexecConfig:
    """Top-level settings of one ``torch.compile(..., backend="dynexec")`` call.

    Args:
        lowering: compiler for every stage: ``"inductor"`` (Triton on GPU, C++ on CPU),
            ``"eager"`` (the FX graph run as Python, for tests and debugging) or
            ``"tensorrt"`` (torch-tensorrt; needs CUDA and ``dynexec_compile[tensorrt]``).
        strict: raise when analysis or a pass cannot apply, instead of warning and
            compiling the stock graph unchanged.
        partition: ``"auto"`` splits the graph into per-block stages only when a dynamic
            feature needs decision points between blocks; ``"blocks"`` always splits;
            ``"none"`` never does (features that need stages then raise).
        early_exit: early-exit settings, or ``None`` for no early exit.
        elastic: elastic sub-model settings, or ``None``.
        decoding: how ``.generate`` decodes (:class:`DecodingConfig`), or ``None``. It does not
            change the compiled forward; ``lowering`` picks the compiler of the decoding step.
        debug_dir: directory where every graph before and after every pass is written as
            text; defaults to the ``DYNEXEC_DEBUG_DIR`` environment variable.
    """

    lowering: str = "inductor"
    strict: bool = False
    partition: str = "auto"
    early_exit: EarlyExitConfig | None = None
    elastic: ElasticConfig | None = None
    decoding: DecodingConfig | None = None
    debug_dir: str | None = field(default_factory=lambda: os.environ.get("DYNEXEC_DEBUG_DIR"))

    @property
    def needs_stages(self) -> bool:
        """Whether the graph must be split at block boundaries."""
        if self.partition == "none":
            return False
        return self.partition == "blocks" or self.early_exit is not None


def _check_keys(section: str, given: dict[str, Any], cls: type) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"dynexec: unknown option{'s' if len(unknown) > 1 else ''} {unknown} in {section}; "
            f"valid keys are {valid}"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"dynexec: option {name}={value!r} is not valid; use one of {list(choices)}")


def _parse_early_exit(raw: Any) -> EarlyExitConfig | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"dynexec: option early_exit must be a dict, got {type(raw).__name__}")
    _check_keys("early_exit", raw, EarlyExitConfig)
    cfg = EarlyExitConfig(**raw)
    _check_choice("early_exit.rule", cfg.rule, EXIT_RULES)
    _check_choice("early_exit.heads", cfg.heads, EXIT_HEADS)
    thr = cfg.threshold
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or math.isnan(thr):
        raise ValueError(f"dynexec: early_exit.threshold must be a number, got {thr!r}")
    if cfg.rule == "entropy" and thr < 0:
        raise ValueError(
            f"dynexec: early_exit.threshold={thr} is out of range for rule 'entropy': "
            "an entropy threshold is in nats and must be >= 0"
        )
    if cfg.rule == "max_prob" and not 0.0 < thr <= 1.0:
        raise ValueError(
            f"dynexec: early_exit.threshold={thr} is out of range for rule 'max_prob': "
            "a probability threshold must be in (0, 1]"
        )
    if not isinstance(cfg.patience, int) or isinstance(cfg.patience, bool) or cfg.patience < 1:
        raise ValueError(f"dynexec: early_exit.patience must be an int >= 1, got {cfg.patience!r}")
    layers = cfg.layers
    if layers != "all":
        if isinstance(layers, int) or not all(isinstance(i, int) for i in layers):
            raise ValueError(
                f"dynexec: early_exit.layers must be 'all' or a list of block indices, got {layers!r}"
            )
        if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
            raise ValueError(
                f"dynexec: early_exit.layers={list(layers)} must be distinct non-negative block indices"
            )
        cfg = dataclasses.replace(cfg, layers=tuple(sorted(layers)))
    return dataclasses.replace(cfg, threshold=float(thr))


def _parse_elastic(raw: Any) -> ElasticConfig | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"dynexec: option elastic must be a dict, got {type(raw).__name__}")
    _check_keys("elastic", raw, ElasticConfig)
    cfg = ElasticConfig(**raw)
    levels = tuple(float(x) for x in cfg.levels)
    if not levels or any(not 0.0 < x <= 1.0 for x in levels):
        raise ValueError(f"dynexec: elastic.levels={list(cfg.levels)} must be fractions in (0, 1]")
    anchor = cfg.anchor_layers
    if anchor != "auto" and (not isinstance(anchor, int) or isinstance(anchor, bool) or anchor < 0):
        raise ValueError(f"dynexec: elastic.anchor_layers must be an int >= 0 or 'auto', got {anchor!r}")
    _check_choice("elastic.lora", cfg.lora, ELASTIC_LORA)
    slo = cfg.slo_ms
    if slo is not None and (isinstance(slo, bool) or not isinstance(slo, (int, float)) or not slo > 0):
        raise ValueError(f"dynexec: elastic.slo_ms must be a number of milliseconds > 0 or None, got {slo!r}")
    q = cfg.slo_quantile
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q <= 1.0:
        raise ValueError(f"dynexec: elastic.slo_quantile must be in (0, 1], got {q!r}")
    reps = cfg.profile_repeats
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"dynexec: elastic.profile_repeats must be an int >= 1, got {reps!r}")
    if not isinstance(cfg.precompile, bool):
        raise ValueError(f"dynexec: elastic.precompile must be True or False, got {cfg.precompile!r}")
    return dataclasses.replace(
        cfg, levels=tuple(sorted(set(levels), reverse=True)), slo_ms=None if slo is None else float(slo)
    )


def _parse_decoding(raw: Any) -> DecodingConfig | None:
    """Own keys of :class:`DecodingConfig` plus the strategy's options, written flat; every key
    must be one of them (the strategies' option names come from the strategies themselves)."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if isinstance(raw, DecodingConfig):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"dynexec: option decoding must be a dict, got {type(raw).__name__}")
    from dynexec_compile.hf import strategy_names, strategy_options

    own = [f.name for f in dataclasses.fields(DecodingConfig) if f.name != "options"]
    strategy = raw.get("strategy")
    strategies = strategy_names()
    if strategy is not None and strategy not in strategies:
        raise ValueError(f"dynexec: option decoding.strategy={strategy!r} is not valid; use one of {strategies} or None")
    allowed = strategy_options(strategy) if strategy is not None else sorted({o for s in strategies for o in strategy_options(s)})
    unknown = sorted(set(raw) - set(own) - set(allowed))
    if unknown:
        where = f"strategy {strategy!r}" if strategy is not None else "any strategy"
        raise ValueError(
            f"dynexec: unknown option{'s' if len(unknown) > 1 else ''} {unknown} in decoding; valid keys are "
            f"{own} and the options of {where}: {list(allowed)}"
        )
    cfg = DecodingConfig(**{k: raw[k] for k in own if k in raw}, options={k: v for k, v in raw.items() if k not in own})
    if not isinstance(cfg.compile, bool):
        raise ValueError(f"dynexec: option decoding.compile must be True or False, got {cfg.compile!r}")
    if cfg.mode is not None and not isinstance(cfg.mode, str):
        raise ValueError(f"dynexec: option decoding.mode must be a torch.compile mode string or None, got {cfg.mode!r}")
    _check_choice("decoding.cache", cfg.cache, DECODING_CACHES)
    return cfg


def parse_options(options: dict[str, Any] | DynexecConfig | None) -> DynexecConfig:
    """Parse ``torch.compile`` options into a :class:`DynexecConfig`.

    Raises:
        ValueError: an unknown key (the message lists the valid keys) or a bad value.
    """
    if isinstance(options, DynexecConfig):
        return options
    options = dict(options or {})
    _check_keys("options", options, DynexecConfig)
    early_exit = _parse_early_exit(options.pop("early_exit", None))
    elastic = _parse_elastic(options.pop("elastic", None))
    decoding = _parse_decoding(options.pop("decoding", None))
    cfg = DynexecConfig(early_exit=early_exit, elastic=elastic, decoding=decoding, **options)
    _check_choice("lowering", cfg.lowering, LOWERINGS)
    _check_choice("partition", cfg.partition, PARTITIONS)
    if not isinstance(cfg.strict, bool):
        raise ValueError(f"dynexec: option strict must be True or False, got {cfg.strict!r}")
    if cfg.partition == "none" and cfg.early_exit is not None:
        raise ValueError("dynexec: early_exit needs stages between blocks; it cannot run with partition='none'")
    if cfg.decoding is not None and cfg.lowering not in DECODING_LOWERINGS:
        raise ValueError(
            f"dynexec: decoding runs its step on lowering {list(DECODING_LOWERINGS)}; lowering={cfg.lowering!r} "
            "is for the staged forward only"
        )
    return cfg
