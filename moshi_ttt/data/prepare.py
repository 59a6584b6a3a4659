"""Build the offline text corpus: whole-document train/val/test splits as flat token files.

Layout of ``out_dir``::

    train.bin, val.bin, test.bin              flat token streams (raw, np.memmap-able)
    train.docs.npy, val.docs.npy, test.docs.npy   int64 [n_docs, 2]: start, end of each document
    manifest.json                            tokenizer, dtype, split rule, sha256s, documents
    .cache/debs/                             downloaded .debs, reused (unless ``cache_dir``)

Runs are reproducible: the same packages, interpreter and arguments give byte-identical files
and manifest (the manifest holds no timestamps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from .sources import Document, LoadedSource, SourceError, load_source
from .tokenizer import get_tokenizer

SPLITS = ("train", "val", "test")
LONG_DOC_CHARS = 100_000
FORMAT = "moshi_ttt.corpus/1"
SPLIT_RULE = (
    "Per source, u = sha256('<seed>/<source>/<doc_id>')[:8] / 2**64: test if u < test_frac, "
    "val if u < test_frac + val_frac, else train (so adding a source or document reassigns no "
    "other document by hash). Sources with < 3 documents go wholly to train. Then, per source: "
    "while test "
    "holds fewer than max(1, round(test_frac * n_long)) documents of >= long_doc_chars chars, "
    "the long non-test document with the smallest u moves to test; an empty test or val takes "
    "the train document with the smallest u. Within a split, documents keep source order."
)


@dataclass(frozen=True)
class _Doc:
    doc: Document
    tokens: np.ndarray  # [T] in the corpus dtype
    u: float  # hash position in [0, 1)


def _unit(seed: int, source: str, doc_id: str) -> float:
    digest = hashlib.sha256(f"{seed}/{source}/{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_splits(
    units: Sequence[float], chars: Sequence[int], val_frac: float, test_frac: float
) -> list[str]:
    """Split name per document of ONE source (hash positions ``units``, lengths ``chars``).

    The rule is ``SPLIT_RULE``.
    """
    if len(units) < 3:
        return ["train"] * len(units)
    split = [
        "test" if u < test_frac else "val" if u < test_frac + val_frac else "train" for u in units
    ]
    by_u = sorted(range(len(units)), key=lambda i: units[i])
    long = [i for i in by_u if chars[i] >= LONG_DOC_CHARS]
    need = max(1, round(test_frac * len(long))) if long else 0
    for i in long:
        if sum(split[j] == "test" for j in long) >= need:
            break
        split[i] = "test"
    for name in ("test", "val"):
        if name not in split:
            split[next(i for i in by_u if split[i] == "train")] = name
    return split


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def documents_sha256(docs: Sequence[Document]) -> str:
    """A digest of the documents' ids and texts (to compare corpora across machines)."""
    h = hashlib.sha256()
    for d in docs:
        for part in (d.source, d.doc_id, d.text):
            h.update(struct.pack("<Q", len(part.encode())) + part.encode())
    return h.hexdigest()


def _dtype(vocab_size: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise ValueError(f"vocab_size {vocab_size} too large")


def _write_split(out: Path, split: str, docs: Sequence[_Doc]) -> dict:
    """Write ``<split>.bin`` and ``<split>.docs.npy``; the split's manifest entry."""
    bounds, listing, offset = np.zeros((len(docs), 2), dtype=np.int64), [], 0
    with open(out / f"{split}.bin", "wb") as f:
        for i, d in enumerate(docs):
            f.write(d.tokens.tobytes())
            bounds[i] = offset, offset + len(d.tokens)
            listing.append(
                {
                    "source": d.doc.source,
                    "doc_id": d.doc.doc_id,
                    "title": d.doc.title,
                    "chars": len(d.doc.text),
                    "tokens": len(d.tokens),
                    "offset": offset,
                }
            )
            offset += len(d.tokens)
    np.save(out / f"{split}.docs.npy", bounds)
    files = {"tokens": f"{split}.bin", "docs": f"{split}.docs.npy"}
    return {
        "files": files,
        "sha256": {v: _sha256(out / v) for v in files.values()},
        "tokens": offset,
        "documents": len(docs),
        "document_list": listing,
    }


def _source_entry(src: LoadedSource, docs: Sequence[_Doc], split: Sequence[str]) -> dict:
    p = src.provenance
    return {
        "package": p.package,
        "version": p.version,
        "deb_sha256": p.deb_sha256,
        "license": p.license,
        "documents": len(docs),
        "chars": sum(len(d.doc.text) for d in docs),
        "tokens": sum(len(d.tokens) for d in docs),
        "content_sha256": documents_sha256(src.documents),
        "split_documents": {s: split.count(s) for s in SPLITS},
        "split_tokens": {
            s: sum(len(d.tokens) for d, x in zip(docs, split) if x == s) for s in SPLITS
        },
    }


def prepare_corpus(
    out_dir: str | Path,
    sources: Sequence[str] = ("austen", "bible", "pydocs", "stdlib"),
    tokenizer: str = "byte",
    ranks_path: str | Path | None = None,
    seed: int = 0,
    val_frac: float = 0.05,
    test_frac: float = 0.1,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict:
    """Fetch, parse, split and tokenize ``sources`` into ``out_dir``; returns the manifest.

    ``.deb`` files are cached in ``cache_dir`` (default ``<out_dir>/.cache/debs``).
    """
    if not (0 < val_frac and 0 < test_frac and val_frac + test_frac <= 0.5):
        raise ValueError(
            f"need 0 < val_frac, test_frac and val_frac + test_frac <= 0.5, got "
            f"{val_frac}, {test_frac}"
        )
    if len(set(sources)) != len(sources) or not sources:
        raise ValueError(f"sources must be distinct and non-empty, got {sources}")
    tok = get_tokenizer(tokenizer, ranks_path)
    dtype = _dtype(tok.vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # no stale manifest over half-written files
    per_split: dict[str, list[_Doc]] = {s: [] for s in SPLITS}
    source_entries = {}
    bar = tqdm(sources, desc="corpus", unit="source", disable=not progress, file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(f"loading {name}")
        src = load_source(name, cache_dir or out / ".cache" / "debs")
        docs = [
            _Doc(d, tok.encode(d.text).astype(dtype), _unit(seed, name, d.doc_id))
            for d in tqdm(
                src.documents,
                desc=f"tokenize {name}",
                unit="doc",
                disable=not progress,
                file=sys.stderr,
                leave=False,
            )
        ]
        split = assign_splits(
            [d.u for d in docs], [len(d.doc.text) for d in docs], val_frac, test_frac
        )
        for d, s in zip(docs, split):
            per_split[s].append(d)
        source_entries[name] = _source_entry(src, docs, split)
        if progress:
            e = source_entries[name]
            counts = "/".join(str(e["split_documents"][s]) for s in SPLITS)
            tqdm.write(
                f"{name}: {e['documents']} documents, {e['chars']:,} chars, "
                f"{e['tokens']:,} tokens from {e['package']} {e['version']}; "
                f"train/val/test documents {counts}",
                file=sys.stderr,
            )
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "ranks_sha256": _sha256(Path(ranks_path)) if ranks_path else None,
        "seed": seed,
        "val_frac": val_frac,
        "test_frac": test_frac,
        "split_rule": SPLIT_RULE,
        "long_doc_chars": LONG_DOC_CHARS,
        "sources": source_entries,
        "splits": {s: _write_split(out, s, per_split[s]) for s in SPLITS},
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    (out / "manifest.json").write_text(text, encoding="utf-8")
    return manifest


def load_manifest(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise ValueError(
            f"no corpus in {out_dir}: {path.name} is missing "
            "(build it with moshi_ttt.data.prepare.prepare_corpus)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_split(
    out_dir: str | Path, split: str, verify: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(tokens as a read-only np.memmap, document bounds int64 [n_docs, 2], manifest).

    ``verify`` checks both files against the manifest's sha256 (ValueError on mismatch).
    """
    manifest = load_manifest(out_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"unknown split {split!r}: expected one of {list(manifest['splits'])}")
    entry, out = manifest["splits"][split], Path(out_dir)
    for name in entry["files"].values():
        if not (out / name).is_file():
            raise ValueError(f"corpus in {out_dir} is incomplete: {name} is missing")
        if verify and _sha256(out / name) != entry["sha256"][name]:
            raise ValueError(
                f"{out / name} does not match its sha256 in manifest.json "
                "(modified or half-written; rebuild the corpus)"
            )
    dtype = np.dtype(manifest["dtype"])
    path = out / entry["files"]["tokens"]
    tokens = np.memmap(path, dtype=dtype, mode="r") if entry["tokens"] else np.zeros(0, dtype=dtype)
    bounds = np.load(out / entry["files"]["docs"])
    if len(tokens) != entry["tokens"] or len(bounds) != entry["documents"]:
        raise ValueError(f"{path} has {len(tokens)} tokens, manifest says {entry['tokens']}")
    return tokens, bounds, manifest


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=prepare_corpus.__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--sources", nargs="+", default=["austen", "bible", "pydocs", "stdlib"])
    ap.add_argument("--tokenizer", default="byte", choices=["byte", "gpt2"])
    ap.add_argument("--ranks-path", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        prepare_corpus(
            args.out_dir, tuple(args.sources), args.tokenizer, args.ranks_path, args.seed
        )
    except SourceError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
