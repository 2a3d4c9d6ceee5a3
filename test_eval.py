"""Tests of eval.py. Videos are tiny synthetic clips; the judge is a scripted fake HTTP server on
127.0.0.1; metric tests use a scripted policy, the end-to-end tests the real tiny VideoLM."""
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

import eval as ev
from answers import extract_choice
from data import fit_frames, load_jsonl, write_jsonl
from judge import parse_verdict
from model import ModelConfig, VideoLM
from oracle import OracleError
from synth import make_synthetic_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIONS = ["a cat", "a dog", "a bird", "a fish"]
TWELVE_WORDS = "the video shows a man walking slowly along the beach at sunset"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """12 synthetic eval clips: {"eval": open rows, "eval_mc": the same with 4 options}."""
    return make_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), num_train=0, num_eval=12, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny random VideoLM, saved the way sft.py / train.py save it."""
    path = str(tmp_path_factory.mktemp("ckpt"))
    VideoLM(ModelConfig()).save(path)
    return path


def videomme_rows(synth):
    """The MC rows in Video-MME's shape: row i has category CATS[i % 4] and duration DURS[i % 3]."""
    rows = load_jsonl(synth["eval_mc"])
    for i, row in enumerate(rows):
        row.update(category=VIDEOMME_SUBSET[i % 4], duration=ev.DURATIONS[i % 3])
    return rows


VIDEOMME_SUBSET = ["Temporal Perception", "Action Recognition", "OCR Problems", "Information Synopsis"]


class ScriptedPolicy:
    """What evaluate() needs of a policy; replies come from a dict id -> text (default: "").
    Records which ids each generate call answered."""

    def __init__(self, replies=None):
        self.replies = replies or {}
        self.config = SimpleNamespace(num_frames=4)
        self.device = torch.device("cpu")
        self.training = True
        self.generated, self.encode_calls, self.frame_shapes = [], 0, []

    def eval(self):
        return self.train(False)

    def train(self, mode=True):
        self.training = mode
        return self

    def fit_frames(self, frames):
        return fit_frames(frames, 32)

    def encode_video(self, frames, seconds=None):
        self.encode_calls += 1
        self.frame_shapes.append(tuple(frames.shape))
        return torch.zeros(frames.shape[0], 1, 1)

    def encode_prompts(self, samples, mc_format="oneline"):
        self.batch, self.mc_format = [s.get("id") for s in samples], mc_format
        return torch.arange(len(samples)).unsqueeze(1), torch.ones(len(samples), 1, dtype=torch.long)

    def generate(self, features, prompt_ids, prompt_mask, group_size=1, max_new_tokens=8,
                 temperature=1.0, greedy=False, generator=None, all_finished=None):
        self.generated.append(list(self.batch))
        self.last_call = dict(max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy)
        return prompt_ids, prompt_mask, torch.zeros(len(prompt_ids), dtype=torch.bool)

    def decode(self, ids, mask):
        return [self.replies.get(self.batch[i], "") for i in ids[:, 0].tolist()]


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# multiple choice: the letter, unanswered


@pytest.mark.parametrize("reply, letter", [
    ("The best answer is B", "B"),
    ("Answer: (C)", "C"),
    ("b)", "B"),
    ("(D) a dog", "D"),
    ("I think it's A.", "A"),
    ("C", "C"),
    ("I think the answer is b", "B"),
    ("The best answer is: D. a fish", "D"),
    ("Best option: (A) a cat", "A"),
    ("a dog", "B"),                                          # the text of option B
    ("The best answer is B because the man in the video is clearly walking", "B"),
    ("I think it's C because the bird is flying over the water in every frame", "C"),
    (TWELVE_WORDS, None),                                    # no letter, no option named: unanswered
    ("a man is walking along the beach slowly", None),
    ("one two three four five six seven eight nine ten", None),
    ("It is not clear from the video which one of these is right", None),
    ("a dog is running in the park near a tree", "B"),       # "a" is not option A; the reply names B's dog
    ("", None),
    ("The answer is", None),
])
def test_mc_choice(reply, letter):
    assert extract_choice(reply, OPTIONS) == letter


def test_mc_aggregation_by_category_and_duration(synth, capsys):
    rows = videomme_rows(synth)
    correct, unanswered = {0, 1, 2, 4, 8}, {3, 7}
    replies = {}
    for i, row in enumerate(rows):
        wrong = "ABCD"[("ABCD".index(row["answer"]) + 1) % 4]
        replies[row["id"]] = (f"The best answer is {row['answer']}" if i in correct else
                              TWELVE_WORDS if i in unanswered else f"({wrong})")
    policy = ScriptedPolicy(replies)
    results = ev.evaluate(policy, rows, task="mc", batch_size=5, progress=False)
    assert results["task"] == "mc" and results["n"] == 12 and results["skipped_videos"] == 0
    assert results["accuracy"] == pytest.approx(5 / 12)
    assert results["unanswered"] == 2
    # categories in the paper's order, each with its accuracy and count
    assert list(results["by_category"]) == ["Temporal Perception", "Action Recognition", "OCR Problems",
                                            "Information Synopsis"]
    assert {c: m["accuracy"] for c, m in results["by_category"].items()} == pytest.approx(
        {"Temporal Perception": 1.0, "Action Recognition": 1 / 3, "OCR Problems": 1 / 3,
         "Information Synopsis": 0.0})
    assert all(m["n"] == 3 for m in results["by_category"].values())
    assert list(results["by_duration"]) == ["short", "medium", "long"]
    assert {d: m["accuracy"] for d, m in results["by_duration"].items()} == pytest.approx(
        {"short": 0.25, "medium": 0.5, "long": 0.5})
    # greedy, a few new tokens; 3 batches of <= 5, one encode_video each; training mode restored
    assert policy.last_call == dict(max_new_tokens=5, temperature=0.0, greedy=True)
    assert [len(ids) for ids in policy.generated] == [5, 5, 2] and policy.encode_calls == 3
    assert policy.training

    ev.print_results(results, title="Video-MME")
    printed = capsys.readouterr().out
    for label in VIDEOMME_SUBSET + ["short", "medium", "long", "Overall", "41.7%", "unanswered: 2"]:
        assert label in printed


# ---------------------------------------------------------------------------------------------
# open-ended: the judge's verdicts


@pytest.mark.parametrize("reply, expected", [
    ('{"pred": "yes", "score": 4.8}', {"pred": "yes", "score": 4.8}),     # 4.8 stays 4.8
    ("{'pred': 'no', 'score': 2}", {"pred": "no", "score": 2.0}),         # a python dict
    ('Sure, here is my evaluation:\n```json\n{"pred": "YES", "score": 5}\n```\nHope it helps.',
     {"pred": "yes", "score": 5.0}),
    ('{"pred": "no", "score": "3.5"}', {"pred": "no", "score": 3.5}),
    ('{"pred": "yes"}', None),                 # no score
    ('{"score": 4}', None),                    # no verdict
    ('{"pred": "maybe", "score": 3}', None),
    ('{"pred": "yes", "score": 7}', None),     # outside 0-5
    ("The prediction is correct, I would give it a 4.", None),
    ("", None),
])
def test_parse_verdict(reply, expected):
    if expected is None:
        with pytest.raises(ValueError):
            parse_verdict(reply)
    else:
        assert parse_verdict(reply) == expected


class ObjectJudge:
    """A judge object (no HTTP): the verdict is looked up by the prediction."""

    def __init__(self, verdicts):
        self.verdicts, self.seen = verdicts, []

    def judge_answer(self, question, reference, prediction, prompt="videochatgpt"):
        self.seen.append((question, reference, prediction))
        verdict = self.verdicts[prediction]
        if isinstance(verdict, Exception):
            raise verdict
        return verdict


def test_open_counts_invalid_and_keeps_fractional_scores(synth, tmp_path):
    rows = load_jsonl(synth["eval"])[:4]
    replies = {row["id"]: f"answer {i}" for i, row in enumerate(rows)}
    judge = ObjectJudge({"answer 0": {"pred": "yes", "score": 4.8}, "answer 1": {"pred": "no", "score": 1.0},
                         "answer 2": {"pred": "yes", "score": 5.0},
                         "answer 3": OracleError("judge failed after 5 attempt(s): invalid reply")})
    policy = ScriptedPolicy(replies)
    predictions = tmp_path / "open.jsonl"
    results = ev.evaluate(policy, rows, task="open", batch_size=3, judge=judge,
                          predictions_path=str(predictions), progress=False)
    assert results["n"] == 4 and results["invalid"] == 1
    assert results["accuracy"] == pytest.approx(2 / 3)            # yes / (yes + no)
    assert results["score"] == pytest.approx((4.8 + 1.0 + 5.0) / 3)
    assert policy.last_call == dict(max_new_tokens=64, temperature=0.2, greedy=False)
    assert sorted(judge.seen) == sorted((r["question"], r["answer"], f"answer {i}") for i, r in enumerate(rows))
    lines = {line["id"]: line for line in read_lines(predictions)}
    assert len(lines) == 4
    invalid = lines[rows[3]["id"]]
    assert invalid["invalid"] and invalid["verdict"] is None and "invalid reply" in invalid["error"]
    assert lines[rows[0]["id"]]["score"] == 4.8 and lines[rows[0]["id"]]["verdict"] == "yes"
    with pytest.raises(ValueError, match="judge"):
        ev.evaluate(policy, rows, task="open", progress=False)


# ---------------------------------------------------------------------------------------------
# the fake judge server, and open-ended end to end through the command line


class FakeJudgeServer:
    """An OpenAI-compatible /v1/chat/completions that replies by the question's tag: tag -> list of
    replies, one per attempt (the last one repeats)."""

    def __init__(self, script):
        self.script, self.requests = script, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                tag = re.search(r"Question: .*\[(q\d+)\]", prompt).group(1)
                with lock:
                    attempt = sum(t == tag for t, _ in server.requests)
                    server.requests.append((tag, prompt))
                replies = server.script[tag]
                content = replies[min(attempt, len(replies) - 1)]
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def attempts(self, tag):
        return sum(t == tag for t, _ in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_open_end_to_end_cli_with_fake_judge(synth, checkpoint, tmp_path, capsys):
    rows = load_jsonl(synth["eval"])[:4]
    for i, row in enumerate(rows):
        row["question"] += f" [q{i}]"          # so the judge can tell the requests apart
    data = tmp_path / "open.jsonl"
    write_jsonl(data, rows)
    judge = FakeJudgeServer({
        "q0": ['{"pred": "yes", "score": 4.8}'],
        "q1": ["I cannot decide.", '{"pred": "no", "score": 1}'],        # malformed, retried
        "q2": ["garbage", "still garbage"],                               # stays malformed: invalid
        "q3": ["Here you go: {'pred': 'yes', 'score': 4}"],
    })
    predictions, out = tmp_path / "preds.jsonl", tmp_path / "results.json"
    try:
        assert ev.main([f"--checkpoint={checkpoint}", f"--data={data}", "--task=open",
                        f"--judge_base_url={judge.url}", "--judge_model=fake", "--judge_max_retries=1",
                        "--judge_backoff=0.01", "--max_new_tokens=12", f"--predictions={predictions}",
                        f"--out={out}", "--quiet=True", "--max_invalid_fraction=0.25"]) == 0   # 1 of 4 invalid
    finally:
        judge.close()
    assert judge.attempts("q0") == 1 and judge.attempts("q1") == 2 and judge.attempts("q2") == 2
    results = json.load(open(out))
    assert results["task"] == "open" and results["n"] == 4 and results["invalid"] == 1
    assert results["accuracy"] == pytest.approx(2 / 3)
    assert results["score"] == pytest.approx((4.8 + 1 + 4) / 3)
    assert results["temperature"] == 0.2 and results["predictions"] == str(predictions)
    lines = {line["id"]: line for line in read_lines(predictions)}
    assert len(lines) == 4 and lines[rows[2]["id"]]["invalid"] and lines[rows[0]["id"]]["score"] == 4.8
    # the judge saw each sample's question, correct answer and the model's own prediction
    for i, row in enumerate(rows):
        prompt = next(p for t, p in judge.requests if t == f"q{i}")
        assert f"Correct Answer: {row['answer']}\nPredicted Answer: {lines[row['id']]['prediction']}\n" in prompt
    printed = capsys.readouterr().out
    assert "Overall" in printed and "invalid judge verdicts: 1" in printed
    assert "accuracy 66.7% over 3 valid judge verdicts of 4 (1 invalid)" in printed


def test_open_needs_a_judge_on_the_command_line(synth, checkpoint):
    with pytest.raises(SystemExit):
        ev.main([f"--checkpoint={checkpoint}", f"--data={synth['eval']}", "--task=open"])


# ---------------------------------------------------------------------------------------------
# exact match, resume, skipped videos


def exact_replies(rows):
    """Right for even rows, wrong (but normalising differently) for odd ones."""
    return {r["id"]: (f"The {r['answer'].upper()}." if i % 2 == 0 else "purple elephant") for i, r in enumerate(rows)}


def test_exact_match_normalised_per_category(synth):
    rows = load_jsonl(synth["eval"])
    results = ev.evaluate(ScriptedPolicy(exact_replies(rows)), rows, batch_size=4, progress=False)
    assert results["task"] == "exact" and results["n"] == 12 and results["accuracy"] == 0.5
    expected = {}
    for i, row in enumerate(rows):
        expected.setdefault(row["category"], []).append(i % 2 == 0)
    assert {c: (m["accuracy"], m["n"]) for c, m in results["by_category"].items()} == {
        c: (sum(v) / len(v), len(v)) for c, v in expected.items()}
    assert results["by_duration"] == {}


def test_resume_generates_only_the_missing_samples(synth, tmp_path):
    rows = load_jsonl(synth["eval"])
    replies = exact_replies(rows)
    predictions = tmp_path / "preds.jsonl"
    full = ev.evaluate(ScriptedPolicy(replies), rows, batch_size=3, predictions_path=str(predictions),
                       progress=False)
    lines = predictions.read_text().splitlines(keepends=True)
    assert len(lines) == 12
    # an interrupted run: half the lines, then half of the next one (killed mid-write)
    predictions.write_text("".join(lines[:6]) + lines[6][:20])
    kept = {json.loads(line)["id"] for line in lines[:6]}
    policy = ScriptedPolicy(replies)
    resumed = ev.evaluate(policy, rows, batch_size=3, predictions_path=str(predictions), resume=True,
                          progress=False)
    generated = [i for call in policy.generated for i in call]
    assert sorted(generated) == sorted(r["id"] for r in rows if r["id"] not in kept)
    assert len(policy.generated) == 2
    assert resumed == full
    final = read_lines(predictions)                     # every line parses again
    assert sorted(r["id"] for r in final) == sorted(r["id"] for r in rows)
    # resuming a finished file generates nothing; without --resume the file starts over
    policy = ScriptedPolicy(replies)
    assert ev.evaluate(policy, rows, predictions_path=str(predictions), resume=True, progress=False) == full
    assert policy.generated == []
    ev.evaluate(ScriptedPolicy(replies), rows[:2], predictions_path=str(predictions), progress=False)
    assert len(read_lines(predictions)) == 2
    with pytest.raises(ValueError, match="'exact' predictions"):
        ev.evaluate(ScriptedPolicy(), load_jsonl(synth["eval_mc"]), task="mc",
                    predictions_path=str(predictions), resume=True, progress=False)


def test_missing_video_is_skipped_and_counted(synth, tmp_path, caplog):
    rows = load_jsonl(synth["eval"])[:5]
    missing = str(tmp_path / "gone.mp4")
    rows[2]["video"] = missing
    policy = ScriptedPolicy(exact_replies(rows))
    predictions = tmp_path / "preds.jsonl"
    with caplog.at_level(logging.WARNING, logger="eval"):
        results = ev.evaluate(policy, rows, batch_size=1, predictions_path=str(predictions), progress=False)
    assert results["skipped_videos"] == 1 and results["n"] == 4
    assert results["accuracy"] == pytest.approx(2 / 4)         # rows 0 and 4 right, 2 is not counted
    assert any(missing in message for message in caplog.messages)
    assert len(policy.generated) == 4                          # the empty batch made no generate call
    skipped = [line for line in read_lines(predictions) if line.get("skipped")]
    assert [line["id"] for line in skipped] == [rows[2]["id"]] and "file not found" in skipped[0]["error"]
    # resume tries the skipped video again; it now exists
    rows[2]["video"] = rows[1]["video"]
    policy = ScriptedPolicy(exact_replies(rows))
    results = ev.evaluate(policy, rows, predictions_path=str(predictions), resume=True, progress=False)
    assert policy.generated == [[rows[2]["id"]]] and results["skipped_videos"] == 0 and results["n"] == 5


# ---------------------------------------------------------------------------------------------
# the comparison table


TABLE2 = {"Temporal Perception": (0.710, 0.498), "Spatial Reasoning": (0.512, 0.550),
          "Overall": (0.424, 0.362)}


def fake_results(column, task="mc"):
    by_category = {c: {"accuracy": v[column], "n": 10} for c, v in TABLE2.items() if c != "Overall"}
    results = {"task": task, "n": 20, "accuracy": TABLE2["Overall"][column], "by_category": by_category,
               "by_duration": {}, "skipped_videos": 0}
    if task == "open":
        results.update(score=(3.9, 3.6)[column], invalid=0)
        for m in by_category.values():
            m.update(score=(3.9, 3.6)[column], invalid=0)
    else:
        results["unanswered"] = column
    return results


def test_compare_command_prints_table2(tmp_path):
    paths = []
    for column, name in ((1, "vlm"), (0, "oracle")):     # delta = B - A: Oracle-RLAIF minus VLM-RLAIF
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(fake_results(column), checkpoint=f"out/{name}-rlaif")))
        paths.append(str(path))
    out = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--compare=" + ",".join(paths)],
                         capture_output=True, text=True, cwd=HERE, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["category", "vlm-rlaif", "oracle-rlaif", "delta"]
    rows = {line.split("  ")[0].strip(): line.split() for line in lines[1:]}
    assert rows["Temporal Perception"][-3:] == ["49.8%", "71.0%", "+21.2"]
    assert rows["Spatial Reasoning"][-3:] == ["55.0%", "51.2%", "-3.8"]
    assert rows["Overall"][-3:] == ["36.2%", "42.4%", "+6.2"]
    assert "delta = oracle-rlaif - vlm-rlaif" in out.stdout


def test_compare_open_has_accuracy_and_score_and_missing_rows():
    a, b = fake_results(0, "open"), fake_results(1, "open")
    del b["by_category"]["Spatial Reasoning"]
    text = ev.format_comparison(b, a, names=("before", "after"))
    header, *rows = text.splitlines()
    assert header.split() == ["category", "before", "acc", "before", "score", "after", "acc", "after",
                              "score", "delta", "acc", "delta", "score"]
    temporal = next(r for r in rows if r.startswith("Temporal Perception")).split()
    assert temporal[-6:] == ["49.8%", "3.60", "71.0%", "3.90", "+21.2", "+0.30"]
    spatial = next(r for r in rows if r.startswith("Spatial Reasoning")).split()
    assert spatial[-6:] == ["-", "-", "51.2%", "3.90", "-", "-"]
    assert "delta = after - before" in text
    with pytest.raises(ValueError):
        ev.format_comparison(a, fake_results(1, "mc"))


# ---------------------------------------------------------------------------------------------
# the real tiny model through the command line


def test_cli_infers_the_task_and_writes_files(synth, checkpoint, capsys):
    assert ev.main([f"--checkpoint={checkpoint}", f"--data={synth['eval_mc']}", "--batch_size=5",
                    "--limit=6", "--quiet=True"]) == 0
    beside = os.path.join(os.path.dirname(checkpoint), "eval", os.path.basename(checkpoint))   # never inside it
    predictions = os.path.join(beside, "eval_mc_mc_predictions.jsonl")
    results = json.load(open(os.path.join(beside, "eval_mc_mc_results.json")))
    assert results["task"] == "mc" and results["n"] == 6 and results["max_new_tokens"] == 5
    assert 0.0 <= results["accuracy"] <= 1.0 and set(results["by_category"]) <= {"colour", "count", "position", "order"}
    lines = read_lines(predictions)
    assert len(lines) == 6 and all({"prediction", "choice", "correct", "unanswered"} <= set(l) for l in lines)
    assert "Overall" in capsys.readouterr().out
    # no options: exact match
    assert ev.main([f"--checkpoint={checkpoint}", f"--data={synth['eval']}", "--limit=3", "--quiet=True"]) == 0
    results = json.load(open(os.path.join(beside, "eval_exact_results.json")))
    assert results["task"] == "exact" and results["n"] == 3 and results["max_new_tokens"] == 8


# ---------------------------------------------------------------------------------------------
# torch.distributed: two CPU processes (gloo)


def distributed_worker(rank, world, port, rows, predictions, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    policy = ScriptedPolicy(exact_replies(rows))
    results = ev.evaluate(policy, rows, batch_size=1, predictions_path=predictions, progress=False)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"results": results, "generate_calls": len(policy.generated),
                   "encode_calls": policy.encode_calls, "ids": [i for c in policy.generated for i in c]}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_distributed_shards_keep_ranks_in_step(synth, tmp_path):
    rows = load_jsonl(synth["eval"])[:5]
    rows[3]["video"] = str(tmp_path / "gone.mp4")     # rank 1's second batch has no video at all
    predictions = str(tmp_path / "preds.jsonl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(distributed_worker, args=(2, port, rows, predictions, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    # rank 0 has samples 0, 2, 4; rank 1 has 1, 3 (no video) and one blank batch: 3 calls each
    assert [r["generate_calls"] for r in ranks] == [3, 3] and [r["encode_calls"] for r in ranks] == [3, 3]
    assert ranks[0]["ids"] == [rows[0]["id"], rows[2]["id"], rows[4]["id"]]
    assert ranks[1]["ids"][0] == rows[1]["id"]
    assert ranks[0]["results"] == ranks[1]["results"]
    single = ev.evaluate(ScriptedPolicy(exact_replies(rows)), rows, progress=False)
    assert ranks[0]["results"] == single and single["skipped_videos"] == 1
    lines = read_lines(predictions)                      # written once, by rank 0
    assert sorted(line["id"] for line in lines) == sorted(r["id"] for r in rows)


# ---------------------------------------------------------------------------------------------
# parity with the published protocols: Video-MME as lmms-eval scores it, open QA as Video-ChatGPT judges it

def test_videomme_rows_get_lmms_evals_prompt_settings_and_breakdowns(synth):
    rows = videomme_rows(synth)
    for i, row in enumerate(rows):
        row.update(domain=["Knowledge", "Sports Competition"][i % 2], sub_category=["Astronomy", "Football"][i % 2])
    replies = {row["id"]: (row["answer"] if i < 6 else "a reply naming no option") for i, row in enumerate(rows)}
    policy = ScriptedPolicy(replies)
    results = ev.evaluate(policy, rows, task="mc", progress=False)
    assert policy.mc_format == "videomme" and results["mc_prompt"] == "videomme"     # Video-MME rows: auto
    assert policy.last_call == dict(max_new_tokens=16, temperature=0.0, greedy=True)    # lmms-eval's settings
    assert results["accuracy"] == pytest.approx(6 / 12) and results["unanswered"] == 6   # no letter: wrong
    assert set(results["by_domain"]) == {"Knowledge", "Sports Competition"}
    assert {k: m["n"] for k, m in results["by_sub_category"].items()} == {"Astronomy": 6, "Football": 6}
    ev.evaluate(policy, rows, task="mc", mc_prompt="oneline", progress=False)          # the old prompt, on request
    assert policy.mc_format == "oneline" and policy.last_call["max_new_tokens"] == 5
    plain = load_jsonl(synth["eval_mc"])                                                 # not Video-MME: oneline
    ev.evaluate(policy, plain, task="mc", progress=False)
    assert policy.mc_format == "oneline"


def test_extract_lmms_reads_as_the_leaderboard_does(synth):
    rows = videomme_rows(synth)[:4]
    option_text = {row["id"]: row["options"][ord(row["answer"]) - 65] for row in rows}   # the answer's text
    policy = ScriptedPolicy(option_text)
    ours = ev.evaluate(policy, rows, task="mc", progress=False)
    lmms = ev.evaluate(policy, rows, task="mc", extract="lmms", progress=False)
    assert ours["accuracy"] == 1.0 and lmms["accuracy"] == 0.0 and lmms["unanswered"] == 4   # lmms ignores option text
    assert lmms["extract"] == "lmms"


def test_open_judge_gets_videochatgpts_messages_and_is_aggregated_as_it_does(synth, tmp_path):
    import judge as judge_module
    rows = load_jsonl(synth["eval"])[:4]
    for i, row in enumerate(rows):
        row["question"] = f"  What is shown? [q{i}] "                   # raw: Video-ChatGPT strips nothing
    server = FakeJudgeServer({"q0": ["{'pred': 'yes', 'score': 4.8}"], "q1": ["{'pred': 'No.', 'score': 1}"],
                              "q2": ["{'pred': 'maybe', 'score': 3}"], "q3": ["{'pred': 'Yes!', 'score': 5}"]})
    try:
        judge = judge_module.Judge(base_url=server.url, model="fake", max_retries=0, backoff=0.01)
        replies = {row["id"]: f" answer\n{i} " for i, row in enumerate(rows)}
        results = ev.evaluate(ScriptedPolicy(replies), rows, task="open", judge=judge, progress=False)
    finally:
        server.close()
    system = "You are an intelligent chatbot designed for evaluating the correctness of generative outputs"
    for i, row in enumerate(rows):
        tag, prompt = next((t, p) for t, p in server.requests if t == f"q{i}")
        assert prompt == (f"Please evaluate the following video-based question-answer pair:\n\nQuestion: {row['question']}"
                          f"\nCorrect Answer: {row['answer']}\nPredicted Answer:  answer\n{i} \n\nProvide your "
                          "evaluation only as a yes/no and score where the score is an integer value between 0 and 5,"
                          " with 5 indicating the highest meaningful match. Please generate the response in the form "
                          "of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a "
                          "string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING.DO NOT PROVIDE ANY "
                          "OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. For example, "
                          "your response should look like this: {'pred': 'yes', 'score': 4.8}.")
    assert judge_module.VCG_SYSTEM.startswith(system) and "task:------##INSTRUCTIONS: - Focus" in judge_module.VCG_SYSTEM
    # "yes" in pred: yes; else "no" in it: no; else neither (left out of the accuracy, counted, scored)
    assert results["accuracy"] == pytest.approx(2 / 3) and results["unclear"] == 1 and results["invalid"] == 0
    assert results["score"] == pytest.approx((4.8 + 1 + 3 + 5) / 4) and results["judge_prompt"] == "videochatgpt"


# ---------------------------------------------------------------------------------------------
# faults, second round: a dripping judge, invalid verdicts, resume, where the files go


def tagged_open_rows(synth, tmp_path, n=4):
    rows = load_jsonl(synth["eval"])[:n]
    for i, row in enumerate(rows):
        row["question"] += f" [q{i}]"          # so the fake judge can tell the requests apart
    path = tmp_path / "open.jsonl"
    write_jsonl(path, rows)
    return rows, path


def test_a_dripping_judge_costs_judge_max_seconds_per_verdict_not_300_s(synth, checkpoint, tmp_path, capsys):
    stop = threading.Event()

    class Drip(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not stop.is_set():                   # a byte every 50 ms: every read is quick, the reply never ends
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                stop.wait(0.05)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows, data = tagged_open_rows(synth, tmp_path)
    start = time.monotonic()
    try:
        code = ev.main([f"--checkpoint={checkpoint}", f"--data={data}", "--task=open", "--judge_model=m",
                        f"--judge_base_url=http://127.0.0.1:{server.server_address[1]}/v1", "--judge_max_seconds=1.0",
                        "--judge_timeout=0.5", "--judge_max_retries=3", f"--predictions={tmp_path / 'p.jsonl'}",
                        "--max_new_tokens=2", "--quiet=True"])
    finally:
        stop.set()
        server.shutdown()
        server.server_close()
    assert time.monotonic() - start < 15                     # 4 verdicts at once, 1 s each (300 s each before)
    assert code == 1 and "4 of 4 samples have no valid judge verdict" in capsys.readouterr().err
    assert all(line["invalid"] and "max_seconds=1.0" in line["error"] for line in read_lines(tmp_path / "p.jsonl"))


def test_invalid_verdicts_exit_1_and_a_resume_keeps_one_record_per_id(synth, checkpoint, tmp_path, capsys):
    rows, data = tagged_open_rows(synth, tmp_path)
    predictions = tmp_path / "p.jsonl"
    args = [f"--checkpoint={checkpoint}", f"--data={data}", "--task=open", "--judge_model=m", "--judge_max_retries=0",
            f"--predictions={predictions}", "--max_new_tokens=2", "--quiet=True"]
    dying = FakeJudgeServer({"q0": ['{"pred": "yes", "score": 5}'], "q1": ["502 Bad Gateway"],
                             "q2": ["502 Bad Gateway"], "q3": ["502 Bad Gateway"]})     # died after one verdict
    try:
        assert ev.main(args + [f"--judge_base_url={dying.url}"]) == 1
    finally:
        dying.close()
    captured = capsys.readouterr()
    assert "accuracy 100.0% over 1 valid judge verdicts of 4 (3 invalid)" in captured.out
    assert "3 of 4 samples have no valid judge verdict" in captured.err
    back = FakeJudgeServer({f"q{i}": ['{"pred": "no", "score": 1}'] for i in range(4)})
    try:
        assert ev.main(args + [f"--judge_base_url={back.url}", "--resume=True"]) == 0
    finally:
        back.close()
    assert back.attempts("q0") == 0 and [back.attempts(f"q{i}") for i in (1, 2, 3)] == [1, 1, 1]
    lines = read_lines(predictions)
    assert sorted(line["id"] for line in lines) == sorted(row["id"] for row in rows)     # 4 lines for 4 ids
    assert not any(line["invalid"] for line in lines)


def test_resume_survives_a_last_line_cut_inside_a_multibyte_character(synth, tmp_path):
    rows = load_jsonl(synth["eval"])[:4]
    replies = {row["id"]: "rouge \u00e9carlate \u2014 \u7ea2" for row in rows}
    predictions = tmp_path / "p.jsonl"
    full = ev.evaluate(ScriptedPolicy(replies), rows, predictions_path=str(predictions), progress=False)
    data = predictions.read_bytes()
    cut = data.rindex("\u7ea2".encode()) + 1                 # killed in the middle of the last record's character
    predictions.write_bytes(data[:cut])
    policy = ScriptedPolicy(replies)
    assert ev.evaluate(policy, rows, predictions_path=str(predictions), resume=True, progress=False) == full
    assert policy.generated == [[rows[-1]["id"]]] and len(read_lines(predictions)) == 4


def test_default_predictions_survive_the_next_save_of_the_checkpoint_they_evaluate(synth, checkpoint, tmp_path):
    import shutil
    from checkpoint import write_dir
    out = tmp_path / "out"
    write_dir(str(out / "ckpt"), lambda d: shutil.copytree(checkpoint, os.path.join(d, "model")))   # a train.py checkpoint
    model = str(out / "ckpt" / "model")
    assert ev.main([f"--checkpoint={model}", f"--data={synth['eval']}", "--limit=2", "--quiet=True"]) == 0
    predictions = out / "eval" / "ckpt_model" / "eval_exact_predictions.jsonl"
    assert len(read_lines(predictions)) == 2
    write_dir(str(out / "ckpt"), lambda d: shutil.copytree(checkpoint, os.path.join(d, "model")))   # the next save
    assert len(read_lines(predictions)) == 2 and (out / "eval" / "ckpt_model" / "eval_exact_results.json").exists()


def test_a_checkpoint_naming_a_hub_id_loads_only_when_the_command_line_names_it(synth, checkpoint, tmp_path, monkeypatch):
    import shutil
    from checkpoint import CheckpointError
    from transformers import AutoTokenizer
    path = str(tmp_path / "ckpt")
    shutil.copytree(checkpoint, path)
    meta = json.load(open(os.path.join(path, "config.json")))
    meta["model"]["lm"] = "some-org/some-lm"
    json.dump(meta, open(os.path.join(path, "config.json"), "w"))
    os.remove(os.path.join(path, "manifest.json"))                     # edited by hand
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, *a, **k: 1 / 0)   # a download would start here
    args = [f"--checkpoint={path}", f"--data={synth['eval']}", "--limit=1", "--quiet=True"]
    with pytest.raises(CheckpointError, match="lm is 'some-org/some-lm', not a local directory.*eval.py --hub_ids="):
        ev.main(args)
    with pytest.raises(ZeroDivisionError):
        ev.main(args + ["--hub_ids=some-org/some-lm"])
