"""Long-conversation data: moshi-finetune format reader, Mimi codes, text interleaving, segments."""

import json
import math
import os
import re
import wave

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np
import pytest
import torch
from conftest import assert_close

from moshi_ttt.moshi import data as md
from moshi_ttt.moshi import synth

CFG = md.DataConfig()
QUICK = synth.SynthConfig(
    lead_s=0.3,
    turn_gap_s=(0.15, 0.3),
    words_per_minute=220,
    # short audio: Mimi is slow on CPU
    tone_word_s=(0.04, 0.012),
    word_gap_s=0.03,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Mimi on a shared 2-core machine: one thread is ~5x faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mimi():
    return md.load_mimi(seed=0)


class FixedTokenizer:
    """encode(word) -> a fixed token list per word."""

    def __init__(self, table):
        self.table = table

    def encode(self, text):
        return list(self.table[text])


# ----------------------------------------------------------------------------------- steps


def test_seconds_to_steps():
    assert md.seconds_to_steps(100.0) == 1250  # moshi-finetune's 100 s segments
    assert md.seconds_to_steps(20.48) == 256  # a 256-step chunk is 20.48 s, not 256 s
    assert md.steps_to_seconds(256) == 20.48
    assert [md.seconds_to_steps(md.steps_to_seconds(s)) for s in range(3001)] == list(range(3001))
    # a partial frame counts, as in Mimi (checked against Mimi's frame count in the stereo test)
    assert [md.seconds_to_steps(n / 24_000) for n in (1, 1919, 1920, 1921, 24_000)] == [
        1,
        1,
        1,
        2,
        13,
    ]


# ----------------------------------------------------------------------------------- reading


def _words():
    return [
        md.Word("Hello,", 0.1 + 0.2, 1 / 3 + 0.4, "SPEAKER_MAIN"),
        md.Word("there", 0.8, 1.23456789, "SPEAKER_OTHER"),
        md.Word("é", 1.5, 1.5, "SPEAKER_MAIN"),  # zero duration, kept by the reader
        md.Word(" again", 2.0, 2.75, "SPEAKER_MAIN"),
    ]


def _write(tmp_path, audio=None, rate=24_000, words=None, name="a"):
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.9, 0.9, (2, 3 * rate)).astype(np.float32) if audio is None else audio
    wav = tmp_path / "stereo" / f"{name}.wav"
    duration = md.write_conversation(wav, audio, rate, _words() if words is None else words)
    return md.write_jsonl(tmp_path / "data.jsonl", [(f"stereo/{name}.wav", duration)]), audio


def test_read_dataset_returns_what_was_written(tmp_path):
    jsonl, audio = _write(tmp_path)
    ((entry, conv),) = list(md.read_dataset(jsonl))
    assert entry.path == "stereo/a.wav" and entry.wav == tmp_path / "stereo" / "a.wav"
    assert entry.duration == 3.0 and conv.duration == 3.0 and conv.sample_rate == 24_000
    assert conv.words == tuple(_words())  # floats and text exactly, in file order
    pcm = np.round(np.clip(audio.astype(np.float64), -1, 1) * 32767)  # 16-bit PCM as written
    np.testing.assert_array_equal(conv.audio * 32768, pcm)


def _pcm(path, channels, rate, n=2400):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.zeros(n * channels, "<i2").tobytes())


def _break(tmp_path, case):
    """Write a dataset broken in one way; returns (jsonl, kwargs for read_dataset)."""
    jsonl, _ = _write(tmp_path)
    wav, js = tmp_path / "stereo" / "a.wav", tmp_path / "stereo" / "a.json"
    if case == "missing jsonl":
        return tmp_path / "nope.jsonl", {}
    if case == "jsonl not json":
        jsonl.write_text('{"path": "stereo/a.wav", "duration": 3.0\n')
    elif case == "jsonl no duration":
        jsonl.write_text('{"path": "stereo/a.wav"}\n')
    elif case == "jsonl negative duration":
        jsonl.write_text('{"path": "stereo/a.wav", "duration": -1}\n')
    elif case == "duration mismatch":
        jsonl.write_text('{"path": "stereo/a.wav", "duration": 9.5}\n')
    elif case == "missing wav":
        wav.unlink()
    elif case == "not a wav":
        wav.write_bytes(b"ID3 definitely not riff")
    elif case == "mono wav":
        _pcm(wav, 1, 24_000, 72_000)
    elif case == "three channels":
        _pcm(wav, 3, 24_000, 72_000)
    elif case == "wrong sample rate":
        _pcm(wav, 2, 16_000, 48_000)
        return jsonl, {"resample_audio": False}
    elif case == "missing json":
        js.unlink()
    elif case == "json not json":
        js.write_text("{'alignments': []}")
    elif case == "json no alignments":
        js.write_text('{"words": []}')
    elif case == "json bad entry":
        js.write_text('{"alignments": [["hi", [0.5], "SPEAKER_MAIN"]]}')
    return jsonl, {}


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing jsonl", "not found"),
        ("jsonl not json", "not valid JSON"),
        ("jsonl no duration", "'duration' must be"),
        ("jsonl negative duration", "positive"),
        ("duration mismatch", "the .jsonl says"),
        ("missing wav", "audio file not found"),
        ("not a wav", "not a RIFF/WAVE"),
        ("mono wav", "1 channel(s)"),
        ("three channels", "3 channel(s)"),
        ("wrong sample rate", "16000 Hz, expected 24000"),
        ("missing json", "alignment .json not found"),
        ("json not json", "not valid JSON"),
        ("json no alignments", "'alignments' list"),
        ("json bad entry", "alignments[0]"),
    ],
)
def test_bad_inputs_raise_clear_errors(tmp_path, case, message):
    jsonl, kwargs = _break(tmp_path, case)
    with pytest.raises(md.DatasetError, match=re.escape(message)):
        list(md.read_dataset(jsonl, **kwargs))


@pytest.mark.parametrize("rate", [16_000, 22_050, 48_000])
def test_resample_matches_the_sine_sampled_at_24k(tmp_path, rate):
    def sines(sr, seconds=1.0):
        t = np.arange(round(seconds * sr)) / sr
        return np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 3000 * t + 1)])

    y = md.resample(sines(rate), rate, 24_000)
    ref = sines(24_000)
    assert y.shape == ref.shape
    edge = 1200  # 50 ms: the signal is cut off outside [0, 1 s)
    assert_close(y[:, edge:-edge], ref[:, edge:-edge], 2e-3)
    # the reader resamples other rates the same way
    md.write_conversation(tmp_path / "s.wav", sines(rate).astype(np.float32) * 0.5, rate, [])
    conv = md.read_conversation(tmp_path / "s.wav")
    written, _ = md.read_wav(tmp_path / "s.wav")
    np.testing.assert_array_equal(conv.audio, md.resample(written, rate, 24_000))


# ----------------------------------------------------------------------------------- text


def test_interleave_places_each_word_at_its_start_frame(spm):
    rng = np.random.default_rng(1)
    vocab = [
        t for s in synth.dataset_scripts(3, 0, 4, 5) for t in synth.script_words(s, synth.MOSHI)
    ]
    long_word = next(w for w in vocab if len(md.word_tokens(spm, w)) >= 2)
    T, frame, words = 300, 0, []
    while frame < T - 20:
        text = vocab[len(words) % len(vocab)]
        n = len(md.word_tokens(spm, text))
        start = (frame + rng.uniform(0.01, 0.99)) / 12.5  # anywhere inside the frame
        words.append(md.Word(text, start, start + rng.uniform(0.1, 0.6), "SPEAKER_MAIN"))
        # not in the text
        words.append(md.Word("noise", start + 0.05, start + 0.2, "SPEAKER_OTHER"))
        frame += n + int(rng.integers(1, 6))  # no word starts before the previous one is placed
    words.append(md.Word(long_word, (T - 0.5) / 12.5, (T + 2) / 12.5, "SPEAKER_MAIN"))  # cut at T
    words.append(md.Word("late", (T + 0.5) / 12.5, (T + 2) / 12.5, "SPEAKER_MAIN"))  # after the end
    words.append(md.Word("dropped", 1.0, 1.0, "SPEAKER_MAIN"))  # zero duration: ignored
    shuffled = [words[i] for i in rng.permutation(len(words))]

    ref = torch.full((T,), CFG.text_padding_id)  # naive: each word on its own
    for w in words:
        if w.speaker != "SPEAKER_MAIN" or w.end <= w.start:
            continue
        f = math.floor(w.start * 12.5)
        if f >= T:
            continue
        tokens = md.word_tokens(spm, w.text)[: T - f]
        ref[f : f + len(tokens)] = torch.tensor(tokens)
        if f > 0:
            ref[f - 1] = CFG.end_of_text_padding_id
    out = md.interleave_text(shuffled, T, spm, CFG)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert out[-1] == md.word_tokens(spm, long_word)[0] and out[-2] == CFG.end_of_text_padding_id


def test_interleave_overlapping_words_drop_or_queue():
    tok = FixedTokenizer({"alpha": [11, 12, 13], "be": [21, 22], "c": [31]})
    words = [
        md.Word("alpha", 0.16, 0.5, "SPEAKER_MAIN"),  # frame 2
        md.Word("be", 0.25, 0.9, "SPEAKER_MAIN"),  # frame 3, while alpha is unfinished
        md.Word("c", 0.0, 0.05, "SPEAKER_MAIN"),
    ]  # frame 0: no end-of-padding before it
    P, E = CFG.text_padding_id, CFG.end_of_text_padding_id
    dropped = md.interleave_text(words, 14, tok, CFG).tolist()
    assert dropped == [31, E, 11, 21, 22, P, P, P, P, P, P, P, P, P]
    import dataclasses

    queued = md.interleave_text(
        words, 14, tok, dataclasses.replace(CFG, keep_and_shift=True)
    ).tolist()
    assert queued == [31, E, 11, 12, 13, 21, 22, P, P, P, P, P, P, P]
    inword = md.interleave_text(
        words, 14, tok, dataclasses.replace(CFG, in_word_padding_id=99)
    ).tolist()
    # up to floor(0.9*12.5)=11
    assert inword == [31, E, 11, 21, 22, 99, 99, 99, 99, 99, 99, 99, P, P]


# ----------------------------------------------------------------------------------- audio


def _stereo(n, seed=0):
    t = np.arange(n) / 24_000
    noise = np.random.default_rng(seed).normal(0, 0.2, n)
    return np.stack([0.4 * np.sin(2 * np.pi * (200 + 300 * t) * t), noise]).astype(np.float32)


def test_stereo_codes_equal_each_channel_encoded_alone(mimi):
    audio = _stereo(1920 * 9 + 100)
    codes = md.encode_stereo(mimi, audio, chunk_steps=4)  # streamed 4 frames at a time
    with torch.no_grad():
        left = mimi.encode(torch.from_numpy(audio[None, :1]))[0]  # [8, T], one call, mono
        right = mimi.encode(torch.from_numpy(audio[None, 1:]))[0]
    torch.testing.assert_close(codes, torch.cat([left, right]), rtol=0, atol=0)
    assert codes.shape[1] == md.seconds_to_steps(audio.shape[1] / 24_000) == 10
    assert codes.unique().numel() > 20 and not torch.equal(codes[:8], codes[8:])  # not vacuous


def test_defaults_are_moshi_7b_ids_and_layout(mimi):
    from moshi.models.lm import LMModel
    from moshi.models.loaders import _lm_kwargs

    tiny = {
        k: _lm_kwargs[k]
        for k in ("n_q", "dep_q", "card", "text_card", "existing_text_padding_id", "delays")
    }
    lm = LMModel(
        dim=16,
        num_heads=2,
        num_layers=1,
        depformer_dim=16,
        depformer_num_heads=2,
        depformer_num_layers=1,
        **tiny,
    )
    assert md.DataConfig.from_lm(lm) == md.DataConfig()
    assert lm.num_codebooks == 1 + 2 * mimi.num_codebooks  # text + Moshi's + user's codebooks
    assert lm.dep_q == mimi.num_codebooks  # Moshi's own codebooks come first (generated ones)


def test_delay_codes_matches_moshi():
    from moshi.models.lm_utils import _delay_sequence
    from moshi.models.loaders import _lm_kwargs

    delays = _lm_kwargs["delays"]
    codes = torch.randint(0, 2048, (17, 23))
    initial = torch.tensor([32000] + [2048] * 16)
    ref = _delay_sequence(delays, codes[None], initial[None, :, None])[0]
    torch.testing.assert_close(md.delay_codes(codes, delays, initial.tolist()), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- segments


@pytest.mark.parametrize("steps", [1, 10, 37, 50])
def test_segments_concatenate_to_the_conversation(steps):
    codes = torch.randint(-1, 2048, (17, 37))
    segs = list(md.conversation_segments(codes, steps))
    torch.testing.assert_close(torch.cat([s.codes for s in segs], dim=1), codes, rtol=0, atol=0)
    assert [s.start for s in segs] == list(range(0, 37, steps))
    assert [s.first for s in segs] == [True] + [False] * (len(segs) - 1)
    assert [s.last for s in segs] == [False] * (len(segs) - 1) + [True]
    assert [s.codes.shape[1] for s in segs[:-1]] == [steps] * (len(segs) - 1)
    as_numpy = list(md.conversation_segments(codes.numpy(), steps))
    np.testing.assert_array_equal(
        np.concatenate([s.codes for s in as_numpy], axis=1), codes.numpy()
    )
    with pytest.raises(ValueError):
        next(md.conversation_segments(codes, 0))


# ----------------------------------------------------------------------------------- pipeline


def _expected_codes(conv, mimi, spm):
    """Reader -> each channel through Mimi alone -> text interleaved: the codes layout by hand."""
    with torch.no_grad():
        x = torch.from_numpy(conv.audio)[:, None]  # [2, 1, N]
        moshi_audio, user_audio = mimi.encode(x[:1])[0], mimi.encode(x[1:])[0]  # [8, T] each
    text = md.interleave_text(conv.words, moshi_audio.shape[1], spm, CFG)
    return torch.cat([text[None], moshi_audio, user_audio]).numpy()


def test_prepare_is_deterministic_and_matches_the_pieces(tmp_path, mimi, spm):
    jsonl = synth.tone_conversations(
        tmp_path / "data", n=2, seed=3, filler_exchanges=0, num_facts=1, cfg=QUICK
    )
    md.prepare_conversations(jsonl, tmp_path / "a", mimi, spm, progress=False)
    md.prepare_conversations(jsonl, tmp_path / "b", mimi, spm, progress=False)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert files == sorted(
        p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()
    )
    assert len(files) == 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f

    prepared = md.load_prepared(tmp_path / "a")
    ((_, first),) = [c for c in md.read_dataset(jsonl)][:1]
    codes = prepared[0].codes()
    np.testing.assert_array_equal(codes, _expected_codes(first, mimi, spm))
    assert prepared[0].steps == codes.shape[1] == md.seconds_to_steps(first.duration)
    segs = list(md.conversation_segments(codes, md.seconds_to_steps(1.0)))  # 13-step segments
    np.testing.assert_array_equal(np.concatenate([s.codes for s in segs], axis=1), codes)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (
        manifest["layout"]["rows"][:2] == ["text", "moshi_audio_0"]
        and not manifest["layout"]["delayed"]
    )
    # the tone script's words come back from the files, Moshi's as the main speaker
    script = synth.dataset_scripts(2, 3, 0, 1)[0]
    assert [w.text for w in first.words if w.speaker == "SPEAKER_MAIN"] == synth.script_words(
        script, synth.MOSHI
    )
    assert [w.text for w in first.words if w.speaker != "SPEAKER_MAIN"] == synth.script_words(
        script, synth.USER
    )


def test_speak_without_tools_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    monkeypatch.setattr(synth, "_find_espeak", lambda: None)
    with pytest.raises(synth.MissingToolError, match="apt-get install espeak-ng sox"):
        synth.speak_conversations(tmp_path, n=1)
    assert not (tmp_path / "conversations.jsonl").exists()


@pytest.mark.skipif(bool(synth.missing_tools()), reason=f"needs {', '.join(synth.missing_tools())}")
def test_spoken_conversation_round_trips(tmp_path, mimi, spm):
    jsonl = synth.speak_conversations(
        tmp_path / "data", n=1, seed=5, filler_exchanges=0, num_facts=1, cfg=QUICK
    )
    ((entry, conv),) = list(md.read_dataset(jsonl, resample_audio=False))
    script = synth.dataset_scripts(1, 5, 0, 1)[0]
    main = [w for w in conv.words if w.speaker == "SPEAKER_MAIN"]
    user = [w for w in conv.words if w.speaker != "SPEAKER_MAIN"]
    assert [w.text for w in main] == synth.script_words(script, synth.MOSHI)
    assert [w.text for w in user] == synth.script_words(script, synth.USER)

    def rms(channel, words):  # loudness of one channel inside the given words' spans
        idx = np.concatenate([np.arange(int(w.start * 24_000), int(w.end * 24_000)) for w in words])
        return float(np.sqrt(np.mean(conv.audio[channel, idx] ** 2)))

    # left Moshi, right user
    assert rms(0, main) > 20 * rms(0, user) and rms(1, user) > 20 * rms(1, main)

    facts = json.loads(entry.wav.with_suffix(".json").read_text())["facts"]
    for f in facts:  # the answer, late in the conversation, repeats a fact told early
        told = next(w for w in conv.words if w.start == f["told_s"])
        answer = next(w for w in main if w.start == f["answer_s"])
        assert (
            told.text.strip(".,") == answer.text.strip(".,") == f["value"]
            and f["told_s"] < f["answer_s"]
        )

    codes = md.conversation_codes(conv, mimi, spm)
    assert codes.shape == (17, md.seconds_to_steps(conv.duration))
    torch.testing.assert_close(
        codes[0], md.interleave_text(conv.words, codes.shape[1], spm), rtol=0, atol=0
    )
    frames = [math.floor(w.start * 12.5) for w in main]
    for w, f in zip(main, frames):  # each word's first token sits at the frame of its start
        if frames.count(f) == 1:
            assert codes[0, f] == md.word_tokens(spm, w.text)[0], w
    special = (CFG.text_padding_id, CFG.end_of_text_padding_id)
    placed = [t for t in codes[0].tolist() if t not in special]
    every = iter([t for w in main for t in md.word_tokens(spm, w.text)])
    # in order; only tokens overtaken by the next word dropped
    assert all(t in every for t in placed)


# ----------------------------------------------------------------------------------- audio io


def _wave_pcm16(path):
    """Reference reader: the standard library's ``wave`` and int16 / 32768."""
    with wave.open(str(path)) as f:
        c, rate = f.getnchannels(), f.getframerate()
        x = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768.0
    return x.reshape(-1, c).T, rate


def _sinc_resample(audio, sr_in, sr_out, zero_crossings=16, rolloff=0.945):
    """Reference resampler: a polyphase Hann-windowed sinc evaluated sample by sample."""
    C, N = audio.shape
    n_out = math.ceil(N * sr_out / sr_in)
    cutoff = rolloff * min(1.0, sr_out / sr_in)
    half = math.ceil(zero_crossings / cutoff)
    out = np.zeros((C, n_out))
    for i in range(n_out):
        t = i * sr_in / sr_out  # position in input samples
        k = np.arange(math.floor(t) - half, math.floor(t) + half + 2)
        d = k - t
        w = np.where(np.abs(d) <= half, 0.5 * (1 + np.cos(np.pi * d / half)), 0.0)
        h = cutoff * np.sinc(cutoff * d) * w
        ok = (k >= 0) & (k < N)
        out[:, i] = audio[:, k[ok]] @ h[ok]
    return out


@pytest.mark.parametrize("rate", [16_000, 48_000])
def test_synthetic_conversations_read_as_the_reference_readers_do(tmp_path, rate):
    """A synthetic (tone) conversation stored at another rate: read by soundfile and resampled by
    soxr, it equals the standard library's PCM decoding and a windowed-sinc resampler within
    0.5% of its peak (away from the edges)."""
    from moshi_ttt.moshi.synth import tone_conversations

    jsonl = tone_conversations(tmp_path / "tones", n=1, seed=0, filler_exchanges=1, num_facts=1)
    ((_, conv),) = list(md.read_dataset(jsonl))
    audio = conv.audio[:, :24_000]  # the first second, [2, 24000] at 24 kHz
    stored = _sinc_resample(audio.astype(np.float64), 24_000, rate)
    md.write_wav(tmp_path / "x.wav", stored, rate)
    ours, ours_rate = md.read_wav(tmp_path / "x.wav")
    ref, ref_rate = _wave_pcm16(tmp_path / "x.wav")
    assert ours_rate == ref_rate == rate
    np.testing.assert_array_equal(ours, ref)
    back, ref_back = (
        md.resample(ours, rate, 24_000),
        _sinc_resample(ref.astype(np.float64), rate, 24_000),
    )
    assert back.shape == ref_back.shape == audio.shape
    edge = 600
    assert_close(back[:, edge:-edge], ref_back[:, edge:-edge], 5e-3)
