"""Train Medusa-style draft heads for SmolLM2-135M-Instruct on CPU and write a model card.

Self-distilled: the model answers chat prompts the project builds offline
(``dynexec_compile.models.chat_prompts(split="train")``: SST-2 train reviews to rewrite,
standard-library functions to annotate, summaries), greedily with dynexec's compiled
decoding (the answers are kept in ``$DYNEXEC_CACHE`` for reruns); the heads then learn,
teacher-forced on prompt + answer, the model's own predictions 2..k+1 tokens ahead
(``dynexec_compile.train_draft_heads``), trained and measured only at the positions where they
will draft: from the prompt's last token on. Benchmarks use the
``split="bench"`` prompts (SST-2 validation, held-out stdlib files, other questions).

    nohup python examples/train_smollm2_heads.py > smollm2_heads.log 2>&1 &

``--what exit-adapter`` trains, on the same answers, the exit adapter for
``strategy="self_speculative", exit_layer=E, exit_head="trained"``
(``dynexec_compile.train_exit_lm_head(head="adapter")``) into ``exit-adapter/``.

``--what eagle`` trains the EAGLE draft (``dynexec_compile.train_eagle_draft``) into ``eagle/``
on every position of those chats, plus ``--free-form N`` self-generated answers to free-form
questions (:func:`free_form_questions`) and ``--copy-conversations N`` teacher-forced chats that
repeat their request; ``--agreement DRAFT...`` only measures drafts on the bench answers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dynexec_compile as dx
from dynexec_compile.bench.common import left_padded
from dynexec_compile.decoding.draft_heads import DraftHeads
from dynexec_compile.elastic.prompt import chat_ids
from dynexec_compile.models import chat_prompts, dynexec_cache_dir, load_lm

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "smollm2-135m-instruct"
NAME = "smollm2-135m-instruct"


def answers(model, tokenizer, prompts: list[torch.Tensor], new_tokens: int, batch: int) -> list[torch.Tensor]:
    """The model's own greedy answer (up to EOS) per prompt, ``[n_i]`` each."""
    eos = model.generation_config.eos_token_id
    out = []
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        ids, mask = left_padded(group, tokenizer.pad_token_id)
        seqs = dx.generate(model, ids, mask, max_new_tokens=new_tokens).sequences
        for row in range(len(group)):
            new = seqs[row, ids.shape[1] :]
            stop = (new == eos).nonzero()
            out.append(new[: int(stop[0]) + 1] if stop.numel() else new)
        print(f"answered {min(i + batch, len(prompts))}/{len(prompts)} prompts", flush=True)
    return out


def cached_answers(model, tokenizer, prompts: list[torch.Tensor], new_tokens: int, name: str,
                   batch: int = 8) -> list[torch.Tensor]:
    """:func:`answers`, kept in ``$DYNEXEC_CACHE`` (safetensors) so that a rerun with other training
    settings does not generate again; the file is keyed by the prompts' count and split."""
    path = dynexec_cache_dir() / f"{NAME}-answers-{name}-{len(prompts)}x{new_tokens}.safetensors"
    if path.exists():
        stored = load_file(path)
        return [stored[str(i)] for i in range(len(prompts))]
    out = answers(model, tokenizer, prompts, new_tokens, batch=batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({str(i): a.contiguous() for i, a in enumerate(out)}, path)
    return out


def command(args, *left_out: str) -> str:
    """The command line that trained a file (without ``--out``, unset options and ``left_out``)."""
    given = {k: v for k, v in vars(args).items() if k not in ("out", *left_out) and v is not None}
    return "python examples/train_smollm2_heads.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())


@torch.no_grad()
def agreement(model, heads: DraftHeads, prompts: list[torch.Tensor], replies: list[torch.Tensor]) -> list[float]:
    """Per head ``i``: how often its top-1 guess at position ``t`` equals the model's own top-1
    at ``t + i`` (the token ``t + 1 + i``), teacher-forced, over the positions where drafting
    happens: from the prompt's last token on, guessing answer tokens only."""
    hits, total = torch.zeros(heads.num_heads), torch.zeros(heads.num_heads)
    lm_head = model.get_output_embeddings()
    for prompt, reply in zip(prompts, replies):
        seq = torch.cat([prompt, reply])
        h = model.base_model(input_ids=seq[None]).last_hidden_state  # [1, S, D]
        target = lm_head(h).argmax(-1)[0]  # [S]: the model's next token at each position
        guesses = heads(h, lm_head).argmax(-1)[0]  # [S, k]
        first = len(prompt) - 1  # the last prompt token predicts the first answer token
        for i in range(1, heads.num_heads + 1):
            # head i at t (t >= first) guesses target[t + i]; t + i must stay inside the sequence
            hits[i - 1] += (guesses[first : len(seq) - i, i - 1] == target[first + i :]).sum()
            total[i - 1] += target[first + i :].numel()
    return (hits / total).tolist()


@torch.no_grad()
def exit_agreement(model, head, exit_layer: int, prompts: list[torch.Tensor], replies: list[torch.Tensor]) -> float:
    """How often the exit head's top-1 on block ``exit_layer - 1``'s output equals the model's own
    next token, teacher-forced, at the answer positions (the first drafted token's acceptance)."""
    hits = total = 0
    for prompt, reply in zip(prompts, replies):
        seq = torch.cat([prompt, reply])[None]
        out = model(input_ids=seq, output_hidden_states=True)
        first = len(prompt) - 1
        target = out.logits[0, first:].argmax(-1)
        guess = head(out.hidden_states[exit_layer][0, first:]).argmax(-1)
        hits += int((guess == target).sum())
        total += target.numel()
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=480, help="training chat prompts")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--offsets", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--what", choices=["draft-heads", "exit-adapter", "eagle"], default="draft-heads")
    parser.add_argument("--vocab", type=int, default=8192, help="eagle: the draft's vocabulary (most frequent tokens)")
    parser.add_argument("--copy-conversations", type=int, default=0,
                        help="eagle: also train on this many teacher-forced chats whose answer repeats the text "
                        "of its request (SST-2 train reviews, non-held-out stdlib functions)")
    parser.add_argument("--free-form", type=int, default=0,
                        help="eagle: also train on the model's own answers to this many free-form questions")
    parser.add_argument("--init", type=Path, default=None, metavar="DRAFT",
                        help="eagle: train this draft further (its training.json is kept in the new card)")
    parser.add_argument("--agreement", type=Path, nargs="+", default=None, metavar="DRAFT",
                        help="eagle: only print these draft files' held-out first-guess agreement, by kind of prompt")
    parser.add_argument("--exit-layer", type=int, default=15, help="E of the exit adapter (the bench's self-speculation layer)")
    parser.add_argument("--out", type=Path, default=None, help="default: models/smollm2-135m-instruct/{draft-heads,exit-adapter}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_lm(NAME)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    train_prompts = chat_prompts(tokenizer, args.prompts, "train")
    held_prompts = chat_prompts(tokenizer, 12, "bench")
    train = cached_answers(model, tokenizer, train_prompts, args.new_tokens, "train")
    held = cached_answers(model, tokenizer, held_prompts, args.new_tokens, "bench")
    if args.agreement:
        for path in args.agreement:
            draft = dx.load_eagle_draft(path, dtype=torch.float32)
            print(path, json.dumps(eagle_agreement_by_kind(model, draft, held_prompts, held)), flush=True)
        return None
    gen_cpu, gen_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    # one sequence per step; only the positions that draft answer tokens are trained
    data = []
    for prompt, reply in zip(train_prompts, train):
        seq = torch.cat([prompt, reply])[None]  # [1, S]
        mask = torch.zeros_like(seq, dtype=torch.bool)
        mask[:, len(prompt) - 1 :] = True
        data.append((seq, mask))
    if args.what == "eagle":
        return train_eagle(args, model, tokenizer, data, held_prompts, held, gen_cpu, gen_wall)
    data = [item for _ in range(args.epochs) for item in data]
    if args.what == "exit-adapter":
        return train_exit_adapter(args, model, data, held_prompts, held, gen_cpu, gen_wall, len(train))
    cpu1, wall1 = time.process_time(), time.perf_counter()
    heads = dx.train_draft_heads(model, data, offsets=args.offsets, lr=args.lr)
    train_cpu, train_wall = time.process_time() - cpu1, time.perf_counter() - wall1
    untrained = DraftHeads(model.config.hidden_size, args.offsets, vocab_size=model.config.vocab_size)
    before = agreement(model, untrained, held_prompts, held)
    after = agreement(model, heads, held_prompts, held)
    out = args.out or MODEL_DIR / "draft-heads"
    out.mkdir(parents=True, exist_ok=True)
    dx.save_draft_heads(heads, out / "heads.safetensors", dtype=torch.bfloat16)
    summary = {
        "command": command(args),
        "training_sequences": len(train),
        "training_answer_tokens": int(sum(a.numel() for a in train)),
        "self_generation": {"cpu_s": round(gen_cpu, 1), "wall_s": round(gen_wall, 1)},
        "head_training": {"cpu_s": round(train_cpu, 1), "wall_s": round(train_wall, 1), "steps": len(data)},
        "threads": args.threads,
        "top1_agreement_per_offset_heldout_answers": {"untrained (identity blocks)": before, "trained": after},
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def train_exit_adapter(args, model, data, held_prompts, held, gen_cpu: float, gen_wall: float, sequences: int) -> None:
    from dynexec_compile.decoding.layers import DecoderStack
    from dynexec_compile.decoding.self_speculative import AdapterExitHead

    cpu1, wall1 = time.process_time(), time.perf_counter()
    adapter = dx.train_exit_lm_head(model, data, args.exit_layer, head="adapter", lr=args.lr)
    train_cpu, train_wall = time.process_time() - cpu1, time.perf_counter() - wall1
    shared = exit_agreement(model, DecoderStack(model).logits, args.exit_layer, held_prompts, held)
    trained = exit_agreement(model, AdapterExitHead(model, adapter.blocks[0]), args.exit_layer, held_prompts, held)
    out = args.out or MODEL_DIR / "exit-adapter"
    out.mkdir(parents=True, exist_ok=True)
    dx.save_draft_heads(adapter, out / "adapter.safetensors", dtype=torch.bfloat16)
    summary = {
        "command": command(args, "offsets"),
        "exit_layer": args.exit_layer,
        "training_sequences": sequences,
        "self_generation": {"cpu_s": round(gen_cpu, 1), "wall_s": round(gen_wall, 1)},
        "adapter_training": {"cpu_s": round(train_cpu, 1), "wall_s": round(train_wall, 1), "steps": len(data)},
        "threads": args.threads,
        "top1_agreement_heldout_answers": {"shared head": shared, "trained adapter": trained},
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


@torch.no_grad()
def eagle_agreement(model, draft, prompts: list[torch.Tensor], replies: list[torch.Tensor]) -> float:
    """How often the draft's first guess (from the model's true features, teacher-forced; its
    vocabulary plus the prompt's tokens, as decoding) equals the model's own next token, over the
    answer tokens it would guess."""
    return _ratio(_agreement_counts(model, draft, prompts, replies))


def eagle_agreement_by_kind(model, draft, prompts: list[torch.Tensor], replies: list[torch.Tensor]) -> dict[str, float]:
    """:func:`eagle_agreement` over all bench prompts and over each kind (``chat_prompts``
    interleaves reviews, code and free-form questions); each prompt runs once."""
    counts = _agreement_counts(model, draft, prompts, replies)
    kinds = {name: _ratio(counts[k::3]) for k, name in enumerate(("reviews", "code", "free_form"))}
    return {"all": _ratio(counts), **kinds}


def _agreement_counts(model, draft, prompts: list[torch.Tensor], replies: list[torch.Tensor]) -> list[tuple[int, int]]:
    """Per prompt: ``(first guesses equal to the model's token, guesses)`` (see :func:`eagle_agreement`)."""
    from dynexec_compile.decoding.eagle import DraftRunner
    from dynexec_compile.decoding.layers import DecoderStack

    runner = DraftRunner(draft, DecoderStack(model), 1, 1)
    counts = []
    for prompt, reply in zip(prompts, replies):
        seq = torch.cat([prompt, reply])[None]  # [1, S]
        h = model.get_decoder()(input_ids=seq).last_hidden_state  # [1, S, D]
        target = model.get_output_embeddings()(h).argmax(-1)[0]  # [S]: the model's token after each position
        runner.new_cache(1, seq.shape[1] - 1)
        runner.set_request_vocab(prompt[None], torch.tensor([len(prompt)]))  # as decoding does
        positions = torch.arange(seq.shape[1] - 1)[None]
        guesses = runner.guess(runner.pairs(h[:, :-1], seq[:, 1:], positions))[0]  # [S - 1]: pair p guesses target[p + 1]
        first = len(prompt) - 1  # pair p = first: the first answer token follows; it guesses the second
        counts.append((int((guesses[first:-1] == target[first + 1 : -1]).sum()), target[first + 1 : -1].numel()))
    return counts


def _ratio(counts: list[tuple[int, int]]) -> float:
    return sum(hits for hits, _ in counts) / max(sum(total for _, total in counts), 1)


def copy_conversations(tokenizer, n: int) -> list[torch.Tensor]:
    """``n`` chats whose assistant turn is the text of the user's request, teacher-forced (not
    the model's own answer): SST-2 train reviews and non-held-out stdlib functions, alternating."""
    from dynexec_compile.data import load_sst2
    from dynexec_compile.models import _CODE_TASKS, _REVIEW_TASKS, _stdlib_functions

    reviews = [s for s, _ in load_sst2("train") if 60 <= len(s) <= 240]
    functions = _stdlib_functions(held_out=False, max_lines=30)
    out = []
    for i in range(n):
        if i % 2:
            text = functions[(i * 7919) % len(functions)]
            request, answer = _CODE_TASKS[i % len(_CODE_TASKS)].format(text=text), f"```python\n{text}\n```"
        else:
            text = reviews[(i * 104729 + 11) % len(reviews)]
            request, answer = _REVIEW_TASKS[i % len(_REVIEW_TASKS)].format(text=text), text
        chat = [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        out.append(torch.tensor(ids[:512], dtype=torch.long)[None])
    return out


# Free-form training questions: subjects and phrasings apart from the benchmark's own eight
# (models._FREE_FORM: habits for maintainable code, lists and tuples, the sky, pull requests,
# hash tables, debugging, reversing strings, the seasons), which stay unseen.
_TOPICS = (
    "recursion", "photosynthesis", "the water cycle", "unit testing", "version control", "memory management",
    "black holes", "volcanoes", "binary search", "object-oriented programming", "rainbows", "the phases of the moon",
    "exceptions in Python", "regular expressions", "decorators in Python", "generators in Python",
    "dictionaries in Python", "sorting algorithms", "the internet", "compilers", "electric circuits", "gravity",
    "healthy sleep", "time management", "learning a new language", "public speaking", "writing clear emails",
    "code comments", "API design", "databases", "caching", "concurrency", "floating-point numbers", "prime numbers",
    "the human heart", "bees", "coffee", "chess", "tides", "earthquakes",
)
_TOPIC_TASKS = (
    "Explain {t} in simple terms.", "What are three interesting facts about {t}?", "Write a short paragraph about {t}.",
    "Give me a short checklist about {t}.", "Why does {t} matter? Answer in two sentences.", "Write a haiku about {t}.",
)
_MODULE_TASKS = (
    "What is the Python module `{t}` used for? Give a short example.",
    "When would I use Python's `{t}` module? Explain briefly.",
)
# the second block of questions (session 16): more topics and phrasings, after the first block
_TOPICS_2 = (
    "machine learning", "neural networks", "encryption", "strong passwords", "open source software",
    "operating systems", "linked lists", "graphs in computer science", "dynamic programming", "big O notation", "HTTP",
    "DNS", "JSON", "CSV files", "type hints in Python", "virtual environments in Python",
    "list comprehensions in Python", "context managers in Python", "the global interpreter lock", "garbage collection",
    "continuous integration", "logging", "refactoring", "technical debt", "pair programming", "the solar system",
    "the moon landing", "dinosaurs", "the ocean", "rain forests", "deserts", "glaciers", "clouds", "lightning",
    "magnets", "sound waves", "light", "atoms", "DNA", "vaccines", "the immune system", "exercise", "nutrition",
    "meditation", "reading books", "budgeting", "saving money", "job interviews", "teamwork", "giving feedback",
    "taking notes", "gardening", "cooking pasta", "baking bread", "tea", "cats", "dogs", "bird migration", "trees",
    "the Roman Empire", "the printing press", "electricity", "trains", "bicycles", "maps", "music theory",
)
_TOPIC_TASKS_2 = (
    "How would you explain {t} to a ten-year-old?", "What are the pros and cons of {t}?",
    "List five key terms related to {t}, with a one-line definition of each.", "What is a common misconception about {t}?",
)
_MODULE_TASKS_2 = (
    "What are common mistakes when using Python's `{t}` module?",
    "Show a small example that uses Python's `{t}` module and explain each line.",
)


def free_form_blocks() -> list[list[str]]:
    """The free-form questions in blocks, each topics x phrasings and the standard library's
    public modules x phrasings, interleaved so that any prefix mixes them. Answers are cached per
    block, so a new block goes after the others: a run that takes more questions than before
    reuses the answers to every block it takes whole."""
    modules = sorted(m for m in sys.stdlib_module_names if not m.startswith("_"))

    def mix(topical: list[str], modular: list[str]) -> list[str]:
        return [q for pair in zip(topical, modular) for q in pair] + topical[len(modular):] + modular[len(topical):]

    first = mix([task.format(t=t) for task in _TOPIC_TASKS for t in _TOPICS],
                [task.format(t=m) for task in _MODULE_TASKS for m in modules])
    topical = [task.format(t=t) for task in _TOPIC_TASKS_2 for t in _TOPICS + _TOPICS_2]
    topical += [task.format(t=t) for task in _TOPIC_TASKS for t in _TOPICS_2]
    second = mix(topical, [task.format(t=m) for task in _MODULE_TASKS_2 for m in modules])
    return [first, second]


def free_form_questions(tokenizer, n: int) -> list[list[torch.Tensor]]:
    """The first ``n`` free-form questions as chat prompts, by block (:func:`free_form_blocks`)."""
    blocks, left, out = free_form_blocks(), n, []
    if n > sum(map(len, blocks)):
        raise ValueError(f"--free-form: at most {sum(map(len, blocks))} questions, got {n}")
    for block in blocks:
        taken, left = block[:left], left - min(left, len(block))
        if taken:
            out.append([chat_ids(tokenizer, q)[0] for q in taken])
    return out


def train_eagle(args, model, tokenizer, data, held_prompts, held, gen_cpu: float, gen_wall: float) -> None:
    from dynexec_compile.decoding.eagle import EagleDraft

    free = []
    if args.free_form:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for questions in free_form_questions(tokenizer, args.free_form):  # answers cached per block
            digest = hashlib.sha256(b"".join(q.numpy().tobytes() for q in questions)).hexdigest()[:8]
            replies = cached_answers(model, tokenizer, questions, args.new_tokens, f"free{digest}", batch=16)
            free += [torch.cat([q, r])[None] for q, r in zip(questions, replies, strict=True)]
        gen_cpu, gen_wall = gen_cpu + time.process_time() - cpu0, gen_wall + time.perf_counter() - wall0
    cpu1, wall1 = time.process_time(), time.perf_counter()
    sequences = [seq for seq, _ in data] + free  # every position: the prompts' text too
    copies = copy_conversations(tokenizer, args.copy_conversations)
    sequences += copies
    # --init: read before the new draft overwrites it (the default --out is the same folder)
    start = dx.load_eagle_draft(args.init, dtype=torch.float32) if args.init else None
    earlier = json.loads((args.init.parent / "training.json").read_text()) if args.init else None
    draft = dx.train_eagle_draft(model, sequences, draft=start, vocab=args.vocab, epochs=args.epochs, lr=args.lr)
    train_cpu, train_wall = time.process_time() - cpu1, time.perf_counter() - wall1
    torch.manual_seed(0)
    before = start if args.init else EagleDraft(model.config, draft.vocab)
    out = args.out or MODEL_DIR / "eagle"
    out.mkdir(parents=True, exist_ok=True)
    dx.save_eagle_draft(draft, out / "draft.safetensors", dtype=torch.bfloat16)
    by_kind = eagle_agreement_by_kind(model, draft, held_prompts, held)
    summary = {
        "command": command(args, "offsets", "exit_layer"),
        "training_sequences": len(sequences),
        "of_which_self_generated_free_form_chats": len(free),
        "of_which_teacher_forced_copy_chats": len(copies),
        "training_tokens": int(sum(s.numel() for s in sequences)),
        "self_generation": {"cpu_s": round(gen_cpu, 1), "wall_s": round(gen_wall, 1)},
        "draft_training": {"cpu_s": round(train_cpu, 1), "wall_s": round(train_wall, 1), "steps": len(sequences) * args.epochs},
        "threads": args.threads,
        "draft_vocab": int(draft.vocab.numel()),
        "first_guess_agreement_heldout_answers": {
            ("before_this_stage" if args.init else "untrained"): eagle_agreement(model, before, held_prompts, held),
            "trained": by_kind["all"],
            "trained_by_kind": by_kind,
        },
    }
    if earlier is not None:
        summary["earlier_stage"] = earlier  # the draft this run started from
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
