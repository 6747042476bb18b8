"""Needle prompts: the needle sits at the requested depth, the prompt has the requested size."""

from __future__ import annotations

from polartensor.eval.common import ByteTokenizer
from polartensor.eval.needle import NEEDLES, build_prompt, score_answer


def test_build_prompt_depth_and_length():
    tok = ByteTokenizer()
    hay = tok.encode("Some words here. More words follow. " * 400)
    for depth in (0.0, 0.5, 1.0):
        ctx, q, info = build_prompt(tok, hay, NEEDLES[0], 2048, depth, 8)
        assert len(ctx) + len(q) + 8 <= 2048
        text = tok.decode(ctx)
        assert NEEDLES[0].fact in text
        assert abs(text.index(NEEDLES[0].fact) / len(text) - depth) < 0.05
        assert tok.decode(q).endswith(NEEDLES[0].answer_prefix)


def test_score_answer():
    n = NEEDLES[1]
    assert score_answer(" eat a sandwich and sit in Dolores Park", n) == 1.0
    assert score_answer(" eat a sandwich in a park", n) == 0.5
    assert score_answer(" 7294.", NEEDLES[0]) == 1.0
