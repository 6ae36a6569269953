"""Where the paper's evaluation harness asks its LLM judge, with which prompt, and how it reads
the reply.

Owns: for each scoring kind, which items reach the judge (those its exact rules leave
undecided), the harness's prompt texts (kept verbatim: the judge's answers depend on them), the
number of times it asks, and the verdict it takes from a reply; plus the record each judged item
carries (``{"model", "replies"}``). docs/scoring.md ("Judge") states each step and where the
harness does it.
Does not know: HTTP, caching or retries (:class:`~opsd_core.evaluation.judge.JudgeClient`), files,
aggregation, or which benchmark is which beyond the item's ``part`` (the harness's dataset name)
and its scoring kind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from opsd_core.evaluation import rules
from opsd_core.evaluation.items import BenchmarkItem
from opsd_core.evaluation.judge import JudgeClient
from opsd_core.evaluation.scorers import CIRCULAR_OFFSET

# Token caps the harness's judge wrapper sends: its default for multiple choice, 1024 for ChartQA.
MCQ_MAX_TOKENS = 2048
CHARTQA_MAX_TOKENS = 1024
# The harness asks again when a multiple-choice reply names no option, three askings in all.
MCQ_ASKINGS = 3
_CJK = re.compile("[\u4e00-\u9fff]")

_MCQ_EXAMPLE = "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
MCQ_TEMPLATE = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice "
    "question. You are provided with a question, several options, and an answer, and you need to find which "
    "option is most similar to the answer. If the meaning of all options are significantly different from the "
    "answer, output Z. Your should output a single uppercase character in A, B, C, D (if they are valid options), "
    "and Z. \n"
    f"Example 1: \n{_MCQ_EXAMPLE}Answer: a cute teddy bear\nYour output: A\n"
    f"Example 2: \n{_MCQ_EXAMPLE}Answer: Spider\nYour output: Z\n"
    "Example 3: \nQuestion: {question}?\nOptions: {options}\nAnswer: {answer}\nYour output: "
)
_CN_EXAMPLE = "问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n"
MCQ_TEMPLATE_CN = (
    "你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。你会被提供：一个问题，多个选项，一个答案。"
    "你的任务是找到与答案意义最相近的选项。如果所有选项的意义都与答案显著不同，则输出 Z。"
    "你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。"
    f"例 1:{_CN_EXAMPLE}答案: 一只可爱的泰迪熊\n输出: A\n"
    f"例 2: \n{_CN_EXAMPLE}答案: 蜘蛛\n输出: Z\n"
    "例 3: \n问题: {question}?\n选项: {options}\n答案: {answer}\n输出: "
)
_BLINK_LINES = (
    "You are an AI assistant that matches an answer to one of the provided single-choice options.",
    "",
    "Task:",
    "",
    "Read the Question, the Options, and the Answer.",
    "Decide which option\u2019s meaning is semantically closest to the Answer.",
    "Output ONLY one of: (A), (B), (C), (D, if present), or (Z). Do not add any extra text.",
    "Rules:",
    "",
    (
        "If the Answer explicitly refuses to answer, cannot help, or indicates it will not choose (e.g., \u201cI "
        "can\u2019t help\u201d, \u201cI refuse\u201d, \u201cnot sure\u201d, \u201cno answer\u201d), output (Z)."
    ),
    "If the Answer does not correspond to any option, or its meaning conflicts with all options, output (Z).",
    "If the Answer mentions/chooses one of the options by label or clear description, map it directly to that option.",
    "If multiple options appear in the Answer, choose the one most strongly endorsed; if still ambiguous, output (Z).",
    (
        "Ignore the \u201c(Z) Failed\u201d line in the prompt examples; it\u2019s just a label, not an option to "
        "select from the task. Only output (Z) when the above rules require it."
    ),
    (
        "If options include more than A/B/C/D, only consider those explicitly listed. If an option label is "
        "missing in the provided list, do not output it."
    ),
    "If the Answer uses synonyms or paraphrases of an option, choose the best semantic match.",
    "If the Answer contradicts itself, or contains both a refusal and a choice, treat it as refusal \u2192 output (Z).",
    "Output format must be exactly one of: (A) or (B) or (C) or (D) or (Z).",
    "Examples:",
    "",
    "Example 1:",
    "Question: Which point is closer to the camera?",
    "Options:",
    "A. Point A",
    "B. Point B",
    "(Z) Failed",
    "Answer: Point B, where the child is sitting, is closer to the camera.",
    "Your output: (B)",
    "",
    "Example 2:",
    "Question: Which point is closer to the camera?",
    "Options:",
    "(A) Point A",
    "(B) Point B",
    "(Z) Failed",
    "Answer: I'm sorry, but I can't assist with that request.",
    "Your output: (Z)",
    "",
    "Example 3:",
    "Question: Which point is corresponding to the reference point?",
    "Options:",
    "(A) Point A",
    "(B) Point B",
    "(C) Point C",
    "(D) Point D",
    "(Z) Failed",
    (
        "Answer: The reference point (REF) on the first image is at the tip of the pot... Therefore, there is no "
        "correct answer in the choices."
    ),
    "Your output: (Z)",
    "",
    "Example 4:",
    "Question: {question}?",
    "Options: {options}",
    "(Z) Failed",
    "Answer: {answer}",
    "Your output:",
)
# The harness's BLINK prompt is an indented triple-quoted string: every line keeps 8 spaces.
MCQ_TEMPLATE_BLINK = "\n" + "\n".join(f"        {line}" if line else "" for line in _BLINK_LINES) + "\n    "
_CHARTQA_EXAMPLES = (
    (
        "What is the difference in value between mutton and corn?",
        (
            "I subtract the value of corn from the value of mutton: 103.7 - 103.13 = 0.57. Therefore, the "
            "difference in value between mutton and corn is 0.57."
        ),
        "0.57",
    ),
    ("Is the average of all bars in 55 to 64 age group greater than average of 25 to 64 age group?", "No", "No"),
    ("How much does the value of Approve decrease from Jul 2015 to Sep 2015?",
     'the value of "Approve" decreased by 12 percentage points from July 2015 to September 2015.', "12"),
)
CHARTQA_TEMPLATE = (
    "\n    Role: You are an \u201cAnswer Extraction Assistant.\u201d You are given a question and a model's response. "
    "The response contains the final answer to the question.\n    \n"
    "    Task: Extract only the final answer from the response and output it. Do not include any extra words, "
    "punctuation, or units. If the final answer does not appear in the response, output: None.\n\n"
    "    Rules:\n"
    "        1. Output only the answer itself\u2014no explanations, labels, or extra text.\n"
    "        2. If the answer is numeric, remove units and extra symbols (e.g., %, currency); keep the minus sign "
    "and decimal point.\n\n"
    "    Examples:\n"
    + "".join(
        f"    [example_{n}]\n    Question:\n    {question}\n    Model's response:\n    {response}\n"
        f"    Your output:\n    {output}\n" + ("\n" if n != 2 else "    \n")
        for n, (question, response, output) in enumerate(_CHARTQA_EXAMPLES, start=1)
    )
    + "    Question:\n{question}\n\n    Model's response:\n {answer}\n\n    Your output:\n\n    "
)


# ---------------------------------------------------------------------------------------------- prompts
def option_list(options: dict[str, str] | Any) -> str:
    """The options as the harness lists them for its judge: a header line, then ``X. text`` lines."""
    return "There are several options: \n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())


def mcq_prompt(item: BenchmarkItem, response: str) -> str:
    """The judge prompt for a multiple-choice response: BLINK's own prompt for the ``BLINK`` file,
    the Chinese one when the question holds CJK characters, else the general one."""
    if item.release_part == "BLINK":
        template = MCQ_TEMPLATE_BLINK
    elif _CJK.search(item.question):
        template = MCQ_TEMPLATE_CN
    else:
        template = MCQ_TEMPLATE
    return template.format(question=item.question, options=option_list(item.options), answer=response)


def chartqa_prompt(item: BenchmarkItem, response: str) -> str:
    """The judge prompt that asks for a ChartQA response's final answer (round markers removed,
    the response stripped)."""
    text = response
    for marker in rules.ROUND_MARKERS:
        text = text.replace(marker, " ")
    return CHARTQA_TEMPLATE.format(question=item.question, answer=text.strip())


# ---------------------------------------------------------------------------------------------- deciding
def ask_option(client: JudgeClient, item: BenchmarkItem, response: str) -> tuple[rules.Verdict, dict]:
    """(verdict, judge record) for a multiple-choice response the exact rules left undecided:
    ask up to :data:`MCQ_ASKINGS` times until a reply names an option by the harness's matching
    rules (letter, ``Z``, rejection phrase, option text). No option after the last asking:
    ``judge:unreadable``, counted wrong (the harness draws a random letter there)."""
    prompt = mcq_prompt(item, response)
    replies = []
    for attempt in range(MCQ_ASKINGS):
        reply = client.ask(prompt, MCQ_MAX_TOKENS, attempt=attempt)
        replies.append(reply)
        letter, how = rules.infer_option(reply, item.options)
        if letter is not None:
            return rules.Verdict(letter == str(item.answer), letter, f"judge:{how}"), _record(client, replies)
    return rules.Verdict(False, None, "judge:unreadable"), _record(client, replies)


def ask_chartqa(client: JudgeClient, item: BenchmarkItem, response: str, gold_relative: bool) -> tuple[rules.Verdict, dict]:
    """(verdict, judge record) for a ChartQA response without an answer-tag pair: the judge's
    reply, stripped, is the prediction, matched against every gold as in
    :func:`opsd_core.evaluation.rules.chartqa`."""
    reply = client.ask(chartqa_prompt(item, response), CHARTQA_MAX_TOKENS)
    prediction = reply.strip()
    golds = [item.answer] if isinstance(item.answer, str) else [str(gold) for gold in item.answer]
    if gold_relative:
        hit = any(rules.relaxed_match(gold, prediction) for gold in golds)
    else:
        hit = any(rules.relaxed_match(prediction, gold) for gold in golds)
    form = "gold-relative" if gold_relative else "prediction-relative"
    return rules.Verdict(hit, prediction, f"judge:{form}"), _record(client, [reply])


def _record(client: JudgeClient, replies: list[str]) -> dict:
    return {"model": client.model, "replies": replies}


def judge_items(
    client: JudgeClient,
    scoring: str,
    items: Sequence[BenchmarkItem],
    responses: Sequence[str | None],
    verdicts: Sequence[rules.Verdict | None],
    chartqa_gold_relative: bool = False,
) -> tuple[list[rules.Verdict | None], list[dict | None]]:
    """(verdicts, judge records) of one benchmark's items with the judge on, from their exact
    ``verdicts`` (None: unanswered, never judged). ``scoring`` is the benchmark's kind:

    * ``mcq``: an item whose exact verdict is ``no-answer`` goes to the judge (:func:`ask_option`).
    * ``circular``: only a question none of whose matched copies is wrong and some of whose
      copies matched nothing; those copies, in index order, get the answer-tag / boxed rules of
      multiple choice, then the judge, until one is wrong.
    * ``chartqa``: an item without an answer-tag pair goes to the judge (:func:`ask_chartqa`).
    * ``vsp`` (and any other kind): the judge is never asked.

    A record is None where the exact verdict stands, else ``{"model", "replies"}`` (``replies``
    empty where the judge path's own rules decided without asking).
    """
    decided = list(verdicts)
    records: list[dict | None] = [None] * len(items)
    if scoring == "mcq":
        for position, (item, response, verdict) in enumerate(zip(items, responses, verdicts)):
            if verdict is not None and verdict.rule == "no-answer":
                decided[position], records[position] = ask_option(client, item, response)
    elif scoring == "chartqa":
        for position, (item, response, verdict) in enumerate(zip(items, responses, verdicts)):
            if verdict is not None and verdict.rule.startswith("whole-response:"):
                decided[position], records[position] = ask_chartqa(client, item, response, chartqa_gold_relative)
    elif scoring == "circular":
        groups: dict[int, list[int]] = {}
        for position, item in enumerate(items):
            groups.setdefault(item.index % CIRCULAR_OFFSET, []).append(position)
        questions = {item.index for item in items if item.index < CIRCULAR_OFFSET}
        for question, positions in groups.items():
            copies = sorted(positions, key=lambda p: items[p].index)
            if question not in questions or any(verdicts[p] is None for p in copies):
                continue
            matched = [verdicts[p].extracted is not None for p in copies]
            if all(matched) or any(m and not verdicts[p].hit for p, m in zip(copies, matched)):
                continue
            for position, was_matched in zip(copies, matched):
                if was_matched:
                    continue
                item, response = items[position], responses[position]
                verdict = rules.multiple_choice(response, item.options, str(item.answer))
                if verdict.rule != "no-answer":
                    verdict, record = rules.Verdict(verdict.hit, verdict.extracted, f"circular:{verdict.rule}"), _record(client, [])
                else:
                    verdict, record = ask_option(client, item, response)
                    verdict = rules.Verdict(verdict.hit, verdict.extracted, f"circular:{verdict.rule}")
                decided[position], records[position] = verdict, record
                if not verdict.hit:
                    break
    return decided, records
