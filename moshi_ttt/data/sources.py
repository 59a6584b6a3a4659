"""Offline text sources, each a list of whole ``Document``s.

``austen``  six Jane Austen novels (Debian ``r-cran-janeaustenr``, an R lazy-load database).
``bible``   the 66 books of the World English Bible (Debian ``sword-text-web``, a SWORD zText
            module; its deuterocanon is left out).
``pydocs``  Python 3.11 documentation pages (Debian ``python3.11-doc``, HTML to plain text).
``stdlib``  ``.py`` files of the running interpreter's standard library, tests excluded.
"""

from __future__ import annotations

import html
import platform
import re
import sysconfig
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .debian import SourceError, fetch_deb, read_deb, read_lazyload, read_ztext


@dataclass(frozen=True)
class Document:
    """One whole document; ``doc_id`` is unique within its ``source``."""

    source: str
    doc_id: str
    title: str
    text: str
    license: str


@dataclass(frozen=True)
class Provenance:
    """Where a source came from: a Debian package (with the .deb's sha256) or the interpreter."""

    package: str
    version: str
    deb_sha256: str | None
    license: str


@dataclass(frozen=True)
class LoadedSource:
    name: str
    documents: tuple[Document, ...]
    provenance: Provenance


# ----------------------------------------------------------------------------- austen
AUSTEN_LICENSE = "public-domain (text); MIT (janeaustenr package)"
AUSTEN_NOVELS = {  # R variable -> title as janeaustenr::austen_books() names it, publication order
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def austen_documents(variables: Mapping[str, Sequence]) -> list[Document]:
    """The six novels (character vectors of lines) as documents, lines joined by newlines."""
    missing = sorted(set(AUSTEN_NOVELS) - set(variables))
    if missing:
        raise SourceError(f"source 'austen': novels missing from the R data: {missing}")
    docs = []
    for key, title in AUSTEN_NOVELS.items():
        lines = ["" if line is None else str(line) for line in variables[key]]
        docs.append(Document("austen", key, title, "\n".join(lines).strip("\n"), AUSTEN_LICENSE))
    return docs


def _austen_parse(files: Mapping[str, bytes]) -> list[Document]:
    stem = "usr/lib/R/site-library/janeaustenr/data/Rdata"
    return austen_documents(read_lazyload(files[stem + ".rdx"], files[stem + ".rdb"]))


# ----------------------------------------------------------------------------- bible
BIBLE_LICENSE = "public-domain"
BIBLE_BOOKS = tuple(
    tuple(s.split(" ", 1))
    for s in (  # (OSIS id, name): the 66-book canon
        "Gen Genesis|Exod Exodus|Lev Leviticus|Num Numbers|Deut Deuteronomy|Josh Joshua|Judg "
        "Judges|"
        "Ruth Ruth|1Sam 1 Samuel|2Sam 2 Samuel|1Kgs 1 Kings|2Kgs 2 Kings|1Chr 1 Chronicles|"
        "2Chr 2 Chronicles|Ezra Ezra|Neh Nehemiah|Esth Esther|Job Job|Ps Psalms|Prov Proverbs|"
        "Eccl Ecclesiastes|Song Song of Solomon|Isa Isaiah|Jer Jeremiah|Lam Lamentations|"
        "Ezek Ezekiel|Dan Daniel|Hos Hosea|Joel Joel|Amos Amos|Obad Obadiah|Jonah Jonah|Mic Micah|"
        "Nah Nahum|Hab Habakkuk|Zeph Zephaniah|Hag Haggai|Zech Zechariah|Mal Malachi|Matt Matthew|"
        "Mark Mark|Luke Luke|John John|Acts Acts|Rom Romans|1Cor 1 Corinthians|2Cor 2 Corinthians|"
        "Gal Galatians|Eph Ephesians|Phil Philippians|Col Colossians|1Thess 1 Thessalonians|"
        "2Thess 2 Thessalonians|1Tim 1 Timothy|2Tim 2 Timothy|Titus Titus|Phlm Philemon|"
        "Heb Hebrews|Jas James|1Pet 1 Peter|2Pet 2 Peter|1John 1 John|2John 2 John|3John 3 John|"
        "Jude Jude|Rev Revelation"
    ).split("|")
)
_TAG = re.compile(r"<(/?)([A-Za-z]+)([^>]*?)(/?)>|[^<]+")
_ATTR = re.compile(r'([\w:]+)="([^"]*)"')
_GAP, _LINE, _PARA = "\x03", "\x01", "\x02"  # soft space, line break, chapter break
_BREAKS = {
    "div": _LINE,
    "l": _LINE,
    "lg": _LINE,
    "lb": _LINE,
    "item": _LINE,
    "list": _LINE,
    "speaker": _LINE,
    "title": _LINE,
    "q": _GAP,
}


def _osis_books(osis: str) -> dict[str, list[str]]:
    """Plain-text pieces per book: notes, non-canonical titles and milestones dropped."""
    books: dict[str, list[str]] = {}
    book, drop = None, []  # drop: stack of open elements whose content is skipped
    for m in _TAG.finditer(osis):
        close, name, attrs, empty = m.groups()
        if name is None:
            if book and not drop:
                books[book].append(html.unescape(m.group(0)))
            continue
        a = dict(_ATTR.findall(attrs))
        if (
            name in ("div", "chapter")
            and "sID" in a
            and "osisID" in a
            and (name == "chapter" or a.get("type") == "book")
        ):
            book = a["osisID"].split(".")[0]
            books.setdefault(book, [])
        elif name == "div" and a.get("type") == "book" and "eID" in a:
            book = None
        if (
            not close
            and not empty
            and (name == "note" or (name == "title" and a.get("canonical") != "true"))
        ):
            drop.append(name)
        elif close and drop and drop[-1] == name:
            drop.pop()
            if book and not drop:
                books[book].append(_GAP)
        elif book and not drop and (close or empty or name in ("list", "title")):
            books[book].append(_osis_break(name, a))
    return books


def _osis_break(name: str, attrs: dict[str, str]) -> str:
    if name == "chapter":
        return _PARA if "sID" in attrs else ""
    return "" if attrs.get("type") == "x-milestone" else _BREAKS.get(name, "")


def _osis_clean(pieces: Sequence[str]) -> str:
    text = "".join(pieces)
    text = re.sub(_GAP + r"+(?=[\s,.;:!?’”)\]—" + _GAP + _LINE + _PARA + "]|$)", "", text)
    text = re.sub(r"[ \t" + _GAP + "]+", " ", text)
    text = re.sub(
        r"[\s" + _LINE + _PARA + r"]*[" + _LINE + _PARA + r"][\s" + _LINE + _PARA + "]*",
        lambda m: "\n\n" if _PARA in m.group(0) else "\n",
        text,
    )
    return text.strip()


def bible_documents(entries: Sequence[str]) -> list[Document]:
    """One document per canonical book from zText entries (OSIS markup stripped).

    A book is what lies between its ``<div type="book" sID>`` and ``eID`` milestones; a
    ``<chapter sID="Book.N">`` also (re)opens its book, since one book heading can be lost.
    Chapters are separated by a blank line, paragraphs and poetry lines by a newline.
    """
    books = _osis_books(_GAP.join(entries))
    docs = []
    for osis_id, name in BIBLE_BOOKS:
        text = _osis_clean(books.get(osis_id, []))
        if not text:
            raise SourceError(f"source 'bible': book {osis_id} ({name}) not found in the module")
        docs.append(Document("bible", osis_id, name, text, BIBLE_LICENSE))
    return docs


def _bible_parse(files: Mapping[str, bytes]) -> list[Document]:
    stem = "usr/share/sword/modules/texts/ztext/engweb2015eb/"
    module = {k.rsplit("/", 1)[1]: v for k, v in files.items() if k.lower().startswith(stem)}
    return bible_documents(read_ztext(module))


# ----------------------------------------------------------------------------- pydocs
PYDOCS_ROOT = "usr/share/doc/python3.11/html/"
PYDOCS_MIN_CHARS = 2000
_PYDOCS_SKIP = re.compile(r"(^|/)(genindex.*|search|index|py-modindex|contents)\.html$")
_WIDE = {
    "p",
    "pre",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "dl",
    "ul",
    "ol",
    "table",
    "section",
    "blockquote",
}
_NARROW = {"div", "li", "dt", "dd", "tr", "br", "hr", "caption", "figure"}


class _SphinxText(HTMLParser):
    """Plain text of a Sphinx page's ``role="main"`` div, plus the page ``<title>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.title = ""
        self._in_title = False
        self._depth = 0  # div nesting inside the main div (0: outside)
        self._skip: str | None = None  # tag whose content is skipped (headerlinks, scripts)
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        self._in_title = tag == "title"
        if self._depth == 0:
            self._depth = int(tag == "div" and a.get("role") == "main")
            return
        self._depth += tag == "div"
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (a.get("class") or "")):
            self._skip = tag
        self._pre += tag == "pre"
        self._block(tag)

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False
        if self._depth == 0:
            return
        self._depth -= tag == "div"
        self._skip = None if tag == self._skip else self._skip
        self._pre -= tag == "pre" and self._pre > 0
        self._block(tag)

    def _block(self, tag: str) -> None:
        want = 2 if tag in _WIDE else int(tag in _NARROW)  # newlines a block boundary needs
        have = len(self.out[-1]) - len(self.out[-1].rstrip("\n")) if self.out else 2
        if want > have:
            self.out.append("\n" * (want - have))

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._depth == 0 or self._skip:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            if not self.out or self.out[-1].endswith("\n"):
                data = data.lstrip()
        if data:
            self.out.append(data)


def html_to_text(page: str) -> tuple[str, str]:
    """(title, plain text) of a Sphinx HTML page."""
    parser = _SphinxText()
    parser.feed(page)
    parser.close()
    text = re.sub(r"[ \t]+\n", "\n", "".join(parser.out))
    title = re.sub(r"\s+—\s+Python [\d.]+ documentation$", "", " ".join(parser.title.split()))
    return title, re.sub(r"\n{3,}", "\n\n", text).strip()


def pydocs_documents(pages: Mapping[str, str]) -> list[Document]:
    """Pages (path relative to the html root -> HTML) as documents, in path order.

    Index, search and table-of-contents pages and pages under ``PYDOCS_MIN_CHARS`` are skipped.
    """
    docs = []
    for path in sorted(pages):
        if _PYDOCS_SKIP.search(path):
            continue
        title, text = html_to_text(pages[path])
        if len(text) >= PYDOCS_MIN_CHARS:
            docs.append(Document("pydocs", path, title or path, text, "PSF-2.0"))
    return docs


def _pydocs_parse(files: Mapping[str, bytes]) -> list[Document]:
    return pydocs_documents({k[len(PYDOCS_ROOT) :]: v.decode("utf-8") for k, v in files.items()})


# ----------------------------------------------------------------------------- stdlib
STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_documents(root: str | Path) -> list[Document]:
    """``.py`` files under ``root`` (sorted by path), skipping test and third-party directories."""
    root = Path(root)
    docs = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if STDLIB_SKIP_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(Document("stdlib", rel.as_posix(), rel.as_posix(), text, "PSF-2.0"))
    return docs


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DebSource:
    package: str
    license: str
    pattern: str  # regex (re.match) of the data-tree paths to read from the .deb
    parse: Callable[[Mapping[str, bytes]], list[Document]]


SOURCES = {
    "austen": DebSource(
        "r-cran-janeaustenr",
        AUSTEN_LICENSE,
        r"usr/lib/R/site-library/janeaustenr/data/Rdata\.rd[bx]$",
        _austen_parse,
    ),
    "bible": DebSource(
        "sword-text-web",
        BIBLE_LICENSE,
        r"usr/share/sword/modules/texts/ztext/engweb2015eb/",
        _bible_parse,
    ),
    "pydocs": DebSource("python3.11-doc", "PSF-2.0", PYDOCS_ROOT + r".*\.html$", _pydocs_parse),
    "stdlib": None,  # the running interpreter, no package
}


def load_source(name: str, cache_dir: str | Path) -> LoadedSource:
    """Documents and provenance of source ``name``; .debs are cached in ``cache_dir``."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}: expected one of {sorted(SOURCES)}")
    spec = SOURCES[name]
    if spec is None:
        root = sysconfig.get_paths()["stdlib"]
        prov = Provenance(f"cpython-stdlib ({root})", platform.python_version(), None, "PSF-2.0")
        return LoadedSource(name, tuple(stdlib_documents(root)), prov)
    deb = fetch_deb(spec.package, cache_dir, name)
    try:
        docs = spec.parse(read_deb(deb.path, re.compile(spec.pattern, re.I).match))
    except SourceError:
        raise
    except Exception as e:  # a malformed package: one clear line, not a traceback
        raise SourceError(
            f"source {name!r}: cannot parse {deb.path.name}: {type(e).__name__}: {e}"
        ) from e
    return LoadedSource(
        name, tuple(docs), Provenance(spec.package, deb.version, deb.sha256, spec.license)
    )


def austen(cache_dir: str | Path) -> list[Document]:
    return list(load_source("austen", cache_dir).documents)


def bible(cache_dir: str | Path) -> list[Document]:
    return list(load_source("bible", cache_dir).documents)


def pydocs(cache_dir: str | Path) -> list[Document]:
    return list(load_source("pydocs", cache_dir).documents)


def stdlib(cache_dir: str | Path | None = None) -> list[Document]:
    return list(load_source("stdlib", cache_dir or ".").documents)
