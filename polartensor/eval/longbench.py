"""LongBench (Bai et al., arXiv 2308.14508) in its own jsonl format: prompts, lengths, metrics.

A LongBench data directory holds ``<dataset>.jsonl`` files whose lines are
``{"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}``.
Prompts, generation lengths and metrics follow LongBench's ``dataset2prompt.json``,
``dataset2maxlen.json`` and ``metrics.py`` (rewritten here; the code-similarity metric uses
difflib's ratio instead of fuzzywuzzy's, which is the same Levenshtein-style ratio on 0..1
up to implementation details). Data cannot be downloaded on our machines: the tests and the
committed demo run use a small fixture that :func:`make_fixture` generates from the offline
essays in the same format.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import string
from collections import Counter
from pathlib import Path

__all__ = ["DATASET_MAXLEN", "DATASET_METRIC", "PROMPTS", "load_dataset", "make_fixture",
           "score_dataset", "split_prompt"]

_QA = ("Answer the question based on the given passages. Only give me the answer and do not "
       "output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the "
       "question based on the given passages. Only give me the answer and do not output any "
       "other words.\n\nQuestion: {input}\nAnswer:")
PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a "
    "question. Answer the question asconcisely as you can, using a single phrase if possible. Do "
    "not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the "
    "story asconcisely as you can, using a single phrase if possible. Do not provide any "
    "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as "
    "concisely as you can, using a single phrase or sentence if possible. If the question cannot "
    "be answered based on the information in the article, write \"unanswerable\". If the "
    "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide "
    "any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article "
    "as concisely as you can, using a single phrase or sentence if possible. If the question "
    "cannot be answered based on the information in the article, write \"unanswerable\". If the "
    "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide "
    "any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer "
    "the following question based on the above text, only give me the answer and do not output "
    "any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": _QA, "2wikimqa": _QA, "musique": _QA,
    "gov_report": "You are given a report by a government agency. Write a one-page summary of "
    "the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\n"
    "Summary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or "
    "instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, "
    "answer the query based on the above meeting transcript in one or more sentences.\n\n"
    "Query: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. "
    "\n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of "
    "questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do "
    "not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some "
    "examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be "
    "duplicates. Please carefully read these paragraphs and determine how many unique paragraphs "
    "there are after removing duplicates. In other words, how many non-repeating paragraphs are "
    "there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after "
    "removing duplicates. The output format should only contain the number, such as 1, 2, 3, and "
    "so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. "
    "Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an "
    "abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. "
    "The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
DATASET_MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32,
    "musique": 32, "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64,
    "triviaqa": 32, "samsum": 128, "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64,
    "repobench-p": 64,
}
# LongBench does not wrap these in a chat template, and keeps only the first output line.
NO_CHAT = ("trec", "triviaqa", "samsum", "lcc", "repobench-p")
FIRST_LINE = ("trec", "triviaqa", "samsum")


# -- metrics (LongBench metrics.py) --------------------------------------------------------------
def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred_tokens, gt_tokens) -> float:
    common = Counter(pred_tokens) & Counter(gt_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_tokens), same / len(gt_tokens)
    return 2 * p * r / (p + r)


def qa_f1_score(pred: str, gt: str, **kw) -> float:
    return _f1(normalize_answer(pred).split(), normalize_answer(gt).split())


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_score(pred: str, gt: str, **kw) -> float:
    """ROUGE-L F1 on whitespace tokens (LongBench uses the ``rouge`` package's rouge-l f)."""
    a, b = pred.lower().split(), gt.lower().split()
    lcs = _lcs(a, b)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def classification_score(pred: str, gt: str, all_classes=None, **kw) -> float:
    matches = [c for c in (all_classes or []) if c in pred]
    matches = [m for m in matches if not (m in gt and m != gt)]
    return 1.0 / len(matches) if gt in matches else 0.0


def retrieval_score(pred: str, gt: str, **kw) -> float:
    m = re.findall(r"Paragraph (\d+)", gt)
    if not m:
        return 0.0
    nums = re.findall(r"\d+", pred)
    return (sum(n == m[0] for n in nums) / len(nums)) if nums else 0.0


def count_score(pred: str, gt: str, **kw) -> float:
    nums = re.findall(r"\d+", pred)
    return (sum(str(n) == str(gt) for n in nums) / len(nums)) if nums else 0.0


def code_sim_score(pred: str, gt: str, **kw) -> float:
    lines = [ln for ln in pred.lstrip("\n").split("\n")
             if "`" not in ln and "#" not in ln and "//" not in ln]
    first = lines[0] if lines else ""
    return difflib.SequenceMatcher(None, first, gt).ratio()


DATASET_METRIC = {
    "narrativeqa": qa_f1_score, "qasper": qa_f1_score, "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score, "2wikimqa": qa_f1_score, "musique": qa_f1_score,
    "gov_report": rouge_score, "qmsum": rouge_score, "multi_news": rouge_score,
    "trec": classification_score, "triviaqa": qa_f1_score, "samsum": rouge_score,
    "passage_count": count_score, "passage_retrieval_en": retrieval_score,
    "lcc": code_sim_score, "repobench-p": code_sim_score,
}


def score_one(dataset: str, pred: str, answers: list, all_classes=None) -> float:
    if dataset in FIRST_LINE:
        pred = pred.lstrip("\n").split("\n")[0]
    metric = DATASET_METRIC[dataset]
    return max(metric(pred, str(gt), all_classes=all_classes) for gt in answers)


def score_dataset(dataset: str, preds: list[str], docs: list[dict]) -> float:
    """LongBench's per-dataset score: 100 x mean of the best match over the answers."""
    if not preds:
        return float("nan")
    total = sum(score_one(dataset, p, d["answers"], d.get("all_classes"))
                for p, d in zip(preds, docs))
    return 100.0 * total / len(preds)


# -- data and prompts -----------------------------------------------------------------------------
def load_dataset(data_dir: str | Path, name: str, limit: int | None = None) -> list[dict]:
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a LongBench data directory holds <dataset>.jsonl files (unzip "
            "LongBench's data.zip there, or make a fixture with --make-fixture)")
    docs = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                docs.append(json.loads(line))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def split_prompt(dataset: str, doc: dict) -> tuple[str, str]:
    """(prompt up to the end of the context, the rest): the first part goes to the cache."""
    template = PROMPTS[dataset]
    head, tail = template.split("{context}")
    return head.format(input=doc.get("input", "")) + doc["context"], \
        tail.format(input=doc.get("input", ""))


# -- fixture ---------------------------------------------------------------------------------------
def _paragraphs(texts: list[str], min_chars: int = 300, max_chars: int = 900) -> list[str]:
    out = []
    for t in texts:
        t = re.sub(r"([.!?])([A-Z])", r"\1 \2", t)
        sents = re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", t).strip())
        cur = ""
        for s in sents:
            cur = f"{cur} {s}".strip()
            if len(cur) >= min_chars:
                out.append(cur[:max_chars])
                cur = ""
    return out


def make_fixture(out_dir: str | Path, texts: list[str], n: int = 4, paragraphs: int = 8,
                 seed: int = 0) -> list[str]:
    """Write a small LongBench-format fixture from real text: passage_retrieval_en,
    passage_count and multifieldqa_en files of ``n`` examples each. It is *not* LongBench data:
    it exercises the same format, prompts and metrics offline."""
    rng = random.Random(seed)
    paras = _paragraphs(texts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    rows = []
    for i in range(n):  # passage_retrieval_en: which paragraph is the "abstract" from
        pick = rng.sample(paras, paragraphs)
        target = rng.randrange(paragraphs)
        ctx = "\n\n".join(f"Paragraph {j + 1}: {p}" for j, p in enumerate(pick))
        first = re.split(r"(?<=[.!?])\s+", pick[target])[0]
        rows.append({"input": first, "context": ctx, "answers": [f"Paragraph {target + 1}"],
                     "length": len(ctx.split()), "dataset": "passage_retrieval_en",
                     "language": "en", "all_classes": None, "_id": f"fixture-pr-{i}"})
    made["passage_retrieval_en"] = rows
    rows = []
    for i in range(n):  # passage_count: unique paragraphs among repeats
        uniq = rng.randint(2, max(2, paragraphs // 2))
        base = rng.sample(paras, uniq)
        seq = base + [rng.choice(base) for _ in range(paragraphs - uniq)]
        rng.shuffle(seq)
        ctx = "\n\n".join(f"Paragraph {j + 1}: {p}" for j, p in enumerate(seq))
        rows.append({"input": "", "context": ctx, "answers": [uniq],
                     "length": len(ctx.split()), "dataset": "passage_count", "language": "en",
                     "all_classes": None, "_id": f"fixture-pc-{i}"})
    made["passage_count"] = rows
    rows = []
    names = ["Halvorsen", "Okonkwo", "Marchetti", "Vasquez", "Lindqvist", "Tanaka"]
    cities = ["Lisbon", "Nairobi", "Tromso", "Valparaiso", "Kyoto", "Tbilisi"]
    for i in range(n):  # multifieldqa_en: a fact inside real text
        pick = rng.sample(paras, paragraphs)
        who, city = rng.choice(names), rng.choice(cities)
        fact = f"Dr. {who} moved the company's research lab to {city} in 2011."
        pos = rng.randrange(paragraphs + 1)
        pick.insert(pos, fact)
        ctx = "\n\n".join(pick)
        rows.append({"input": f"To which city did Dr. {who} move the company's research lab?",
                     "context": ctx, "answers": [city], "length": len(ctx.split()),
                     "dataset": "multifieldqa_en", "language": "en", "all_classes": None,
                     "_id": f"fixture-mf-{i}"})
    made["multifieldqa_en"] = rows
    for name, docs in made.items():
        with open(out / f"{name}.jsonl", "w") as fh:
            for d in docs:
                fh.write(json.dumps(d) + "\n")
    return list(made)
