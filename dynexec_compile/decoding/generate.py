"""``dynexec_compile.generate``: decoding strategies on the compiled static-cache step.

The arguments every strategy shares are checked once into :class:`DecodeSettings`; a
strategy is a function ``(model, input_ids, attention_mask, settings, **options) ->
GenerateOutput`` registered under its name (:func:`register_strategy`). It builds its
engine and a :class:`Proposer` (what to guess each step) and hands both to
:func:`decode_loop`, the one loop every strategy shares: the prefill, the steps until every
row stopped, the output, the streamer and the statistics. A step's forward, verification
and cache commit are shared too (:func:`~dynexec_compile.decoding.verify.verify_step`; a
draft-and-verify proposer only says what to guess:
:class:`~dynexec_compile.decoding.verify.DraftProposer`), so a new strategy is one proposer
file and one registry line. Output follows ``model.generate``: prompt (as
given, padding included) followed by the new tokens, rows that stopped early filled with
``pad_token_id``.

Engines (cache + compiled graphs) are kept in a small LRU (:func:`strategy_engine`); a later
call reuses an engine whose cache is long enough, so prompts in the same length bucket and
shorter generations run on the graphs already compiled.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache, PreTrainedModel

from dynexec_compile.decoding.runs import TokenRuns
from dynexec_compile.decoding.sampling import SamplingParams, draw, sampling_probs
from dynexec_compile.decoding.step import (
    Backend,
    DecodeEngine,
    check_causal_lm,
    pack_prompts,
    prefill_bucket,
)

CACHES = ("static", "dynamic")
PENDING_STRATEGIES: dict[str, str] = {}
CACHE_LEN_MULTIPLE = 128
MAX_ENGINES = 8
_ENGINES: OrderedDict[tuple, DecodeEngine] = OrderedDict()  # see strategy_engine


@dataclass
class GenerateStats:
    """What a generation did.

    Attributes:
        strategy: the strategy's name.
        forward_passes: model forwards, prefill included.
        steps: decoding steps after the prefill.
        new_tokens: generated tokens per row (EOS included, padding not).
        accepted_per_step: per step, the tokens each row kept (a plain step keeps 1 per live row).
        compiles: graphs compiled by Dynamo during the call (0 once warm).
        prefill_time_s: seconds in the prefill (compilation included on a cold call).
        decode_time_s: seconds in the decoding steps.
        extra: strategy-specific figures (drafted tokens, acceptance, ...).
    """

    strategy: str
    forward_passes: int = 0
    steps: int = 0
    new_tokens: list[int] = field(default_factory=list)
    accepted_per_step: list[list[int]] = field(default_factory=list)
    compiles: int = 0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens kept per row per decoding step, over rows still generating."""
        kept = [n for step in self.accepted_per_step for n in step if n > 0]
        return sum(kept) / len(kept) if kept else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens per model forward, averaged over rows."""
        if not self.forward_passes or not self.new_tokens:
            return 0.0
        return sum(self.new_tokens) / len(self.new_tokens) / self.forward_passes

    @property
    def tokens_per_second(self) -> float:
        """All rows' generated tokens over prefill + decode time."""
        seconds = self.prefill_time_s + self.decode_time_s
        return sum(self.new_tokens) / seconds if seconds > 0 else 0.0


@dataclass
class GenerateOutput:
    """``sequences``: ``[B, L + n]`` prompt + generated tokens; ``stats``: :class:`GenerateStats`."""

    sequences: torch.Tensor
    stats: GenerateStats


@dataclass(frozen=True)
class DecodeSettings:
    """The checked arguments every strategy shares (see :func:`generate`).

    ``eos_token_ids`` is a tuple (possibly empty); ``sampling`` is ``None`` for greedy.
    """

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    sampling: SamplingParams | None
    generator: torch.Generator | None
    cache: str
    compile: bool
    backend: Backend
    mode: str | None
    options: dict[str, Any] | None
    cuda_graphs: bool | None
    regional: bool | None = None
    packed: bool | None = None
    streamer: Any = None


Strategy = Callable[..., GenerateOutput]
_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, fn: Strategy) -> None:
    """Make ``generate(..., strategy=name, **options)`` call ``fn(model, input_ids,
    attention_mask, settings, **options)``."""
    _STRATEGIES[name] = fn


def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    strategy: str = "greedy",
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    cache: str = "static",
    compile: bool = True,
    backend: Backend = "inductor",
    mode: str | None = None,
    compile_options: dict[str, Any] | None = None,
    cuda_graphs: bool | None = None,
    regional: bool | None = None,
    packed: bool | None = None,
    streamer: Any = None,
    **strategy_options: Any,
) -> GenerateOutput:
    """Decode ``max_new_tokens`` tokens per row with a compiled, static-cache step.

    Args:
        model: a transformers causal LM in eval mode (not modified).
        input_ids: ``[B, L]`` prompts; pad on the left as for ``model.generate``.
        attention_mask: ``[B, L]``, 0 on padding; ``None`` when there is none.
        strategy: ``"greedy"`` (argmax, token-identical to ``model.generate(do_sample=False)``
            in fp32), ``"sample"``, ``"lookahead"`` (greedy or sampling; options ``window``, ``ngram``,
            ``guesses``, ``prompt_lookup``, see :mod:`dynexec_compile.decoding.lookahead`) or
            ``"speculative"`` (``draft_model=``, ``num_draft=`` or ``tree=``; see
            :mod:`dynexec_compile.decoding.speculative`), ``"draft_heads"`` (``heads=``, optional
            ``tree=``), ``"self_speculative"`` (``exit_layer=``, ``num_draft=`` or ``tree=``),
            ``"eagle"`` (``draft=``, ``num_draft=``, ``alternatives=``, ``lookup=``, ``copy_lookup=``; see
            :mod:`dynexec_compile.decoding.eagle`), ``"calm"`` (lossy token-level early exit; see
            :mod:`dynexec_compile.decoding.calm`).
        max_new_tokens: tokens to generate per row (>= 1).
        eos_token_id: stop a row at this token (or any of a list); ``None`` takes the model's
            ``generation_config.eos_token_id``.
        pad_token_id: fills rows that stopped; ``None`` takes the generation config's, else the
            first EOS id (as transformers does).
        do_sample: sample instead of argmax; implied by ``strategy="sample"``.
        temperature, top_k, top_p: the sampling distribution (see :class:`SamplingParams`).
        generator: random generator for the draws (same generator state, same draws).
        cache: ``"static"`` (dynexec's :class:`SlotCache`, fixed shapes) or ``"dynamic"``
            (transformers' ``DynamicCache``, growing shapes; compiled with dynamic shapes).
        compile: compile the forward with ``torch.compile(fullgraph=True)``.
        backend, mode, compile_options: passed to ``torch.compile``.
        cuda_graphs: capture the step as a CUDA graph (``None``: on when the model is on CUDA
            and the cache is static).
        regional: compile one decoder layer and reuse it for all layers instead of each step
            as one graph (``None``: on for CPU models of 128 MiB of weights or more; see
            :class:`DecodeEngine`).
        packed: run the compiled graphs' linear layers on weights pre-packed once for oneDNN,
            or on AVX2-only CPUs a step's few rows on ``dynexec::skinny_linear`` (fp32, bf16,
            torchao int8 weight-only) (``None``: on with regional compilation; see
            :mod:`dynexec_compile.backends.packed`).
        streamer: an object with transformers' ``BaseStreamer`` protocol (``TextStreamer``,
            ``TextIteratorStreamer``, ...), batch 1 only: ``put(input_ids)`` once, then
            ``put(tokens)`` (1-D) with the tokens each step keeps, in order (several per step
            for multi-token strategies; nothing after EOS, no padding), then ``end()``.
        **strategy_options: options of the chosen strategy (e.g. ``window=`` for lookahead).

    Returns:
        :class:`GenerateOutput` with ``sequences`` ``[B, L + n]`` and ``stats``.
    """
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a string, got {type(strategy).__name__}")
    if strategy not in _STRATEGIES:
        if strategy in PENDING_STRATEGIES:
            raise NotImplementedError(f"strategy={strategy!r} is not implemented yet: {PENDING_STRATEGIES[strategy]}")
        known = sorted(set(_STRATEGIES) | set(PENDING_STRATEGIES))
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies are {known}")
    check_causal_lm(model)
    if strategy == "greedy" and do_sample:
        raise ValueError("strategy='greedy' with do_sample=True: use strategy='sample' to sample")
    if strategy == "sample":
        if do_sample is False:
            raise ValueError("strategy='sample' with do_sample=False: use strategy='greedy' for argmax decoding")
        do_sample = True
    if streamer is not None:
        if not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
            raise TypeError(f"streamer must have put() and end() (transformers' BaseStreamer), got {type(streamer).__name__}")
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"streamer= streams one sequence: input_ids must be [1, L], got shape {tuple(input_ids.shape)}; "
                "generate the batch without a streamer"
            )
    eos_ids = _eos_ids(model, eos_token_id)
    settings = DecodeSettings(
        max_new_tokens=_check_max_new_tokens(max_new_tokens),
        eos_token_ids=eos_ids,
        pad_token_id=_pad_id(model, pad_token_id, eos_ids),
        sampling=SamplingParams(temperature, top_k, top_p) if do_sample else None,
        generator=generator,
        cache=_check_choice("cache", cache, CACHES),
        compile=bool(compile),
        backend=backend,
        mode=mode,
        options=compile_options,
        cuda_graphs=cuda_graphs,
        regional=regional,
        packed=packed,
        streamer=streamer,
    )
    return _STRATEGIES[strategy](model, input_ids, attention_mask, settings, **strategy_options)


def strategy_engine(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    strategy: str,
    *,
    reserve: int = 0,
    key: Hashable = ("plain", "target"),
    build: Callable[..., DecodeEngine] = DecodeEngine,
) -> DecodeEngine:
    """The engine a strategy's steps run on: dynexec's static :class:`SlotCache` with room for
    the longest prompt, ``max_new_tokens`` and ``reserve`` (the widest step), reused across calls.

    Engines (cache + compiled graphs) are kept in a small LRU keyed by model, batch size,
    compile settings and ``key`` (what else an engine carries: draft heads, an exit layer; a
    role such as ``("plain", "draft")`` keeps engines of one model apart when it plays two
    parts at once). An engine with a longer cache is reused rather than compiling new graphs
    for a shorter one: a recompile costs far more than attending over the extra (masked)
    slots. Engines whose frozen weights went stale are dropped. ``build(model, batch_size,
    max_len, **engine options)`` makes one when none fits.
    """
    if settings.cache != "static":
        raise ValueError(f"strategy={strategy!r} needs cache='static' (its steps write per-row slots of dynexec's SlotCache)")
    _, lengths = pack_prompts(input_ids, attention_mask)
    batch, max_len = input_ids.shape[0], cache_length(int(lengths.max()), settings.max_new_tokens, reserve)
    for stale in [k for k, e in _ENGINES.items() if e.model is model and e.frozen_weights_changed()]:
        del _ENGINES[stale]  # its graphs hold the old weights
    backend = id(settings.backend) if callable(settings.backend) else settings.backend
    options = tuple(sorted((settings.options or {}).items()))
    wanted = (id(model), batch, settings.compile, backend, settings.mode, options, settings.cuda_graphs, settings.regional,
              settings.packed, key)
    fitting = [(k, e) for k, e in _ENGINES.items() if k[0] == wanted and e.model is model and e.max_len >= max_len]
    if fitting:
        found, engine = min(fitting, key=lambda item: item[1].max_len)
    else:
        engine = build(model, batch, max_len, compile=settings.compile, backend=settings.backend, mode=settings.mode,
                       options=settings.options, cuda_graphs=settings.cuda_graphs, regional=settings.regional,
                       packed=settings.packed)
        found = (wanted, max_len)
        _ENGINES[found] = engine
        while len(_ENGINES) > MAX_ENGINES:
            _ENGINES.popitem(last=False)
    _ENGINES.move_to_end(found)
    return engine


def cache_length(prompt_len: int, max_new_tokens: int, reserve: int = 0) -> int:
    """Cache slots for a generation: prefill bucket, prompt + new tokens + ``reserve`` (the
    widest verification step), rounded up so nearby requests share an engine."""
    need = max(prefill_bucket(prompt_len), prompt_len + max_new_tokens + reserve)
    return -(-need // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE


def compile_count() -> int:
    """Graphs Dynamo has compiled in this process so far."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


# ---- the shared loop -------------------------------------------------------------------


class Proposer(Protocol):
    """One decoding strategy as :func:`decode_loop` runs it.

    Attributes:
        name: the strategy's name (``stats.strategy``).
        engine: the target's engine; its ``forward_passes`` are the ones counted.
        width: the most tokens one step keeps per row.
    """

    name: str
    engine: Any
    width: int

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Fill the caches with the prompts; each row's first generated token ``[B]``."""

    def step(self, runs: TokenRuns) -> torch.Tensor:
        """One decoding step: guess, verify, commit, keep the accepted tokens in ``runs``
        (rows ``runs.done`` keep nothing). Returns the tokens kept per row ``[B]``."""

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        """The strategy's own figures for ``stats.extra``."""


def decode_loop(
    proposer: Proposer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, settings: DecodeSettings
) -> GenerateOutput:
    """Prefill, then step until every row stopped (EOS or ``max_new_tokens``); one output type.

    Every strategy runs this loop: the stop rule, the streamer (the prompt first, then each
    step's kept tokens, then ``end()``), the timings and the shared statistics live here.
    """
    engine, streamer = proposer.engine, settings.streamer
    stats = GenerateStats(strategy=proposer.name)
    compiles0, forwards0 = compile_count(), engine.forward_passes
    batch, device = input_ids.shape[0], engine.device
    runs = TokenRuns(
        batch, settings.max_new_tokens, proposer.width, settings.eos_token_ids, settings.pad_token_id, device, streamer
    )
    if streamer is not None:
        streamer.put(input_ids.cpu())

    start = time.perf_counter()
    first = proposer.prefill(input_ids, attention_mask)  # [B]
    runs.keep(first[:, None], torch.ones_like(first))
    _synchronize(device)
    stats.prefill_time_s = time.perf_counter() - start
    start = time.perf_counter()
    kept = []
    while not runs.all_done():
        kept.append(proposer.step(runs))  # [B] each, read once at the end
    _synchronize(device)
    stats.decode_time_s = time.perf_counter() - start

    stats.steps = len(kept)
    stats.accepted_per_step = torch.stack(kept).tolist() if kept else []
    stats.new_tokens = runs.produced.tolist()
    stats.forward_passes = engine.forward_passes - forwards0
    stats.compiles = compile_count() - compiles0
    stats.extra = proposer.extra(stats)
    if streamer is not None:
        streamer.end()
    return GenerateOutput(sequences=runs.sequences(input_ids), stats=stats)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def next_token(logits: torch.Tensor, settings: DecodeSettings) -> torch.Tensor:
    # logits: [B, V] -> token: [B]
    if settings.sampling is None:
        return logits.argmax(dim=-1)
    return draw(sampling_probs(logits, settings.sampling), settings.generator)


# ---- plain decoding (greedy / sample) --------------------------------------------------


def _plain(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: DecodeSettings,
    **options: Any,
) -> GenerateOutput:
    if options:
        raise TypeError(f"greedy/sample decoding takes no options {sorted(options)}")
    if settings.cache == "dynamic":
        decoder = _DynamicDecoder(model, settings)
    else:
        decoder = strategy_engine(model, input_ids, attention_mask, settings, "greedy")
    return decode_loop(_PlainProposer(decoder, settings), input_ids, attention_mask, settings)


class _PlainProposer:
    """One token per row per forward: nothing guessed, nothing to verify."""

    width = 1

    def __init__(self, engine: DecodeEngine | _DynamicDecoder, settings: DecodeSettings):
        self.engine, self.settings = engine, settings
        self.name = "greedy" if settings.sampling is None else "sample"

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.token = next_token(self.engine.prefill(input_ids, attention_mask), self.settings)  # [B]
        return self.token

    def step(self, runs: TokenRuns) -> torch.Tensor:
        self.token = next_token(self.engine.decode(self.token), self.settings)  # [B]
        return runs.keep(self.token[:, None], torch.ones_like(self.token))

    def extra(self, stats: GenerateStats) -> dict[str, Any]:
        return {}


class _DynamicDecoder:
    """transformers' own ``DynamicCache`` path: the inputs ``model.generate`` would pass.

    Left padding stays in the cache and the 2-D mask grows by one column per step; shapes
    change every step, so with ``compile=True`` the forward is compiled with dynamic shapes.
    """

    def __init__(self, model: PreTrainedModel, settings: DecodeSettings):
        if settings.cuda_graphs:
            raise ValueError("cuda_graphs needs cache='static' (fixed shapes and addresses)")
        self.model = model
        self.device = next(model.parameters()).device
        self.forward_passes = 0
        self._forward = self._forward_impl
        if settings.compile:
            self._forward = torch.compile(
                self._forward_impl,
                backend=settings.backend,
                fullgraph=True,
                dynamic=True,
                mode=settings.mode,
                options=settings.options,
            )
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pack_prompts(input_ids, attention_mask)  # same argument checks as the static path
        ids = input_ids.to(self.device).long()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device).long()
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, L], as model.generate
        self._cache = DynamicCache(config=self.model.config)
        self._mask, self._positions = mask, positions[:, -1:]
        with torch.no_grad():  # the prefill runs eagerly, as in transformers
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self._cache, use_cache=True
            )
        self.forward_passes += 1
        return out.logits[:, -1]

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)  # [B, L+t]
        self._positions = self._positions + 1  # [B, 1]
        with torch.no_grad():
            logits = self._forward(token[:, None], self._mask, self._positions, self._cache)
        self.forward_passes += 1
        return logits[:, -1]

    def _forward_impl(
        self, token: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        return out.logits


# ---- argument checks ---------------------------------------------------------------------


def _check_max_new_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; use one of {list(choices)}")
    return value


def _eos_ids(model: PreTrainedModel, eos_token_id: int | list[int] | None) -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return ()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}")
    return tuple(ids)


def _pad_id(model: PreTrainedModel, pad_token_id: int | None, eos_ids: tuple[int, ...]) -> int | None:
    """The filler of stopped rows: given, else the generation config's, else the first EOS id
    (as transformers does)."""
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad_token_id is None and eos_ids:
        pad_token_id = eos_ids[0]
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    return pad_token_id


register_strategy("greedy", _plain)
register_strategy("sample", _plain)
