"""Image-caption pairs for the text-tower fine-tune: a folder of images with same-stem .txt captions, a JSONL
manifest (either local or gs://), or a prepared TFDS captions dataset, read into one `Pairs` (an encoded-image
source, the captions of each image). Bad pairs (image missing, no caption, a malformed manifest line) are
counted, named and left out here; images that do not decode are found (and left out) when the frozen image
tower embeds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dgmr_jax.core.paths import as_path, is_uri
from dgmr_jax.data.sources import IMAGE_EXTENSIONS, ImageFolderSource, walk_files

SHOWN = 5  # bad pairs named in a warning


@dataclasses.dataclass
class Pairs:
    """Images (`source[i]` -> encoded bytes, `names[i]` for messages) and the captions of each, plus what was
    left out. Every image here has one or more non-empty captions."""

    spec: str
    source: Any
    names: list[str]
    captions: list[list[str]]
    bad: list[tuple[str, str]]  # (name, why) of each pair left out

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
        bad = self.bad + [(self.names[i], reason) for i, reason in sorted(why.items())]
        source = _Subset(self.source, keep) if why else self.source
        names, captions = [self.names[i] for i in keep], [self.captions[i] for i in keep]
        return Pairs(self.spec, source, names, captions, bad)


class FileImages:
    """Image files by path: the encoded-bytes source the eval batches read."""

    def __init__(self, paths: list[str], spec: str) -> None:
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bytes:
        return as_path(self.paths[i]).read_bytes()

    def path(self, i: int) -> str:
        return self.paths[i]

    def __repr__(self) -> str:
        return f"PairImages(spec={self.spec!r}, num_images={len(self)})"


class _Subset:
    """Records `keep` of a source, renumbered."""

    def __init__(self, source: Any, keep: list[int]) -> None:
        self.source, self.keep = source, keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> bytes:
        return self.source[self.keep[i]]

    def path(self, i: int) -> str:
        return self.source.path(self.keep[i]) if hasattr(self.source, "path") else f"record {self.keep[i]}"

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, num_images={len(self)})"


def _clean(captions: Sequence[Any]) -> list[str]:
    """Non-empty captions, stripped; bytes decoded as UTF-8."""
    out = []
    for c in captions:
        c = c.decode("utf-8", "replace") if isinstance(c, bytes) else c
        if isinstance(c, str) and c.strip():
            out.append(c.strip())
    return out


def _read_texts(paths: list[str]) -> list[str]:
    """The text of each file, read by 32 threads: on Cloud Storage each read is a round trip."""
    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(lambda p: as_path(p).read_bytes().decode("utf-8", "replace"), paths))


def read_folder(root: str) -> Pairs:
    """Every image under `root` (local or gs://) with the captions of its same-stem .txt file (one per non-empty
    line); an image without a caption file, an empty caption file, and a caption file without an image are bad
    pairs. The folder is listed once."""
    folder = ImageFolderSource(root)
    paths = [folder.path(i) for i in range(len(folder))]
    texts = {os.path.join(d, f) for d, files in walk_files(folder.root) for f in files if f.endswith(".txt")}
    txt_of = {p: os.path.splitext(p)[0] + ".txt" for p in paths}
    captioned = [p for p in paths if txt_of[p] in texts]
    read = dict(zip(captioned, _read_texts([txt_of[p] for p in captioned]), strict=True))
    names, captions, bad = [], [], []
    for path in paths:
        txt = os.path.basename(txt_of[path])
        caps = _clean(read[path].splitlines()) if path in read else None
        if caps is None:
            bad.append((path, f"no caption file {txt}"))
        elif not caps:
            bad.append((path, f"caption file {txt} is empty"))
        else:
            names.append(path)
            captions.append(caps)
    bad += [(txt, "caption file without an image") for txt in sorted(texts - set(txt_of.values()))]
    return Pairs(root, FileImages(names, root), names, captions, bad)


def read_manifest(path: str) -> Pairs:
    """{"image": path, "captions": [...]} lines, image paths relative to the file (local or gs://); a line that
    is not such a record or has no non-empty caption is a bad pair, and so is a missing local image (a missing
    remote one is found, like an undecodable image, when the image tower embeds it: one request per image
    here would be slow)."""
    root = str(as_path(path).parent)
    names, captions, bad = [], [], []
    for n, line in enumerate(as_path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append((where, "not JSON"))
            continue
        if not (isinstance(record, dict) and isinstance(record.get("image"), str)):
            bad.append((where, 'not a {"image": path, "captions": [...]} record'))
            continue
        image = record["image"] if is_uri(record["image"]) else os.path.join(root, record["image"])
        caps = record.get("captions")
        caps = _clean(caps) if isinstance(caps, list) else []
        if not is_uri(image) and not os.path.isfile(image):
            bad.append((image, f"image missing ({where})"))
        elif not caps:
            bad.append((image, f"no caption ({where})"))
        else:
            names.append(image)
            captions.append(caps)
    return Pairs(path, FileImages(names, path), names, captions, bad)


def _feature(record: dict, key: str) -> Any:
    """A record's feature at a "/"-separated path, e.g. "captions/text" (coco_captions)."""
    value = record
    for part in key.split("/"):
        value = value[part]
    return value


def read_tfds(name: str, split: str, data_dir: str | None, image_key: str, caption_key: str) -> Pairs:
    """A prepared TFDS dataset (array_record) with an image feature and a caption feature (a text, or a
    sequence of texts; "/" walks nested features, e.g. coco_captions' "captions/text")."""
    from dgmr_jax.data.sources import TfdsSource

    source = TfdsSource(name, split=split, data_dir=data_dir, image_key=image_key)
    top = caption_key.split("/")[0]
    if top not in source.features:
        raise ValueError(
            f"TFDS dataset {name!r} has no caption feature {top!r} (features: {source.features}); "
            "set --config.data.caption_key"
        )
    names, captions, bad = [], [], []
    from tqdm.auto import tqdm

    for i in tqdm(range(len(source)), desc=f"captions of {name}", unit="record", disable=len(source) < 1000):
        text = _feature(source.record(i), caption_key)
        caps = _clean([text] if isinstance(text, (str, bytes)) else list(text))
        if caps:
            names.append(f"{name}[{split}] record {i}")
            captions.append(caps)
        else:
            bad.append((f"{name}[{split}] record {i}", "no caption"))
    keep = [int(n.rsplit(" ", 1)[1]) for n in names]
    return Pairs(f"tfds:{name}", _Subset(source, keep), names, captions, bad)


def read_pairs(
    spec: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_key: str = "image",
    caption_key: str = "captions/text",
) -> Pairs:
    """The pairs of `spec`: a folder, a .jsonl manifest, or tfds:NAME (see the module docstring)."""
    if spec.startswith("tfds:"):
        pairs = read_tfds(spec[len("tfds:") :], split, data_dir, image_key, caption_key)
    elif as_path(spec).is_dir():
        pairs = read_folder(spec)
    elif as_path(spec).is_file():
        if spec.lower().endswith(IMAGE_EXTENSIONS):
            raise ValueError(f"--pairs {spec} is one image: give a folder, a .jsonl manifest or tfds:NAME")
        pairs = read_manifest(spec)
    else:
        raise FileNotFoundError(
            f"--pairs {spec} is not a folder (images + same-stem .txt captions), a .jsonl manifest or tfds:NAME"
        )
    return pairs


def warn_bad(pairs: Pairs, what: str = "pairs") -> None:
    """Name the first bad pairs on stderr."""
    if pairs.bad:
        shown = "; ".join(f"{name}: {why}" for name, why in pairs.bad[:SHOWN])
        more = f" and {len(pairs.bad) - SHOWN} more" if len(pairs.bad) > SHOWN else ""
        print(
            f"finetune-text: warning: skipped {len(pairs.bad)} bad {what} of {pairs.spec}: {shown}{more}",
            file=sys.stderr,
        )


def require_good(pairs: Pairs) -> None:
    if not len(pairs):
        reasons = "; ".join(f"{n}: {w}" for n, w in pairs.bad[:SHOWN]) or "it holds no image"
        raise ValueError(f"--pairs {pairs.spec} has no good image-caption pair ({len(pairs.bad)} bad: {reasons})")
