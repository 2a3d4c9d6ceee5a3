"""
Oracle rankers: who orders the G responses the policy sampled for one prompt (paper Sec. 3).
Oracle-RLAIF replaces a calibrated reward model by an Oracle that only has to *rank* candidate
answers. Every oracle here has the same two methods:

    oracle.rank(sample, responses) -> list[int]
        competition ranks of the G responses, 0 = best; identical responses share a rank (scores
        9, 7, 7, 3 -> ranks 0, 1, 1, 3). Failure raises OracleError with the reason: the trainer
        gives that group zero advantages and counts it; it never invents a ranking.
    oracle.rank_many(samples, groups, max_workers=8) -> list[list[int] | OracleError]
        the groups of a batch, concurrently; a failed group holds its OracleError in its slot.

make_oracle(name, **options) builds one: "reference" (agreement with the dataset's answer: exact >
partial > wrong), "graded" (plus partial credit for near misses), "reward_model" (a sequence
classification model, or any score_fn(question, responses)), "judge" (an LLM behind an
OpenAI-compatible endpoint; the client is judge.py). A sample is a dict {"id", "video", "question",
"answer", optional "options"}; for multiple choice the answer is a letter, "options" the texts.

Check an Oracle (a judge endpoint, say) on a file of groups before a long run:
    python oracle.py --oracle=judge --base_url=http://localhost:8000/v1 --model=NAME --groups=groups.jsonl
where each line is {"sample": {...}, "responses": [...]}; one JSON line comes out per group.
"""
import base64
import functools
import io
import json
import logging
import math
import random
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from answers import extract_choice, normalize_answer, token_f1
from configurator import configure
from data import LETTERS
from grpo_rank import ranks_from_scores
from judge import (EMPTY_SHOWN, JUDGE_BASE_URL, JUDGE_MAX_RETRIES, JUDGE_MAX_SECONDS, JUDGE_TIMEOUT, Judge,
                   JudgeError, parse_ranking)

log = logging.getLogger("oracle")

ORACLE_NAMES = ("reference", "graded", "reward_model", "judge")

# ---------------------------------------------------------------------------------------------
# scores of the reference-based Oracles
EXACT_SCORE = 2.0   # above any partial credit (token F1 <= 1), so an exact match always ranks first

# GradedOracle's colour table: neighbours on the colour wheel (and the greys) earn NEAR_COLOUR_SCORE.
# Deliberately small and symmetric; extend it for your own data.
COLOUR_NEIGHBOURS = [("red", "orange"), ("red", "pink"), ("red", "purple"), ("orange", "yellow"),
                     ("orange", "brown"), ("yellow", "green"), ("green", "blue"), ("green", "cyan"),
                     ("blue", "cyan"), ("blue", "purple"), ("purple", "pink"),
                     ("black", "gray"), ("gray", "white")]
COLOURS = {c for pair in COLOUR_NEIGHBOURS for c in pair}
COLOUR_ALIASES = {"grey": "gray", "violet": "purple"}
NEAR_COLOUR_SCORE = 0.5

RANK_SYSTEM = ("You are a careful, impartial judge of answers to questions about videos. "
               "You compare candidate answers and rank them from best to worst.")


class OracleError(Exception):
    """An oracle could not rank a group (the judge did not answer, a score was not finite, ...).
    The message says why; it never contains an API key."""


# ---------------------------------------------------------------------------------------------
# small helpers shared by the oracles

def ranks_of(scores):
    """list[float] (higher = better) -> list[int] competition ranks, 0 = best."""
    if not scores:
        return []
    return ranks_from_scores(torch.tensor([scores], dtype=torch.float32))[0].tolist()


def format_question(sample):
    """The question as an oracle should see it: for multiple choice, followed by the lettered options."""
    question = sample["question"].strip()
    options = sample.get("options")
    if options:
        question += "\n" + "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))
    return question


def run_many(jobs, max_workers=8, errors=(OracleError,)):
    """Run zero-argument callables concurrently; an exception of type `errors` lands in its slot.
    max_workers <= 1 runs them in order in this thread. Any other exception is a bug and raises."""
    def call(job):
        try:
            return job()
        except errors as e:
            return e
    if max_workers <= 1 or len(jobs) <= 1:
        return [call(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(jobs))) as pool:
        return list(pool.map(call, jobs))


def rank_many(oracle, samples, groups, max_workers=8):
    """Rank many (sample, responses) groups concurrently.
    oracle: anything with .rank(sample, responses); samples: list[dict]; groups: list[list[str]]
    -> list[list[int] | OracleError], in input order."""
    if len(samples) != len(groups):
        raise ValueError(f"{len(samples)} samples but {len(groups)} groups")
    jobs = [functools.partial(oracle.rank, s, g) for s, g in zip(samples, groups)]
    return run_many(jobs, max_workers)


# ---------------------------------------------------------------------------------------------
# reference answers

def reference_letter(sample):
    """The correct letter of a multiple-choice sample (its answer, or the option its answer spells)."""
    answer = sample["answer"].strip()
    letter = extract_choice(answer, sample["options"])
    if letter is None:
        raise OracleError(f"sample {sample.get('id')!r}: answer {answer!r} names none of the options")
    return letter


class ReferenceOracle:
    """Ranks by agreement with the reference answer.

    Open-ended: after normalize_answer, exact match scores 2, partial overlap its token F1 in
    (0, 1], anything else 0, so all wrong answers tie. Multiple choice (sample has "options"):
    the chosen letter (extract_choice) scores 1 when correct, else 0. Empty responses are wrong.
    Pure CPU and fast: rank_many runs the groups one after the other."""

    def score(self, sample, responses):
        """sample: dict, responses: list[str] -> list[float], higher = better."""
        if sample.get("options"):
            correct = reference_letter(sample)
            return [1.0 if extract_choice(r, sample["options"]) == correct else 0.0 for r in responses]
        reference = normalize_answer(sample["answer"])
        return [self.score_open(normalize_answer(r), reference) for r in responses]

    def score_open(self, prediction, reference):
        """Score of one normalised open-ended prediction against the normalised reference."""
        if not prediction:
            return 0.0
        if prediction == reference:
            return EXACT_SCORE
        return token_f1(prediction, reference)

    def rank(self, sample, responses):
        """sample: dict, responses: list[str] -> list[int] competition ranks, 0 = best."""
        return ranks_of(self.score(sample, responses))

    def rank_many(self, samples, groups, max_workers=8):
        return rank_many(self, samples, groups, max_workers=1)   # pure CPU: threads add nothing

    def __repr__(self):
        return f"{type(self).__name__}()"


def _numbers(normalized):
    return [float(t) for t in normalized.split() if re.fullmatch(r"\d+(?:\.\d+)?", t)]


def _colours(normalized):
    tokens = [COLOUR_ALIASES.get(t, t) for t in normalized.split()]
    return [t for t in tokens if t in COLOURS]


class GradedOracle(ReferenceOracle):
    """ReferenceOracle with partial credit for near misses, so wrong answers are ordered too.

    When the reference holds exactly one number (a count): a prediction whose first number is
    off by d != 0 scores 1 / (1 + d) (0.5, 0.33, 0.25, ...). When the reference holds exactly one
    colour: a prediction whose first colour neighbours it in COLOUR_NEIGHBOURS scores 0.5.
    A prediction keeps its token F1 when that is higher; an exact match still scores 2.
    Multiple choice is scored as in ReferenceOracle (a letter is right or wrong)."""

    def score_open(self, prediction, reference):
        score = super().score_open(prediction, reference)
        if score == EXACT_SCORE or not prediction:
            return score
        true_numbers, pred_numbers = _numbers(reference), _numbers(prediction)
        if len(true_numbers) == 1 and pred_numbers and pred_numbers[0] != true_numbers[0]:
            score = max(score, 1.0 / (1.0 + abs(pred_numbers[0] - true_numbers[0])))
        true_colours, pred_colours = _colours(reference), _colours(prediction)
        if len(true_colours) == 1 and pred_colours:
            pair = {true_colours[0], pred_colours[0]}
            if any(pair == set(p) for p in COLOUR_NEIGHBOURS):
                score = max(score, NEAR_COLOUR_SCORE)
        return score


# ---------------------------------------------------------------------------------------------
# reward model

class RewardModelOracle:
    """Ranks responses by a reward model's scalar score.

    path: a local directory (or hub name) of any AutoModelForSequenceClassification with
    num_labels=1 and its tokenizer; or score_fn: a callable (question: str, responses: list[str])
    -> list[float]. Identical responses are scored once; scoring is batched under torch.no_grad.
    A tokenizer with a chat template sees [user: question, assistant: response] (how chat RMs are
    trained); otherwise the (question, response) pair is encoded as a text pair.
    Non-finite scores raise OracleError."""

    def __init__(self, path=None, score_fn=None, device="cpu", dtype=None, batch_size=16, max_length=1024):
        if (path is None) == (score_fn is None):
            raise ValueError("RewardModelOracle needs exactly one of path= or score_fn=")
        self.path, self.score_fn = path, score_fn
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self.model = self.tokenizer = None
        if path is not None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            if self.tokenizer.pad_token is None:     # Llama-style tokenizers ship without one
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            kwargs = {"dtype": getattr(torch, dtype)} if isinstance(dtype, str) else {}
            self.model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            if self.model.config.num_labels != 1:
                raise ValueError(f"reward model {path} has num_labels={self.model.config.num_labels}, expected 1")
            # the model finds each sequence's last token by looking for the pad id: it must know it
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.model.to(self.device).eval()

    @torch.no_grad()
    def model_scores(self, question, responses):
        """question: str, responses: list[str] -> list[float], one forward per batch_size responses."""
        tok = self.tokenizer
        scores = []
        for start in range(0, len(responses), self.batch_size):
            chunk = responses[start:start + self.batch_size]
            if getattr(tok, "chat_template", None):
                texts = [tok.apply_chat_template([{"role": "user", "content": question},
                                                  {"role": "assistant", "content": r}], tokenize=False)
                         for r in chunk]
                batch = tok(texts, add_special_tokens=False, padding=True, truncation=True,
                            max_length=self.max_length, return_tensors="pt")
            else:
                batch = tok([question] * len(chunk), chunk, padding=True, truncation=True,
                            max_length=self.max_length, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            scores += self.model(**batch).logits[:, 0].float().cpu().tolist()
        return scores

    def score(self, sample, responses):
        """sample: dict, responses: list[str] -> list[float] (identical responses scored once)."""
        unique = list(dict.fromkeys(responses))
        question = format_question(sample)
        if self.score_fn is not None:
            try:
                unique_scores = [float(s) for s in self.score_fn(question, unique)]
            except Exception as e:   # a user's scorer (maybe remote) failing is an oracle failure
                raise OracleError(f"score_fn failed: {type(e).__name__}: {e}") from e
        else:
            unique_scores = self.model_scores(question, unique)
        if len(unique_scores) != len(unique):
            raise OracleError(f"reward model gave {len(unique_scores)} scores for {len(unique)} responses")
        if not all(math.isfinite(s) for s in unique_scores):
            raise OracleError(f"reward model gave non-finite scores {unique_scores}")
        by_text = dict(zip(unique, unique_scores))
        return [by_text[r] for r in responses]

    def rank(self, sample, responses):
        """sample: dict, responses: list[str] -> list[int] competition ranks, 0 = best."""
        return ranks_of(self.score(sample, responses))

    def rank_many(self, samples, groups, max_workers=8):
        # a local model is one device: threads would only contend for it (and the tokenizer is not
        # thread-safe); a score_fn may be a remote call, which does gain from concurrency
        return rank_many(self, samples, groups, max_workers=1 if self.model is not None else max_workers)

    def __repr__(self):
        source = f"path={self.path!r}" if self.path is not None else f"score_fn={self.score_fn!r}"
        return f"RewardModelOracle({source}, device={str(self.device)!r})"


# ---------------------------------------------------------------------------------------------
# the judge

def video_frames_png(path, num_frames, max_side):
    """num_frames frames of a video as base64 PNG data URLs, the longer side at most max_side px."""
    import data   # lazily: only judges that look at frames need the video stack
    from PIL import Image
    try:
        frames = data.load_video(path, num_frames)   # (T, H, W, 3) uint8
    except data.VideoError as e:
        raise OracleError(f"cannot read frames of {path}: {e}") from e
    urls = []
    for frame in frames.numpy():
        image = Image.fromarray(frame)
        if max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


class JudgeOracle(Judge):
    """A judge LLM that ranks (judge.Judge: the endpoint, its retries, the API key's handling).

    The judge sees the question (with its options), the reference answer when there is one, and
    the distinct responses numbered [1]..[n] in a shuffled order (judges favour early positions;
    the shuffle uses random.Random(seed, call number), so a run is reproducible). It replies
    {"ranking": [ids best first]}; the reply is validated, mapped back through the shuffle and
    expanded to duplicates. Failures after the retries raise OracleError.
    frames > 0 also sends that many video frames as PNG image_url parts (for vision judges)."""

    def __init__(self, seed=0, frames=0, frame_size=336, use_reference=True, **endpoint):
        super().__init__(**endpoint)
        self.seed, self.frames, self.frame_size, self.use_reference = seed, frames, frame_size, use_reference
        self.calls = 0                      # rank calls so far: with seed, picks each call's shuffle
        self.lock = threading.Lock()

    def chat(self, messages, parse=None, deadline=None):
        try:
            return super().chat(messages, parse, deadline)
        except JudgeError as e:          # an Oracle fails with OracleError, whatever its kind ...
            reason = str(e)
        raise OracleError(reason)        # ... raised outside the except block: no urllib error inside

    def take_calls(self, n):
        """Reserve n consecutive call numbers (thread-safe); returns the first."""
        with self.lock:
            first, self.calls = self.calls, self.calls + n
        return first

    def rank_prompt(self, sample, shown):
        """The user prompt for the distinct responses `shown` (single-line strings), ids 1..n in order."""
        lines = ["Rank the candidate answers to this question about a video, from best to worst.", "",
                 f"Question: {format_question(sample)}"]
        if self.use_reference and sample.get("answer"):
            lines.append(f"Correct answer: {sample['answer'].strip()}")
        lines += ["", "Candidate answers:"]
        for i, response in enumerate(shown, start=1):
            lines.append(f"[{i}] {response or EMPTY_SHOWN}")
        lines += ["", "Judge correctness first" + (" (agreement with the correct answer)" if
                                                      self.use_reference and sample.get("answer") else "")
                  + ", then relevance, detail and consistency with the video.",
                  f'Reply with only a JSON object {{"ranking": [...]}} listing each of the {len(shown)} '
                  "ids exactly once, best answer first."]
        return "\n".join(lines)

    def user_content(self, sample, text):
        """Plain text, or text followed by the video's frames for vision judges."""
        if not self.frames:
            return text
        images = video_frames_png(sample["video"], self.frames, self.frame_size)
        return [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": url}}
                                                   for url in images]

    def rank(self, sample, responses, call=None, deadline=None):
        """sample: dict, responses: list[str] -> list[int] competition ranks, 0 = best.
        call: the call number that seeds the shuffle (default: the next one)."""
        if call is None:
            call = self.take_calls(1)
        keys = [" ".join(r.split()) for r in responses]   # as shown: one line per candidate
        unique = list(dict.fromkeys(keys))                 # identical responses are shown once
        if len(unique) <= 1:
            return [0] * len(responses)                # nothing to rank: no request
        shown = unique[:]
        random.Random(f"{self.seed}:{call}").shuffle(shown)
        messages = [{"role": "system", "content": RANK_SYSTEM},
                    {"role": "user", "content": self.user_content(sample, self.rank_prompt(sample, shown))}]
        ranking = self.chat(messages, functools.partial(parse_ranking, n=len(shown)), deadline)
        place = {shown[shown_id - 1]: position for position, shown_id in enumerate(ranking)}
        log.debug("sample %s: judge ranking %s", sample.get("id"), ranking)
        return ranks_of([-float(place[k]) for k in keys])

    def rank_many(self, samples, groups, max_workers=8):
        """As rank_many(), with one deadline for the whole batch (max_seconds from now): a dead judge
        costs a training step max_seconds, not max_seconds per wave of groups."""
        if len(samples) != len(groups):
            raise ValueError(f"{len(samples)} samples but {len(groups)} groups")
        first = self.take_calls(len(groups))   # numbered in input order: shuffles do not depend on threads
        deadline = time.monotonic() + self.client["max_seconds"]
        jobs = [functools.partial(self.rank, s, g, call=first + i, deadline=deadline)
                for i, (s, g) in enumerate(zip(samples, groups))]
        return run_many(jobs, max_workers)


# ---------------------------------------------------------------------------------------------

def make_oracle(name, **options):
    """Build an oracle from the trainer's config: name in ORACLE_NAMES, options its keywords."""
    if name == "reference":
        return ReferenceOracle(**options)
    elif name == "graded":
        return GradedOracle(**options)
    elif name == "reward_model":
        return RewardModelOracle(**options)
    elif name == "judge":
        return JudgeOracle(**options)
    raise ValueError(f"unknown oracle {name!r}; valid: {', '.join(ORACLE_NAMES)}")


# ----------------------------------------------------------------------------- command line
# defaults, overridable as --key=value
oracle = "reference"         # one of ORACLE_NAMES
groups = ""                  # JSONL of {"sample": {...}, "responses": [...]}; "-" for stdin
max_workers = 8
base_url = JUDGE_BASE_URL    # judge
model = ""
api_key_env = "OPENAI_API_KEY"
temperature = 0.0
timeout = JUDGE_TIMEOUT
max_retries = JUDGE_MAX_RETRIES
max_seconds = JUDGE_MAX_SECONDS
seed = 0
frames = 0
reward_model = ""            # reward_model: a local AutoModelForSequenceClassification dir
device = "cpu"
log_level = "WARNING"


def main(argv):
    """Rank every group of a file; one JSON line out per group. Returns 1 if any group failed."""
    configure(argv, globals())
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not groups:
        raise SystemExit("usage: python oracle.py --oracle=NAME --groups=FILE.jsonl [judge or reward model options]")
    if oracle == "judge":
        options = dict(base_url=base_url, model=model, api_key_env=api_key_env, temperature=temperature,
                       timeout=timeout, max_retries=max_retries, max_seconds=max_seconds, seed=seed, frames=frames)
    else:
        options = dict(path=reward_model, device=device) if oracle == "reward_model" else {}
    ranker = make_oracle(oracle, **options)
    with (sys.stdin if groups == "-" else open(groups)) as stream:
        items = [json.loads(line) for line in stream if line.strip()]
    samples, responses = [item["sample"] for item in items], [item["responses"] for item in items]
    start = time.monotonic()
    results = ranker.rank_many(samples, responses, max_workers=max_workers)
    failures = 0
    for sample, group, result in zip(samples, responses, results):
        line = {"id": sample.get("id"), "responses": group}
        if isinstance(result, OracleError):
            line["error"], failures = str(result), failures + 1
        else:
            line["ranks"] = result
        print(json.dumps(line), flush=True)
    log.info("%d groups ranked, %d failed, in %.1f s", len(results), failures, time.monotonic() - start)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
