"""The Hugging Face habits: ``model.generate(...)`` arguments run dynexec's decoding strategies.

Why: a user of this field already has a working ``model.generate(**inputs, max_new_tokens=...,
do_sample=..., prompt_lookup_num_tokens=..., assistant_model=..., streamer=...)`` call,
configured by the model's ``generation_config``. This module maps that call onto
:func:`dynexec_compile.generate` so that trying dynexec changes one argument, not the call.

Three forms, one mapping (:func:`_decode`):

- ``model.generate(**inputs, custom_generate=hf_generate, ...)``. transformers (5.23) calls a
  callable ``custom_generate`` after its own argument handling (the generation config merged
  with the model's, the attention mask, the length limits), but it drops ``assistant_model``,
  ``streamer`` and ``tokenizer`` before the call, even when the callable names them. So this
  form serves every argument that survives, and refuses the dropped ones (it reads them from
  the calling ``generate`` frame) instead of ignoring them.
- ``wrap_generate(model)(**inputs, assistant_model=..., streamer=..., stop_strings=...,
  tokenizer=...)``: a thin wrapper of ``model.generate`` that takes the dropped arguments
  first, then calls ``model.generate`` with a ``custom_generate`` that carries them.
- :func:`compile`: ``torch.compile(model, backend="dynexec", options={"decoding": {...}})``
  whose returned module's ``.generate`` runs the configured strategy (see its docstring for
  why plain ``torch.compile`` cannot give that, and how :func:`wrap_generate` reads the
  options of a module compiled that way).

What dynexec cannot honour is an error naming the argument, never silently ignored: every
generation-config field that differs from transformers' defaults is either mapped, or known
not to change the tokens (cache and compile settings of transformers' own loop), or refused.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.generation import GenerateDecoderOnlyOutput, StopStringCriteria
from transformers.generation.streamers import BaseStreamer

from dynexec_compile.config import DecodingConfig, DynexecConfig, _parse_decoding, parse_options
from dynexec_compile.decoding.generate import _STRATEGIES, GenerateStats
from dynexec_compile.decoding.generate import generate as dx_generate
from dynexec_compile.decoding.lookahead import LookaheadConfig

__all__ = ["DynexecGenerateOutput", "compile", "hf_generate", "strategy_names", "strategy_options", "wrap_generate"]

# Fields that change how transformers' own loop runs, never which tokens it emits; dynexec has
# its own cache and compiler, so they have nothing to act on.
NOT_USED_FIELDS = (
    "use_cache",
    "cache_implementation",
    "cache_config",
    "max_cache_len",
    "compile_config",
    "disable_compile",
    "prefill_chunk_size",
)
# Fields read by the mapping below (each checked where it is read).
MAPPED_FIELDS = (
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "stop_strings",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "num_beams",
    "num_return_sequences",
    "return_dict_in_generate",
    "output_scores",
    "output_logits",
    "output_attentions",
    "output_hidden_states",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "prompt_lookup_num_tokens",
    "max_matching_ngram_size",
    "assistant_early_exit",
    "num_assistant_tokens",
    "num_assistant_tokens_schedule",
    "assistant_confidence_threshold",
)
_METADATA_FIELDS = ("transformers_version", "_from_model_config")
# Model inputs transformers prepares itself before calling custom_generate.
_PREPARED_KWARGS = ("attention_mask", "position_ids", "logits_to_keep", "use_cache", "past_key_values")
_GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__
_HF_STRATEGY_ARGS = {"speculative": "assistant_model", "lookahead": "prompt_lookup_num_tokens", "self_speculative": "assistant_early_exit"}


@dataclass
class DynexecGenerateOutput(GenerateDecoderOnlyOutput):
    """``model.generate(..., return_dict_in_generate=True)``'s output with dynexec's
    :class:`~dynexec_compile.decoding.generate.GenerateStats` beside ``sequences``."""

    stats: GenerateStats | None = None


# ---- strategies and their options ---------------------------------------------------------


def strategy_names() -> list[str]:
    """The registered decoding strategies of :func:`dynexec_compile.generate`."""
    return sorted(_STRATEGIES)


def strategy_options(strategy: str) -> list[str]:
    """The option names ``dynexec_compile.generate(strategy=strategy, **options)`` takes, read
    from the strategy itself: its keyword-only parameters, or lookahead's config fields."""
    if strategy == "lookahead":
        return [f.name for f in dataclasses.fields(LookaheadConfig)]
    params = inspect.signature(_STRATEGIES[strategy]).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


# ---- the public forms ----------------------------------------------------------------------


def hf_generate(
    model: Any,
    input_ids: torch.Tensor,
    logits_processor: Any = None,
    stopping_criteria: Any = None,
    generation_config: GenerationConfig | None = None,
    synced_gpus: bool = False,
    streamer: BaseStreamer | None = None,
    *,
    decoding: dict[str, Any] | DecodingConfig | None = None,
    **model_kwargs: Any,
) -> torch.Tensor | DynexecGenerateOutput:
    """``model.generate(**inputs, custom_generate=hf_generate, ...)``: decode with dynexec.

    transformers calls this after merging the generation config and preparing the inputs.
    ``decoding=`` (a dict like ``options["decoding"]``, see :class:`DecodingConfig`) survives
    as a custom argument: ``decoding={"compile": False}`` runs the step eagerly,
    ``decoding={"strategy": "lookahead", "window": 2}`` picks a strategy the HF arguments do not
    name. ``assistant_model``, ``streamer``, ``stop_strings`` (its tokenizer) do not reach a
    callable ``custom_generate`` in transformers; they raise here, use :func:`wrap_generate`.

    Returns what ``model.generate`` returns: ``[B, L + n]`` token ids, or with
    ``return_dict_in_generate`` a :class:`DynexecGenerateOutput` (``.sequences``, ``.stats``).
    """
    if streamer is not None:
        raise ValueError("hf_generate: streamer= is not a custom_generate argument; use dynexec_compile.wrap_generate(model)")
    _refuse_dropped_arguments(sys._getframe(1), model_kwargs)
    return _decode(model, input_ids, generation_config, model_kwargs, decoding=_as_decoding(decoding))


def wrap_generate(model: Any, **decoding: Any) -> Callable[..., Any]:
    """``model.generate`` with dynexec's decoding, taking the arguments transformers drops before
    a callable ``custom_generate`` (``assistant_model``, ``streamer``, ``tokenizer`` with
    ``stop_strings``) first. Neither ``model`` nor its generation config is modified.

    Args:
        model: a transformers causal LM, or a module from ``torch.compile(model, backend=
            "dynexec", options={"decoding": {...}})`` (its decoding options are read).
        **decoding: :class:`DecodingConfig` keys and strategy options, flat (e.g.
            ``compile=False``, ``strategy="lookahead", window=2``); not with a compiled module
            that carries its own.

    Returns:
        ``generate(inputs=None, generation_config=None, *, assistant_model=None, streamer=None,
        tokenizer=None, **kwargs)`` with ``model.generate``'s arguments and return value.
    """
    base, cfg, lowering = _model_and_decoding(model, decoding)

    def generate(
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        assistant_model: Any = None,
        streamer: BaseStreamer | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | DynexecGenerateOutput:
        if "custom_generate" in kwargs:
            raise ValueError("wrap_generate: custom_generate= is dynexec's own here; call model.generate for another one")
        if kwargs.get("assistant_tokenizer") is not None:
            raise ValueError("assistant_tokenizer: a draft with another tokenizer is not supported; the draft must share the target's vocabulary")
        stop_strings = kwargs.pop("stop_strings", None)
        if generation_config is not None and generation_config.stop_strings is not None:
            generation_config = copy.deepcopy(generation_config)  # the user's object stays as it is
            stop_strings = stop_strings if stop_strings is not None else generation_config.stop_strings
            generation_config.stop_strings = None
        if getattr(base.generation_config, "stop_strings", None) is not None:
            raise NotImplementedError(
                "the model's generation_config.stop_strings is set: transformers fills it into every call and then needs "
                "the tokenizer it drops before custom_generate; pass a copy of the model without it, or stop_strings= "
                "to this call on a model whose generation_config has none"
            )
        stop, draft, user_streamer = None, assistant_model, streamer
        if stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs tokenizer= (the model's tokenizer), as in model.generate")
            stop = StopStringCriteria(tokenizer, stop_strings)

        def custom_generate(
            model: Any,
            input_ids: torch.Tensor,
            logits_processor: Any = None,
            stopping_criteria: Any = None,
            generation_config: GenerationConfig | None = None,
            synced_gpus: bool = False,
            streamer: BaseStreamer | None = None,
            **model_kwargs: Any,
        ) -> torch.Tensor | DynexecGenerateOutput:
            _refuse_dropped_arguments(sys._getframe(1), model_kwargs)
            return _decode(
                model,
                input_ids,
                generation_config,
                model_kwargs,
                decoding=cfg,
                lowering=lowering,
                assistant_model=draft,
                streamer=user_streamer,
                stop=stop,
            )

        return base.generate(inputs, generation_config=generation_config, custom_generate=custom_generate, **kwargs)

    generate.__doc__ = f"{type(base).__name__}.generate with dynexec's decoding (see dynexec_compile.wrap_generate)."
    return generate


def compile(model: torch.nn.Module, options: dict[str, Any] | None = None, **compile_kwargs: Any) -> torch.nn.Module:
    """``torch.compile(model, backend="dynexec", options=options, **compile_kwargs)`` whose
    ``.generate`` runs ``options["decoding"]``'s strategy on dynexec's engine.

    Why a function of our own: ``torch.compile`` returns an ``OptimizedModule`` that forwards
    attribute access to ``model``, so its ``.generate`` is ``model``'s own, and Dynamo calls the
    backend only when a forward is traced, with no handle on the module, so the backend cannot
    install anything at ``torch.compile`` time. This function parses ``options`` at once (an
    unknown key is a ``ValueError`` naming the valid ones) and puts ``generate`` on the returned
    ``OptimizedModule`` itself (:func:`wrap_generate` of it); ``model`` is not modified and its
    own ``.generate`` stays transformers'. With a plain ``torch.compile(..., backend="dynexec",
    options={"decoding": ...})``, ``dynexec_compile.wrap_generate(compiled)`` gives the same.

    The forward of the returned module is dynexec's compiled forward as usual; ``.generate``
    compiles its own static-cache step from ``model`` with ``options["lowering"]``.
    """
    if "backend" in compile_kwargs:
        raise ValueError("dynexec_compile.compile: backend is 'dynexec'; use torch.compile for another backend")
    cfg = parse_options(options)
    if cfg.decoding is None:  # .generate decodes with the defaults: say so in the options it reads back
        options = dataclasses.replace(cfg, decoding=DecodingConfig())
    compiled = torch.compile(model, backend="dynexec", options=options, **compile_kwargs)
    # OptimizedModule.__setattr__ forwards names to the wrapped model; this one is its own.
    object.__setattr__(compiled, "generate", wrap_generate(compiled))
    return compiled


# ---- the mapping ---------------------------------------------------------------------------


def _decode(
    model: Any,
    input_ids: torch.Tensor,
    gc: GenerationConfig | None,
    model_kwargs: dict[str, Any],
    *,
    decoding: DecodingConfig,
    lowering: str = "inductor",
    assistant_model: Any = None,
    streamer: BaseStreamer | None = None,
    stop: StopStringCriteria | None = None,
) -> torch.Tensor | DynexecGenerateOutput:
    """The prepared ``model.generate`` call -> :func:`dynexec_compile.generate` -> its output."""
    if gc is None:
        raise ValueError("hf_generate runs inside model.generate: call model.generate(..., custom_generate=hf_generate)")
    _check_fields(gc)
    attention_mask = _check_model_kwargs(model_kwargs)
    prompt_len = input_ids.shape[1]
    max_new_tokens = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - prompt_len
    eos = _eos_list(gc.eos_token_id)
    _check_min_length(gc, eos, prompt_len)
    strategy, options = _strategy(gc, decoding, assistant_model)
    sampling = {"temperature": gc.temperature, "top_k": gc.top_k or None, "top_p": gc.top_p} if gc.do_sample else {}
    if stop is not None and streamer is not None:
        streamer = _StopStringStreamer(streamer, stop)
    out = dx_generate(
        model,
        input_ids,
        attention_mask,
        strategy=strategy,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=gc.pad_token_id,
        do_sample=bool(gc.do_sample),
        **sampling,
        cache=decoding.cache,
        compile=decoding.compile,
        backend=lowering,
        mode=decoding.mode,
        streamer=streamer,
        **options,
    )
    sequences = out.sequences
    if stop is not None:
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else None)
        sequences = _cut_at_stop_strings(sequences, prompt_len, out.stats.new_tokens, stop, pad)
    if gc.return_dict_in_generate:
        return DynexecGenerateOutput(sequences=sequences, stats=out.stats)
    return sequences


def _strategy(gc: GenerationConfig, decoding: DecodingConfig, assistant_model: Any) -> tuple[str, dict[str, Any]]:
    """The dynexec strategy and its options for these HF arguments and decoding settings."""
    chosen: dict[str, dict[str, Any]] = {}
    defaults: dict[str, Any] = {}  # options the HF arguments imply unless the decoding settings set them
    if assistant_model is not None:
        chosen["speculative"] = {"draft_model": assistant_model}
    if gc.prompt_lookup_num_tokens is not None:
        k = gc.prompt_lookup_num_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"prompt_lookup_num_tokens must be an int >= 1, got {k!r}")
        if gc.max_matching_ngram_size not in (None, 2):
            raise ValueError(
                f"max_matching_ngram_size={gc.max_matching_ngram_size}: dynexec's prompt lookup matches the last 2 "
                "tokens (transformers' default); leave it unset or 2"
            )
        chosen["lookahead"] = {"ngram": k + 1, "prompt_lookup": True}
        # transformers' prompt lookup has no Jacobi window: one k-token guess from the text,
        # unless the decoding settings ask for a window or more guesses
        defaults = {"window": 0, "guesses": 1}
    if gc.assistant_early_exit is not None:
        chosen["self_speculative"] = {"exit_layer": gc.assistant_early_exit}
    if len(chosen) > 1:
        args = [_HF_STRATEGY_ARGS[s] for s in chosen]
        raise ValueError(f"{' and '.join(args)} ask for different strategies ({list(chosen)}); pass one of them")
    drafts = "speculative" in chosen or "self_speculative" in chosen
    if drafts:
        options = next(iter(chosen.values()))
        if gc.num_assistant_tokens not in (None, 20):  # transformers' default: dynexec's own default applies
            options["num_draft"] = gc.num_assistant_tokens
        if gc.num_assistant_tokens_schedule not in (None, "constant"):
            raise ValueError(
                f"num_assistant_tokens_schedule={gc.num_assistant_tokens_schedule!r}: dynexec drafts a fixed "
                "num_draft per step; set it to 'constant' (the tokens are the same, only the speed differs)"
            )
        if gc.assistant_confidence_threshold not in (None, 0.4):
            raise ValueError(
                f"assistant_confidence_threshold={gc.assistant_confidence_threshold}: dynexec's draft does not stop "
                "on low confidence; leave it unset"
            )
    plain = "sample" if gc.do_sample else "greedy"
    strategy = decoding.strategy
    if chosen:
        (hf_strategy, options), = chosen.items()
        if strategy not in (None, hf_strategy):
            raise ValueError(
                f"{_HF_STRATEGY_ARGS[hf_strategy]} asks for strategy {hf_strategy!r}, the decoding settings for "
                f"{strategy!r}; drop one of them"
            )
        strategy = hf_strategy
    else:
        options = {}
        if strategy in (None, "greedy", "sample"):
            strategy = plain if strategy is None else strategy
    for key, value in decoding.options.items():
        if key in options and options[key] is not value and options[key] != value:
            raise ValueError(f"decoding option {key}={value!r} contradicts {key}={options[key]!r} from the HF arguments")
        options[key] = value
    options = {**defaults, **options}
    unknown = sorted(set(options) - set(strategy_options(strategy)))
    if unknown:
        raise ValueError(f"strategy {strategy!r} takes no option(s) {unknown}; its options are {strategy_options(strategy)}")
    return strategy, options


# ---- argument checks -----------------------------------------------------------------------


def _field_defaults() -> dict[str, tuple[Any, ...]]:
    """What each generation-config field holds when nobody set it: ``GenerationConfig()``'s value
    and the value transformers fills in before decoding (``top_k=50``, ``num_beams=1``, ...)."""
    unset = GenerationConfig().to_dict()
    filled = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    return {name: (value, filled.get(name, value)) for name, value in unset.items()}


_DEFAULTS = _field_defaults()


def _is_default(name: str, value: Any) -> bool:
    unset, filled = _DEFAULTS[name]
    return value == unset or value == filled or (value is False and unset is None)


def _check_fields(gc: GenerationConfig) -> None:
    """Refuse every generation-config field that differs from transformers' defaults and that
    dynexec neither maps nor knows to leave the tokens unchanged."""
    values = gc.to_dict()
    refused = sorted(
        name
        for name, value in values.items()
        if name in _DEFAULTS
        and not name.startswith("_")
        and name not in _METADATA_FIELDS + NOT_USED_FIELDS + MAPPED_FIELDS
        and not _is_default(name, value)
    )
    if refused:
        shown = ", ".join(f"{n}={values[n]!r}" for n in refused)
        raise NotImplementedError(
            f"dynexec's decoding does not implement {shown}; unset {'them' if len(refused) > 1 else 'it'} or call "
            "model.generate without custom_generate"
        )
    if gc.num_beams not in (None, 1):
        raise NotImplementedError(f"num_beams={gc.num_beams}: beam search is not a dynexec strategy; use num_beams=1")
    if gc.num_return_sequences not in (None, 1):
        raise NotImplementedError(
            f"num_return_sequences={gc.num_return_sequences} is not supported; repeat the prompt in the batch instead"
        )
    outputs = [n for n in ("output_scores", "output_logits", "output_attentions", "output_hidden_states") if getattr(gc, n)]
    if outputs:
        raise NotImplementedError(f"{', '.join(outputs)}: dynexec returns sequences and its stats, not per-step tensors")


def _check_min_length(gc: GenerationConfig, eos: list[int], prompt_len: int) -> None:
    """``min_new_tokens`` / ``min_length`` forbid EOS for the first tokens, which changes which
    token wins a step; dynexec's loops have no such rule, so an effective one raises."""
    if not eos:
        return  # transformers adds the EOS ban only when there is an EOS token
    if gc.min_new_tokens:
        raise NotImplementedError(
            f"min_new_tokens={gc.min_new_tokens}: dynexec's decoding cannot ban EOS for the first tokens; "
            "drop it, or call model.generate without custom_generate"
        )
    if gc.min_length and gc.min_length > prompt_len:
        raise NotImplementedError(
            f"min_length={gc.min_length} (> the prompt's {prompt_len} tokens): dynexec's decoding cannot ban EOS "
            "for the first tokens; drop it, or call model.generate without custom_generate"
        )


def _check_model_kwargs(model_kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The attention mask; every other model input is one transformers prepared, or an error."""
    unknown = sorted(k for k, v in model_kwargs.items() if k not in _PREPARED_KWARGS and v is not None)
    if unknown:
        raise NotImplementedError(f"model input(s) {unknown}: dynexec's decoding takes input_ids and attention_mask only")
    cache = model_kwargs.get("past_key_values")
    if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
        raise NotImplementedError("past_key_values: continuing from a filled cache is not supported; pass the whole prompt")
    return model_kwargs.get("attention_mask")


def _refuse_dropped_arguments(frame: Any, model_kwargs: dict[str, Any]) -> None:
    """Refuse what ``model.generate`` took but did not hand to ``custom_generate``.

    transformers drops ``assistant_model`` and ``streamer`` before calling a callable
    ``custom_generate`` and folds the user's ``logits_processor`` / ``stopping_criteria`` into
    lists built from the generation config; only its frame still shows them. Read from there so
    that they raise rather than being ignored. Called directly (not from ``generate``), the
    arguments are the ones given.
    """
    if frame.f_code is not _GENERATE_CODE:
        if model_kwargs.get("position_ids") is not None:
            raise NotImplementedError("position_ids: dynexec derives positions from the attention mask")
        return
    given = frame.f_locals
    if given.get("assistant_model") is not None:
        raise ValueError(
            "assistant_model: transformers drops it before calling a custom_generate callable; use "
            "dynexec_compile.wrap_generate(model)(..., assistant_model=draft)"
        )
    if given.get("streamer") is not None:
        raise ValueError(
            "streamer: transformers drops it before calling a custom_generate callable; use "
            "dynexec_compile.wrap_generate(model)(..., streamer=streamer)"
        )
    for name in ("logits_processor", "stopping_criteria"):
        if given.get(name):
            raise NotImplementedError(f"{name}: dynexec's decoding cannot run user {name.replace('_', ' ')}s; drop it")
    for name in ("prefix_allowed_tokens_fn", "negative_prompt_ids", "negative_prompt_attention_mask"):
        if given.get(name) is not None:
            raise NotImplementedError(f"{name} is not supported by dynexec's decoding")
    if given.get("synced_gpus"):
        raise NotImplementedError("synced_gpus=True: dynexec decodes on one device")
    if given.get("kwargs_has_position_ids"):
        raise NotImplementedError("position_ids: dynexec derives positions from the attention mask; drop position_ids")


def _eos_list(eos: Any) -> list[int]:
    if eos is None:
        return []  # no EOS: an empty list (None would make dynexec read the model's config again)
    return [eos] if isinstance(eos, int) else list(eos)


def _as_decoding(decoding: Any) -> DecodingConfig:
    cfg = _parse_decoding(decoding)
    return cfg if cfg is not None else DecodingConfig()


def _model_and_decoding(model: Any, decoding: dict[str, Any]) -> tuple[Any, DecodingConfig, str]:
    """The module to decode with, its decoding settings and the step's compiler: a compiled
    module's own (its ``lowering``), or the given ones on Inductor."""
    from torch._dynamo.eval_frame import OptimizedModule

    if not isinstance(model, OptimizedModule):
        return model, _as_decoding(decoding), "inductor"
    cfg = _compiled_options(model)
    if decoding:
        raise ValueError("wrap_generate: this module was compiled with its own decoding options; pass them there")
    if cfg.early_exit is not None or cfg.elastic is not None:
        raise NotImplementedError(
            "options early_exit / elastic change the compiled forward; .generate's decoding does not use them "
            "(it would decode with the full model): drop them or the decoding option"
        )
    return model._orig_mod, cfg.decoding if cfg.decoding is not None else DecodingConfig(), cfg.lowering


def _compiled_options(compiled: Any) -> DynexecConfig:
    """The parsed options of a module from ``torch.compile(model, backend="dynexec", options=...)``."""
    from torch._dynamo.eval_frame import innermost_backend

    backend = innermost_backend(compiled.dynamo_ctx.callback)
    if getattr(backend, "compiler_name", None) != "dynexec":
        name = getattr(backend, "compiler_name", backend)
        raise ValueError(f"wrap_generate: the module was compiled with backend {name!r}, not 'dynexec'; pass the model itself")
    return parse_options(getattr(backend, "kwargs", {}).get("options"))


# ---- stop strings --------------------------------------------------------------------------


def _cut_at_stop_strings(
    sequences: torch.Tensor, prompt_len: int, new_tokens: list[int], stop: StopStringCriteria, pad: int | None
) -> torch.Tensor:
    """Apply transformers' stop-string rule to decoded rows: a row ends after the token that
    completes a stop string (transformers' own ``StopStringCriteria``, evaluated on each prefix as
    its loop does) or at its EOS, whichever comes first; later tokens become ``pad``; the batch
    ends when its last row does.

    Rows depend only on their own prefix, so cutting after decoding gives what stopping would
    have; the cost is that decoding ran on past the stop string.
    """
    # sequences: [B, L + n]; row r generated new_tokens[r] tokens (EOS included), then pad
    ends = torch.tensor(new_tokens, dtype=torch.long) + prompt_len  # [B] one past each row's last token
    done = torch.zeros(len(new_tokens), dtype=torch.bool)  # [B] met a stop string
    for end in range(prompt_len + 1, int(ends.max()) + 1):
        hit = stop(sequences[:, :end], None).cpu() & ~done & (end <= ends)  # [B]
        ends[hit] = end
        done |= hit
        if bool((done | (ends <= end)).all()):
            break
    if not bool(done.any()):
        return sequences
    if pad is None:
        raise ValueError("stop_strings needs a pad_token_id (or an EOS id) to fill the rows that stopped")
    out = sequences.clone()
    for row in torch.nonzero(done).flatten().tolist():
        out[row, ends[row] :] = pad
    return out[:, : int(ends.max())]


class _StopStringStreamer(BaseStreamer):
    """Passes tokens to ``inner`` up to and including the one that completes a stop string
    (batch 1, as transformers' streamers), then swallows the rest of the decoding."""

    def __init__(self, inner: BaseStreamer, stop: StopStringCriteria):
        self.inner, self.stop = inner, stop
        self.ids: torch.Tensor | None = None  # [1, t] prompt + streamed
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if self.ids is None:
            self.ids = value.reshape(1, -1).cpu()
            self.inner.put(value)
            return
        if self.stopped:
            return
        tokens = value.reshape(-1).cpu()
        for i in range(tokens.numel()):
            self.ids = torch.cat([self.ids, tokens[i : i + 1].view(1, 1)], dim=1)
            if bool(self.stop(self.ids, None)[0]):
                self.stopped = True
                tokens = tokens[: i + 1]
                break
        self.inner.put(tokens)

    def end(self) -> None:
        self.inner.end()
