"""``moshi-ttt moshi train``: train the adapter's memory into Moshi (``trainer.MoshiTrainer``).

Model: a stock checkpoint from local files (``--moshi-weights``, ``--config``) or ``--tiny`` (a
random tiny Moshi). Data: a moshi-finetune ``.jsonl`` (``--data``), Mimi-encoded once into
``--cache``, or synthetic conversations (tones) with facts stated early and asked late.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from .training import recipe_name

MIMI_CARD = 2048  # codes per Mimi codebook
ADAPTER_HELP = (
    "the memory: an AdapterConfig preset (off, inplace_ttt, ttt_cache, both) or a JSON "
    "file of AdapterConfig.to_json()"
)


def add_moshi_parser(sub) -> None:
    moshi = sub.add_parser("moshi", help="Moshi: train the memory into a Moshi checkpoint")
    msub = moshi.add_subparsers(dest="moshi_command", required=True)
    tp = msub.add_parser(
        "train",
        help="train stage by stage on conversations, memory carried "
        "across each conversation's segments",
    )
    _model_args(tp)
    tp.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="Moshi's text tokenizer (.model) for --data transcripts",
    )
    tp.add_argument("--adapter", default="ttt_cache", help=ADAPTER_HELP)
    tp.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a moshi-finetune .jsonl (default: synthetic tone conversations)",
    )
    tp.add_argument(
        "--mimi-weights",
        type=Path,
        default=None,
        help="Mimi's weights to encode --data (default: a random Mimi, for tests)",
    )
    tp.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where encoded conversations are kept (default: OUT/codes)",
    )
    tp.add_argument(
        "--conversations", type=int, default=4, help="synthetic conversations (without --data)"
    )
    tp.add_argument(
        "--recipe",
        default="staged",
        choices=["staged", "tiny"],
        type=recipe_name,
        help="staged: the memory alone, then attention above the lower half, then all (its "
        "former name, spec, is accepted)",
    )
    tp.add_argument(
        "--steps",
        type=int,
        default=None,
        help="total steps, the recipe's stages in proportion (each >= 1)",
    )
    tp.add_argument("--stage-steps", default=None, help="steps of the 3 stages, e.g. 100,300,600")
    tp.add_argument(
        "--segment", type=int, default=None, help="steps per segment (default: the recipe's)"
    )
    tp.add_argument(
        "--batch",
        type=int,
        default=None,
        help="conversations per step, over all processes (default 1)",
    )
    tp.add_argument("--lr", type=float, default=None)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--checkpoint-every", type=int, default=0)
    tp.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    tp.add_argument("--out", type=Path, required=True)
    tp.add_argument("--device", default="cpu")
    tp.set_defaults(func=cmd_moshi_train)

    rp = msub.add_parser(
        "recall",
        help="conversation recall: facts told early, asked late; the answer's text tokens scored",
    )
    _model_args(rp)
    rp.add_argument("--tokenizer", type=Path, required=True, help="Moshi's text tokenizer (.model)")
    rp.add_argument("--adapter", default="ttt_cache", help=ADAPTER_HELP)
    rp.add_argument(
        "--added",
        type=Path,
        default=None,
        help="the trained memory (added.safetensors of `moshi train`)",
    )
    rp.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a .jsonl whose alignment files list the facts (synthetic conversations)",
    )
    rp.add_argument("--mimi-weights", type=Path, default=None)
    rp.add_argument("--segment", type=int, default=250, help="frames per streamed call")
    rp.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--device", default="cpu")
    rp.set_defaults(func=cmd_moshi_recall)


def _model_args(p) -> None:
    """--tiny, or --moshi-weights with --config."""
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--tiny", action="store_true", help="a random tiny Moshi (CPU runs, tests)")
    model.add_argument(
        "--moshi-weights",
        type=Path,
        default=None,
        help="a stock Moshi checkpoint (.safetensors), read offline",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the checkpoint's config.json (moshi's loader format; with --moshi-weights)",
    )


def _adapter(spec: str, num_layers: int):
    from .moshi.config import PRESET_NAMES, AdapterConfig

    if spec in PRESET_NAMES:
        return AdapterConfig.preset(spec, num_layers=num_layers)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"--adapter {spec!r}: not a preset ({', '.join(PRESET_NAMES)}) nor a JSON file"
        )
    try:
        return AdapterConfig.from_json(path.read_text())
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"--adapter {path}: not an AdapterConfig JSON ({e})") from None


def _stages(a, cfg):
    """The recipe's stages with ``--stage-steps`` or ``--steps`` applied."""
    from .training import scale_stages

    stages = cfg.stages
    if a.stage_steps is not None:
        try:
            steps = [int(x) for x in a.stage_steps.split(",")]
        except ValueError:
            raise ValueError(
                f"--stage-steps must be comma-separated integers, got {a.stage_steps!r}"
            ) from None
        if len(steps) != len(stages) or min(steps) < 1:
            raise ValueError(
                f"--stage-steps needs {len(stages)} positive integers, got {a.stage_steps!r}"
            )
        return tuple(dataclasses.replace(s, steps=n) for s, n in zip(stages, steps))
    if a.steps is not None:
        try:
            return scale_stages(stages, a.steps)
        except ValueError as e:
            raise ValueError(f"--{e}") from None
    return stages


def _model(a):
    import torch
    from moshi.models.lm import LMModel

    from .moshi.config import tiny_lm_kwargs

    if a.tiny:  # audio cardinality: Mimi's codebook size; text: the tokenizer's, if given
        over = {"card": MIMI_CARD}
        if a.tokenizer is not None:
            from .moshi.data import load_tokenizer

            over["text_card"] = load_tokenizer(a.tokenizer).vocab_size()
        torch.manual_seed(a.seed)
        return LMModel(**tiny_lm_kwargs(**over)).to(a.device)
    if a.config is None:
        raise ValueError("--moshi-weights needs --config (the checkpoint's config.json)")
    for what, path in (("--moshi-weights", a.moshi_weights), ("--config", a.config)):
        if not path.is_file():
            raise ValueError(f"{what} {path}: no such file")
    from .moshi.checkpoint import load_stock

    try:
        return load_stock(a.config, a.moshi_weights, device=a.device, dtype=torch.float32)
    except RuntimeError as e:  # a state dict that does not fit the config
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{a.moshi_weights} does not match {a.config}: {first}") from None


def _conversations(a, lm, out: Path) -> list:
    from .moshi.data import DataConfig, load_mimi, load_prepared, prepare_conversations
    from .moshi.synth import tone_conversations

    if (lm.num_codebooks - 1) % 2:
        raise ValueError(
            f"this Moshi has {lm.num_codebooks} codebooks: expected text + 2 x n_q audio"
        )
    import torch.distributed as dist

    cache = a.cache or out / "codes"
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0 and not (cache / "manifest.json").is_file():
        jsonl = a.data
        if jsonl is None:
            jsonl = tone_conversations(out / "synthetic", n=a.conversations, seed=a.seed)
        elif not jsonl.is_file():
            raise ValueError(f"--data {jsonl}: no such file")
        mimi = load_mimi(a.mimi_weights, num_codebooks=(lm.num_codebooks - 1) // 2)
        prepare_conversations(jsonl, cache, mimi, a.tokenizer, DataConfig(), progress=True)
        print(f"conversations encoded into {cache}", file=sys.stderr)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 encoded them once; every rank reads the same cache
    convs = load_prepared(cache)
    if not convs:
        raise ValueError(f"{cache}: no conversations")
    return [c.codes for c in convs]


def cmd_moshi_train(a) -> None:
    from .moshi import patch_lm
    from .moshi.trainer import MoshiTrainConfig, MoshiTrainer
    from .trainer import init_distributed

    init_distributed()  # under torchrun: one process per GPU, the model sharded (FSDP2)

    lm = _model(a)
    num_layers = len(lm.transformer.layers)
    lm = patch_lm(lm, _adapter(a.adapter, num_layers))
    over = {
        k: v for k, v in (("segment", a.segment), ("lr", a.lr), ("batch", a.batch)) if v is not None
    }
    cfg = MoshiTrainConfig.preset(
        a.recipe, num_layers=num_layers, seed=a.seed, checkpoint_every=a.checkpoint_every, **over
    )
    cfg = dataclasses.replace(cfg, stages=_stages(a, cfg))
    a.out.mkdir(parents=True, exist_ok=True)
    convs = _conversations(a, lm, a.out)
    (a.out / "config.json").write_text(
        json.dumps(
            {
                "adapter": json.loads(lm.moshi_ttt_config.to_json()),
                "train": dataclasses.asdict(cfg),
            },
            indent=1,
        )
        + "\n"
    )
    trainer = MoshiTrainer(lm, cfg, convs, a.out)
    trainer.fit(resume=a.resume)
    if trainer.rank == 0:
        print(
            f"trained: {a.out / 'added.safetensors'}, log {a.out / 'train_log.csv'}",
            file=sys.stderr,
        )


def cmd_moshi_recall(a) -> None:
    import torch

    from .moshi import load_added, patch_lm
    from .moshi.data import conversation_codes, load_mimi, load_tokenizer, read_dataset
    from .moshi.recall import fact_recall, recall_summary

    if not a.data.is_file():
        raise ValueError(f"--data {a.data}: no such file")
    if not a.tokenizer.is_file():
        raise ValueError(f"--tokenizer {a.tokenizer}: no such file")
    lm = _model(a)
    lm = patch_lm(lm, _adapter(a.adapter, len(lm.transformer.layers)))
    if a.added is not None:
        if not a.added.is_file():
            raise ValueError(f"--added {a.added}: no such file")
        load_added(lm, a.added)
    lm.eval()
    tok = load_tokenizer(a.tokenizer)
    mimi = load_mimi(a.mimi_weights, num_codebooks=(lm.num_codebooks - 1) // 2)
    rows, scores = [], []
    for entry, conv in read_dataset(a.data):
        facts = json.loads(entry.wav.with_suffix(".json").read_text()).get("facts") or []
        codes = conversation_codes(conv, mimi, tok)
        with torch.no_grad():
            got = fact_recall(lm, codes, facts, tok, a.segment)
        scores += got
        rows += [
            {"conversation": entry.path, **dataclasses.asdict(s), "recalled": s.recalled}
            for s in got
        ]
    summary = recall_summary(scores)
    if not scores:
        raise ValueError(
            f"{a.data}: no fact to score (the alignment files list none, or their "
            "answers' tokens are not in the text stream)"
        )
    print(json.dumps(summary))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"summary": summary, "facts": rows}, indent=1) + "\n")
