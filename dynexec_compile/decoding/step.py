"""The compiled decoding step every strategy is a loop of.

A ``DecodeEngine`` owns a :class:`SlotCache` for one model, batch size and cache length, and
runs fixed-shape compiled graphs on it, all through one mechanism (:meth:`DecodeEngine.run_graph`:
one graph per name and input shapes):

- ``prefill(input_ids, attention_mask)``: prompts packed to the front of each row (slot ==
  position), right-padded to a length bucket so nearby prompt lengths share one graph (with
  regional compilation, whose prefill graph has a dynamic length, to a multiple of 8);
- ``decode(tokens)``: the 1-token step; positions, slots and mask come from the cache's
  lengths inside the graph, which then advances them — one call, no host work per step;
- ``step(tokens, positions, mask, slots)``: the generic fused forward of ``T`` tokens per row
  under a caller-built mask; the caller then keeps what it accepts with ``commit``;
- a strategy's whole step (forward, verification, commit: :mod:`dynexec_compile.decoding.verify`)
  as one graph, whose forward is :meth:`DecodeEngine.step_forward` — the model's, or a
  subclass's that drafts inside the graph (draft heads, self-speculation).

Shapes are static (``dynamic=False``), so after warm-up nothing recompiles; on CUDA every
graph but the prefill is captured as a CUDA graph and replayed.

At batch 1 on a CPU the step is a chain of matrix-vector products that stream the weights
from memory, plus overhead. What was measured to shorten it (``benchmarks/bench_step.py``):
Inductor freezing, which folds the weights into pre-transposed and fused (q/k/v, gate/up)
constants — MKL's GEMV on a transposed weight is ~1.5x slower here; tracing attention in its
eager form, which Inductor fuses with the mask and softmax; and skipping Dynamo's guard
evaluation on shapes an engine has already run.
"""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from dynexec_compile.backends.attention import cpu_attention
from dynexec_compile.backends.cuda_graphs import CudaGraphRunner
from dynexec_compile.backends.inductor_passes import (
    ContiguousWeightsForFreezing,
    WidenQuantizedWeights,
)
from dynexec_compile.backends.kernels import skinny
from dynexec_compile.backends.packed import PackedWeights, packing_backend
from dynexec_compile.backends.packed import available as packing_available
from dynexec_compile.decoding.adaptive import WidthChooser
from dynexec_compile.decoding.cache import SlotCache, attention_windows
from dynexec_compile.decoding.masks import chain_mask, layer_masks, model_mask
from dynexec_compile.decoding.regional import RegionalLayers, private_copy

Backend = str | Callable


def check_causal_lm(model: Any) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``model`` is a decoder-only HF LM in eval mode."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel causal LM, got {type(model).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or not model.can_generate():
        raise ValueError(
            f"{type(model).__name__} is not a decoder-only causal LM (can_generate="
            f"{model.can_generate()}, is_encoder_decoder={getattr(config, 'is_encoder_decoder', False)}); "
            "use an AutoModelForCausalLM model"
        )
    params = inspect.signature(model.forward).parameters
    missing = [p for p in ("position_ids", "past_key_values", "attention_mask") if p not in params]
    if missing:
        raise ValueError(f"{type(model).__name__}.forward does not accept {missing}; it cannot decode with a KV cache")
    if model.training:
        raise ValueError(
            f"{type(model).__name__} is in training mode (dropout active, outputs random); call model.eval() first"
        )


def prefill_bucket(length: int) -> int:
    """Padded prefill length: a power of two from 16 up to 512, then a multiple of 512."""
    if length <= 512:
        return max(16, 1 << (length - 1).bit_length())
    return -(-length // 512) * 512


def pack_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens (``attention_mask == 1``, in order) to the front.

    Left- or right-padded prompts both become ``[B, L]`` rows whose first ``lengths[b]``
    entries are the prompt, so prompt token ``i`` has position ``i`` — what transformers
    computes from the mask (``cumsum - 1``) for a left-padded batch.

    Returns:
        ``(packed [B, L], lengths [B])``; entries past ``lengths[b]`` are the row's pad tokens.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if attention_mask is None:
        lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
        return input_ids.long(), lengths
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
        )
    real = attention_mask.to(input_ids.device) != 0  # [B, L]
    lengths = real.sum(dim=1)  # [B]
    if bool((lengths == 0).any()):
        raise ValueError("every prompt needs at least one token with attention_mask == 1; a row is empty")
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
    return input_ids.long().gather(1, order), lengths


class DecodeEngine:
    """Static-cache, compiled decoding for one causal LM at a fixed batch size and cache length.

    Args:
        model: a transformers causal LM in eval mode. It is not modified (see ``attention``).
        batch_size: rows decoded together.
        max_len: cache slots per row: prompt + generated tokens + the widest step must fit.
        compile: compile prefill/decode/step with ``torch.compile(fullgraph=True,
            dynamic=False)``; ``False`` runs the same code eagerly.
        backend: ``torch.compile`` backend (a name or a callable).
        mode: ``torch.compile`` mode (Inductor only); ``None`` for the default. On CPU,
            ``"max-autotune"`` keeps freezing and the CPU options and adds
            :data:`CPU_AUTOTUNE_OPTIONS`: Inductor's C++ GEMM template competes with MKL for
            every matmul shape (measured on the demo LM: a 1-token step 1.7 -> 1.05 ms, a
            5-token step about as cheap as a 1-token one), at the price of minutes of
            compilation per engine. Its kernels sum in another order than MKL: logits equal
            the default mode's up to fp32 rounding, so a greedy argmax can flip where two
            logits tie within rounding.
        options: ``torch.compile`` options for the backend; with Inductor on CPU they extend
            :data:`CPU_INDUCTOR_OPTIONS`, with ``freeze`` :data:`FREEZING_OPTIONS`.
        cuda_graphs: capture the graphs (all but the prefill) as CUDA graphs; ``None`` = on when
            the model is on CUDA.
        freeze: Inductor freezing — the weights become constants of the compiled graphs, so
            Inductor folds their layout (pre-transposed, fused QKV / gate-up matmuls) once.
            The engine then holds its own copy of the folded weights; if the model's weights
            change in place afterwards, ``prefill`` raises (build a new engine). ``None`` = on
            for Inductor on CPU without a ``mode``.
        attention: attention implementation to trace the model with (``"eager"``, ``"sdpa"``),
            set on the model's config only for the duration of each call and restored after;
            ``None`` keeps the model's; ``"auto"``: eager attention on CPU (a 1-token query over
            the cache is a matrix-vector product that Inductor fuses with the mask and
            softmax, cheaper than SDPA's CPU kernel), without copies of the key/value heads where
            the family allows (:func:`~dynexec_compile.backends.attention.cpu_attention`); the
            model's own elsewhere.
        skip_guards: once a step shape has run, call it again without re-evaluating Dynamo's
            guards (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): nothing the
            guards check changes between an engine's own calls, since all state is in tensors.
        regional: compile ONE decoder layer and reuse its code for every layer, the rest of
            each step running eagerly (see :mod:`dynexec_compile.decoding.regional`): the
            compile time of one layer whatever the depth, no freezing. ``None`` = on for
            compiled CPU models of at least :data:`REGIONAL_MIN_BYTES` of weights, whose
            step is bound by memory traffic (measured on SmolLM2-135M: see the README). A
            batch of prompts of unequal lengths then prefills row by row (:meth:`_prefill_rows`).
        packed: every linear layer of the compiled graphs runs on a copy of its weight packed
            once for oneDNN (:mod:`dynexec_compile.backends.packed`): on a CPU a step over
            several tokens then costs about what a 1-token step costs, where the plain GEMM
            re-packs every weight per call. On AVX2-only CPUs steps of at most 20 rows run
            ``dynexec::skinny_linear`` on the plain weights instead (measured faster there),
            fp32, bf16 and torchao int8 weight-only alike.
            Costs one packed copy of the linear weights, shared by the model's engines.
            ``None`` = on with regional compilation.

    Attributes:
        cache: the :class:`SlotCache`; ``cache.lengths`` holds each row's committed length.
        forward_passes: model forwards run so far (prefill, decode and step calls).
        chooser: what this engine's step shapes cost and keep, for strategies that choose
            each step's shape (``adaptive=True``, :mod:`~dynexec_compile.decoding.adaptive`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        batch_size: int,
        max_len: int,
        *,
        compile: bool = True,
        backend: Backend = "inductor",
        mode: str | None = None,
        options: dict[str, Any] | None = None,
        cuda_graphs: bool | None = None,
        freeze: bool | None = None,
        attention: str | None = "auto",
        skip_guards: bool = True,
        regional: bool | None = None,
        packed: bool | None = None,
    ):
        check_causal_lm(model)
        weight = next(model.parameters())
        on_cpu, on_cuda = weight.device.type == "cpu", weight.device.type == "cuda"
        inductor = compile and backend == "inductor"
        if regional is None:
            regional = compile and on_cpu and parameter_bytes(model) >= REGIONAL_MIN_BYTES
        if regional and not compile:
            raise ValueError("regional=True compiles the decoder layers: it needs compile=True")
        if regional and freeze:
            raise ValueError("regional compilation keeps the weights as graph inputs (one graph for all layers); freeze=True needs the whole-step graphs (regional=False)")
        if packed is None:
            packed = regional and packing_available()
        if packed and not (compile and on_cpu):
            raise ValueError("packed=True rewrites the compiled graphs' linears for oneDNN on the CPU: it needs compile=True and a CPU model")
        if inductor and on_cpu and mode == "max-autotune":  # as options: freezing stays on
            mode, options = None, {**CPU_AUTOTUNE_OPTIONS, **(options or {})}
        if freeze is None:
            freeze = inductor and on_cpu and mode is None and not regional
        if freeze and not inductor:
            raise ValueError("freeze=True is Inductor freezing: it needs compile=True and backend='inductor'")
        if inductor and on_cpu and mode is None:
            options = {**CPU_INDUCTOR_OPTIONS, **(options or {})}
            if packed and type(options["post_grad_custom_pre_pass"]) is WidenQuantizedWeights and skinny.available():
                options["post_grad_custom_pre_pass"] = WidenQuantizedWeights(skinny_rows=skinny.MAX_ROWS)  # int8 steps too
        if freeze:
            options = {**FREEZING_OPTIONS, **(options or {})}
        if attention == "auto":
            attention = cpu_attention(model) if on_cpu and model._can_set_attn_implementation() else None
        self.model = model
        self.cache = SlotCache(model.config, batch_size, max_len, dtype=weight.dtype, device=weight.device)
        self.forward_passes = 0
        self.chooser = WidthChooser()
        self.compiled = compile
        self._freeze = freeze
        self._attention = attention
        self._skip_guards = compile and skip_guards
        self._warm: set[tuple] = set()  # (graph name, input shapes) already run
        self._length_bound = 0  # host-side upper bound of max(cache.lengths)
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._max_position = _learned_positions(model.config)
        self._weights_at_freeze = weights_fingerprint(model) if freeze else None
        self.compile_settings = {"mode": mode, "options": options, "freeze": freeze, "regional": regional, "packed": packed,
                                 "attention": attention}  # as resolved
        self._packed = PackedWeights(model) if packed else None
        self._compiler = _compiler(compile, backend, mode, options, packed=packed)
        self._regional: RegionalLayers | None = None
        self._row_cache: SlotCache | None = None  # the one-row cache of a prefill row by row
        if regional:  # the layers compile; every graph runs eagerly around them
            self._regional = RegionalLayers(
                model, self.cache, lambda fn, dynamic: _compiler(True, backend, mode, options, dynamic, packed)(fn)
            )
            self._compiler = _compiler(False, backend, None, None)
        # run_graph: name -> (the body, its compiled graph)
        self._graphs: dict[str, tuple[Callable, Callable]] = {}
        if cuda_graphs is None:
            cuda_graphs = on_cuda and mode not in ("reduce-overhead", "max-autotune")
        if cuda_graphs and not on_cuda:
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = cuda_graphs

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` committed tokens per row (the cache's own tensor; do not write to it)."""
        return self.cache.lengths

    @property
    def device(self) -> torch.device:
        return self.cache.device

    # ---- public steps -------------------------------------------------------------------

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the cache with the prompts and return each row's next-token logits ``[B, V]``.

        Args:
            input_ids: ``[B, L]`` prompts, left- or right-padded.
            attention_mask: ``[B, L]``, 1 for prompt tokens, 0 for padding; ``None`` = all 1.
        """
        return self.prefill_outputs(input_ids, attention_mask)[0]

    def prefill_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple:
        """:meth:`prefill`, returning everything :meth:`prefill_forward` returns (logits first)."""
        if input_ids.shape[0] != self.batch_size:
            raise ValueError(f"prefill: batch of {input_ids.shape[0]} rows, engine built for {self.batch_size}")
        if self.frozen_weights_changed():
            raise RuntimeError(
                "the model's weights changed after this engine froze them into its compiled graphs; "
                "build a new DecodeEngine (or pass freeze=False to see weight changes live)"
            )
        packed, lengths = pack_prompts(input_ids.to(self.device), attention_mask)
        longest = int(lengths.max())
        # regional compilation runs one dynamic-shape prefill graph for every length, so the
        # prompt only pads to a multiple of 8 there; whole-step graphs compile per bucket
        bucket = prefill_bucket(longest) if self._regional is None else _regional_width(longest)
        if bucket > self.max_len:
            raise ValueError(
                f"prefill: prompts of {longest} tokens need {bucket} slots (bucketed), cache has {self.max_len}"
            )
        self.cache.reset()
        self._length_bound = 0
        lengths = lengths.to(self.device)
        if self._regional is not None and _rows_apart(lengths.tolist(), bucket):
            out = self._prefill_rows(packed, lengths)
        else:
            # ids: [B, bucket], prompt first; the padded tail is scratch that later steps overwrite
            ids = torch.zeros(self.batch_size, bucket, dtype=torch.long, device=self.device)
            ids[:, :longest] = packed[:, :longest]
            out = self.run_graph("prefill", DecodeEngine._prefill_body, ids, lengths, width=0)
        self._length_bound = longest
        return out

    def _prefill_rows(self, packed: torch.Tensor, lengths: torch.Tensor) -> tuple:
        """The prefill one row at a time, each padded to its own multiple of 8, on a one-row
        cache whose slots are copied into the row's (regional compilation: the same dynamic
        graph for every row). A CPU prefill is bound by arithmetic, so a batch of unequal
        prompts then costs the sum of their lengths rather than rows x the longest. Counted as
        one forward, as the batched prefill is. Returns the batched prefill's outputs, a row's
        shorter per-token outputs zero-padded."""
        if self._row_cache is None:
            self._row_cache = SlotCache(self.model.config, 1, self.max_len, dtype=self.cache.dtype, device=self.device)
        whole, parts = self.cache, []
        try:
            self.cache = self._row_cache
            for row, length in enumerate(lengths.tolist()):
                ids = packed.new_zeros(1, _regional_width(length))
                ids[0, :length] = packed[row, :length]
                parts.append(self.run_graph("prefill", DecodeEngine._prefill_body, ids, lengths[row : row + 1], width=0, forwards=0))
                for mine, its in zip(whole.layers, self._row_cache.layers, strict=True):
                    mine.keys[row, :, :length] = its.keys[0, :, :length]
                    mine.values[row, :, :length] = its.values[0, :, :length]
        finally:
            self.cache = whole
        whole.lengths.copy_(lengths)
        self.forward_passes += 1
        return tuple(_stack_rows(outputs) for outputs in zip(*parts, strict=True))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row at position ``lengths[b]``; commits it and returns logits ``[B, V]``.

        Args:
            tokens: ``[B, 1]`` (or ``[B]``) the last sampled token of each row.
        """
        return self.run_graph("decode", DecodeEngine._decode_body, tokens.reshape(self.batch_size, 1), width=1)

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        slots: torch.Tensor | None = None,
        *,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Fused forward of ``T`` tokens per row under a caller-built mask; nothing committed.

        The tokens' keys/values are written at ``slots`` (scratch until :meth:`commit`).

        Args:
            tokens: ``[B, T]`` token ids.
            positions: ``[B, T]`` position ids (``lengths[b] + depth`` in a tree).
            mask: ``[B, 1, T, S_max]`` additive float mask over cache slots in the model's
                dtype (see :mod:`dynexec_compile.decoding.masks`).
            slots: ``[B, T]`` distinct slots ``>= lengths[b]``; defaults to ``positions``
                (right for a chain).
            return_hidden: also return the final hidden states (the LM head's input); a
                graph of its own.
        Returns:
            ``[B, T, V]`` logits, or ``(logits, hidden [B, T, D])``.
        """
        slots = positions if slots is None else slots
        self._check_step(tokens, positions, mask, slots)
        name, body = ("step_hidden", DecodeEngine._step_hidden_body) if return_hidden else ("step", DecodeEngine._step_body)
        return self.run_graph(name, body, tokens, positions, slots, mask, width=0)

    def run_graph(self, name: str, body: Callable[..., Any], *tensors: torch.Tensor, width: int, forwards: int = 1) -> Any:
        """Run ``body(engine, *tensors)`` as ONE compiled graph of this engine.

        Why: a strategy's step is more than the forward — masks, verification, the cache
        commit, the stopping rule — and every small op or compiled call outside the graph is
        host work and, on CUDA, a kernel launch outside the captured graph. In one graph the
        whole step is one call (one CUDA-graph replay on GPU). On this project's CPU the gain
        measured on the demo LM was small (~1% for lookahead: its host work had shrunk to
        0.25 ms of a 2 ms step). Inside ``body``, :meth:`forward_logits` runs the model on the
        cache and ``engine.cache.apply_commit`` keeps tokens.

        ``body`` must be a pure function of its tensors and of this engine: its graph is
        compiled on the first call of ``name`` and, like the engine's own entry points, later
        calls with the same shapes skip Dynamo's guards, so a Python value that changes
        between calls would be silently baked in. Pass everything that varies as a tensor.

        Args:
            name: the graph's name in this engine (one graph per name and input shapes);
                ``"prefill"`` is the prompt's graph (shapes vary with the prompt bucket).
            body: ``body(engine, *tensors) -> tensors``.
            tensors: its tensor arguments.
            width: the most cache slots past the committed length the body writes (checked
                against the cache size before the call).
            forwards: model forwards the body runs (counted in :attr:`forward_passes`).
        """
        if self._length_bound + width > self.max_len:
            self._refresh_bound(width)
        known = self._graphs.get(name)
        if known is None or known[0] is not body:
            fn = self._compiler(types.MethodType(private_copy(body, f"engine{id(self):x}_{name}"), self))
            if self.cuda_graphs and name != "prefill":  # bookkeeping: the cache's lengths (and its buffers)
                fn = CudaGraphRunner(fn, state=[self.cache.lengths])
            known = self._graphs[name] = (body, fn)
        out = self._run(name, known[1], *tensors)
        self.forward_passes += forwards
        self._length_bound += width
        return out

    def forward_logits(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The model's logits ``[B, T, V]`` for ``tokens`` written at ``slots`` (traceable: for
        :meth:`run_graph` bodies; see :meth:`step` for the arguments). Nothing committed."""
        return self._forward(tokens, positions, slots, mask).logits

    def step_forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """What a verification step runs on its tokens, inside its graph (traceable):
        ``(tokens [B, T], logits [B, T, V], extras)``. Here the model's forward; an engine that
        drafts inside the step (self-speculation) overrides it and fills ``tokens`` from the
        root ``tokens[:, 0]`` with its deterministic guesses."""
        return tokens, self.forward_logits(tokens, positions, slots, mask), ()

    def step_after(self, verdict: Any, extras: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Tensors a step returns after its verdict and commit, in the same graph (draft heads:
        the next candidates); traceable. ``extras`` are :meth:`step_forward`'s."""
        return ()

    def prefill_forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, last: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The prefill's forward (traceable): ``ids [B, L]`` at slots == positions, ``last
        [B, 1]`` each row's last prompt token; returns ``(logits at last [B, V], *extras)``."""
        if self._accepts_logits_to_keep:
            return (self._forward(ids, positions, positions, mask, keep=last).logits[:, 0],)  # [B, V]
        logits = self._forward(ids, positions, positions, mask).logits  # [B, L, V]
        return (logits.gather(1, last[:, :, None].expand(-1, 1, logits.shape[-1]))[:, 0],)

    def frozen_weights_changed(self) -> bool:
        """Whether the model's weights changed since this engine froze them (``freeze=True``)."""
        return self._weights_at_freeze is not None and weights_fingerprint(self.model) != self._weights_at_freeze

    def commit(self, counts: torch.Tensor, accepted_slots: torch.Tensor | None = None) -> None:
        """Keep ``counts[b]`` accepted tokens per row (see :meth:`SlotCache.apply_commit`); the
        key/value moves run as a compiled graph per ``A``."""
        counts = counts.to(device=self.device, dtype=torch.long)
        if accepted_slots is not None:
            accepted_slots = accepted_slots.to(device=self.device, dtype=torch.long)
        self.cache.check_commit(counts, accepted_slots)
        if accepted_slots is None:
            self.cache.lengths.add_(counts)
        else:
            self.run_graph("commit", DecodeEngine._commit_body, counts, accepted_slots, width=0, forwards=0)
        self._length_bound = int(self.cache.lengths.max())

    # ---- calling the compiled graphs -----------------------------------------------------

    def _run(self, name: str, fn: Callable, *args: torch.Tensor) -> Any:
        """Call a compiled graph: no grad, the engine's attention implementation on the
        model's config for the call only, freezing on while it compiles, guards skipped once
        this shape has run."""
        # shapes, strides and dtypes: what the skipped guards would have checked on tensors
        key = (name, *((tuple(a.shape), a.stride(), a.dtype) for a in args))
        warm = key in self._warm
        config = self.model.config
        saved = config._attn_implementation_internal
        if self._attention is not None:
            config._attn_implementation_internal = self._attention
        try:
            try:
                out = self._call(name, fn, args, warm)
            except RuntimeError as error:
                # A warm shape with no compiled code: Dynamo's caches were cleared
                # (torch._dynamo.reset()). The failed call stopped before any compiled code
                # ran; compile again with the guards on.
                if not (warm and self._skip_guards and "skip_guard_eval_unsafe" in str(error)):
                    raise
                self._warm.clear()
                out = self._call(name, fn, args, False)
        finally:
            config._attn_implementation_internal = saved
        self._warm.add(key)
        return out

    def _call(self, name: str, fn: Callable, args: tuple, warm: bool) -> Any:
        regional = self._regional.installed(dynamic=name == "prefill") if self._regional else contextlib.nullcontext()
        head = self._packed.head_installed() if self._packed and self._regional else contextlib.nullcontext()
        with torch.no_grad(), _freezing(self._freeze and not warm), _skip_guards(self._skip_guards and warm), regional, head:
            return fn(*args)

    # ---- traced bodies ------------------------------------------------------------------

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> Any:
        """The model's forward with the cache writing at ``slots``; its output object.

        ``mask`` is the step's full-attention mask; sliding-window layers get it narrowed to
        their window (one mask when every layer slides, a dict keyed by layer type when the
        types alternate), so the model's own sliding window is kept exactly.
        """
        kwargs: dict[str, Any] = {} if keep is None else {"logits_to_keep": keep}
        if hidden:
            kwargs["output_hidden_states"] = True
        masks = layer_masks(mask, positions, slots, attention_windows(self.model.config))
        self.cache.set_write_slots(slots)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=model_mask(masks),
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                **kwargs,
            )
        finally:
            self.cache.set_write_slots(None)
        return out

    def _prefill_body(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # ids: [B, L]; lengths: [B]
        batch, width = ids.shape
        slots = torch.arange(width, device=ids.device)[None, :].expand(batch, width)  # [B, L]
        mask = chain_mask(slots, self.cache.max_len, self.cache.dtype)  # [B, 1, L, S]
        # The bucket's padded tail is scratch; clamp its positions so a model with learned
        # positions (GPT-2's n_positions) never indexes past its table.
        positions = slots.clamp(max=self._max_position - 1) if self._max_position else slots
        out = self.prefill_forward(ids, positions, mask, (lengths - 1)[:, None])
        self.cache.lengths.copy_(lengths)
        return out

    def _decode_body(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, 1]; slot == position == committed length
        slots = self.cache.lengths[:, None].clone()  # [B, 1]
        mask = chain_mask(slots, self.cache.max_len, self.cache.dtype)  # [B, 1, 1, S]
        logits = self._forward(tokens, slots, slots, mask).logits  # [B, 1, V]
        self.cache.lengths.add_(1)
        return logits[:, 0]

    def _step_body(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_logits(tokens, positions, slots, mask)

    def _step_hidden_body(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._forward(tokens, positions, slots, mask, hidden=True)
        return out.logits, out.hidden_states[-1]

    def _commit_body(self, counts: torch.Tensor, accepted_slots: torch.Tensor) -> None:
        self.cache.apply_commit(counts, accepted_slots)

    # ---- checks -------------------------------------------------------------------------

    def _refresh_bound(self, width: int) -> None:
        self._length_bound = int(self.cache.lengths.max())
        if self._length_bound + width > self.max_len:
            raise ValueError(
                f"the KV cache is full: a row holds {self._length_bound} of {self.max_len} slots and the "
                f"step adds {width}, which would overflow it; build the engine with a larger max_len"
            )

    def _check_step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> None:
        batch, width = tokens.shape if tokens.ndim == 2 else (None, None)
        if batch != self.batch_size:
            raise ValueError(f"step: tokens must be [B={self.batch_size}, T], got {tuple(tokens.shape)}")
        for name, t in (("positions", positions), ("slots", slots)):
            if t.shape != tokens.shape:
                raise ValueError(f"step: {name} must have the shape of tokens {tuple(tokens.shape)}, got {tuple(t.shape)}")
        if mask.shape != (batch, 1, width, self.max_len) or mask.dtype != self.cache.dtype:
            raise ValueError(
                f"step: mask must be an additive {self.cache.dtype} mask of shape "
                f"{(batch, 1, width, self.max_len)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if int(slots.min()) < 0 or int(slots.max()) >= self.max_len:
            raise ValueError(f"step: slots must lie in [0, {self.max_len}), got [{int(slots.min())}, {int(slots.max())}]")


# What one more prefill call costs beyond its tokens' arithmetic, in prompt tokens: it streams
# the weights once more, ~40 ms for SmolLM2-135M's 538 MB on one core of an AVX2 EPYC, the time
# that core takes for ~12 of its tokens (80 GFLOP/s, 0.27 GFLOP a token); rounded up.
PREFILL_CALL_TOKENS = 16


def _regional_width(length: int) -> int:
    """A regional prefill's padded length (its graph takes every length): a multiple of 8."""
    return -(-length // 8) * 8


def _rows_apart(lengths: list[int], bucket: int) -> bool:
    """Whether prefilling row by row (each padded to a multiple of 8) saves more padded tokens
    than its extra calls cost (:data:`PREFILL_CALL_TOKENS` each)."""
    own = sum(map(_regional_width, lengths))
    return len(lengths) > 1 and len(lengths) * bucket - own > PREFILL_CALL_TOKENS * (len(lengths) - 1)


def _stack_rows(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One-row outputs ``[1, ...]`` as a batch ``[B, ...]``, each zero-padded to the largest."""
    shape = [max(sizes) for sizes in zip(*(part.shape[1:] for part in parts), strict=True)]
    out = parts[0].new_zeros(len(parts), *shape)
    for row, part in enumerate(parts):
        out[(row, *(slice(0, n) for n in part.shape[1:]))] = part[0]
    return out


def _learned_positions(config: Any) -> int | None:
    """Size of a learned position table (GPT-2's ``n_positions``), ``None`` for rotary models."""
    if getattr(config, "position_embedding_type", None) == "rope" or hasattr(config, "rope_theta") or getattr(config, "rope_parameters", None):
        return None
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (shared ones counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """Identity and in-place-modification counter of every parameter: changes when weights are
    replaced or updated in place (optimizer steps, ``load_state_dict``)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


# Regional compilation by default from this size of weights on CPU: far beyond the caches, a
# step is bound by streaming the weights, so whole-graph fusion and freezing gain little while
# compiling every layer into one graph costs minutes (SmolLM2-135M: 538 MB in fp32).
REGIONAL_MIN_BYTES = 128 * 2**20
CPU_INDUCTOR_OPTIONS: dict[str, Any] = {
    # one matmul for q/k/v and one for gate/up (with freezing): fewer, larger GEMVs
    "cpp.enable_concat_linear": True,
    # MKL-packed weights are slower than a plain GEMV on a pre-transposed weight at batch 1
    "cpp.weight_prepack": False,
    # int8 weight-only (torchao) linears: ATen widens each weight, the matmul takes the view
    "post_grad_custom_pre_pass": WidenQuantizedWeights(),
}
CPU_AUTOTUNE_OPTIONS: dict[str, Any] = {
    # mode="max-autotune" on CPU: every matmul shape benchmarks Inductor's C++ GEMM template
    # (micro-kernels on the frozen, packed weights) against MKL and keeps the faster
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "cpp.weight_prepack": True,
    "post_grad_custom_pre_pass": WidenQuantizedWeights(),
}
FREEZING_OPTIONS: dict[str, Any] = {
    "freezing": True,
    # every frozen matmul weight row-major [in, out] (folded once by freezing)
    "joint_custom_post_pass": ContiguousWeightsForFreezing(),
}


def _freezing(on: bool) -> contextlib.AbstractContextManager:
    """Inductor reads ``freezing`` while Dynamo traces (to make weights graph constants), so it
    must be set globally around the compiling call, not only in ``options``."""
    return torch._inductor.config.patch(freezing=True) if on else contextlib.nullcontext()


def _skip_guards(on: bool) -> contextlib.AbstractContextManager:
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if on else contextlib.nullcontext()


def _compiler(
    enabled: bool,
    backend: Backend,
    mode: str | None,
    options: dict[str, Any] | None,
    dynamic: bool = False,
    packed: bool = False,
) -> Callable:
    """``fn -> torch.compile(fn, fullgraph=True, dynamic=dynamic, ...)``, or identity when disabled;
    ``packed``: every linear of the graphs through :func:`~dynexec_compile.backends.packed.packed_linear`."""
    if not enabled:
        if mode is not None or options:
            raise ValueError("mode/options are compile settings; they need compile=True")
        return lambda fn: fn
    if mode is not None and options:
        raise ValueError("torch.compile takes either mode or options, not both")
    if packed:  # the backend as a callable behind the rewrite (mode and options go to Inductor's wrapper)
        if backend == "inductor":
            inner = torch._TorchCompileInductorWrapper(mode, options, dynamic)
        elif mode is not None or options:
            raise ValueError("mode/options are Inductor settings; backend is not 'inductor'")
        else:
            inner = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        backend, mode, options = packing_backend(inner), None, None

    def compile_fn(fn: Callable) -> Callable:
        return torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic, mode=mode, options=options)

    return compile_fn
