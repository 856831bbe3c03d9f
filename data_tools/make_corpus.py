"""Build the embedded default corpus: the Python and Django manuals as RefinedWeb-format parquet.

    python -m data_tools.make_corpus --out data/corpus

The text comes from two Debian documentation packages, ``python3.11-doc``
(the CPython 3.11 manual; PSF licence) and ``python-django-doc`` (the Django
3.2 manual; BSD-3-Clause); see data_tools/CORPUS.md.  Each is read from the
installed package if present, otherwise its ``.deb`` is fetched with
``apt-get download`` into a cache directory and unpacked there.  Every HTML
page becomes one document holding its main-content text, with its public
address as ``url``, so the quickstart takes the same make_corpus ->
train-tokenizer -> prepare path a RefinedWeb user takes.  The output depends
only on the package versions, which are recorded in the ``dump`` column.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_tools.debian_package import PackageFiles, PackageUnavailableError, package_files
from data_tools.html_text import extract_main_text
from megatron_sffn.entry_setup import quiet_on_broken_pipe

SCHEMA = pa.schema(
    [
        ("content", pa.string()),
        ("url", pa.string()),
        ("timestamp", pa.timestamp("s", tz="UTC")),
        ("dump", pa.string()),
        ("segment", pa.string()),
    ]
)
# Generated index and search pages hold lists of links, not prose; _modules holds source code.
SKIPPED_PAGES = ("genindex", "py-modindex.html", "search.html")
SKIPPED_DIRS = ("_static", "_sources", "_images", "_downloads", "_modules")


@dataclass(frozen=True)
class DocSource:
    """A Sphinx HTML manual inside a Debian package."""

    package: str
    html_root: str  # inside the package
    base_url: str  # where the same pages are published
    main_element: tuple[str, str]  # (attribute, value) of the element holding a page's text
    directory_urls: bool  # published as .../page/ rather than .../page.html

    def url(self, rel: str) -> str:
        if not self.directory_urls:
            return self.base_url + rel
        stem = rel.removesuffix(".html")
        return self.base_url + ("" if stem == "index" else stem.removesuffix("/index") + "/")


SOURCES = (
    DocSource(
        "python3.11-doc", "usr/share/doc/python3.11/html", "https://docs.python.org/3.11/", ("role", "main"), False
    ),
    DocSource(
        "python-django-doc",
        "usr/share/doc/python-django-doc/html",
        "https://docs.djangoproject.com/en/3.2/",
        ("id", "yui-main"),
        True,
    ),
)


@dataclass(frozen=True)
class CorpusSummary:
    files: list[Path]
    documents: int
    characters: int
    empty_pages: list[str]  # pages whose main element held no text, left out


def iter_pages(html_root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative path, file)`` of a manual's pages in sorted order, without index/search pages."""
    for path in sorted(html_root.rglob("*.html"), key=lambda p: p.relative_to(html_root).as_posix()):
        rel = path.relative_to(html_root)
        if rel.parts[0] in SKIPPED_DIRS or rel.name.startswith(SKIPPED_PAGES):
            continue
        yield rel.as_posix(), path


def source_table(source: DocSource, files: PackageFiles, progress: bool = True) -> tuple[pa.Table, list[str]]:
    """One RefinedWeb-format row per page of ``source``, and the pages that had no text."""
    html_root = files.root / source.html_root
    pages = list(iter_pages(html_root))
    if not pages:
        raise PackageUnavailableError(f"{html_root}: no HTML pages; is {source.package} complete?")
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    empty = []
    for rel, path in tqdm(pages, unit="page", desc=source.package, file=sys.stderr, disable=not progress):
        text = extract_main_text(path.read_text(encoding="utf-8"), source.main_element)
        if not text:
            empty.append(f"{source.package}:{rel}")
            continue
        rows["content"].append(text)
        rows["url"].append(source.url(rel))
        # The page's time in the package: fixed per package version, as a crawl time is per page.
        rows["timestamp"].append(dt.datetime.fromtimestamp(int(path.stat().st_mtime), tz=dt.timezone.utc))
        rows["dump"].append(f"debian:{files.name}={files.version}")
        rows["segment"].append(rel)
    return pa.table(rows, schema=SCHEMA), empty


def make_corpus(out: Path, cache: Path, docs_per_file: int = 256, progress: bool = True) -> CorpusSummary:
    """Write every source as ``<package>-NNNNN.parquet`` files under ``out``."""
    files: list[Path] = []
    documents = characters = 0
    empty: list[str] = []
    for source in SOURCES:
        table, source_empty = source_table(source, package_files(source.package, source.html_root, cache), progress)
        files += _write_parquet_files(table, out, source.package, docs_per_file)
        documents += table.num_rows
        characters += sum(len(t) for t in table.column("content").to_pylist())
        empty += source_empty
    return CorpusSummary(files, documents, characters, empty)


def _write_parquet_files(table: pa.Table, out: Path, prefix: str, docs_per_file: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, start in enumerate(range(0, table.num_rows, docs_per_file)):
        target = out / f"{prefix}-{i:05d}.parquet"
        tmp = target.with_name(target.name + ".tmp")
        pq.write_table(table.slice(start, docs_per_file), tmp, compression="zstd")
        os.replace(tmp, target)
        files.append(target)
    for stale in sorted(set(out.glob(f"{prefix}-*.parquet")) - set(files)):
        stale.unlink()  # left by an earlier run that produced more files
    return files


@quiet_on_broken_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/corpus"), help="directory for the parquet files")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("data/.cache/debian"),
        help="where downloaded .deb files are kept and unpacked",
    )
    parser.add_argument("--docs-per-file", type=int, default=256, help="documents per parquet file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        summary = make_corpus(args.out, args.cache, args.docs_per_file, progress=not args.quiet)
    except PackageUnavailableError as exc:
        print(f"make_corpus: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"make_corpus: {summary.documents} documents, {summary.characters:,} characters "
        f"in {len(summary.files)} parquet files under {args.out}",
        file=sys.stderr,
    )
    if summary.empty_pages:
        print(
            f"make_corpus: {len(summary.empty_pages)} pages without main text were left out: "
            f"{', '.join(summary.empty_pages)}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
