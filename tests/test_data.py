"""Corpus sources and preparation, offline: every input is a small fake built here.

The ``network`` test downloads the real packages; it runs only when selected (``-m network``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from moshi_ttt.data import debian, prepare, sources
from moshi_ttt.data.debian import SourceError
from moshi_ttt.data.prepare import assign_splits, load_split, prepare_corpus
from moshi_ttt.data.tokenizer import ByteTokenizer


# ----------------------------------------------------------------------------- fake formats
def _xdr(obj) -> bytes:
    """R XDR serialization of str lists (STRSXP), int tuples, bools and named lists (dicts)."""
    i32 = lambda *v: struct.pack(f">{len(v)}i", *v)  # noqa: E731
    chars = lambda s: i32(9 | 8 << 12, len(s.encode())) + s.encode()  # noqa: E731  (UTF-8)
    if isinstance(obj, bool):
        return i32(10, 1, int(obj))
    if isinstance(obj, tuple):
        return i32(13, len(obj), *obj)
    if isinstance(obj, list):
        return i32(16, len(obj)) + b"".join(chars(s) for s in obj)
    names = _xdr(list(obj))  # a dict: VECSXP with a names attribute
    body = i32(19 | 1 << 9, len(obj)) + b"".join(_xdr(v) for v in obj.values())
    return body + i32(2 | 1 << 10) + i32(1) + chars("names") + names + i32(254)


def _rds(obj) -> bytes:
    return b"X\n" + struct.pack(">4i", 3, 0x040201, 0x030500, 5) + b"UTF-8" + _xdr(obj)


def _lazyload(objects: dict[str, list[str]]) -> tuple[bytes, bytes]:
    """(rdx, rdb) of an R lazy-load database holding ``objects``, zlib-compressed like R."""
    rdb, index = b"", {}
    for name, value in objects.items():
        raw = _rds(value)
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = (len(rdb), len(blob))
        rdb += blob
    return gzip.compress(_rds({"variables": index, "compressed": True}), mtime=0), rdb


def _ztext(testaments: dict[str, list[list[str]]]) -> dict[str, bytes]:
    """A zText module: per testament, blocks of entries, stored in REVERSED block order."""
    files = {}
    for t, blocks in testaments.items():
        bzs, bzv, bzz = [], [], b""
        order = list(range(len(blocks)))[::-1]  # block number != index order
        for number in order:
            raw = "".join(blocks[number]).encode()
            comp = zlib.compress(raw)
            bzs.append((number, len(bzz), len(comp), len(raw)))
            bzz += comp
        for number, block in enumerate(blocks):
            offset = 0
            for entry in block:
                bzv.append(struct.pack("<IIH", order.index(number), offset, len(entry.encode())))
                offset += len(entry.encode())
        files[f"{t}.bzs"] = b"".join(struct.pack("<3I", *b[1:]) for b in bzs)
        files[f"{t}.bzv"], files[f"{t}.bzz"] = b"".join(bzv), bzz
    return files


GEN_1_1 = (
    '<w lemma="strong:H0430">In</w> <w>the</w> <w>beginning</w>, <w>God</w><note '
    'placement="foot"><reference type="annotateRef">1:1 </reference>Hebrew “Elohim”.'
    "</note><w>created</w> the heavens &amp; the earth. "
)


def _book(osis: str, heading: bool = True) -> list[str]:
    """Entries of one book: heading, 2 chapters of 2 verses, the book's end milestone."""
    head = (
        (
            f'<div canonical="true" osisID="{osis}" sID="b{osis}" type="book"/> <title '
            f'type="main">The Book of {osis}</title>'
        )
        if heading
        else ""
    )
    entries = [head]
    for c in (1, 2):
        entries.append(f'<chapter n="{c}" osisID="{osis}.{c}" sID="{osis}.{c}"/>')
        entries += [f'<div sID="p{c}" type="x-p"/>{osis} {c}:1 text.', f"{osis} {c}:2 text. "]
    entries[-1] += f'<div canonical="true" eID="b{osis}" osisID="{osis}" type="book"/>'
    return entries


def _bible_entries() -> dict[str, list[list[str]]]:
    """66 books (plus a deuterocanonical Tob), with Genesis, Psalms, Matthew and Hosea special."""
    ids = [b for b, _ in sources.BIBLE_BOOKS]
    books = {b: _book(b, heading=b != "Hos") for b in ids + ["Tob"]}
    books["Gen"][2] = GEN_1_1
    books["Ps"][2] = (
        '<title canonical="true" type="psalm">A Psalm.</title><lg sID="g"/><l '
        'sID="a"/>line one,<l eID="a"/> <l sID="b"/>line two.<l eID="b"/><lg eID="g"/>'
    )
    books["Matt"][2] = '<q marker="" who="Jesus">“Come.”</q><w>Then</w> he went. '
    # a book outside the versification lands in Hosea's heading, cutting Hosea's own heading
    books["Hos"][0] = (
        '<div canonical="true" osisID="DanGr" sID="x" type="book"/><chapter '
        'osisID="DanGr.1" sID="DanGr.1"/>Greek Daniel text.'
    )
    header = ["", '<milestone type="x-importer"/>']
    ot = [header] + [books[b] for b in ids[:39] + ["Tob"]]
    return {"ot": ot, "nt": [header] + [books[b] for b in ids[39:]]}


def _deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """Write a minimal .deb (ar of debian-binary, control.tar.gz, data.tar.xz)."""

    def tar(members: dict[str, bytes], mode: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as t:
            for name, data in members.items():
                info = tarfile.TarInfo("./" + name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\n".encode()
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.gz": tar({"control": control}, "w:gz"),
        "data.tar.xz": tar(files, "w:xz"),
    }
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" * (len(data) % 2)
    path = path / f"{package}_{version}_all.deb"
    path.write_bytes(out)
    return path


NOVEL_LINES = {
    k: [f"{t.upper()}", "", "Chapter 1", ""] + [f"{k} line {i}." for i in range(9000)]
    for k, t in sources.AUSTEN_NOVELS.items()
}  # > 100k chars each: long documents


def _page(title: str, body: str) -> str:
    return (
        f"<html><head><title>{title} — Python 3.11.2 documentation</title></head><body>"
        f'<div class="related">nav</div><div class="document"><div class="body" '
        f'role="main"><section><h1>{title}<a class="headerlink" href="#">¶</a></h1>{body}'
        f'</section></div></div><div class="sphinxsidebar">sidebar</div></body></html>'
    )


PAGES = {
    "library/a.html": _page("a — A", "<p>" + "alpha " * 500 + "</p>"),
    "library/b.html": _page("b — B", "<p>" + "beta " * 500 + "</p>"),
    "library/c.html": _page("c — C", "<p>" + "gamma " * 500 + "</p>"),
    "library/tiny.html": _page("tiny", "<p>short</p>"),
    "library/index.html": _page("Library", "<p>" + "toc " * 800 + "</p>"),
    "genindex-A.html": _page("Index", "<p>" + "idx " * 800 + "</p>"),
}


@pytest.fixture(scope="module")
def debs(tmp_path_factory) -> Path:
    """A .deb cache with fake austen, bible and pydocs packages."""
    cache = tmp_path_factory.mktemp("debs")
    rdx, rdb = _lazyload(NOVEL_LINES)
    stem = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    _deb(cache, "r-cran-janeaustenr", "1.0.0-1", {stem + ".rdx": rdx, stem + ".rdb": rdb})
    mod = "usr/share/sword/modules/texts/ztext/engWEB2015eb/"
    _deb(
        cache,
        "sword-text-web",
        "426.0-1",
        {mod + k: v for k, v in _ztext(_bible_entries()).items()},
    )
    _deb(
        cache,
        "python3.11-doc",
        "3.11.2-6",
        {sources.PYDOCS_ROOT + k: v.encode() for k, v in PAGES.items()},
    )
    return cache


FAKE = ("austen", "bible", "pydocs")


@pytest.fixture(scope="module")
def corpus(debs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    prepare_corpus(out, FAKE, seed=0, progress=False, cache_dir=debs)
    return out


# ----------------------------------------------------------------------------- parsers
def test_ztext_roundtrip():
    testaments = _bible_entries()
    expected = [e for t in ("ot", "nt") for block in testaments[t] for e in block]
    assert debian.read_ztext(_ztext(testaments)) == expected


def test_bible_books_plain_text():
    entries = debian.read_ztext(_ztext(_bible_entries()))
    docs = {d.doc_id: d for d in sources.bible_documents(entries)}
    assert list(docs) == [b for b, _ in sources.BIBLE_BOOKS]  # 66, canon order, no Tob/DanGr
    assert docs["Gen"].text == (
        "In the beginning, God created the heavens & the earth. "
        "Gen 1:2 text.\n\nGen 2:1 text. Gen 2:2 text."
    )
    assert docs["Ps"].text == (
        "A Psalm.\nline one,\nline two.\nPs 1:2 text.\n\nPs 2:1 text. Ps 2:2 text."
    )
    assert docs["Matt"].text.startswith("“Come.” Then he went. Matt 1:2 text.")
    assert docs["Hos"].text == "Hos 1:1 text. Hos 1:2 text.\n\nHos 2:1 text. Hos 2:2 text."


def test_lazyload_austen():
    rdx, rdb = _lazyload(NOVEL_LINES)
    docs = sources.austen_documents(debian.read_lazyload(rdx, rdb))
    assert [d.title for d in docs] == list(sources.AUSTEN_NOVELS.values())
    assert [d.text for d in docs] == ["\n".join(NOVEL_LINES[d.doc_id]) for d in docs]


def test_html_to_text():
    body = (
        '<p>Some <code>code</code>\n  here.</p><div class="highlight"><pre>def f():\n'
        "    return 1\n</pre></div><ul><li>one</li><li>two</li></ul>"
    )
    title, text = sources.html_to_text(_page("json — JSON", body))
    assert (title, text) == (
        "json — JSON",
        "json — JSON\n\nSome code here.\n\ndef f():\n    return 1\n\none\ntwo",
    )


def test_pydocs_skips_index_and_tiny_pages():
    docs = sources.pydocs_documents(PAGES)
    assert [d.doc_id for d in docs] == ["library/a.html", "library/b.html", "library/c.html"]


def test_stdlib_skips_tests(tmp_path):
    for rel in (
        "a.py",
        "pkg/b.py",
        "test/t.py",
        "pkg/tests/x.py",
        "site-packages/y.py",
        "idlelib/idle_test/z.py",
        "pkg/data.txt",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    docs = sources.stdlib_documents(tmp_path)
    assert [(d.doc_id, d.text) for d in docs] == [
        ("a.py", "# a.py\n"),
        ("pkg/b.py", "# pkg/b.py\n"),
    ]


def test_deb_roundtrip(tmp_path):
    files = {"usr/share/x.txt": b"hello", "usr/share/y.bin": bytes(range(256))}
    path = _deb(tmp_path, "pkg", "1.2-3", files)
    assert debian.read_deb(path, lambda p: p.startswith("usr/")) == files
    deb = debian.fetch_deb("pkg", tmp_path, "demo")  # cached: no apt-get
    assert (deb.version, deb.sha256) == ("1.2-3", hashlib.sha256(path.read_bytes()).hexdigest())


def test_source_error_without_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SourceError) as e:
        sources.load_source("austen", tmp_path / "cache")
    assert str(e.value).startswith(
        "source 'austen': cannot fetch Debian package "
        "'r-cran-janeaustenr': apt-get not found on PATH"
    )


def test_source_error_names_apt_stderr(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(
        "#!/bin/sh\necho 'W: Download is performed unsandboxed as root' >&2\n"
        'echo "E: Unable to locate package $2" >&2\nexit 100\n'
    )
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(SourceError) as e:
        sources.load_source("bible", tmp_path / "cache")
    assert str(e.value) == (
        "source 'bible': cannot fetch Debian package 'sword-text-web': "
        "`apt-get download sword-text-web` exited with 100:\n"
        "E: Unable to locate package sword-text-web"
    )


# ----------------------------------------------------------------------------- corpus
def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_manifest_sha256_matches_files(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    recorded = {n: h for s in manifest["splits"].values() for n, h in s["sha256"].items()}
    actual = {n: hashlib.sha256((corpus / n).read_bytes()).hexdigest() for n in recorded}
    assert recorded == actual


def test_reproducible_bytes(corpus, debs, tmp_path):
    prepare_corpus(tmp_path, FAKE, seed=0, progress=False, cache_dir=debs)
    assert _files(tmp_path) == _files(corpus)


def _assignment(manifest: dict) -> dict[tuple[str, str], str]:
    return {
        (d["source"], d["doc_id"]): s
        for s, e in manifest["splits"].items()
        for d in e["document_list"]
    }


def test_splits_disjoint_and_complete(corpus, debs):
    manifest = json.loads((corpus / "manifest.json").read_text())
    listed = [
        (d["source"], d["doc_id"]) for e in manifest["splits"].values() for d in e["document_list"]
    ]
    all_docs = [
        (d.source, d.doc_id) for name in FAKE for d in sources.load_source(name, debs).documents
    ]
    assert sorted(listed) == sorted(all_docs)  # each document in exactly one split
    per_source = {(src, s) for (src, _), s in _assignment(manifest).items()}
    assert per_source == {(src, s) for src in FAKE for s in prepare.SPLITS}


def test_split_deterministic_and_stable_under_added_sources(corpus, debs, tmp_path):
    manifest = json.loads((corpus / "manifest.json").read_text())
    alone = prepare_corpus(tmp_path / "a", ("austen",), progress=False, cache_dir=debs)
    other_seed = prepare_corpus(tmp_path / "b", ("bible",), seed=1, progress=False, cache_dir=debs)
    full = _assignment(manifest)
    assert _assignment(alone) == {k: v for k, v in full.items() if k[0] == "austen"}
    assert _assignment(other_seed) != {k: v for k, v in full.items() if k[0] == "bible"}


def test_long_documents_held_out():
    chars = [prepare.LONG_DOC_CHARS] * 4 + [10] * 16
    split = assign_splits([0.9] * 4 + [0.3] * 16, chars, val_frac=0.05, test_frac=0.1)
    # no u < 0.15, so only the fix-ups fill test (one long document) and val
    assert [split[i] for i in range(4)] == ["test", "train", "train", "train"]
    assert (split.count("test"), split.count("val")) == (1, 1)


def test_load_split_round_trip(corpus, debs):
    tok = ByteTokenizer()
    texts = {
        (d.source, d.doc_id): d.text
        for name in FAKE
        for d in sources.load_source(name, debs).documents
    }
    for split in prepare.SPLITS:
        tokens, bounds, manifest = load_split(corpus, split)
        listing = manifest["splits"][split]["document_list"]
        decoded = [tok.decode(tokens[a:b]) for a, b in bounds]
        assert decoded == [texts[d["source"], d["doc_id"]] for d in listing]
        assert bounds[:, 0].tolist() == [d["offset"] for d in listing]


def test_austen_novel_in_test(corpus):
    _, _, manifest = load_split(corpus, "test")
    held = [
        d["title"] for d in manifest["splits"]["test"]["document_list"] if d["source"] == "austen"
    ]
    assert len(held) == 1 and held[0] in sources.AUSTEN_NOVELS.values()


def test_load_split_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="manifest.json is missing"):
        load_split(tmp_path, "train")
    for name, data in _files(corpus).items():
        (tmp_path / name).write_bytes(data)
    data = bytearray((tmp_path / "val.bin").read_bytes())
    data[0] ^= 1
    (tmp_path / "val.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its sha256"):
        load_split(tmp_path, "val")
    tokens, _, _ = load_split(tmp_path, "val", verify=False)
    assert tokens[0] == data[0]


# ----------------------------------------------------------------------------- real packages
@pytest.mark.network
def test_real_packages(request, tmp_path):
    if "network" not in (request.config.option.markexpr or "").replace("not network", ""):
        pytest.skip("downloads Debian packages: run with -m network")
    novels = {d.title: d.text for d in sources.austen(tmp_path)}
    assert sorted(novels) == sorted(sources.AUSTEN_NOVELS.values())
    assert "Pride & Prejudice" in novels and min(map(len, novels.values())) > 400_000
    assert novels["Pride & Prejudice"].startswith("PRIDE AND PREJUDICE")
    books = sources.bible(tmp_path)
    assert [d.doc_id for d in books] == [b for b, _ in sources.BIBLE_BOOKS]
    assert books[0].text.startswith("In the beginning, God created the heavens and the earth.")
    assert books[-1].text.endswith(
        "The grace of the Lord Jesus Christ be with all the saints. Amen."
    )
