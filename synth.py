"""
The embedded default (no downloads): the synthetic video-QA task, its word-level tokenizer and the tiny
random tower and LM. The task: coloured squares on a dark, noisy background, four categories whose
answers need the video.

    colour    what colour is the square?          (6 colours)
    count     how many squares are there?         (one, two, three)
    position  where is the square?                (left, right, top, bottom)
    order     which colour appears first?         (6 colours; the second square appears later)

The policy pools CLIP patch features Video-ChatGPT style: T temporal tokens (mean over the patches
of a frame) and S spatial tokens (mean over the frames of a patch). Each category survives that:
colour and count are in every token, position is in the spatial tokens, and order is in the
temporal tokens (which colours a frame contains). Motion direction is not used: patch-mean pooling
erases it.

    python synth.py --out=data/synth          # 2000 train / 300 held-out clips, data.py's JSONL format
"""
import json
import re
import os
import sys

import av
import numpy as np
from tqdm import tqdm

from configurator import configure
from data import IMAGE, LETTERS, build_prompt, write_jsonl

# -----------------------------------------------------------------------------
# defaults of the command line, overridable as --key=value
out = "data/synth"
num_train = 2000
num_eval = 300
seed = 0
num_frames = 8
size = 64
# -----------------------------------------------------------------------------

# RGB values are far apart (>= 140 in RGB distance) so that
# colours survive yuv420p compression and a 32x32 resize.
COLOURS = ["red", "green", "blue", "yellow", "white", "purple"]
RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (30, 70, 250),
             "yellow": (240, 220, 40), "white": (240, 240, 240), "purple": (180, 50, 210)}
CATEGORIES = ["colour", "count", "position", "order"]
ANSWERS = {"colour": COLOURS, "count": ["one", "two", "three"],
                 "position": ["left", "right", "top", "bottom"], "order": COLOURS}
EXTRA_DISTRACTORS = {"count": ["four"]}  # count has 3 answers; MC needs 4 options
QUESTIONS = {
    "colour": ["what colour is the square ?", "what is the colour of the square ?"],
    "count": ["how many squares are there ?", "how many squares can you see ?"],
    "position": ["where is the square ?", "in which part of the frame is the square ?"],
    "order": ["which colour appears first ?", "what colour is the first square to appear ?"],
}
FPS = 8
X264 = {"qp": "0"}   # lossless: x264's lossy decisions vary run to run (measured: 10 of 40
                           # re-encodings of one clip at crf 18 differed in pixels), lossless ones do not
VERSION = 3  # bump when the generator changes, so cached data is regenerated


def split_words(text):
    """Lowercase words with punctuation split off: "How many?" -> ["how", "many", "?"]."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def synthetic_vocab():
    """Every word of a synthetic question, answer or multiple-choice option,
    plus the option letters ("a".."d", lowercased like everything else). Sorted."""
    words = set(LETTERS[:4].lower())
    for questions in QUESTIONS.values():
        for q in questions:
            words.update(split_words(q))
    for cat in CATEGORIES:
        words.update(ANSWERS[cat] + EXTRA_DISTRACTORS.get(cat, []))
    return sorted(words)


PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def word_tokenizer(words=None):
    """A word-level tokenizer (lower-cased, punctuation split off) over `words` (default: the synthetic
    task's) plus the plain template's."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    splitter = pre_tokenizers.Whitespace()
    words = synthetic_vocab() if words is None else words
    template = build_prompt("", ["x"] * 4).replace(IMAGE, " ") + " " + " ".join(words) + " abcdefghijklmnopqrstuvwxyz "
    pieces = {piece.lower() for piece, _ in splitter.pre_tokenize_str(template)}
    pieces |= set(" ".join("abcdefghijklmnopqrstuvwxyz"))
    vocab = {token: i for i, token in enumerate([PAD, UNK, BOS, EOS] + sorted(pieces - {""}))}
    core = Tokenizer(WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK,
                                   bos_token=BOS, eos_token=EOS)


def tiny_vision(config):
    """The tiny default's CLIP vision tower, random, from model.ModelConfig's tiny_* sizes."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    hidden = config.tiny_vision_hidden
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=config.tiny_vision_layers,
        num_attention_heads=4, image_size=config.tiny_image_size, patch_size=config.tiny_patch_size))


def tiny_lm(config, tokenizer):
    """The tiny default's LLaMA, random, from model.ModelConfig's tiny_* sizes, for `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden = config.tiny_lm_hidden
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=config.tiny_lm_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))


def _place(rng, size, sides, gap):
    """Top-left corners (y, x) for squares of the given sides, fully inside the
    frame and at least gap px apart (so that they never merge after a resize)."""
    for _ in range(1000):
        corners = [rng.integers(0, size - s + 1, size=2) for s in sides]
        if all(a[0] + sa + gap <= b[0] or b[0] + sb + gap <= a[0] or
               a[1] + sa + gap <= b[1] or b[1] + sb + gap <= a[1]
               for i, (a, sa) in enumerate(zip(corners, sides))
               for b, sb in zip(corners[i + 1:], sides[i + 1:])):
            return corners
    raise RuntimeError(f"cannot place {len(sides)} squares in a {size}px frame")


def _make_synthetic(rng, category, answer, num_frames, size):
    """make_synthetic_video, plus hard distractors for the multiple-choice form."""
    T, S = num_frames, size
    if T < 4 or S < 32:
        raise ValueError(f"synthetic videos need >= 4 frames of >= 32 px, got {T} frames of {S} px")
    if category not in CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}")
    answers = ANSWERS[category]
    answer = answers[rng.integers(len(answers))] if answer is None else answer
    if answer not in answers:
        raise ValueError(f"{answer!r} is not a {category} answer")
    # near-black background: a random dark tint plus static grey noise
    background = 8 + rng.integers(0, 30, size=3) + rng.normal(0, 4, size=(S, S, 1))
    frames = np.repeat(np.clip(background, 0, 255).astype(np.uint8)[None], T, axis=0)
    def rgb(name):  # jittered a little, still far from every other colour
        return np.clip(np.array(RGB[name]) + rng.integers(-12, 13, size=3), 0, 255)
    def paint(t, y, x, side, colour):
        frames[t, y:y + side, x:x + side] = colour
    hard = []
    if category == "colour":  # one square, 8-12 px at 64, drifting by up to 1 px/frame
        side = int(rng.integers(S // 8, 3 * S // 16 + 1))
        (y, x), (vy, vx), colour = _place(rng, S, [side], 0)[0], rng.integers(-1, 2, size=2), rgb(answer)
        for t in range(T):
            paint(t, int(np.clip(y + vy * t, 0, S - side)), int(np.clip(x + vx * t, 0, S - side)), side, colour)
    elif category == "count":  # 1-3 squares of one colour, 10-14 px at 64, 4 px apart
        sides = [int(s) for s in rng.integers(5 * S // 32, 7 * S // 32 + 1, size=answers.index(answer) + 1)]
        colour = rgb(COLOURS[rng.integers(len(COLOURS))])
        for (y, x), side in zip(_place(rng, S, sides, S // 16), sides):
            for t in range(T):
                paint(t, y, x, side, colour)
    elif category == "position":  # centre within S/4 of its side, within S/8 of the middle line
        side = int(rng.integers(3 * S // 16, S // 4 + 1))
        along = int(rng.integers(0, S // 4 - side // 2 + 1))  # distance of the square from its side
        across = S // 2 - side // 2 + int(rng.integers(-S // 8, S // 8 + 1))
        far = S - side - along
        y, x = {"left": (across, along), "right": (across, far),
                "top": (along, across), "bottom": (far, across)}[answer]
        colour = rgb(COLOURS[rng.integers(len(COLOURS))])
        for t in range(T):
            paint(t, y, x, side, colour)
    elif category == "order":
        # The first square (the answer's colour) is there from frame 0 to the
        # end; the second appears in the second half (frame T/2 .. 3T/4 - 1)
        # and stays, so the last frames show both.
        others = [c for c in COLOURS if c != answer]
        second = others[rng.integers(len(others))]
        sides = [int(s) for s in rng.integers(S // 8, 3 * S // 16 + 1, size=2)]  # 8-12 px at 64
        (y1, x1), (y2, x2) = _place(rng, S, sides, S // 16)
        appear = int(rng.integers(T // 2, max(T // 2, T - 1 - T // 4) + 1))
        c1, c2 = rgb(answer), rgb(second)
        for t in range(T):
            paint(t, y1, x1, sides[0], c1)
            if t >= appear:
                paint(t, y2, x2, sides[1], c2)
        hard = [second]
    question = QUESTIONS[category][rng.integers(len(QUESTIONS[category]))]
    return frames, question, answer, hard


def make_synthetic_video(rng, category, answer=None, num_frames=8, size=64):
    """One synthetic clip. rng: numpy Generator; category: one of
    CATEGORIES; answer: forced answer word (random if None).
    Returns (frames uint8 (num_frames, size, size, 3), question str, answer str)."""
    frames, question, answer, _ = _make_synthetic(rng, category, answer, num_frames, size)
    return frames, question, answer


def write_mp4(path, frames, fps=FPS, options=X264):
    """uint8 (T, H, W, 3) -> H.264 mp4 (yuv420p), lossless by default, so the decoded pixels are the same
    on every run and machine; the rename keeps a killed run from leaving half a file."""
    tmp = f"{path}.tmp{os.getpid()}.mp4"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _balanced_plan(n, rng):
    """n (category, answer) pairs: categories take turns, answers cycle within
    a category, then the order is shuffled. Counts differ by at most one."""
    plan = []
    for i in range(n):
        category = CATEGORIES[i % len(CATEGORIES)]
        answers = ANSWERS[category]
        plan.append((category, answers[(i // len(CATEGORIES)) % len(answers)]))
    return [plan[j] for j in rng.permutation(n)]


def _multiple_choice(row, hard, rng):
    """The same sample with 4 options: the answer, the hard distractors (the
    other colour of an order clip), then random words of the category."""
    pool = ANSWERS[row["category"]] + EXTRA_DISTRACTORS.get(row["category"], [])
    rest = [w for w in pool if w != row["answer"] and w not in hard]
    distractors = hard + [str(w) for w in rng.choice(rest, 3 - len(hard), replace=False)]
    options = [str(w) for w in rng.permutation([row["answer"]] + distractors)]
    return dict(row, options=options, answer=LETTERS[options.index(row["answer"])])


def make_synthetic_dataset(out_dir, num_train=2000, num_eval=300, seed=0, num_frames=8, size=64):
    """Writes out_dir/videos/*.mp4, train.jsonl, eval.jsonl (open-ended, one-word
    answers) and eval_mc.jsonl (the eval questions with 4 options, answer = letter).
    Deterministic in seed; video paths in the JSONL are relative to out_dir.
    Returns {"train": path, "eval": path, "eval_mc": path} right away when
    out_dir already holds complete data for the same parameters: meta.json is
    written last, so its presence means the run finished."""
    params = {"version": VERSION, "num_train": num_train, "num_eval": num_eval,
              "seed": seed, "num_frames": num_frames, "size": size}
    paths = {split: os.path.join(out_dir, f"{split}.jsonl") for split in ("train", "eval", "eval_mc")}
    meta_path = os.path.join(out_dir, "meta.json")
    video_names = [f"{split}_{i:06d}.mp4" for split, n in (("train", num_train), ("eval", num_eval))
                   for i in range(n)]
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            same = json.load(f) == params
        if same and all(map(os.path.isfile, paths.values())) and \
                set(video_names) <= set(os.listdir(os.path.join(out_dir, "videos"))):
            return paths
        os.remove(meta_path)  # parameters changed or data incomplete: regenerate
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    rows = {"train": [], "eval": [], "eval_mc": []}
    with tqdm(total=num_train + num_eval, desc="synthetic videos", disable=None) as bar:
        for split_id, (split, n) in enumerate((("train", num_train), ("eval", num_eval))):
            plan = _balanced_plan(n, np.random.default_rng([seed, split_id, 0]))
            for i, (category, answer) in enumerate(plan):
                # one generator per clip: a clip does not depend on the ones before it
                rng = np.random.default_rng([seed, split_id, 1, i])
                frames, question, answer, hard = _make_synthetic(rng, category, answer, num_frames, size)
                video = f"videos/{split}_{i:06d}.mp4"
                write_mp4(os.path.join(out_dir, video), frames)
                row = {"id": f"{split}-{i:06d}", "video": video, "question": question,
                       "answer": answer, "category": category}
                rows[split].append(row)
                if split == "eval":
                    rows["eval_mc"].append(_multiple_choice(row, hard, np.random.default_rng([seed, 2, i])))
                bar.update()
    for split, path in paths.items():
        write_jsonl(path, rows[split])
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(params, f)
    os.replace(tmp, meta_path)
    return paths


def main(argv):
    configure(argv, globals())
    made = make_synthetic_dataset(out, num_train, num_eval, seed, num_frames, size)
    print("\n".join(f"{split}: {path}" for split, path in made.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
