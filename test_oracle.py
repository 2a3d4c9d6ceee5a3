"""Tests of oracle.py. The judge is a scripted fake OpenAI-compatible server on 127.0.0.1."""
import base64
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

import judge
import oracle
from grpo_rank import ranks_from_scores
from answers import extract_choice, normalize_answer
from oracle import GradedOracle, JudgeOracle, OracleError, ReferenceOracle, RewardModelOracle, make_oracle

SECRET = "sk-test-9f3c1e7a-unique-secret-d41d8cd9"
FAST = dict(timeout=2.0, max_retries=2, max_seconds=10.0, backoff=0.01, backoff_max=0.05)
MC = {"id": "mc", "video": "/nonexistent.mp4", "question": "What animal is shown?",
      "answer": "B", "options": ["a cat", "a dog", "a bird", "a fish"]}


def open_sample(answer, question="How many squares are there?"):
    return {"id": "q", "video": "/nonexistent.mp4", "question": question, "answer": answer}


# ---------------------------------------------------------------------------------------------
# the fake judge

def completion(content):
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


def shown_answers(body):
    """The candidates [id] text the judge was shown, from the request body: {id: text}."""
    prompt = body["messages"][-1]["content"]
    return {int(i): text for i, text in re.findall(r"^\[(\d+)\] (.*)$", prompt, flags=re.M)}


def rank_marker_first(body, marker="CORRECT"):
    """A judge that ranks the candidate holding the marker first, the others in shown order."""
    shown = shown_answers(body)
    ids = sorted(shown, key=lambda i: (marker not in shown[i], i))
    return 200, {}, completion(json.dumps({"ranking": ids})), 0.0


class FakeJudge:
    """Records requests; `behave(index, body, headers) -> (status, headers, text, delay)` scripts it."""

    def __init__(self):
        self.requests, self.times = [], []
        self.behave = lambda index, body, headers: rank_marker_first(body)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    index = len(fake.requests)
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fake.times.append(time.monotonic())
                status, headers, text, delay = fake.behave(index, body, self.headers)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    data = text.encode()
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:     # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)


@pytest.fixture
def judge_server():
    fake = FakeJudge()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def make_judge(server, **options):
    return JudgeOracle(base_url=server.url, model="fake-judge", **{**FAST, **options})


# ---------------------------------------------------------------------------------------------
# ReferenceOracle, GradedOracle

def test_normalisation():
    assert normalize_answer("Two.") == normalize_answer("2") == normalize_answer("two") == "2"
    assert normalize_answer("The Red") == normalize_answer("red") == "red"
    assert normalize_answer("  An   apple, a pear!") == "apple pear"
    assert normalize_answer("It's 3.5 metres.") == "its 3.5 metres"


@pytest.mark.parametrize("same", ["Two.", "2", "two", "TWO", " the two! "])
def test_reference_exact_matches(same):
    ranks = ReferenceOracle().rank(open_sample("2"), [same, "three", "two squares"])
    assert ranks == [0, 2, 1]      # exact > partial (F1 0.67) > wrong


def test_reference_wrong_answers_tie_and_empty_is_wrong():
    ranks = ReferenceOracle().rank(open_sample("The Red"), ["blue", "", "red", "green", "red square"])
    assert ranks == [2, 2, 0, 2, 1]
    assert ReferenceOracle().rank(open_sample("red"), ["", "   ", "?"]) == [0, 0, 0]   # all wrong: tie
    assert ReferenceOracle().rank(open_sample("red"), []) == []


@pytest.mark.parametrize("response,letter", [
    ("B", "B"), ("(B)", "B"), ("B)", "B"), ("B.", "B"), ("b", "B"), ("The answer is B", "B"),
    ("The best answer is B.", "B"), ("Answer: (B) a dog", "B"), ("B. a dog", "B"), ("a dog", "B"),
    ("Dog", "B"), ("I think the answer is C because", "C"), ("A cat", "A"), ("", None),
    ("Blue", None), ("A dog is running", "B"), ("E", None), ("the answer is b", "B"), ("(c) a bird", "C"),
    ("the answer is a dog", "B"), ("the answer is a horse", None), ("b. a horse", None)])
def test_mc_letter_extraction(response, letter):
    assert extract_choice(response, MC["options"]) == letter


def test_reference_multiple_choice_ranks():
    ranks = ReferenceOracle().rank(MC, ["A", "The answer is B", "dog", "", "(C)", "B."])
    assert ranks == [3, 0, 0, 3, 3, 0]
    by_text = dict(MC, answer="a dog")     # a reference given as option text works too
    assert ReferenceOracle().rank(by_text, ["B", "A"]) == [0, 1]


def test_graded_orders_near_misses():
    ranks = GradedOracle().rank(open_sample("two"), ["four", "2", "three", "red", "", "1"])
    assert ranks == [3, 0, 1, 4, 4, 1]         # exact; off by one; off by two; wrong
    colours = GradedOracle().rank(open_sample("red", "What colour?"), ["blue", "orange", "Red.", "pink"])
    assert colours == [3, 1, 0, 1]             # neighbours of red (orange, pink) above blue
    # reference gives all the wrong ones the same rank
    assert ReferenceOracle().rank(open_sample("two"), ["four", "2", "three"]) == [1, 0, 1]


# ---------------------------------------------------------------------------------------------
# RewardModelOracle

def test_reward_model_callable_and_dedup():
    calls, questions = [], []

    def score_fn(question, responses):
        calls.append(list(responses))
        questions.append(question)
        return [float(len(r)) for r in responses]
    rm = RewardModelOracle(score_fn=score_fn)
    ranks = rm.rank(MC, ["bb", "a", "bb", "cccc"])
    assert ranks == [1, 3, 1, 0]
    assert calls == [["bb", "a", "cccc"]]                 # identical responses scored once
    assert questions == ["What animal is shown?\nA. a cat\nB. a dog\nC. a bird\nD. a fish"]


def test_reward_model_non_finite_and_failing():
    with pytest.raises(OracleError, match="non-finite"):
        RewardModelOracle(score_fn=lambda q, rs: [1.0, float("nan")]).rank(open_sample("x"), ["a", "b"])
    def broken(q, rs):
        raise RuntimeError("rm server down")
    with pytest.raises(OracleError, match="rm server down"):
        RewardModelOracle(score_fn=broken).rank(open_sample("x"), ["a", "b"])


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny_rm")
    words = "[PAD] [UNK] how many squares are there what colour is it one two three red blue green ?".split()
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    return path


def test_reward_model_hf_ranks_agree_with_scores(tiny_rm):
    rm = make_oracle("reward_model", path=str(tiny_rm), batch_size=2)
    sample = open_sample("two")
    responses = ["one", "two squares", "three red blue", "one", "green", "two"]
    scores = rm.score(sample, responses)
    assert scores[0] == scores[3]
    assert rm.rank(sample, responses) == ranks_from_scores(torch.tensor([scores])).tolist()[0]
    # padding must not change a score: each response alone gives the batched score
    alone = [rm.model_scores(oracle.format_question(sample), [r])[0] for r in responses]
    assert alone == pytest.approx(scores, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 5   # a random model still separates them


# ---------------------------------------------------------------------------------------------
# rank_many, make_oracle

def test_rank_many_returns_errors_in_place():
    def score_fn(question, responses):
        if "fail" in question:
            raise RuntimeError("boom")
        return [float(len(r)) for r in responses]
    rm = RewardModelOracle(score_fn=score_fn)
    samples = [open_sample("x", "ok"), open_sample("x", "fail"), open_sample("x", "ok too")]
    results = rm.rank_many(samples, [["a", "bb"], ["a", "bb"], ["ccc", "a"]], max_workers=3)
    assert results[0] == [1, 0] and results[2] == [0, 1]
    assert isinstance(results[1], OracleError) and "boom" in str(results[1])
    ref = ReferenceOracle().rank_many([open_sample("2"), MC], [["two", "3"], ["A", "B"]])
    assert ref == [[0, 1], [1, 0]]


def test_make_oracle():
    assert isinstance(make_oracle("reference"), ReferenceOracle)
    assert isinstance(make_oracle("graded"), GradedOracle)
    assert isinstance(make_oracle("judge", model="m"), JudgeOracle)
    with pytest.raises(ValueError, match="reference.*graded.*reward_model.*judge"):
        make_oracle("gpt")


# ---------------------------------------------------------------------------------------------
# JudgeOracle against the fake server

def test_judge_valid_ranking(judge_server):
    judge = make_judge(judge_server)
    ranks = judge.rank(open_sample("2"), ["three", "2 CORRECT", "one"])
    assert ranks[1] == 0 and sorted(ranks) == [0, 1, 2]
    request = judge_server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "fake-judge"
    assert "Correct answer: 2" in request["body"]["messages"][-1]["content"]


def test_judge_shuffle_mapped_back(judge_server):
    responses = ["alpha", "beta", "gamma CORRECT", "delta", "epsilon"]
    positions = set()
    for seed in range(8):
        judge = make_judge(judge_server, seed=seed)
        ranks = judge.rank(open_sample("x"), responses)
        assert ranks[2] == 0 and sorted(ranks) == [0, 1, 2, 3, 4]
        shown = shown_answers(judge_server.requests[-1]["body"])
        positions.add(next(i for i, t in shown.items() if "CORRECT" in t))
        # the judge ranked the others in shown order: the mapping back must reproduce that order
        others = [t for i, t in sorted(shown.items()) if "CORRECT" not in t]
        assert [ranks[responses.index(t)] for t in others] == [1, 2, 3, 4]
    assert len(positions) > 1              # the marker really moved around
    # reproducible: same seed and call number, same shuffle
    a, b = make_judge(judge_server, seed=3), make_judge(judge_server, seed=3)
    a.rank(open_sample("x"), responses)
    prompt_a = judge_server.requests[-1]["body"]["messages"][-1]["content"]
    b.rank(open_sample("x"), responses)
    assert judge_server.requests[-1]["body"]["messages"][-1]["content"] == prompt_a


def test_judge_duplicates_shown_once_and_share_rank(judge_server):
    judge = make_judge(judge_server)
    ranks = judge.rank(open_sample("x"), ["red", "blue CORRECT", "red", "green", "blue CORRECT", "red"])
    shown = shown_answers(judge_server.requests[0]["body"])
    assert sorted(shown.values()) == ["blue CORRECT", "green", "red"]
    assert ranks[1] == ranks[4] == 0
    assert ranks[0] == ranks[2] == ranks[5] and ranks[3] != ranks[0]
    assert sorted(set(ranks)) in ([0, 2, 5], [0, 2, 3])    # competition ranks over the 6 responses
    # all identical: nothing to rank, no request
    assert judge.rank(open_sample("x"), ["same", "same"]) == [0, 0]
    assert len(judge_server.requests) == 1


def test_judge_prose_with_embedded_json_accepted(judge_server):
    def behave(index, body, headers):
        ids = sorted(shown_answers(body), key=lambda i: -i)
        text = f"Let me think. Answer 2 is vague.\n```json\n{{\"ranking\": {ids}}}\n```\nHope this helps!"
        return 200, {}, completion(text), 0.0
    judge_server.behave = behave
    judge = make_judge(judge_server)
    ranks = judge.rank(open_sample("x"), ["a", "b", "c"])
    assert sorted(ranks) == [0, 1, 2] and len(judge_server.requests) == 1


@pytest.mark.parametrize("reply,reason", [
    ("The second answer is clearly best, then the first.", "no JSON"),
    ('{"ranking": [1, 2]}', "expected 3"),
    ('{"ranking": [1, 1, 2]}', "not a permutation"),
    ('{"ranking": [1, 2, 4]}', "not a permutation"),
    ('{"order": [1, 2, 3]}', "ranking"),
])
def test_judge_invalid_replies_retried_then_error(judge_server, reply, reason):
    judge_server.behave = lambda index, body, headers: (200, {}, completion(reply), 0.0)
    judge = make_judge(judge_server, max_retries=2)
    with pytest.raises(OracleError, match=reason):
        judge.rank(open_sample("x"), ["a", "b", "c"])
    assert len(judge_server.requests) == 3           # first try + max_retries


def test_judge_invalid_reply_then_valid(judge_server):
    def behave(index, body, headers):
        return rank_marker_first(body) if index else (200, {}, completion("no idea"), 0.0)
    judge_server.behave = behave
    assert make_judge(judge_server).rank(open_sample("x"), ["a CORRECT", "b"]) == [0, 1]


def test_judge_500_then_200(judge_server):
    def behave(index, body, headers):
        return rank_marker_first(body) if index else (500, {}, '{"error": "overloaded"}', 0.0)
    judge_server.behave = behave
    assert make_judge(judge_server).rank(open_sample("x"), ["b", "a CORRECT"]) == [1, 0]
    assert len(judge_server.requests) == 2


def test_judge_429_retry_after_honoured(judge_server):
    def behave(index, body, headers):
        return rank_marker_first(body) if index else (429, {"Retry-After": "1"}, '{"error": "slow down"}', 0.0)
    judge_server.behave = behave
    assert make_judge(judge_server).rank(open_sample("x"), ["b", "a CORRECT"]) == [1, 0]
    assert len(judge_server.requests) == 2
    assert judge_server.times[1] - judge_server.times[0] >= 0.9     # waited Retry-After, not the 0.01 s backoff


def test_judge_400_not_retried(judge_server):
    judge_server.behave = lambda index, body, headers: (400, {}, '{"error": "bad model"}', 0.0)
    with pytest.raises(OracleError, match="HTTP 400.*bad model"):
        make_judge(judge_server).rank(open_sample("x"), ["a", "b"])
    assert len(judge_server.requests) == 1


def test_judge_too_slow_retried_then_error(judge_server):
    judge_server.behave = lambda index, body, headers: (*rank_marker_first(body)[:3], 1.0)
    judge = make_judge(judge_server, timeout=0.2, max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(OracleError, match="timeout"):
        judge.rank(open_sample("x"), ["a", "b"])
    assert len(judge_server.requests) == 3 and time.monotonic() - t0 < 3.0


def test_judge_max_seconds_bounds_the_retries(judge_server):
    judge_server.behave = lambda index, body, headers: (503, {}, "{}", 0.0)
    judge = make_judge(judge_server, max_retries=100, backoff=0.1, backoff_max=0.1, max_seconds=0.5)
    t0 = time.monotonic()
    with pytest.raises(OracleError, match="HTTP 503"):
        judge.rank(open_sample("x"), ["a", "b"])
    assert time.monotonic() - t0 < 1.0 and 2 <= len(judge_server.requests) < 10


def test_judge_connection_refused():
    judge = JudgeOracle(base_url="http://127.0.0.1:9/v1", model="m", **{**FAST, "max_retries": 1})
    with pytest.raises(OracleError, match="connection error"):
        judge.rank(open_sample("x"), ["a", "b"])


def test_api_key_sent_but_never_leaked(judge_server, monkeypatch, caplog):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG, logger="oracle")
    caplog.set_level(logging.DEBUG, logger="judge")

    def behave(index, body, headers):
        assert headers["Authorization"] == f"Bearer {SECRET}"
        if index == 0:    # a server that echoes the key back in its error body
            return 500, {}, json.dumps({"error": f"bad key {SECRET}"}), 0.0
        return 401, {"WWW-Authenticate": f"Bearer {SECRET}"}, json.dumps({"error": f"invalid key {SECRET}"}), 0.0
    judge_server.behave = behave
    judge = make_judge(judge_server, api_key_env="MY_JUDGE_KEY")
    with pytest.raises(OracleError) as info:
        judge.rank(open_sample("x"), ["a", "b"])
    assert len(judge_server.requests) == 2
    assert "HTTP 401" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None   # no urllib error (headers) inside
    for text in [str(info.value), repr(info.value), repr(judge), str(vars(judge)), caplog.text]:
        assert SECRET not in text
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert any("retrying" in r.getMessage() for r in caplog.records)
    results = judge.rank_many([open_sample("x")], [["a", "b"]])     # also in rank_many's slot
    assert isinstance(results[0], OracleError) and SECRET not in str(results[0])


def test_judge_no_key_no_header(judge_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    make_judge(judge_server).rank(open_sample("x"), ["a", "b CORRECT"])
    assert "Authorization" not in judge_server.requests[0]["headers"]


def test_judge_rank_many_concurrent_and_reproducible(judge_server):
    def behave(index, body, headers):
        if "FAIL" in body["messages"][-1]["content"]:
            return 200, {}, completion("no"), 0.0
        return rank_marker_first(body)
    judge_server.behave = behave
    samples = [open_sample("x", f"question {i}" + (" FAIL" if i == 2 else "")) for i in range(5)]
    groups = [["p", "q CORRECT", "r", "s"] for _ in samples]
    results = make_judge(judge_server, max_retries=1).rank_many(samples, groups, max_workers=4)
    assert all(r[1] == 0 and sorted(r) == [0, 1, 2, 3] for i, r in enumerate(results) if i != 2)
    assert isinstance(results[2], OracleError)
    # the shuffle of group i depends on (seed, i), not on thread timing
    prompts = {}
    for _ in range(2):
        judge_server.requests.clear()
        make_judge(judge_server, seed=7).rank_many(samples[:2], groups[:2], max_workers=2)
        for r in judge_server.requests:
            content = r["body"]["messages"][-1]["content"]
            prompts.setdefault(content.split("\n")[2], set()).add(content)
    assert all(len(v) == 1 for v in prompts.values()) and len(prompts) == 2


def test_judge_answer_verdict(judge_server):
    replies = iter(["I would say {'pred': 'yes', 'score': 4.8} overall.", '{"pred": "maybe", "score": 3}',
                    '{"pred": "no", "score": 1}', "{'pred': 'maybe', 'score': 2}"])
    judge_server.behave = lambda index, body, headers: (200, {}, completion(next(replies)), 0.0)
    judge = make_judge(judge_server)
    # the project's own messages: pred exactly yes or no, anything else retried
    assert judge.judge_answer("What colour?", "red", "Red.", prompt="project") == {"pred": "yes", "score": 4.8}
    assert judge.judge_answer("What colour?", "red", "blue", prompt="project") == {"pred": "no", "score": 1.0}
    prompt = judge_server.requests[0]["body"]["messages"][-1]["content"]
    assert "Correct answer: red" in prompt and "Predicted answer: Red." in prompt
    # Video-ChatGPT's (the default): "maybe" is neither yes nor no, kept as such, not retried
    assert judge.judge_answer("What colour?", "red", "pink") == {"pred": "neither", "score": 2.0}
    assert len(judge_server.requests) == 4
    assert "Correct Answer: red\nPredicted Answer: pink" in judge_server.requests[-1]["body"]["messages"][-1]["content"]


def test_judge_sends_frames(judge_server, monkeypatch):
    import sys
    import types

    class VideoError(Exception):
        pass

    def load_video(path, num_frames):
        if "missing" in path:
            raise VideoError("no such file")
        return torch.randint(0, 256, (num_frames, 40, 60, 3), dtype=torch.uint8)
    monkeypatch.setitem(sys.modules, "data", types.SimpleNamespace(load_video=load_video, VideoError=VideoError))
    judge = make_judge(judge_server, frames=3, frame_size=30)
    judge_server.behave = lambda index, body, headers: (200, {}, completion('{"ranking": [2, 1]}'), 0.0)
    assert sorted(judge.rank(open_sample("x"), ["a", "b"])) == [0, 1]
    content = judge_server.requests[0]["body"]["messages"][-1]["content"]
    assert content[0]["type"] == "text" and "[1] " in content[0]["text"]
    images = [part["image_url"]["url"] for part in content[1:]]
    assert len(images) == 3 and all(url.startswith("data:image/png;base64,") for url in images)
    png = base64.b64decode(images[0].split(",", 1)[1])
    assert int.from_bytes(png[16:20], "big") == 30 and int.from_bytes(png[20:24], "big") == 20   # 60x40 -> 30x20
    with pytest.raises(OracleError, match="no such file"):
        judge.rank(dict(open_sample("x"), video="/missing.mp4"), ["a", "b"])


def test_frames_are_sent_as_lossless_pngs(monkeypatch):
    import io
    import sys
    import types

    from PIL import Image
    video = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    monkeypatch.setitem(sys.modules, "data", types.SimpleNamespace(load_video=lambda path, n: video[:n],
                                                                   VideoError=OSError))
    urls = oracle.video_frames_png("clip.mp4", 2, max_side=336)      # small enough: no resize
    assert len(urls) == 2 and all(url.startswith("data:image/png;base64,") for url in urls)
    for url, frame in zip(urls, video):
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert image.format == "PNG" and torch.equal(torch.from_numpy(np.array(image.convert("RGB"))), frame)


def test_cli_reference(tmp_path, capsys):
    path = tmp_path / "groups.jsonl"
    path.write_text(json.dumps({"sample": open_sample("two"), "responses": ["2", "three"]}) + "\n"
                    + json.dumps({"sample": MC, "responses": ["B", "A"]}) + "\n")
    assert oracle.main(["--oracle=reference", f"--groups={path}"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["ranks"] for line in lines] == [[0, 1], [0, 1]]


def test_cli_judge_reports_errors(judge_server, tmp_path, capsys):
    judge_server.behave = lambda index, body, headers: (500, {}, "{}", 0.0)
    path = tmp_path / "groups.jsonl"
    path.write_text(json.dumps({"sample": open_sample("two"), "responses": ["2", "three"]}) + "\n")
    code = oracle.main(["--oracle=judge", f"--base_url={judge_server.url}", "--model=m", f"--groups={path}",
                        "--max_retries=0", "--timeout=2"])
    assert code == 1
    assert "HTTP 500" in json.loads(capsys.readouterr().out)["error"]


# ---------------------------------------------------------------------------------------------
# the judge client against hostile servers: redirects, echoed keys, trickled bodies, huge replies

class RawServer:
    """A loopback server that answers every connection with `reply(socket)` in a thread; records the
    raw requests it received (headers included)."""

    def __init__(self, reply):
        import socket
        self.requests, self.reply = [], reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(connection,), daemon=True).start()

    def handle(self, connection):
        with connection:
            connection.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.requests.append(data.decode("latin-1"))
            try:
                self.reply(connection)
            except OSError:      # the client hung up
                pass

    def close(self):
        self.sock.close()


def test_judge_refuses_redirects_and_never_sends_the_key_elsewhere(judge_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    elsewhere = RawServer(lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
    try:
        for status in (301, 302, 303, 307, 308):
            judge_server.behave = lambda index, body, headers: (status, {"Location": elsewhere.url + "/chat/completions"}, "", 0.0)
            with pytest.raises(OracleError, match=f"HTTP {status} .*redirect .* refused"):
                make_judge(judge_server, api_key_env="MY_JUDGE_KEY").rank(open_sample("x"), ["a", "b"])
        assert elsewhere.requests == []                     # nothing, let alone the key, went there
    finally:
        elsewhere.close()


def test_no_fragment_of_the_key_survives_a_cut_error_body(judge_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    for filler in (290, 295, 299, 2_000_000):       # the key straddles 300 (the message cut) or the read limit
        body = "x" * (filler if filler < 1_000_000 else judge.MAX_REPLY_BYTES - 10) + SECRET + "y" * 50
        judge_server.behave = lambda index, body_, headers, body=body: (400, {}, body, 0.0)
        with pytest.raises(OracleError) as info:
            make_judge(judge_server, api_key_env="MY_JUDGE_KEY").rank(open_sample("x"), ["a", "b"])
        fragments = {SECRET[i:i + 6] for i in range(len(SECRET) - 5)}
        assert not [f for f in fragments if f in str(info.value)], filler


def test_a_trickling_judge_is_cut_off_at_max_seconds():
    def trickle(connection):
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):                       # one byte every 50 ms: each read is quick, the body is not
            connection.sendall(b" ")
            time.sleep(0.05)
    server = RawServer(trickle)
    try:
        judge = JudgeOracle(base_url=server.url, model="m", timeout=2.0, max_retries=3, max_seconds=1.0, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(OracleError, match="max_seconds=1.0"):
            judge.rank(open_sample("x"), ["a", "b"])
        assert time.monotonic() - start < 1.6
    finally:
        server.close()


def test_a_dead_judge_costs_a_batch_max_seconds_not_max_seconds_per_wave():
    server = RawServer(lambda connection: time.sleep(30))      # accepts, never answers
    try:
        judge = JudgeOracle(base_url=server.url, model="m", timeout=10.0, max_retries=0, max_seconds=1.0)
        start = time.monotonic()
        results = judge.rank_many([open_sample("x", f"q{i}") for i in range(32)], [["a", "b"]] * 32, max_workers=8)
        assert all(isinstance(r, OracleError) for r in results)
        assert time.monotonic() - start < 2.0                    # 4 waves of 8 would take 4 s
    finally:
        server.close()


def test_a_huge_reply_is_refused_without_reading_it_all():
    size = 50 << 20

    def huge(connection):
        connection.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        block = b"{" * (1 << 16)
        for _ in range(size // len(block)):
            connection.sendall(block)
    server = RawServer(huge)
    try:
        judge = JudgeOracle(base_url=server.url, model="m", timeout=5.0, max_retries=0, max_seconds=20.0)
        start = time.monotonic()
        with pytest.raises(OracleError, match="larger than"):
            judge.rank(open_sample("x"), ["a", "b"])
        assert time.monotonic() - start < 5.0
    finally:
        server.close()


def test_reply_parsing_is_linear_in_the_reply():
    from judge import find_json, parse_ranking
    for text in ("{" * 200_000, "{'a'" * 50_000 + "}" * 10, '{"x": ' * 30_000, '{"x": ' * 10_000 + "1" + "}" * 10_000,
                 "{'a': {'a': 1}} " * 20_000):
        start = time.monotonic()
        assert find_json(text, "ranking") is None
        with pytest.raises(ValueError):
            parse_ranking(text, 3)
        assert time.monotonic() - start < 1.0, text[:20]
    assert find_json('noise {{ {"ranking": [2, 1]} }} more', "ranking") == {"ranking": [2, 1]}


# ---------------------------------------------------------------------------------------------
# hostile replies, second round: nesting, keys in every spelling, quadratic parses

def leaked(text, secret=SECRET, size=6):
    """The pieces of `secret` of `size` characters that appear in text."""
    return sorted({secret[i:i + size] for i in range(len(secret) - size + 1) if secret[i:i + size] in text})


DEEP = 100_000


@pytest.mark.parametrize("reply", ['{"choices": ' + "[" * DEEP + "]" * DEEP + "}",          # the envelope
                                   completion('{"ranking": ' + "[" * DEEP + "]" * DEEP + "}"),   # the content
                                   completion("{'ranking': " + "(" * DEEP + ")" * DEEP + "}")],
                         ids=["envelope", "content", "python-literal"])
def test_a_reply_nested_100000_deep_is_an_oracle_error_never_an_exception(judge_server, reply):
    import train_step
    from eval import score_records
    judge_server.behave = lambda index, body, headers: (200, {}, reply, 0.0)
    oracle = make_judge(judge_server, max_retries=0)
    ranks, valid, failures = train_step.oracle_ranks(oracle, [open_sample("x", f"q{i}") for i in range(3)],
                                                     [["a", "b"]] * 3, workers=2)    # what train.py calls
    assert not valid.any() and len(failures) == 3 and all("invalid reply" in f for f in failures)
    sample = {**open_sample("two"), "id": "s"}                                       # what eval.py calls
    records = score_records([sample], [{"prediction": "2", "truncated": False}], {}, "open",
                            judge.Judge(base_url=judge_server.url, model="m", **FAST))
    assert records[0]["invalid"] and "invalid reply" in records[0]["error"]


def test_a_key_read_from_a_file_is_stripped_and_a_key_with_whitespace_inside_refused(judge_server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET + "\n")                 # as `export KEY=$(cat key.txt)` ... or not
    make_judge(judge_server, api_key_env="MY_JUDGE_KEY").rank(open_sample("x"), ["a", "b CORRECT"])
    assert judge_server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    for bad in (SECRET[:10] + "\n" + SECRET[10:], SECRET[:10] + " " + SECRET[10:], SECRET + "\u00e9"):
        monkeypatch.setenv("MY_JUDGE_KEY", bad)
        with pytest.raises(ValueError, match=r"\$MY_JUDGE_KEY holds a space, control or non-ASCII") as info:
            make_judge(judge_server, api_key_env="MY_JUDGE_KEY")              # at start, before any work
        assert not leaked(str(info.value))
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    oracle = make_judge(judge_server, api_key_env="MY_JUDGE_KEY")
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET[:10] + "\n" + SECRET[10:])     # changed during the run
    with pytest.raises(OracleError, match="MY_JUDGE_KEY") as info:
        oracle.rank(open_sample("x"), ["a", "b"])
    assert not leaked(str(info.value)) and len(judge_server.requests) == 1    # nothing more was sent


def test_no_piece_of_the_key_survives_masked_escaped_or_cut(judge_server, monkeypatch, caplog):
    from eval import score_records
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG, logger="judge")
    escaped = "".join(f"\\u{ord(c):04x}" for c in SECRET)            # JSON's spelling of each character
    masked = SECRET[:16] + "*" * 8 + SECRET[-4:]                        # as OpenAI's 401 shows a key
    replies = [(401, {}, json.dumps({"error": f"Incorrect API key provided: {masked}"})),
               (302, {"Location": "http://elsewhere/?key=" + "".join(f"%{ord(c):02X}" for c in SECRET)}, "")]
    for filler in range(180, 200, 3):           # the key across the parser's 200-character cut of a reply
        replies.append((200, {}, '{"choices": [{"message": {"content": "' + "x" * filler + escaped + '"}}]}'))
        replies.append((200, {}, completion("y" * filler + SECRET)))
        replies.append((400, {}, "z" * (filler + 100) + escaped))    # ... and the 300-character cut of an error
    for status, headers, body in replies:
        judge_server.behave = lambda index, body_, headers_, reply=(status, headers, body): (*reply, 0.0)
        with pytest.raises(OracleError) as info:
            make_judge(judge_server, api_key_env="MY_JUDGE_KEY", max_retries=0).rank(open_sample("x"), ["a", "b"])
        assert not leaked(str(info.value)), (status, body[:60], str(info.value)[-80:])
    assert not leaked(caplog.text)
    # nor eval.py's predictions records (the "error" of an invalid verdict)
    judge_server.behave = lambda index, body, headers: (200, {}, completion("verdict: " + masked), 0.0)
    records = score_records([{**open_sample("two"), "id": "s"}], [{"prediction": "2", "truncated": False}], {},
                            "open", judge.Judge(base_url=judge_server.url, model="m", api_key_env="MY_JUDGE_KEY", **FAST))
    assert records[0]["invalid"] and not leaked(json.dumps(records))


def test_a_crafted_reply_parses_in_linear_time_and_inside_the_deadline(judge_server):
    from judge import parse_ranking
    crafted = '{"a":' * 100 + "f(" + ",".join(["1"] * 45_000) + ")" + "}" * 100        # 90 KB: 13-51 s before
    start = time.monotonic()
    with pytest.raises(ValueError):
        parse_ranking(crafted, 3)
    assert time.monotonic() - start < 1.0
    judge_server.behave = lambda index, body, headers: (200, {}, completion(crafted), 0.0)
    oracle = make_judge(judge_server, max_seconds=1.0, max_retries=1000, backoff=0.01, backoff_max=0.01)
    start = time.monotonic()
    with pytest.raises(OracleError, match="invalid reply|max_seconds=1.0"):   # the last attempt may be cut off
        oracle.rank(open_sample("x"), ["a", "b"])
    assert time.monotonic() - start < 2.0                              # max_seconds=1.0 (31 s before)


def test_a_key_holding_an_escape_is_scrubbed_as_written_and_a_placeholder_key_is_left():
    # "%41" inside a key decodes to "A" in the escape-aware pass: the key as written is found too
    assert judge._scrub("token=abc%41defghijklm ok", "abc%41defghijklm") == "token=*** ok"
    # a local server's placeholder key ("4", "EMPTY") is no secret, and scrubbing it would cut every 4 out of
    # a verdict: the reply reaches the parser whole
    reply = json.dumps({"pred": "yes", "score": 4})
    assert judge._scrub(reply, "4") == reply and judge._scrub(reply, "EMPTY") == reply
    assert judge._scrub("a b sk-0123456789 c", "sk-0123456789") == "a b *** c"
