"""The optional LLM judge against a small OpenAI-compatible server on 127.0.0.1 started by the
tests: the harness's prompt arrives, replies are read as the harness reads them, answers are
cached, failures are retried, timeouts and unreachable endpoints end in one line."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.evaluation.benchmarks import load_benchmark
from opsd_core.evaluation.items import BenchmarkItem
from opsd_core.evaluation.judge import (
    API_KEY_VARIABLE,
    CACHE_FILE,
    JudgeClient,
    JudgeError,
    chat_completions_url,
)
from opsd_core.evaluation.judge_rules import judge_items
from opsd_core.evaluation.miniature import write_miniature_benchmarks
from opsd_core.evaluation.rules import Verdict, circular_copy, multiple_choice

# The harness's general multiple-choice judge prompt, written out from its template text.
HARNESS_MCQ_PROMPT = (
    "You are an AI assistant who will help me to match an answer with several options of a single-choice question. "
    "You are provided with a question, several options, and an answer, and you need to find which option is most "
    "similar to the answer. If the meaning of all options are significantly different from the answer, output Z. "
    "Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n"
    "Example 1: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: a cute teddy bear\nYour output: A\n"
    "Example 2: \n"
    "Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n"
    "Answer: Spider\nYour output: Z\n"
    "Example 3: \n"
    "Question: Which piece fits?\n"
    "Options: There are several options: \nA. red\nB. blue\nC. 6.0\n\n"
    "Answer: I would go with the second piece\n"
    "Your output: "
)
OPTIONS = {"A": "red", "B": "blue", "C": "6.0"}


class FakeJudge:
    """An OpenAI-compatible chat endpoint: each POST gets ``reply(prompt, count)`` (a string, or
    ``(status, body)``); every request is kept."""

    def __init__(self, reply: Callable[[str, int], object], delay_s: float = 0.0) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                time.sleep(delay_s)
                answer = reply(body["messages"][0]["content"][0]["text"], len(outer.requests))
                status, payload = answer if isinstance(answer, tuple) else (
                    200, {"choices": [{"message": {"role": "assistant", "content": answer}}]}
                )
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def item(answer: str = "B", index: int = 0, part: str = "VisPuzzle", options=OPTIONS) -> BenchmarkItem:
    return BenchmarkItem("vispuzzle", index, f"{part}.tsv", (), "Which piece fits", options, answer, part=part)


def judged(client: JudgeClient, response: str, gold: str = "B", part: str = "VisPuzzle"):
    target = item(gold, part=part)
    verdicts, records = judge_items(client, "mcq", [target], [response], [multiple_choice(response, OPTIONS, gold)])
    return verdicts[0], records[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------------------------- requests
def test_the_harness_prompt_and_request_arrive(tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEY_VARIABLE, "secret-key")
    with FakeJudge(lambda prompt, n: "B") as server:
        client = JudgeClient(server.url + "/v1/", "judge-x", tmp_path / CACHE_FILE)
        verdict, record = judged(client, "I would go with the second piece")
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer secret-key"
    assert request["body"] == {
        "model": "judge-x",
        "messages": [{"role": "user", "content": [{"type": "text", "text": HARNESS_MCQ_PROMPT}]}],
        "n": 1,
        "temperature": 0.0,
        "max_tokens": 2048,
    }
    assert verdict == Verdict(True, "B", "judge:option-letter")
    assert record == {"model": "judge-x", "replies": ["B"]}
    assert "secret-key" not in (tmp_path / CACHE_FILE).read_text()


def test_base_urls_with_and_without_v1():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_reasoning_models_get_max_completion_tokens_and_no_temperature():
    with FakeJudge(lambda prompt, n: "B") as server:
        judged(JudgeClient(server.url, "gpt-5"), "I would go with the second piece")
    body = server.requests[0]["body"]
    assert body["max_completion_tokens"] == 2048 and "temperature" not in body and "max_tokens" not in body


def test_blink_has_its_own_prompt():
    with FakeJudge(lambda prompt, n: "(B)") as server:
        verdict, _ = judged(JudgeClient(server.url, "j"), "the second piece", part="BLINK")
    prompt = server.requests[0]["body"]["messages"][0]["content"][0]["text"]
    assert prompt.startswith("\n        You are an AI assistant that matches an answer")
    assert prompt.endswith("        Answer: the second piece\n        Your output:\n    ")
    assert verdict.extracted == "B"


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("replies", "extracted", "rule", "asked"),
    [
        (["(B)"], "B", "judge:option-letter", 1),
        (["The answer is C."], "C", "judge:option-letter", 1),
        (["Z"], "Z", "judge:standalone-z", 1),
        (["Cannot determine the answer"], "Z", "judge:rejection-phrase", 1),
        (["blue"], "B", "judge:option-text", 1),
        (["b", "B"], "B", "judge:option-letter", 2),  # lower case names no option: asked again
        (["A or B", "A and B", "hmm"], None, "judge:unreadable", 3),  # three askings, then wrong
    ],
)
def test_replies_are_read_as_the_harness_reads_them(replies, extracted, rule, asked):
    with FakeJudge(lambda prompt, n: replies[n - 1]) as server:
        verdict, record = judged(JudgeClient(server.url, "j"), "I would go with the second piece")
    assert (verdict.extracted, verdict.rule, verdict.hit) == (extracted, rule, extracted == "B")
    assert len(server.requests) == asked and record["replies"] == replies[:asked]


def test_only_what_exact_matching_leaves_undecided_goes_to_the_judge():
    responses = ["The answer is B.", "<answer>C</answer>", "Cannot determine the answer", "Z"]
    with FakeJudge(lambda prompt, n: "A") as server:
        items = [item() for _ in responses]
        verdicts = [multiple_choice(r, OPTIONS, "B") for r in responses]
        decided, records = judge_items(JudgeClient(server.url, "j"), "mcq", items, responses, verdicts)
        assert decided == verdicts and records == [None] * 4
        vsp = judge_items(JudgeClient(server.url, "j"), "vsp", [item()], ["no moves"], [Verdict(False, None, "vsp:no-boxed-moves")])
        assert vsp[1] == [None]
    assert server.requests == []


def test_chartqa_asks_for_the_final_answer_without_an_answer_tag():
    chart = BenchmarkItem("chartqa", 3, "ChartQA_h_bar.tsv", (), "What is bar 3?", {}, ["12"], part="ChartQA_h_bar")
    with FakeJudge(lambda prompt, n: " 12.4 ") as server:
        client = JudgeClient(server.url, "j")
        response = "Round_0: the bar reaches twelve "
        verdicts, records = judge_items(client, "chartqa", [chart, chart], [response, "<answer>7</answer>"],
                                        [Verdict(False, response, "whole-response:prediction-relative"),
                                         Verdict(False, "7", "answer-tag:prediction-relative")])
    (request,) = server.requests
    prompt = request["body"]["messages"][0]["content"][0]["text"]
    assert prompt.endswith("    Question:\nWhat is bar 3?\n\n    Model's response:\n the bar reaches twelve\n\n    Your output:\n\n    ")
    assert request["body"]["max_tokens"] == 1024
    assert verdicts[0] == Verdict(True, "12.4", "judge:prediction-relative")  # |12 - 12.4| / 12.4 <= 5 %
    assert records == [{"model": "j", "replies": ["12.4"]}, None]


def test_circular_questions_are_judged_copy_by_copy_only_where_the_harness_asks():
    def copies(question, answers_and_responses):
        rows = [(item(gold, question + k * 1_000_000, "SAT_circular"), response)
                for k, (gold, response) in enumerate(answers_and_responses)]
        return [r[0] for r in rows], [r[1] for r in rows]

    # question 0: copy 0 matched right, copy 1 decided by its answer tag, copy 2 by the judge;
    # question 1: a matched copy is wrong, so nothing is asked; question 2: the first unmatched copy
    # is judged wrong, so the third is not asked.
    items0, responses0 = copies(0, [("A", "A"), ("B", "hmm <answer>B</answer>"), ("C", "no idea 0")])
    items1, responses1 = copies(1, [("A", "B"), ("B", "no idea 1")])
    items2, responses2 = copies(2, [("A", "no idea 2"), ("B", "no idea 2b")])
    items, responses = items0 + items1 + items2, responses0 + responses1 + responses2
    verdicts = [circular_copy(r, OPTIONS, i.answer) for i, r in zip(items, responses)]
    with FakeJudge(lambda prompt, n: "C" if "no idea 0" in prompt else "B") as server:
        decided, records = judge_items(JudgeClient(server.url, "j"), "circular", items, responses, verdicts)
    asked = [r["body"]["messages"][0]["content"][0]["text"].split("Answer: ")[-1] for r in server.requests]
    assert asked == ["no idea 0\nYour output: ", "no idea 2\nYour output: "]
    assert [v.rule for v in decided] == [
        "circular:option-letter", "circular:answer-tag:option-letter", "circular:judge:option-letter",
        "circular:option-letter", "circular:no-answer",
        "circular:judge:option-letter", "circular:no-answer",
    ]
    assert [v.hit for v in decided] == [True, True, True, False, False, False, False]
    assert [r is not None for r in records] == [False, True, True, False, False, True, False]


# ---------------------------------------------------------------------------------------------- cache
def test_cached_answers_send_no_request_and_a_cut_last_line_is_dropped(tmp_path):
    cache = tmp_path / CACHE_FILE
    with FakeJudge(lambda prompt, n: "B") as server:
        judged(JudgeClient(server.url, "j", cache), "I would go with the second piece")
        with open(cache, "a", encoding="utf-8") as handle:
            handle.write('{"key": "abc", "rep')  # a crash while writing
        again = JudgeClient(server.url, "j", cache)
        verdict, _ = judged(again, "I would go with the second piece")
        assert (len(server.requests), again.sent, again.cached, verdict.extracted) == (1, 0, 1, "B")
        assert cache.read_text().endswith("}\n") and len(cache.read_text().splitlines()) == 1
        judged(again, "something else entirely")  # appends after the repaired line
        other_model = JudgeClient(server.url, "k", cache)
        judged(other_model, "I would go with the second piece")  # the model is part of the key
    assert len(server.requests) == 3
    assert [json.loads(line)["model"] for line in cache.read_text().splitlines()] == ["j", "j", "k"]


def test_a_broken_cache_line_in_the_middle_is_named(tmp_path):
    cache = tmp_path / CACHE_FILE
    cache.write_text('not json\n{"key": "a", "model": "j", "reply": "B"}\n')
    with pytest.raises(JudgeError, match=r"judge-cache.jsonl, line 1: not a judge answer"):
        JudgeClient("http://127.0.0.1:1", "j", cache)


# ---------------------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("status", [500, 503, 429])
def test_failures_are_retried_with_back_off(status):
    with FakeJudge(lambda prompt, n: (status, {"error": "busy"}) if n < 3 else "B") as server:
        client = JudgeClient(server.url, "j", retries=2, backoff_s=0.01)
        verdict, _ = judged(client, "I would go with the second piece")
    assert len(server.requests) == 3 and verdict.extracted == "B" and client.sent == 1


def test_retries_run_out_in_one_line():
    with FakeJudge(lambda prompt, n: (500, {"error": "down"})) as server:
        client = JudgeClient(server.url, "j", retries=1, backoff_s=0.01)
        with pytest.raises(JudgeError) as error:
            judged(client, "I would go with the second piece")
    assert len(server.requests) == 2
    message = str(error.value)
    assert "\n" not in message and "failed 2 tries, the last: HTTP 500" in message and "--judge-retries" in message


def test_a_refusal_is_not_retried_and_names_the_key_variable():
    with FakeJudge(lambda prompt, n: (401, {"error": "no key"})) as server, pytest.raises(
        JudgeError, match=f"HTTP 401.*{API_KEY_VARIABLE}"
    ):
        judged(JudgeClient(server.url, "j", retries=3, backoff_s=0.01), "I would go with the second piece")
    assert len(server.requests) == 1


def test_a_timeout_ends_in_one_line():
    with FakeJudge(lambda prompt, n: "B", delay_s=1.0) as server:
        client = JudgeClient(server.url, "j", timeout_s=0.2, retries=0)
        started = time.perf_counter()
        with pytest.raises(JudgeError) as error:
            judged(client, "I would go with the second piece")
        assert time.perf_counter() - started < 0.9
    message = str(error.value)
    assert "\n" not in message and "no answer within 0.2 s" in message and "--judge-timeout" in message


def test_an_answer_that_is_not_a_chat_completion_is_named():
    with FakeJudge(lambda prompt, n: (200, {"result": "B"})) as server, pytest.raises(
        JudgeError, match="not a chat completion"
    ):
        judged(JudgeClient(server.url, "j"), "I would go with the second piece")


# ---------------------------------------------------------------------------------------------- opsd eval
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_miniature_benchmarks(tmp_path_factory.mktemp("benchmarks"), per_benchmark=4)


def _predictions(root, path):
    puzzles = load_benchmark("vispuzzle", root)
    charts = load_benchmark("chartqa", root)
    records = [
        {"benchmark": "vispuzzle", "index": puzzles[0].index, "response": f"The answer is {puzzles[0].answer}."},
        {"benchmark": "vispuzzle", "index": puzzles[1].index, "response": "not sure: puzzle-one"},
        {"benchmark": "vispuzzle", "index": puzzles[2].index, "response": "not sure: puzzle-two"},
        {"benchmark": "chartqa", "index": charts[0].index, "response": "bar zero is ten-ish"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return puzzles


def test_opsd_eval_counts_judged_items_apart_and_a_rerun_sends_nothing(root, tmp_path):
    predictions = tmp_path / "answers.jsonl"
    puzzles = _predictions(root, predictions)
    replies = {"puzzle-one": puzzles[1].answer, "puzzle-two": "Z", "ten-ish": "10"}

    def reply(prompt, n):
        return next(answer for marker, answer in replies.items() if marker in prompt)

    out = tmp_path / "out"
    arguments = ["eval", "--benchmarks", "vispuzzle,chartqa,vsp", "--data-root", str(root), "--predictions",
                 str(predictions), "--out", str(out)]
    with FakeJudge(reply) as server:
        result = CliRunner().invoke(cli, [*arguments, "--judge", server.url, "--judge-model", "j"])
        assert result.exit_code == 0, result.output
        assert len(server.requests) == 3
        assert "3 items on the judge path; 3 requests sent, 0 answers from" in result.output
        results = json.loads((out / "results.json").read_text())["text"]
        assert (results["vispuzzle"]["judged"], results["vispuzzle"]["accuracy"], results["vispuzzle"]["accuracy_exact"]) == (2, 50, 25)
        assert (results["chartqa"]["judged"], results["chartqa"]["accuracy_exact"]) == (1, 0)
        assert results["vsp"]["judged"] == 0 and results["average"]["judged"] == 3
        assert "text judged | text acc exact" in (out / "results.md").read_text()
        items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
        judged_items = {(i["benchmark"], i["index"]): i for i in items if i["judge"] is not None}
        assert judged_items[("vispuzzle", puzzles[1].index)]["judge"] == {"model": "j", "replies": [puzzles[1].answer]}
        assert judged_items[("vispuzzle", puzzles[1].index)]["hit"] is True
        assert judged_items[("vispuzzle", puzzles[2].index)]["rule"] == "judge:standalone-z"
        assert judged_items[("chartqa", 0)]["extracted"] == "10" and judged_items[("chartqa", 0)]["hit"] is True

        rerun = CliRunner().invoke(cli, [*arguments, "--force", "--judge", server.url, "--judge-model", "j"])
        assert rerun.exit_code == 0, rerun.output
        assert len(server.requests) == 3 and "0 requests sent, 3 answers from" in rerun.output
    assert json.loads((out / "results.json").read_text())["text"] == results

    exact = CliRunner().invoke(cli, [*arguments, "--force"])  # the default: exact matching, no judge columns
    assert exact.exit_code == 0, exact.output
    assert "judged" not in json.loads((out / "results.json").read_text())["text"]["vispuzzle"]


def test_opsd_eval_with_an_unreachable_judge_fails_in_one_line(root, tmp_path):
    predictions = tmp_path / "answers.jsonl"
    _predictions(root, predictions)
    port = free_port()
    result = CliRunner().invoke(cli, ["eval", "--benchmarks", "vispuzzle", "--data-root", str(root), "--predictions",
                                      str(predictions), "--out", str(tmp_path / "out"), "--judge",
                                      f"http://127.0.0.1:{port}/v1", "--judge-model", "j", "--judge-retries", "0"])
    assert result.exit_code != 0
    assert result.output.startswith(f"Error: LLM judge http://127.0.0.1:{port}/v1/chat/completions failed 1 try")
    assert len(result.output.strip().splitlines()) == 1 and "start the server" in result.output


def test_opsd_eval_judge_flags_go_together(root, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--benchmarks", "vsp", "--data-root", str(root), "--judge", "http://x"])
    assert result.exit_code != 0 and "--judge-model" in result.output


def test_answering_with_an_unreachable_judge_keeps_the_answers_and_says_how_to_score_them(root, tmp_path):
    port = free_port()
    arguments = ["eval", "--benchmarks", "vispuzzle,chartqa", "--data-root", str(root), "--limit", "1", "--out",
                 str(tmp_path), "--set", "backend.free_text=skip", "--judge", f"http://127.0.0.1:{port}",
                 "--judge-model", "j", "--judge-retries", "0"]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code != 0
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 2
    last = result.output.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("Error: LLM judge") and result.output.count("Error:") == 1
    assert f"The answers are kept: score them later with --predictions {tmp_path / 'predictions.jsonl'}" in last
