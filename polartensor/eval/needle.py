"""Needle-in-a-haystack construction and scoring (real essay haystack, several needles)."""

from __future__ import annotations

import dataclasses
import re

import torch

__all__ = ["NEEDLES", "Needle", "build_prompt", "greedy_continue", "prompt_parts", "score_answer"]


@dataclasses.dataclass(frozen=True)
class Needle:
    fact: str
    question: str
    answer_prefix: str
    keywords: tuple[str, ...]


NEEDLES: tuple[Needle, ...] = (
    Needle("The special magic number for the blue harbor is 7294.",
           "What is the special magic number for the blue harbor?",
           "The special magic number for the blue harbor is", ("7294",)),
    Needle("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on "
           "a sunny day.",
           "What is the best thing to do in San Francisco?",
           "The best thing to do in San Francisco is", ("sandwich", "Dolores Park")),
    Needle("The secret ingredient in Grandma Rosa's tomato soup is smoked paprika.",
           "What is the secret ingredient in Grandma Rosa's tomato soup?",
           "The secret ingredient in Grandma Rosa's tomato soup is", ("smoked paprika",)),
    Needle("The access code for the old lighthouse is 5813.",
           "What is the access code for the old lighthouse?",
           "The access code for the old lighthouse is", ("5813",)),
)


def score_answer(text: str, needle: Needle) -> float:
    """Fraction of the needle's keywords found in the generated text (case-insensitive)."""
    low = re.sub(r"\s+", " ", text.lower())
    return sum(k.lower() in low for k in needle.keywords) / len(needle.keywords)


def prompt_parts(tokenizer) -> tuple[str, str]:
    """(text before the user message, text after it up to the assistant turn)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "", "\n"
    marker = "@@HAYSTACK@@"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    pre, post = text.split(marker)
    return pre, post


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def build_prompt(tokenizer, haystack_ids: list[int], needle: Needle, context_len: int,
                 depth: float, max_new_tokens: int) -> tuple[list[int], list[int], dict]:
    """(context ids, question ids, info) for a prompt of about ``context_len`` tokens.

    The context (chat header + haystack with the needle at ``depth``, moved back to the
    nearest sentence end) goes to the cache; the question, the assistant header and the
    answer prefix form a second chunk that attends to it.
    """
    pre, post = prompt_parts(tokenizer)
    pre_ids = _encode(tokenizer, pre)
    q_ids = _encode(tokenizer, "\n\n" + needle.question + " Answer using the text above."
                    + post + needle.answer_prefix)
    needle_ids = _encode(tokenizer, " " + needle.fact + " ")
    budget = context_len - len(pre_ids) - len(q_ids) - len(needle_ids) - max_new_tokens
    if budget < 16:
        raise ValueError(f"context_len {context_len} is too short for the prompt")
    if len(haystack_ids) < budget:
        raise ValueError(f"haystack has {len(haystack_ids)} tokens, need {budget}")
    hay = haystack_ids[:budget]
    pos = int(round(depth * len(hay)))
    # move back to just after a sentence end so the needle is a sentence of its own
    ends = {i for i, t in enumerate(hay[:pos]) if tokenizer.decode([t]).rstrip().endswith(".")}
    if pos < len(hay) and ends:
        pos = max(ends) + 1
    ctx = pre_ids + hay[:pos] + needle_ids + hay[pos:]
    return ctx, q_ids, {"needle_token_pos": len(pre_ids) + pos, "tokens": len(ctx) + len(q_ids),
                        "depth_actual": pos / max(1, len(hay))}


@torch.no_grad()
def greedy_continue(model, cache, q_ids: list[int], max_new_tokens: int,
                    stop_ids: set[int] = frozenset()) -> list[int]:
    """Run the question chunk against ``cache``, then greedy-decode up to ``max_new_tokens``."""
    from .scoring import forward

    out = forward(model, torch.tensor([q_ids]), cache)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop_ids:
            break
        tokens.append(nxt)
        if len(tokens) == max_new_tokens:
            break
        out = forward(model, torch.tensor([[nxt]]), cache)
    return tokens
