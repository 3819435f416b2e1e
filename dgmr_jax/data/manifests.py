"""Image-caption pairs and the one reader of jsonl manifests ({"image": path, "captions": [...]} lines), used by
`dgmr-jax finetune-text --pairs` and `dgmr-jax eval --retrieval` alike.

Rules: image paths are relative to the manifest (local or gs://, and so may the images be); a line that is not
JSON, not such a record, has no non-empty caption or names a missing local image is a bad pair: counted, named
in a warning and left out, never fatal unless no pair is good (`require_good`). A missing remote image is found,
like an image that does not decode, when the images are embedded (one request per image here would be slow).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import as_path, is_uri
from dgmr_jax.data.sources import ImageFiles, Subset

SHOWN = 5  # bad pairs named in a warning or an error
RECORD = '{"image": path, "captions": [...]}'


@dataclasses.dataclass(frozen=True)
class BadPair:
    """A pair left out: its name (image path, or manifest line) and why; iterates as (name, why). `line` says it
    as the manifest line's own problem ("FILE line N: image X does not exist"), where there is a line."""

    name: str
    why: str
    line: str = ""

    def __iter__(self) -> Iterator[str]:
        return iter((self.name, self.why))

    def describe(self, by_line: bool = False) -> str:
        return self.line if by_line and self.line else f"{self.name}: {self.why}"


@dataclasses.dataclass
class Pairs:
    """Images (`source[i]` -> encoded bytes, `names[i]` for messages) and the captions of each, plus what was
    left out. Every image here has one or more non-empty captions."""

    spec: str
    source: Any
    names: list[str]
    captions: list[list[str]]
    bad: list[BadPair]  # each pair left out

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    def fingerprint(self) -> str:
        """sha256 of the names and captions: a resumed run checks its stored embeddings belong to these pairs."""
        digest = hashlib.sha256()
        for name, caps in zip(self.names, self.captions, strict=True):
            digest.update(json.dumps([name, caps]).encode())
        return digest.hexdigest()

    def drop(self, why: dict[int, str]) -> Pairs:
        """These pairs without the images `why` names (index -> reason), which join `bad`."""
        keep = [i for i in range(len(self)) if i not in why]
        bad = self.bad + [BadPair(self.names[i], reason) for i, reason in sorted(why.items())]
        source = Subset(self.source, keep) if why else self.source
        names, captions = [self.names[i] for i in keep], [self.captions[i] for i in keep]
        return Pairs(self.spec, source, names, captions, bad)

    def first(self, n: int) -> Pairs:
        """The first n pairs (all of them for n <= 0)."""
        n = min(n, len(self)) if n > 0 else len(self)
        source = self.source if n == len(self) else Subset(self.source, range(n))
        return Pairs(self.spec, source, self.names[:n], self.captions[:n], self.bad)

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """(every caption, the index of its image)."""
        captions = [c for caps in self.captions for c in caps]
        return captions, np.repeat(np.arange(len(self)), [len(c) for c in self.captions])


def clean_captions(captions: Sequence[Any]) -> list[str]:
    """Non-empty captions, stripped; bytes decoded as UTF-8."""
    out = []
    for c in captions:
        c = c.decode("utf-8", "replace") if isinstance(c, bytes) else c
        if isinstance(c, str) and c.strip():
            out.append(c.strip())
    return out


def _line_pair(line: str, where: str, root: str) -> tuple[str, list[str]] | BadPair:
    """(image path, captions) of one manifest line, or why it is a bad pair."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return BadPair(where, "not JSON", f"{where} is not JSON")
    if not (isinstance(record, dict) and isinstance(record.get("image"), str)):
        return BadPair(where, f"not a {RECORD} record", f"{where}: expected {RECORD}")
    image = record["image"] if is_uri(record["image"]) else os.path.join(root, record["image"])
    caps = record.get("captions")
    caps = clean_captions(caps) if isinstance(caps, list) else []
    if not caps:
        no_caption = f'{where}: expected {{"image": path, "captions": [one or more non-empty strings]}}'
        return BadPair(image, f"no caption ({where})", no_caption)
    if not is_uri(image) and not os.path.isfile(image):
        return BadPair(image, f"image missing ({where})", f"{where}: image {image} does not exist")
    return image, caps


def read_manifest(path: str) -> Pairs:
    """The pairs of a jsonl manifest, local or gs:// (rules in the module docstring)."""
    root = str(as_path(path).parent)
    names, captions, bad = [], [], []
    for n, line in enumerate(as_path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        pair = _line_pair(line, f"{path} line {n}", root)
        if isinstance(pair, BadPair):
            bad.append(pair)
        else:
            names.append(pair[0])
            captions.append(pair[1])
    return Pairs(path, ImageFiles(names, path), names, captions, bad)


def _describe(bad: Sequence[BadPair], by_line: bool) -> str:
    return "; ".join(b.describe(by_line) for b in bad[:SHOWN])


def warn_bad(pairs: Pairs, what: str = "pairs", prog: str = "finetune-text", by_line: bool = False) -> None:
    """Name the first bad pairs on stderr."""
    if pairs.bad:
        more = f" and {len(pairs.bad) - SHOWN} more" if len(pairs.bad) > SHOWN else ""
        print(
            f"{prog}: warning: skipped {len(pairs.bad)} bad {what} of {pairs.spec}: "
            f"{_describe(pairs.bad, by_line)}{more}",
            file=sys.stderr,
        )


def require_good(pairs: Pairs, flag: str = "--pairs", by_line: bool = False) -> None:
    """Raise ValueError, naming the first bad pairs, when no pair is good."""
    if not len(pairs):
        reasons = _describe(pairs.bad, by_line) or "it holds no image"
        raise UserError(f"{flag} {pairs.spec} has no good image-caption pair ({len(pairs.bad)} bad: {reasons})")
