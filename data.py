"""
Data for Oracle-RLAIF: video decoding, frames to model pixels, the dataset format and the prompt.
(The published benchmarks' annotations to this format: benchmarks.py; the synthetic task: synth.py.)

The dataset format is JSONL, one sample per line:
    {"id": "42", "video": "videos/a.mp4", "question": "...", "answer": "...",
     "options": [...], "category": "...", "duration": "..."}
"options", "category" and "duration" are optional; any other key is kept.
With "options" the sample is multiple choice and "answer" is a letter.
"""
import errno
import json
import math
import os
import stat
from collections import OrderedDict

import numpy as np
import torch

try:  # decord is the paper's decoder; it has x86-64 wheels only, PyAV is the fallback
    import decord
    HAVE_DECORD = True
except ImportError:
    decord = None
    HAVE_DECORD = False
import av


MAX_REPORTED_ERRORS = 10  # load_jsonl lists this many problems, then "... and N more"
# a video larger than this is decoded scaled down to it (aspect kept): one 4000x3000 clip of 50 frames cost
# 4.0 GB decoded at full size; 1080p and smaller videos decode as they are, pixel for pixel
MAX_DECODE_PIXELS = 1920 * 1080
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IMAGE = "<image>"            # in a prompt: where the video's visual tokens go (LLaVA's placeholder)
TEMPLATES, MC_FORMATS = ("plain", "v1"), ("oneline", "videomme")
# lmms-eval 0.7.3's default videomme task (videomme_doc_to_text with the default post_prompt), word for word
VIDEOMME_PREAMBLE = ("Select the best answer to the following multiple-choice question based on the video and the "
                     "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_INSTRUCTION = "Answer with the option's letter from the given choices directly."
V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VideoError(Exception):
    """A video could not be read. The message names the path and the reason."""


class DatasetError(ValueError):
    """A dataset file is malformed: "FILE:LINE: what is wrong", one line per problem (all in `.errors`)."""

    def __init__(self, message, errors=None):
        super().__init__(message)
        self.errors = errors or [message]


# -----------------------------------------------------------------------------
# video decoding

def _sample_indices(n, num_frames):
    """Uniform sampling as in the paper: round(linspace(0, n-1, num_frames)); short videos repeat frames."""
    return np.linspace(0, n - 1, num_frames).round().astype(np.int64)


def decode_size(width, height, max_pixels=None):
    """The (width, height) a width x height video is decoded at: itself when it has at most max_pixels
    (default MAX_DECODE_PIXELS) pixels, else scaled down to at most that many, the aspect ratio kept
    (even sides, as scalers prefer)."""
    max_pixels = max_pixels or MAX_DECODE_PIXELS
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(2, 2 * int(width * scale / 2)), max(2, 2 * int(height * scale / 2))


def _read_decord(path, num_frames):
    # decord's width / height set the exact output size (-1 keeps a side; it keeps no aspect ratio itself),
    # and ffmpeg's scaler (its filter graph's default, bilinear) runs as each frame is decoded: no full-size
    # RGB frame is ever made
    size = {}
    try:
        with av.open(path) as container:    # the size in the header (a bad file is for decord to report)
            codec = container.streams.video[0].codec_context
            width, height = decode_size(codec.width, codec.height)
            if (width, height) != (codec.width, codec.height):
                size = {"width": width, "height": height}
    except Exception:
        pass
    vr = decord.VideoReader(path, ctx=decord.cpu(0), **size)
    n = len(vr)
    if n == 0:
        raise VideoError(f"{path}: video has zero frames")
    return vr.get_batch(_sample_indices(n, num_frames).tolist()).asnumpy()


def _read_pyav(path, num_frames):
    # Decode sequentially (exact, no seeking), converting only the wanted frames to RGB, so a long video
    # never sits in memory. A header frame count that is missing (0) or wrong costs a second pass.
    n = None
    for _ in range(2):
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if n is None:
                n = stream.frames
            wanted = _sample_indices(n, num_frames) if n > 0 else []
            wanted_set, picked, decoded = set(int(i) for i in wanted), {}, 0
            for frame in container.decode(stream):
                if decoded in wanted_set:     # scaled as it is converted, as decord does (MAX_DECODE_PIXELS)
                    width, height = decode_size(frame.width, frame.height)
                    picked[decoded] = frame.to_ndarray(format="rgb24", width=width, height=height,
                                                       interpolation="BILINEAR")
                decoded += 1
        if decoded == 0:
            raise VideoError(f"{path}: video has zero frames")
        if decoded == n:
            return np.stack([picked[int(i)] for i in wanted])
        n = decoded
    raise VideoError(f"{path}: the frame count differs between two decodes")


def check_video_file(path):
    """VideoError naming the path unless it is a regular, non-empty file (followed through symlinks),
    saying what it is instead: missing, a dangling symlink or a loop, a directory, a FIFO (never opened:
    reading one waits for a writer), a socket or device, empty."""
    try:
        info = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise VideoError(f"{path}: a symlink loop, not a video file") from None
        if isinstance(err, FileNotFoundError):
            raise VideoError(f"{path}: " + ("a symlink to a missing file" if os.path.islink(path) else "file not found")) from None
        raise VideoError(f"{path}: cannot read ({err.strerror or err})") from None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    for test, kind in kinds:
        if test(info.st_mode):
            raise VideoError(f"{path}: {kind}, not a video file")
    if info.st_size == 0:
        raise VideoError(f"{path}: file is empty")


def load_video(path, num_frames, backend="auto"):
    """num_frames frames sampled uniformly over the whole video -> uint8 (num_frames, H, W, 3), RGB; a video of
    more than MAX_DECODE_PIXELS pixels is decoded scaled down to that (aspect kept), so one huge source costs
    little more than a 1080p one. backend: "auto" (decord if importable, else PyAV), "decord" or "pyav". A
    missing, empty, corrupt or frameless file, or a path that is no file (check_video_file) raises VideoError
    naming the path (the decoder's exception chained as cause)."""
    path = os.fspath(path)
    if backend == "auto":
        backend = "decord" if HAVE_DECORD else "pyav"
    if backend not in ("decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r}")
    if backend == "decord" and not HAVE_DECORD:
        # not a VideoError: a trainer that skips bad videos must not skip them all
        raise ImportError("decord is not installed: use backend='pyav' or 'auto'")
    check_video_file(path)
    try:
        frames = _read_decord(path, num_frames) if backend == "decord" else _read_pyav(path, num_frames)
    except VideoError:
        raise
    except Exception as err:  # decord raises RuntimeError/DECORDError, PyAV FFmpegError and others
        reason = (str(err).strip().splitlines() or [""])[0]  # decord appends a stack trace
        raise VideoError(f"{path}: cannot decode video ({type(err).__name__}: {reason})") from err
    return torch.from_numpy(np.ascontiguousarray(frames))


def video_seconds(path):
    """A video's duration in seconds as its container's header gives it (PyAV), None when it does not say:
    the time the sampled frames span, which a policy with time positions needs (qwen_vl: M-RoPE's)."""
    try:
        with av.open(os.fspath(path)) as container:
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / 1_000_000               # microseconds (av.time_base)
            if stream.frames and stream.average_rate:
                return stream.frames / float(stream.average_rate)
    except Exception:   # a file the decoder already read cannot surprise here, but a header without a stream can
        return None
    return None


# -----------------------------------------------------------------------------
# the JSONL dataset format

def question_text(question, options=None, mc_format="oneline"):
    """The question as the model reads it, without any template (build_prompt's, or a model's own chat
    template). Multiple choice: mc_format "oneline" appends "Options: (A) .. Answer with the option's
    letter."; "videomme" is lmms-eval 0.7.3's default Video-MME question (preamble, "A. ..." lines, instruction)."""
    if mc_format not in MC_FORMATS:
        raise ValueError(f"mc_format must be one of {MC_FORMATS}, got {mc_format!r}")
    text = question.strip()
    if options and mc_format == "videomme":
        text = "\n".join([VIDEOMME_PREAMBLE, question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
                         + ["", VIDEOMME_INSTRUCTION])
    elif options:
        text += " Options: " + " ".join(f"({LETTERS[i]}) {option}" for i, option in enumerate(options))
        text += " Answer with the option's letter."
    return text


def build_prompt(question, options=None, template="plain", mc_format="oneline"):
    """The prompt of a sample, for training, rollouts and evaluation alike; IMAGE marks where the visual
    tokens go. "plain" (the tiny default): visual tokens, then "USER: q ASSISTANT:". "v1": VLM-RLAIF's
    conversation template (vicuna v1): system line, " USER: ", the visual tokens, a newline, the
    question, " ASSISTANT:" (the tokenizer adds BOS, as LLaVA's tokenizer_image_token keeps it).
    The question with its options: question_text."""
    if template not in TEMPLATES or mc_format not in MC_FORMATS:
        raise ValueError(f"template must be one of {TEMPLATES} and mc_format one of {MC_FORMATS}, "
                         f"got {template!r}, {mc_format!r}")
    text = question_text(question, options, mc_format)
    if template == "v1":
        return f"{V1_SYSTEM} USER: {IMAGE}\n{text} ASSISTANT:"
    return f"{IMAGE}USER: {text} ASSISTANT:"


def fit_frames(frames, size, pad=False):
    """One clip to a CLIP tower's input size, as CLIPImageProcessor does it: (pad=True: first padded to
    a square with CLIP's mean colour, VLM-RLAIF's image_aspect_ratio="pad") resize so the short side is
    `size` (PIL bicubic, the long side int(size * long / short)), centre crop.
    uint8 (T, H, W, 3) -> uint8 (T, size, size, 3); a clip already at that size is returned as is."""
    from PIL import Image
    if frames.shape[1:3] == (size, size):
        return frames
    fitted = []
    for frame in frames.numpy():
        image = Image.fromarray(frame)
        if pad and image.width != image.height:
            side = max(image.size)
            square = Image.new("RGB", (side, side), tuple(int(c * 255) for c in CLIP_MEAN))
            square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = square
        short, long = sorted(image.size)
        new = (size, int(size * long / short))
        image = image.resize(new if image.width <= image.height else new[::-1], Image.Resampling.BICUBIC)
        top, left = (image.height - size) // 2, (image.width - size) // 2
        fitted.append(np.asarray(image)[top:top + size, left:left + size])
    return torch.from_numpy(np.stack(fitted))


def clip_pixels(frames):
    """uint8 (..., S, S, 3) at the tower's size (fit_frames) -> float (N, 3, S, S): x / 255, then CLIP's
    mean and std, as CLIPImageProcessor's rescale and normalize."""
    pixels = frames.reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float() * (1 / 255)
    mean = torch.tensor(CLIP_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


class ClipCache:
    """Decoded clips, as read_videos returns them, kept in memory up to max_bytes (the least recently
    used dropped first). An RL run passes over its prompts once per epoch; for the tiny default model,
    decoding is a fifth of a step. A failed video is not kept: it is tried, and counted, again."""

    def __init__(self, max_bytes):
        self.max_bytes, self.size, self.clips = max_bytes, 0, OrderedDict()

    def get(self, key):
        """(clip, seconds) kept under key, or None."""
        kept = self.clips.get(key)
        if kept is not None:
            self.clips.move_to_end(key)
        return kept

    def put(self, key, clip, seconds=None):
        nbytes = clip.numel() * clip.element_size()
        if key in self.clips or nbytes > self.max_bytes:
            return
        self.clips[key], self.size = (clip, seconds), self.size + nbytes
        while self.size > self.max_bytes:
            _, (dropped, _) = self.clips.popitem(last=False)
            self.size -= dropped.numel() * dropped.element_size()


def read_videos(samples, num_frames, fit=None, cache=None):
    """Decode the videos of a batch of samples; one that cannot be read does not stop the batch.
    fit: clip -> clip at the model's input size (VideoLM.fit_frames), applied to each clip as it is
    decoded, so a batch's memory never depends on its largest source video. cache: a ClipCache (the
    caller keeps `fit` the same for it) or None.
    -> (frames uint8 (B', T, S, S, 3) or None when none loaded, the B' samples that loaded,
    [(sample, VideoError)] for those that did not: the caller reports and counts them). Clips that `fit`
    leaves at different sizes (a policy that keeps each clip's own aspect ratio) come as a list of B'. Each
    loaded sample is a copy holding "seconds", the clip's duration (video_seconds; a "seconds" the dataset
    row gives wins), for policies with time positions: policy.encode_video(frames, seconds=...)."""
    videos, loaded, failures = [], [], []
    for sample in samples:
        key = (sample["video"], num_frames)
        cached = cache.get(key) if cache is not None else None
        if cached is None:
            try:
                video = load_video(sample["video"], num_frames)
            except VideoError as err:
                failures.append((sample, err))
                continue
            cached = (fit(video) if fit else video, video_seconds(sample["video"]))
            if cache is not None:
                cache.put(key, *cached)
        videos.append(cached[0])
        loaded.append({"seconds": cached[1], **sample})
    if videos and any(video.shape != videos[0].shape for video in videos):
        return videos, loaded, failures
    return (torch.stack(videos) if videos else None), loaded, failures


def _check_sample(row, base_dir):
    """Validates one parsed line; returns (sample, problems). The sample is a
    copy with "id" as str, "video" absolute, and an MC "answer" as a letter."""
    if not isinstance(row, dict):
        return None, [f"expected a JSON object, got {type(row).__name__}"]
    problems = []
    sample = dict(row)
    for key in ("id", "video", "question", "answer"):
        if key not in row:
            problems.append(f"missing required field {key!r}")
    sid = row.get("id")
    if "id" in row:
        if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid) == "":
            problems.append(f"'id' must be a non-empty string or an integer, got {sid!r}")
        else:
            sample["id"] = str(sid)
    for key in ("video", "question", "answer"):
        if key in row and (not isinstance(row[key], str) or not row[key].strip()):
            problems.append(f"{key!r} must be a non-empty string, got {row[key]!r}")
    for key in ("category", "duration"):
        if key in row and not isinstance(row[key], str):
            problems.append(f"{key!r} must be a string, got {row[key]!r}")
    if "options" in row:
        problems += _check_options(row["options"], row.get("answer"), sample)
    if not problems:
        sample["video"] = os.path.abspath(os.path.join(base_dir, os.path.expanduser(row["video"])))
    return sample, problems


def _check_options(options, answer, sample):
    """Multiple choice: 2-26 distinct non-empty strings. "answer" is either a
    capital letter within range, or exactly one option's text, which is then
    replaced by its letter (a letter always wins over an option that reads "B")."""
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        return [f"'options' must be a list of 2 to {len(LETTERS)} strings, got {options!r}"]
    if not all(isinstance(o, str) and o.strip() for o in options):
        return [f"'options' must all be non-empty strings, got {options!r}"]
    if len(set(options)) != len(options):
        return [f"'options' contains duplicates: {options!r}"]
    if not isinstance(answer, str):
        return []  # already reported
    if len(answer) == 1 and answer in LETTERS:
        if LETTERS.index(answer) >= len(options):
            return [f"answer {answer!r} is out of range for {len(options)} options"]
        return []
    if answer in options:
        sample["answer"] = LETTERS[options.index(answer)]
        return []
    return [f"answer {answer!r} is neither a letter A-{LETTERS[len(options) - 1]} nor one of the options"]


def load_jsonl(path):
    """Reads and validates a dataset file; returns a list of sample dicts.

    The whole file is checked and every problem reported at once as one
    DatasetError ("FILE:LINE: ..." per problem, first one first). Blank lines
    are skipped; nothing else is ever dropped. Relative video paths are
    resolved against the file's directory. Videos are not opened here.
    """
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    samples, errors, first_line_of_id = [], [], {}
    with open(path, "rb") as f:  # bytes, so that bad UTF-8 is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.append(f"{path}:{lineno}: not valid UTF-8 ({err.reason})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            sample, problems = _check_sample(row, base_dir)
            errors += [f"{path}:{lineno}: {p}" for p in problems]
            if problems:
                continue
            if sample["id"] in first_line_of_id:
                errors.append(f"{path}:{lineno}: duplicate id {sample['id']!r} "
                              f"(first seen on line {first_line_of_id[sample['id']]})")
                continue
            first_line_of_id[sample["id"]] = lineno
            samples.append(sample)
    if not errors and not samples:
        errors.append(f"{path}:1: the file has no samples")
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        if len(errors) > len(shown):
            shown.append(f"... and {len(errors) - len(shown)} more errors")
        raise DatasetError("\n".join(shown), errors)
    return samples


def write_jsonl(path, rows):
    """Writes rows (dicts) one per line, UTF-8. Atomic: a reader never sees a
    half-written file (written to a temporary name, then renamed)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
