"""Long-stream loss and fast-weight norms of trained checkpoints, as trained and with inference-time
settings changed (no retraining): In-Place TTT's update clip ``inplace_ttt.clip_tau``, the TTT
cache's ``memory.decay`` or ``memory.max_state_norm``. One held-out stream (the test split joined)
to multiples of the training length, as ``moshi-ttt eval --long-stream``.

    python bench/stationarity.py runs/s/window-32/model.pt runs/s/ttt_cache-32/model.pt \\
        --data data/corpus --train-len 256 --out docs/results/stationarity \\
        --set ttt_cache-32 memory.decay=0.01 --set window-32+ttt2 inplace_ttt.clip_tau=1.0

Writes ``long_stream_eval.json`` (``long_report.summary`` of every row, the settings changed) and
``long_stream_eval.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from moshi_ttt import long_report
from moshi_ttt.checkpoint import load_checkpoint
from moshi_ttt.evaluation import long_stream
from moshi_ttt.models.lm import StreamingLM
from moshi_ttt.pipeline import long_stream_tokens


def parse_setting(setting: str) -> tuple[str, str, object]:
    """``memory.F=V`` or ``inplace_ttt.F=V`` -> (part, field, V parsed as JSON)."""
    path, _, value = setting.partition("=")
    part, _, name = path.partition(".")
    if part not in ("memory", "inplace_ttt") or not name or not value:
        raise SystemExit(
            f"a setting is memory.FIELD=VALUE or inplace_ttt.FIELD=VALUE, got {setting!r}"
        )
    return part, name, json.loads(value)


def with_setting(model: StreamingLM, setting: str) -> StreamingLM:
    """The same weights under a config with one field changed (``parse_setting``)."""
    part, name, value = parse_setting(setting)
    sub = getattr(model.cfg, part)
    if sub is None:
        raise SystemExit(f"{setting!r}: the model has no {part}")
    changed = dataclasses.replace(sub, **{name: value})
    cfg = dataclasses.replace(model.cfg, **{part: changed})
    out = StreamingLM(cfg)
    out.load_state_dict(model.state_dict())
    return out.eval()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--data", type=Path, default=Path("data/corpus"))
    p.add_argument("--train-len", type=int, required=True)
    p.add_argument("--multiples", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument(
        "--set",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "SETTING"),
        help="also evaluate model NAME (its run name) with SETTING changed",
    )
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    loaded = []
    for ck in a.checkpoints:
        model, meta = load_checkpoint(ck)
        loaded.append((str(meta.get("name") or ck.parent.name), model))
    unknown = {n for n, _ in a.set} - {n for n, _ in loaded}
    if unknown:
        raise SystemExit(f"--set names no checkpoint: {sorted(unknown)}")
    tokens = long_stream_tokens(a.data, a.multiples[-1] * a.train_len + 1)
    models = {}
    for name, model in loaded:
        runs = [(name, model.eval())] + [
            (f"{name} [{s}]", with_setting(model, s)) for n, s in a.set if n == name
        ]
        for label, m in runs:
            models[label] = {
                "config": m.cfg.to_dict(),
                "long_stream": long_stream(m, tokens, a.train_len, a.multiples),
            }
    metrics = {"models": models}
    a.out.mkdir(parents=True, exist_ok=True)
    summary = long_report.summary(metrics)
    summary["settings"] = [{"model": n, "setting": s} for n, s in a.set]
    (a.out / "long_stream_eval.json").write_text(json.dumps(summary, indent=1))
    long_report.plot(metrics, a.out / "long_stream_eval.png")
    print("\n".join(long_report.markdown(metrics)))


if __name__ == "__main__":
    main()
