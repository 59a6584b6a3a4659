"""Long-conversation training data for Moshi: moshi-finetune's dataset format to Moshi codes.

Input format (kyutai-labs/moshi-finetune)::

    dataset.jsonl   one {"path": "<wav>", "duration": <seconds>} per line; a relative path is
                    taken relative to the folder of the .jsonl
    <name>.wav      stereo: channel 0 (left) = Moshi, channel 1 (right) = user; 24 kHz
                    (other rates are resampled, see ``read_conversation``; read with
                    ``soundfile``, resampled with ``soxr``)
    <name>.json     {"alignments": [[word, [start_s, end_s], speaker], ...], ...}; Moshi's words
                    carry the speaker label "SPEAKER_MAIN"; other keys are ignored

Codes of one conversation, int64 [K, T] with K = 1 + 2 * n_q (17 for Moshi), T = ceil(samples /
1920) frames at 12.5 Hz::

    row 0       text stream (``interleave_text``)
    rows 1..8   Moshi's audio (left channel), Mimi codebooks 0..7
    rows 9..16  user's audio (right channel), Mimi codebooks 0..7

This is moshi's stream order (``LMModel``: text, then the ``dep_q`` generated codebooks, then the
user's; ``LMGen`` writes user tokens to rows ``dep_q + 1:``). The codes are RAW, not delayed:
column t holds frame t of every stream. ``LMModel.forward`` applies the acoustic delays itself
(moshi 7B: ``[0, 0, 1 x 7, 0, 1 x 7]``: text and each speaker's codebook 0 undelayed, acoustic
codebooks one step late); ``delay_codes`` gives the delayed view.

Memory is carried across the consecutive segments of a conversation
(``conversation_segments``): segment sizes are in steps, not seconds (``seconds_to_steps``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import wave
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

if TYPE_CHECKING:
    import sentencepiece
    from moshi.models.compression import MimiModel

logger = logging.getLogger(__name__)

FORMAT = "moshi_ttt.moshi_codes/1"
SAMPLE_RATE = 24_000
FRAME_RATE = 12.5
MAIN_SPEAKER = "SPEAKER_MAIN"


class DatasetError(ValueError):
    """A dataset file is missing or not in moshi-finetune's format."""


MIN_SAMPLE_RATE = 8_000  # below: no speech band left for Mimi once upsampled
MAX_SAMPLE_RATE = 384_000


@dataclass(frozen=True)
class DataConfig:
    """How conversations become codes. Defaults are Moshi 7B's (``DataConfig.from_lm``)."""

    sample_rate: int = SAMPLE_RATE
    frame_rate: float = FRAME_RATE
    text_padding_id: int = 3  # LMModel.text_padding_token_id
    end_of_text_padding_id: int = 0  # LMModel.end_of_text_padding_id: last padding before a word
    in_word_padding_id: int | None = None  # padding while a word is spoken; None: text_padding_id
    zero_token_id: int = -1  # LMModel.zero_token_id: "no input, no loss"
    main_speaker: str = MAIN_SPEAKER  # only these words go into the text stream
    keep_and_shift: bool = False  # False: a new word drops the previous word's unplaced tokens
    encode_chunk_steps: int = 250  # Mimi encodes 20 s at a time (bounded memory, same codes)
    duration_tolerance_s: float = 0.5  # jsonl "duration" vs the wav's length

    @classmethod
    def from_lm(cls, lm) -> "DataConfig":
        """Special token ids of a ``moshi.models.LMModel``."""
        return cls(
            text_padding_id=lm.text_padding_token_id,
            end_of_text_padding_id=lm.end_of_text_padding_id,
            zero_token_id=lm.zero_token_id,
        )


# ----------------------------------------------------------------------------------- steps


def seconds_to_steps(seconds: float, frame_rate: float = FRAME_RATE) -> int:
    """Frames covering ``seconds`` of audio (ceil, as Mimi does: 100 s -> 1250, 1 s -> 13)."""
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    return math.ceil(seconds * frame_rate - 1e-9)


def steps_to_seconds(steps: int, frame_rate: float = FRAME_RATE) -> float:
    """Seconds spanned by ``steps`` frames (256 steps -> 20.48 s at 12.5 Hz)."""
    return steps / frame_rate


# ----------------------------------------------------------------------------------- wav io


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Float32 samples [C, N] in [-1, 1] and the sample rate of a RIFF/WAVE file (``soundfile``:
    integer PCM scaled by 2^(bits - 1), IEEE float as stored)."""
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: audio file not found")
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, soundfile.LibsndfileError):
        info = None
    if info is None or info.format != "WAV":
        raise DatasetError(f"{path}: not a RIFF/WAVE file")
    try:
        x, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [N, C]
    except (RuntimeError, soundfile.LibsndfileError) as e:
        raise DatasetError(f"{path}: unreadable WAVE data ({e})") from None
    return np.ascontiguousarray(x.T), int(rate)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write float [C, N] (clipped to [-1, 1]) as 16-bit PCM."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 2:
        raise ValueError(f"audio must be [C, N], got shape {audio.shape}")
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(audio.shape[0])
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(np.ascontiguousarray(pcm.T).tobytes())  # [C, N] -> [N, C] interleaved


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of float [C, N] to ceil(N * sr_out / sr_in) samples (``soxr``,
    very high quality), deterministic."""
    import soxr

    audio = np.asarray(audio, dtype=np.float32)
    if sr_in == sr_out:
        return audio
    n_out = math.ceil(audio.shape[1] * sr_out / sr_in)
    y = soxr.resample(np.ascontiguousarray(audio.T), sr_in, sr_out, quality="VHQ")  # [M, C]
    y = np.ascontiguousarray(y.T, dtype=np.float32)[:, :n_out]
    return np.pad(y, ((0, 0), (0, n_out - y.shape[1])))


# ----------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Word:
    """One aligned word: ``[text, [start, end], speaker]`` in the alignment json."""

    text: str
    start: float  # seconds
    end: float
    speaker: str


@dataclass(frozen=True)
class DatasetEntry:
    """One line of the .jsonl: ``path`` as written, ``wav`` resolved."""

    path: str
    wav: Path
    duration: float


@dataclass(frozen=True, eq=False)
class Conversation:
    """A stereo conversation: ``audio`` float32 [2, N] (0 = Moshi, 1 = user) and its words."""

    wav: Path
    audio: np.ndarray
    sample_rate: int
    words: tuple[Word, ...]

    @property
    def duration(self) -> float:
        return self.audio.shape[1] / self.sample_rate


def read_jsonl(jsonl: str | Path) -> list[DatasetEntry]:
    """Entries of a moshi-finetune .jsonl (blank lines skipped)."""
    jsonl = Path(jsonl)
    if not jsonl.is_file():
        raise DatasetError(f"{jsonl}: dataset .jsonl not found")
    entries = []
    for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{jsonl}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise DatasetError(f'{jsonl}:{n}: expected {{"path": str, "duration": number}}')
        duration = item.get("duration")
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0:
            raise DatasetError(
                f"{jsonl}:{n}: 'duration' must be a positive number, got {duration!r}"
            )
        wav = Path(item["path"])
        entries.append(
            DatasetEntry(
                item["path"], wav if wav.is_absolute() else jsonl.parent / wav, float(duration)
            )
        )
    return entries


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_alignments(path: str | Path) -> tuple[Word, ...]:
    """Words of an alignment json, in file order, exactly as written."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: alignment .json not found (expected beside the .wav)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise DatasetError(f"{path}: expected an object with an 'alignments' list")
    words = []
    for i, a in enumerate(data["alignments"]):
        ok = (
            isinstance(a, list)
            and len(a) == 3
            and isinstance(a[0], str)
            and isinstance(a[1], list)
            and len(a[1]) == 2
            and all(map(_is_number, a[1]))
            and isinstance(a[2], str)
        )
        if not ok:
            raise DatasetError(
                f"{path}: alignments[{i}] = {a!r}; expected [word, [start, end], speaker]"
            )
        words.append(Word(a[0], float(a[1][0]), float(a[1][1]), a[2]))
    return tuple(words)


def read_conversation(
    wav: str | Path, cfg: DataConfig = DataConfig(), resample_audio: bool = True
) -> Conversation:
    """Read a stereo wav and its sibling .json; other sample rates in [MIN_SAMPLE_RATE,
    MAX_SAMPLE_RATE] are resampled to ``cfg.sample_rate`` (or rejected when ``resample_audio`` is
    False); rates outside that range are rejected."""
    wav = Path(wav)
    audio, rate = read_wav(wav)
    if audio.shape[0] != 2:
        raise DatasetError(
            f"{wav}: {audio.shape[0]} channel(s); moshi-finetune data is stereo "
            "(left = Moshi, right = user)"
        )
    if rate != cfg.sample_rate:
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise DatasetError(
                f"{wav}: sample rate {rate} Hz, which Mimi cannot take: it encodes "
                f"{cfg.sample_rate} Hz audio, resampled from {MIN_SAMPLE_RATE} to "
                f"{MAX_SAMPLE_RATE} Hz"
            )
        if not resample_audio:
            raise DatasetError(f"{wav}: sample rate {rate} Hz, expected {cfg.sample_rate} Hz")
        audio = resample(audio, rate, cfg.sample_rate)
    return Conversation(wav, audio, cfg.sample_rate, read_alignments(wav.with_suffix(".json")))


def read_dataset(
    jsonl: str | Path, cfg: DataConfig = DataConfig(), resample_audio: bool = True
) -> Iterator[tuple[DatasetEntry, Conversation]]:
    """Conversations of a .jsonl in file order; checks each "duration" against its wav."""
    for entry in read_jsonl(jsonl):
        conv = read_conversation(entry.wav, cfg, resample_audio)
        if abs(conv.duration - entry.duration) > cfg.duration_tolerance_s:
            raise DatasetError(
                f"{jsonl}: {entry.path} lasts {conv.duration:.3f} s, "
                f"the .jsonl says {entry.duration:.3f} s"
            )
        yield entry, conv


# ----------------------------------------------------------------------------------- writing


def write_conversation(
    wav: str | Path,
    audio: np.ndarray,
    sample_rate: int,
    words: Sequence[Word],
    extra: dict | None = None,
) -> float:
    """Write ``wav`` (16-bit stereo) and its sibling alignment .json; returns the duration.

    ``extra`` adds top-level keys to the .json (moshi-finetune reads only "alignments").
    """
    wav = Path(wav)
    if audio.ndim != 2 or audio.shape[0] != 2:
        raise ValueError(f"audio must be stereo [2, N], got shape {audio.shape}")
    wav.parent.mkdir(parents=True, exist_ok=True)
    write_wav(wav, audio, sample_rate)
    write_alignments(wav.with_suffix(".json"), words, extra)
    return audio.shape[1] / sample_rate


def write_alignments(path: str | Path, words: Sequence[Word], extra: dict | None = None) -> None:
    """Write an alignment .json: {"alignments": [[word, [start, end], speaker], ...], **extra}."""
    body = {"alignments": [[w.text, [w.start, w.end], w.speaker] for w in words], **(extra or {})}
    Path(path).write_text(json.dumps(body, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(jsonl: str | Path, items: Sequence[tuple[str, float]]) -> Path:
    """Write (path relative to the .jsonl's folder, duration) pairs as a moshi-finetune .jsonl."""
    jsonl = Path(jsonl)
    jsonl.write_text(
        "".join(json.dumps({"path": p, "duration": d}) + "\n" for p, d in items), encoding="utf-8"
    )
    return jsonl


# ----------------------------------------------------------------------------------- text


def load_tokenizer(tokenizer: "str | Path | sentencepiece.SentencePieceProcessor"):
    """A SentencePieceProcessor from a model path (e.g. Moshi's tokenizer_spm_32k_3.model)."""
    import sentencepiece

    if isinstance(tokenizer, sentencepiece.SentencePieceProcessor):
        return tokenizer
    path = Path(tokenizer)
    if not path.is_file():
        raise DatasetError(f"{path}: sentencepiece model not found")
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def word_tokens(tokenizer, word: str) -> list[int]:
    """Token ids of one word (stripped; lines joined by the newline piece)."""
    lines = [tokenizer.encode(line) for line in word.strip().split("\n")]
    if len(lines) == 1:
        return list(lines[0])
    newline = tokenizer.encode("\n")[-1]
    out = list(lines[0])
    for line in lines[1:]:
        out += [newline, *line]
    return out


def interleave_text(
    words: Sequence[Word], num_steps: int, tokenizer, cfg: DataConfig = DataConfig()
) -> torch.Tensor:
    """Text stream int64 [num_steps] of a conversation, with moshi-finetune's rules.

    Only ``cfg.main_speaker``'s words with end > start count, ordered by start. A word's tokens
    go one per frame from frame floor(start * frame_rate); the frame before a word's first
    token, if padding, becomes ``end_of_text_padding_id``. A word starting while the previous
    word's tokens are still unplaced drops them (queues them if ``keep_and_shift``). Frames up
    to floor(end * frame_rate) of the last started word without a token get
    ``in_word_padding_id``, all others ``text_padding_id``.
    """
    pad = cfg.text_padding_id
    in_word = pad if cfg.in_word_padding_id is None else cfg.in_word_padding_id
    kept = sorted(
        (w for w in words if w.speaker == cfg.main_speaker and w.start < w.end),
        key=lambda w: w.start,
    )
    out = [pad] * num_steps
    pending: deque[int] = deque()
    last_end, i = -1, 0
    for t in range(num_steps):
        while i < len(kept) and kept[i].start * cfg.frame_rate < t + 1:  # starts in frame <= t
            tokens = word_tokens(tokenizer, kept[i].text)
            pending = deque([*pending, *tokens]) if cfg.keep_and_shift else deque(tokens)
            last_end = int(kept[i].end * cfg.frame_rate)
            i += 1
        if pending:
            if t > 0 and out[t - 1] in (pad, in_word):
                out[t - 1] = cfg.end_of_text_padding_id
            out[t] = pending.popleft()
        elif t <= last_end:
            out[t] = in_word
    return torch.tensor(out, dtype=torch.long)


# ----------------------------------------------------------------------------------- audio


def load_mimi(
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    num_codebooks: int = 8,
    seed: int = 0,
) -> "MimiModel":
    """Mimi from moshi's own config: real weights from ``weights``, else random (``seed``).

    A random Mimi's codebooks are all zero (every frame gets code 0); here they are replaced by
    random unit vectors so that codes vary with the audio and tests can tell inputs apart.
    """
    from moshi.models import loaders
    from moshi.quantization.core_vq import EuclideanCodebook

    if weights is not None:
        if not Path(weights).is_file():
            raise DatasetError(f"{weights}: Mimi weights not found")
        return loaders.get_mimi(weights, device=device, num_codebooks=num_codebooks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mimi = loaders.get_mimi(None, device="cpu", num_codebooks=num_codebooks)
        gen = torch.Generator().manual_seed(seed)
        for m in mimi.modules():
            if isinstance(m, EuclideanCodebook):
                e = torch.randn(m.embedding_sum.shape, generator=gen)  # [bins, dim]
                m.embedding_sum.copy_(e / e.norm(dim=1, keepdim=True))
                m.cluster_usage.fill_(1.0)
                m._initialized.fill_(1.0)
                m._embedding = None  # drop the cached embedding
    return mimi.to(device).eval()


@torch.no_grad()
def encode_stereo(
    mimi: "MimiModel", audio: np.ndarray | torch.Tensor, chunk_steps: int = 250
) -> torch.Tensor:
    """Mimi codes int64 [2 * n_q, T] of stereo audio [2, N]: Moshi's codebooks, then the user's.

    Both channels are encoded as a batch of two, streaming ``chunk_steps`` frames at a time
    (the same codes as one call, in bounded memory). T = ceil(N / frame_size).
    """
    x = torch.as_tensor(audio, dtype=torch.float32)
    if x.ndim != 2 or x.shape[0] != 2:
        raise ValueError(f"audio must be stereo [2, N], got shape {tuple(x.shape)}")
    frame = mimi.frame_size
    T = math.ceil(x.shape[1] / frame)
    x = F.pad(x, (0, T * frame - x.shape[1]))[:, None, :]  # [2, 1, T * frame]: channels as batch
    device = next(mimi.parameters()).device
    chunks = []
    with mimi.streaming(batch_size=2):
        for s in range(0, T * frame, chunk_steps * frame):
            chunks.append(mimi.encode(x[..., s : s + chunk_steps * frame].to(device)).cpu())
    codes = (
        torch.cat(chunks, dim=-1)
        if chunks
        else torch.zeros(2, mimi.num_codebooks, 0, dtype=torch.long)
    )
    return codes.reshape(2 * codes.shape[1], T)  # [2, n_q, T] -> [2 * n_q, T]


def conversation_codes(
    conv: Conversation, mimi: "MimiModel", tokenizer=None, cfg: DataConfig = DataConfig()
) -> torch.Tensor:
    """Raw codes int64 [1 + 2 * n_q, T] of a conversation (layout in the module docstring).

    Without a tokenizer the text row is ``cfg.zero_token_id`` (no text input, no text loss).
    """
    if conv.sample_rate != mimi.sample_rate:
        raise ValueError(f"audio at {conv.sample_rate} Hz, Mimi expects {mimi.sample_rate} Hz")
    audio = encode_stereo(mimi, conv.audio, cfg.encode_chunk_steps)  # [2 * n_q, T]
    T = audio.shape[1]
    if tokenizer is None:
        text = torch.full((T,), cfg.zero_token_id, dtype=torch.long)
    else:
        text = interleave_text(conv.words, T, tokenizer, cfg)
    return torch.cat([text[None], audio], dim=0)  # [1 + 2 * n_q, T]


def delay_codes(codes: torch.Tensor, delays: Sequence[int], initial: Sequence[int]) -> torch.Tensor:
    """Delayed view [K, T] of raw codes [K, T]: row k shifted right by delays[k], the first
    delays[k] steps filled with initial[k] (as ``LMModel.forward`` does per call)."""
    K, T = codes.shape
    if len(delays) != K or len(initial) != K:
        raise ValueError(f"{K} rows but {len(delays)} delays and {len(initial)} initial tokens")
    out = torch.empty_like(codes)
    for k, d in enumerate(delays):
        d = min(d, T)
        out[k, :d] = initial[k]
        out[k, d:] = codes[k, : T - d]
    return out


# ----------------------------------------------------------------------------------- segments


@dataclass(frozen=True, eq=False)
class Segment:
    """``codes`` [K, S] = steps [start, start + S) of one conversation."""

    codes: torch.Tensor | np.ndarray
    start: int
    first: bool  # reset memory before this segment
    last: bool


def conversation_segments(
    codes: torch.Tensor | np.ndarray, segment_steps: int
) -> Iterator[Segment]:
    """Consecutive [K, segment_steps] views of one conversation [K, T]; the last may be shorter.

    Train them in order, carrying memory from one to the next; reset only where ``first``.
    """
    if segment_steps <= 0:
        raise ValueError(f"segment_steps must be positive, got {segment_steps}")
    T = codes.shape[1]
    for start in range(0, T, segment_steps):
        yield Segment(
            codes[:, start : start + segment_steps], start, start == 0, start + segment_steps >= T
        )


# ----------------------------------------------------------------------------------- prepare


def _digest(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _mimi_sha256(mimi) -> str:
    return _digest(
        name.encode()
        + t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        for name, t in sorted(mimi.state_dict().items())
    )


@dataclass(frozen=True)
class PreparedConversation:
    """One conversation of a prepared folder; ``codes()`` memory-maps int32 [K, T]."""

    name: str
    path: Path
    steps: int

    def codes(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


def prepare_conversations(
    jsonl: str | Path,
    out_dir: str | Path,
    mimi=None,
    tokenizer=None,
    cfg: DataConfig = DataConfig(),
    progress: bool = True,
) -> Path:
    """Encode every conversation of ``jsonl`` to ``out_dir``; returns the manifest path.

    ``mimi``: a MimiModel, a weights path, or None (random Mimi, seed 0: for tests only).
    ``tokenizer``: a SentencePieceProcessor, a model path, or None (text row = zero tokens).
    Layout: ``codes/NNNNN_<stem>.npy`` int32 [K, T] raw codes, and ``manifest.json`` (no
    timestamps or absolute paths: two runs write byte-identical files).
    """
    out_dir = Path(out_dir)
    mimi_desc = {
        "weights": "random seed 0"
        if mimi is None
        else Path(mimi).name
        if isinstance(mimi, (str, Path))
        else "model"
    }
    if mimi is None or isinstance(mimi, (str, Path)):
        mimi = load_mimi(mimi)
    mimi_desc["sha256"] = _mimi_sha256(mimi)
    tok_desc = None
    if tokenizer is not None:
        tokenizer = load_tokenizer(tokenizer)
        tok_desc = {
            "vocab_size": tokenizer.vocab_size(),
            "sha256": hashlib.sha256(tokenizer.serialized_model_proto()).hexdigest(),
        }
    total = len(read_jsonl(jsonl))
    (out_dir / "codes").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (entry, conv) in enumerate(
        tqdm(
            read_dataset(jsonl, cfg),
            total=total,
            desc="conversations",
            disable=not progress,
            dynamic_ncols=True,
        )
    ):
        codes = conversation_codes(conv, mimi, tokenizer, cfg).numpy().astype(np.int32)  # [K, T]
        rel = f"codes/{i:05d}_{entry.wav.stem}.npy"
        np.save(out_dir / rel, codes)
        rows.append(
            {
                "name": f"{i:05d}_{entry.wav.stem}",
                "source": entry.path,
                "codes": rel,
                "steps": int(codes.shape[1]),
                "duration": conv.duration,
                "main_words": sum(w.speaker == cfg.main_speaker for w in conv.words),
                "sha256": _digest(iter([(out_dir / rel).read_bytes()])),
            }
        )
    n_q = mimi.num_codebooks
    manifest = {
        "format": FORMAT,
        "layout": {
            "rows": [
                "text",
                *[f"moshi_audio_{q}" for q in range(n_q)],
                *[f"user_audio_{q}" for q in range(n_q)],
            ],
            "delayed": False,
            "dtype": "int32",
            "frame_rate": cfg.frame_rate,
        },
        "config": asdict(cfg),
        "mimi": mimi_desc,
        "tokenizer": tok_desc,
        "conversations": rows,
        "total_steps": sum(r["steps"] for r in rows),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path


def load_prepared(out_dir: str | Path) -> list[PreparedConversation]:
    """Conversations of a folder written by ``prepare_conversations``, in .jsonl order."""
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return [
        PreparedConversation(r["name"], out_dir / r["codes"], r["steps"])
        for r in manifest["conversations"]
    ]
