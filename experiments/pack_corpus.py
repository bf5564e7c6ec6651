"""This interpreter's stdlib corpus as a folder archive, so another machine trains on identical data.

``corpus="stdlib"`` is the running interpreter's standard library, which differs between Python builds
(the GPU machine's Python 3.12 ships 569 files, 10.7 MB; this machine's 3.11, 1,762 files, 31.5 MB).
This writes every document of ``stdlib_documents()`` under ``stdlib/`` in a ``.tgz`` (text as read,
UTF-8), checks that reading the unpacked folder back gives the same documents, and prints the path.
Unpack it there and pass the folder as the corpus (``reproduce --corpus DIR/stdlib``):

    python -m experiments.pack_corpus .corpus/stdlib.tgz
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
from pathlib import Path

from interventions.zoo.corpus import load_documents, stdlib_documents


def pack_corpus(path: str | Path, max_files: int | None = None) -> Path:
    """Write the stdlib documents to ``path`` (.tgz) and verify the round trip; returns ``path``."""
    path = Path(path)
    docs = stdlib_documents(max_files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tf:
        for rel, text in docs:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"stdlib/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tempfile.TemporaryDirectory() as d, tarfile.open(tmp) as tf:
        tf.extractall(d, filter="data")
        if load_documents(str(Path(d) / "stdlib")) != docs:
            tmp.unlink()
            raise RuntimeError("the unpacked folder does not read back as the same documents")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.pack_corpus",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("file", metavar="FILE.tgz", help="the archive to write (e.g. .corpus/stdlib.tgz)")
    args = parser.parse_args(argv)
    if Path(args.file).is_dir():  # it would be read, packed and then fail to replace it, leaving FILE.tgz.tmp
        parser.error(f"{args.file} is a folder: pass the archive's file name (e.g. {Path(args.file) / 'stdlib.tgz'})")
    print(pack_corpus(args.file))


if __name__ == "__main__":
    main()
