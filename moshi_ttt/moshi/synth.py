"""Two-speaker conversations in moshi-finetune's format, with facts told early and asked late.

The user (and Moshi) state facts near the start ("my name is Clara", "my favourite colour is
green"); after filler exchanges the other side asks for them and the answer repeats the fact,
so predicting the answer needs memory of the start of the conversation.

- ``speak_conversations``: speech from espeak-ng (two voices) merged to stereo and resampled to
  24 kHz by sox. Word timings come from espeak-ng's own word events (the sample where each
  word's synthesis starts), tightened to the voiced samples inside each word's span. If
  espeak-ng reports a different number of words than the text has, that utterance's words get
  the voiced span split in proportion to their lengths in characters (logged).
  Needs the Debian packages ``espeak-ng`` (its library ``libespeak-ng.so.1``) and ``sox``.
- ``tone_conversations``: a pure-numpy stand-in needing no tools: each word is a tone burst
  whose pitch depends on the word and the speaker; timings are exact by construction.

Both write ``conversations.jsonl`` and ``audio/conv_NNNNN.{wav,json}`` under ``out_dir``; each
.json also holds "facts": [{"key", "value", "told_s", "answer_s"}] (start times of the value's
word when told and when Moshi answers with it; moshi-finetune ignores the key).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shutil
import subprocess
import tempfile
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .data import MAIN_SPEAKER, Word, write_alignments, write_conversation, write_jsonl, write_wav

logger = logging.getLogger(__name__)

USER_SPEAKER = "SPEAKER_OTHER"  # any label but MAIN_SPEAKER: moshi-finetune keeps only MAIN's words
MOSHI, USER = "moshi", "user"


class MissingToolError(RuntimeError):
    """espeak-ng or sox is not installed."""


@dataclass(frozen=True)
class SynthConfig:
    """Voices and timing of synthetic conversations."""

    sample_rate: int = 24_000
    moshi_voice: str = "en-us+f3"
    user_voice: str = "en-gb-x-rp+m3"
    words_per_minute: int = 165
    lead_s: float = 0.5  # silence before the first turn and after the last
    turn_gap_s: tuple[float, float] = (0.25, 0.7)  # silence between turns, uniform per turn
    tone_word_s: tuple[float, float] = (0.08, 0.025)  # tone synthesiser: seconds per word, per char
    word_gap_s: float = 0.06  # tone synthesiser: silence between words
    voiced_threshold: float = 0.02  # fraction of an utterance's peak counted as voiced


# ----------------------------------------------------------------------------------- scripts


@dataclass(frozen=True)
class Turn:
    speaker: str  # MOSHI or USER
    text: str
    value_word: int | None = None  # index in text.split() of a fact's value, told or answered


@dataclass(frozen=True)
class Fact:
    key: str
    value: str
    told_turn: int
    answer_turn: int


@dataclass(frozen=True)
class Script:
    turns: tuple[Turn, ...]
    facts: tuple[Fact, ...]


# key, teller, values, statement, question, answer ("{}" is the value)
_FACTS = (
    (
        "name",
        USER,
        ("Clara", "Bruno", "Alice", "Daniel", "Emma", "Felix", "Grace", "Henry"),
        "Hello, my name is {}.",
        "Do you remember my name?",
        "Yes, your name is {}.",
    ),
    (
        "city",
        USER,
        ("Paris", "Lisbon", "Oslo", "Cairo", "Denver", "Kyoto", "Madrid", "Dublin"),
        "I live in {} these days.",
        "Where do I live?",
        "You live in {}.",
    ),
    (
        "pet",
        USER,
        ("cat", "dog", "parrot", "rabbit", "turtle", "goldfish", "hamster"),
        "At home I have a {}.",
        "What pet do I have?",
        "You have a {}.",
    ),
    (
        "colour",
        MOSHI,
        ("green", "blue", "red", "purple", "yellow", "orange"),
        "My favourite colour is {}.",
        "What is your favourite colour?",
        "My favourite colour is {}.",
    ),
    (
        "number",
        USER,
        ("seven", "twelve", "three", "nine", "eleven", "four"),
        "My lucky number is {}.",
        "What is my lucky number?",
        "Your lucky number is {}.",
    ),
)
_ACKS = ("Nice to meet you.", "That sounds lovely.", "Good to know.", "I see, thank you.")
_FILLERS = (
    ("What should I cook tonight?", "A warm soup with fresh bread is always a good choice."),
    ("Is it going to rain tomorrow?", "It might, so taking an umbrella would be wise."),
    ("Can you suggest a good book?", "A long novel about the sea could keep you busy for weeks."),
    ("How do I fall asleep faster?", "Try to keep the room dark and put your phone away early."),
    ("What is a nice hobby to start?", "Painting is calm and you only need a few brushes."),
    ("How long should I walk each day?", "Half an hour of walking is a fine start."),
    ("Do you like music?", "I enjoy quiet piano music in the evening."),
    ("What should I plant in spring?", "Tomatoes and herbs grow well on a sunny balcony."),
    ("How can I learn a language?", "Speak a little every day and do not fear mistakes."),
    ("Any tips for a long trip by train?", "Bring snacks, a book and a warm jacket."),
)


def _turn(speaker: str, template: str, value: str | None = None) -> Turn:
    if value is None:
        return Turn(speaker, template)
    words = template.split()
    idx = next(i for i, w in enumerate(words) if "{}" in w)
    return Turn(speaker, template.format(value), idx)


def conversation_script(seed: int, filler_exchanges: int = 6, num_facts: int = 3) -> Script:
    """Facts stated first (the name always, by the user; the others drawn), then
    ``filler_exchanges`` unrelated exchanges, then the user asks for every fact (shuffled) and
    Moshi answers with it."""
    rng = np.random.default_rng(seed)
    if not 1 <= num_facts <= len(_FACTS):
        raise ValueError(f"num_facts must be in 1..{len(_FACTS)}, got {num_facts}")
    chosen = [
        _FACTS[0],
        *(
            _FACTS[i]
            for i in sorted(rng.choice(np.arange(1, len(_FACTS)), num_facts - 1, replace=False))
        ),
    ]
    values = {f[0]: f[2][int(rng.integers(len(f[2])))] for f in chosen}
    turns: list[Turn] = []
    told: dict[str, int] = {}
    for key, teller, _, statement, _, _ in chosen:
        if teller == MOSHI:
            turns.append(Turn(USER, "Tell me something about you."))
        told[key] = len(turns)
        turns.append(_turn(teller, statement, values[key]))
        if teller == USER:
            turns.append(Turn(MOSHI, _ACKS[int(rng.integers(len(_ACKS)))]))
        else:
            turns.append(Turn(USER, "Nice, thank you."))
    for i in rng.permutation(len(_FILLERS) * (filler_exchanges // len(_FILLERS) + 1))[
        :filler_exchanges
    ]:
        question, answer = _FILLERS[i % len(_FILLERS)]
        turns += [Turn(USER, question), Turn(MOSHI, answer)]
    facts = []
    for j in rng.permutation(len(chosen)):  # the user asks; Moshi answers, so its text has the fact
        key, _, _, _, question, answer = chosen[j]
        turns.append(Turn(USER, question))
        facts.append(Fact(key, values[key], told[key], len(turns)))
        turns.append(_turn(MOSHI, answer, values[key]))
    turns += [Turn(USER, "Thank you, goodbye."), Turn(MOSHI, "Goodbye, talk to you soon.")]
    return Script(tuple(turns), tuple(facts))


# ----------------------------------------------------------------------------------- assembly


@dataclass(frozen=True, eq=False)
class Utterance:
    """Mono float32 [N] audio at ``sample_rate`` and each word's (start, end) in seconds."""

    audio: np.ndarray
    sample_rate: int
    spans: tuple[tuple[float, float], ...]


def _assemble(
    script: Script, render: Callable[[Turn], Utterance], cfg: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, int, list[Word], list[dict]]:
    """Stereo [2, N] (0 = Moshi, 1 = user), rate, words sorted by start, and fact times."""
    utts = [render(t) for t in script.turns]
    rate = utts[0].sample_rate
    offsets, t = [], cfg.lead_s
    for u in utts:
        offsets.append(t)
        t += len(u.audio) / rate + rng.uniform(*cfg.turn_gap_s)
    n = round(offsets[-1] * rate) + len(utts[-1].audio) + round(cfg.lead_s * rate)
    audio = np.zeros((2, n), dtype=np.float32)
    words: list[Word] = []
    starts: dict[int, float] = {}
    for i, (turn, u, off) in enumerate(zip(script.turns, utts, offsets)):
        ch = 0 if turn.speaker == MOSHI else 1
        s = round(off * rate)
        audio[ch, s : s + len(u.audio)] += u.audio
        label = MAIN_SPEAKER if turn.speaker == MOSHI else USER_SPEAKER
        off = s / rate  # the sample the utterance really starts at
        for w, (a, b) in zip(turn.text.split(), u.spans):
            words.append(Word(w, round(off + a, 4), round(off + b, 4), label))
        if turn.value_word is not None:
            starts[i] = round(off + u.spans[turn.value_word][0], 4)
    words.sort(key=lambda w: w.start)
    facts = [
        {
            "key": f.key,
            "value": f.value,
            "told_s": starts[f.told_turn],
            "answer_s": starts[f.answer_turn],
        }
        for f in script.facts
    ]
    return audio, rate, words, facts


def _write_dataset(
    out_dir: Path,
    n: int,
    seed: int,
    filler_exchanges: int,
    num_facts: int,
    write_one: Callable[[Path, Script, np.random.Generator], float],
) -> Path:
    items = []
    for i, script in enumerate(dataset_scripts(n, seed, filler_exchanges, num_facts)):
        rel = f"audio/conv_{i:05d}.wav"
        items.append((rel, write_one(out_dir / rel, script, np.random.default_rng([seed, i, 1]))))
    return write_jsonl(out_dir / "conversations.jsonl", items)


def dataset_scripts(n: int, seed: int, filler_exchanges: int, num_facts: int) -> list[Script]:
    """The scripts of ``speak_conversations`` / ``tone_conversations`` with the same arguments."""
    return [
        conversation_script(
            int(np.random.default_rng([seed, i]).integers(2**31)), filler_exchanges, num_facts
        )
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------- tones


def _tone_utterance(turn: Turn, cfg: SynthConfig) -> Utterance:
    rate, pieces, spans, t = cfg.sample_rate, [], [], 0.0
    base = 220.0 if turn.speaker == MOSHI else 330.0
    for w in turn.text.split():
        dur = cfg.tone_word_s[0] + cfg.tone_word_s[1] * len(w)
        f = base * 2.0 ** ((zlib.crc32(w.lower().encode()) % 12) / 12)
        k = np.arange(round(dur * rate)) / rate
        env = np.sin(np.pi * k / dur) ** 0.5  # smooth on and off
        tone = env * (0.5 * np.sin(2 * np.pi * f * k) + 0.2 * np.sin(4 * np.pi * f * k))
        gap = np.zeros(round(cfg.word_gap_s * rate))
        spans.append((t, t + len(k) / rate))
        t += (len(k) + len(gap)) / rate
        pieces += [tone, gap]
    return Utterance(np.concatenate(pieces).astype(np.float32), rate, tuple(spans))


def tone_conversations(
    out_dir: str | Path,
    n: int = 2,
    seed: int = 0,
    filler_exchanges: int = 2,
    num_facts: int = 3,
    cfg: SynthConfig = SynthConfig(),
) -> Path:
    """Tone-burst conversations (no external tools); returns the .jsonl path."""

    def write_one(wav: Path, script: Script, rng: np.random.Generator) -> float:
        audio, rate, words, facts = _assemble(script, lambda t: _tone_utterance(t, cfg), cfg, rng)
        return write_conversation(wav, audio, rate, words, {"facts": facts})

    return _write_dataset(Path(out_dir), n, seed, filler_exchanges, num_facts, write_one)


# ----------------------------------------------------------------------------------- espeak-ng


class _EspeakEvent(ctypes.Structure):
    """espeak_EVENT of speak_lib.h (espeak-ng 1.49+)."""

    class _Id(ctypes.Union):
        _fields_ = [
            ("number", ctypes.c_int),
            ("name", ctypes.c_char_p),
            ("string", ctypes.c_char * 8),
        ]

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _Id),
    ]


_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)
_EVENT_LIST_END, _EVENT_WORD = 0, 1
_OUTPUT_SYNCHRONOUS, _INIT_DONT_EXIT, _RATE, _CHARS_UTF8 = 2, 0x8000, 1, 1


def _find_espeak() -> str | None:
    name = ctypes.util.find_library("espeak-ng")
    if name is None:
        try:
            ctypes.CDLL("libespeak-ng.so.1")
            name = "libespeak-ng.so.1"
        except OSError:
            return None
    return name


def missing_tools() -> list[str]:
    """What ``speak_conversations`` needs and cannot find (empty when all present)."""
    missing = []
    if _find_espeak() is None:
        missing.append("espeak-ng (library libespeak-ng.so.1)")
    if shutil.which("sox") is None:
        missing.append("sox")
    return missing


def check_tools() -> None:
    """Raise MissingToolError naming what is missing and how to install it."""
    missing = missing_tools()
    if missing:
        raise MissingToolError(
            f"missing {', '.join(missing)}; install the Debian packages: "
            "apt-get install espeak-ng sox"
        )


class _Espeak:
    """espeak-ng through its C library: audio and one word event per spoken word."""

    _instance: "_Espeak | None" = None

    def __init__(self):
        lib = ctypes.CDLL(_find_espeak())
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.rate = lib.espeak_Initialize(_OUTPUT_SYNCHRONOUS, 0, None, _INIT_DONT_EXIT)
        if self.rate <= 0:
            raise MissingToolError("espeak-ng failed to initialise (is espeak-ng-data installed?)")
        self.lib, self._chunks, self._words = lib, [], []
        self._callback = _CALLBACK(self._on_audio)  # kept alive for the library
        lib.espeak_SetSynthCallback(self._callback)

    @classmethod
    def get(cls) -> "_Espeak":
        if cls._instance is None:
            check_tools()
            cls._instance = cls()
        return cls._instance

    def _on_audio(self, samples, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_END:
            if events[i].type == _EVENT_WORD:
                self._words.append(events[i].sample)
            i += 1
        return 0

    def speak(self, text: str, voice: str, wpm: int) -> tuple[np.ndarray, list[int]]:
        """int16 samples [N] at ``self.rate`` and the sample where each word starts."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r} (see espeak-ng --voices)")
        self.lib.espeak_SetParameter(_RATE, wpm, 0)
        self._chunks, self._words = [], []
        data = text.encode("utf-8")
        if self.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, _CHARS_UTF8, None, None) != 0:
            raise RuntimeError(f"espeak-ng could not speak {text!r}")
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return audio, list(self._words)


def _voiced(x: np.ndarray, threshold: float) -> np.ndarray:
    return np.flatnonzero(np.abs(x) > threshold)


def _espeak_utterance(turn: Turn, cfg: SynthConfig) -> Utterance:
    engine = _Espeak.get()
    voice = cfg.moshi_voice if turn.speaker == MOSHI else cfg.user_voice
    pcm, marks = engine.speak(turn.text, voice, cfg.words_per_minute)
    x = pcm.astype(np.float32) / 32768.0
    rate, words = engine.rate, turn.text.split()
    thr = cfg.voiced_threshold * max(float(np.abs(x).max(initial=0.0)), 1e-6)
    if len(marks) != len(words):
        logger.info(
            "espeak-ng gave %d word events for %d words in %r: proportional timing",
            len(marks),
            len(words),
            turn.text,
        )
        v = _voiced(x, thr)
        a, b = (int(v[0]), int(v[-1]) + 1) if len(v) else (0, len(x))
        cum = np.cumsum([0] + [len(w) + 1 for w in words])
        marks = [a + int((b - a) * c / cum[-1]) for c in cum[:-1]]
    bounds = [*marks, len(x)]
    spans = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        v = _voiced(x[s:e], thr)  # tighten [event, next event) to its voiced samples
        a, b = (s + int(v[0]), s + int(v[-1]) + 1) if len(v) else (s, max(e, s + 1))
        spans.append((a / rate, b / rate))
    return Utterance(x, rate, tuple(spans))


def _sox(*args: str) -> None:
    r = subprocess.run(["sox", "-R", "-D", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"sox {' '.join(args)} failed: {r.stderr.strip()}")


def speak_conversations(
    out_dir: str | Path,
    n: int = 2,
    seed: int = 0,
    filler_exchanges: int = 6,
    num_facts: int = 3,
    cfg: SynthConfig = SynthConfig(),
) -> Path:
    """espeak-ng conversations merged by sox (left Moshi, right user, 16-bit, ``cfg.sample_rate``);
    returns the .jsonl path. Raises MissingToolError without espeak-ng or sox."""
    check_tools()

    def write_one(wav: Path, script: Script, rng: np.random.Generator) -> float:
        audio, rate, words, facts = _assemble(script, lambda t: _espeak_utterance(t, cfg), cfg, rng)
        wav.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            left, right = Path(tmp) / "left.wav", Path(tmp) / "right.wav"
            write_wav(left, audio[:1], rate)
            write_wav(right, audio[1:], rate)
            _sox(
                "-M",
                str(left),
                str(right),
                "-b",
                "16",
                str(wav),
                "rate",
                "-v",
                str(cfg.sample_rate),
            )
        write_alignments(wav.with_suffix(".json"), words, {"facts": facts})
        with wave.open(str(wav)) as f:
            return f.getnframes() / f.getframerate()

    return _write_dataset(Path(out_dir), n, seed, filler_exchanges, num_facts, write_one)


def script_words(script: Script, speaker: str) -> list[str]:
    """The words ``speaker`` (MOSHI or USER) says, in order."""
    return [w for t in script.turns if t.speaker == speaker for w in t.text.split()]
