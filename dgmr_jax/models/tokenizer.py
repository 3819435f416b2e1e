"""The text towers' tokenizers: CLIP's byte-level BPE (`Tokenizer`) and SigLIP's SentencePiece (`SiglipTokenizer`).

`Tokenizer` equals `open_clip.tokenize` (OpenAI's SimpleTokenizer), without torch. Text is cleaned (ftfy, HTML
entities unescaped twice, whitespace collapsed, lower-cased), split by CLIP's regex into words, each word's UTF-8
bytes are mapped to printable characters and merged by the BPE ranks of `bpe_simple_vocab_16e6.txt.gz`. The
vocabulary file ships inside the open_clip_torch package; it is read from there without importing open_clip
(which would import torch), or from an explicit path. From a transformers CLIP directory's own files it equals
transformers' CLIPTokenizer instead: the ids and merges of vocab.json + merges.txt (or tokenizer.json), the special
tokens <|startoftext|> / <|endoftext|>, and transformers' cleaning (NFC, whitespace runs to one space, lower case:
no ftfy, no HTML unescaping). `SiglipTokenizer` reads a SigLIP model's spiece.model, or a SigLIP 2
model's Gemma tokenizer.model, with the sentencepiece package (the `siglip` extra).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
import re
import string
import unicodedata
from collections.abc import Callable, Sequence

import ftfy
import numpy as np
import regex

from dgmr_jax.core.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
SOT, EOT = "<start_of_text>", "<end_of_text>"
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"  # the same two tokens as transformers names them
HF_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # a transformers directory's vocabulary, either form
_NUM_MERGES = 49152 - 256 - 2  # 256 byte symbols x 2 (plain and word-final) + merges + 2 specials = 49408 ids
_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def default_vocab_path() -> str | None:
    """The vocabulary file inside the installed open_clip_torch package (located, not imported), if any."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), VOCAB_FILE)
    return path if os.path.isfile(path) else None


def _byte_symbols() -> list[str]:
    """One printable character per byte value 0..255 (GPT-2's reversible map): printable Latin-1 bytes
    stand for themselves, the others take code points 256, 257, ... in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def clean(text: str) -> str:
    """CLIP's text cleaning: ftfy repairs, HTML unescaped twice, whitespace runs collapsed, lower case."""
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def hf_clean(text: str) -> str:
    """transformers' CLIPTokenizer normalizer: NFC, each whitespace run one space, lower case."""
    return regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()


def hf_vocab_files(folder: str | os.PathLike) -> bool:
    """The folder holds a transformers CLIP tokenizer's vocabulary (HF_FILES)."""
    return any(all(os.path.isfile(os.path.join(folder, name)) for name in names) for names in HF_FILES)


def _open_clip_vocabulary(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token ids, merges) of bpe_simple_vocab_16e6.txt.gz: the ids are the byte symbols, the same word-final,
    the merges, then SOT and EOT."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    singles = sorted(_byte_symbols())  # vocabulary order: printable bytes first, then the shifted ones
    vocab = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(vocab)}, merges


def _hf_vocabulary(folder: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token ids, merges) of a transformers CLIP tokenizer: vocab.json + merges.txt, else tokenizer.json's BPE
    model (its merges "a b" strings or [a, b] pairs)."""
    try:
        if all(os.path.isfile(os.path.join(folder, name)) for name in HF_FILES[0]):
            with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
                ids = json.load(f)
            with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
                lines = [line for line in f.read().splitlines() if line.strip() and not line.startswith("#version")]
        else:
            with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
                model = json.load(f)["model"]
            ids, lines = model["vocab"], model["merges"]
        merges = [tuple(m.split() if isinstance(m, str) else m) for m in lines]
        bad = [m for m in merges if len(m) != 2]
        if not isinstance(ids, dict) or bad or not {HF_SOT, HF_EOT} <= set(ids):
            raise ValueError(f"merges {bad[:2]} are not pairs" if bad else f"no {HF_SOT} / {HF_EOT} in it")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{folder}: not a CLIP tokenizer's vocabulary ({err})") from err
    return {str(k): int(v) for k, v in ids.items()}, merges


def _not_found(path: str | None) -> str:
    """Why a vocabulary path is neither the .txt.gz nor a transformers directory, and what to do."""
    if path is None:
        where = "open_clip_torch is not installed"
    elif os.path.isdir(path):
        where = f"{path} holds no vocab.json + merges.txt or tokenizer.json"
    else:
        where = f"{path} does not exist"
    return (
        f"CLIP's BPE vocabulary {VOCAB_FILE} was not found ({where}): pip install open_clip_torch (it ships the "
        "file), or pass the file's path (or a transformers directory with vocab.json + merges.txt)"
    )


class Tokenizer:
    """Texts -> (n, context_length) int32 token ids: SOT, BPE ids, EOT, zero padding; too long texts are
    truncated and end in EOT, exactly as open_clip.tokenize (or transformers' CLIPTokenizer, from its files)."""

    def __init__(self, vocab_path: str | os.PathLike | None = None) -> None:
        """vocab_path: bpe_simple_vocab_16e6.txt.gz (default: the one open_clip_torch ships), or a transformers
        CLIP directory holding vocab.json + merges.txt or tokenizer.json."""
        path = os.fspath(vocab_path) if vocab_path is not None else default_vocab_path()
        if path is not None and os.path.isdir(path) and hf_vocab_files(path):
            self.ids, merges = _hf_vocabulary(path)
            special, self.clean = (HF_SOT, HF_EOT), hf_clean
        elif path is not None and os.path.isfile(path):
            self.ids, merges = _open_clip_vocabulary(path)
            special, self.clean = (SOT, EOT), clean
        else:
            raise FileNotFoundError(_not_found(path))
        self.byte_symbols = _byte_symbols()
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot, self.eot = (self.ids[token] for token in special)
        self._cache: dict[str, list[str]] = {token: [token] for token in special}
        self._words = regex.compile("|".join([*map(regex.escape, special), _WORDS]), regex.IGNORECASE)

    def _bpe(self, word: str) -> list[str]:
        """Merge a word's symbols (last one marked word-final) by rank, lowest first, until none applies."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts[:-1], parts[1:], strict=True), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT / EOT."""
        out = []
        for word in self._words.findall(self.clean(text)):
            symbols = "".join(self.byte_symbols[b] for b in word.encode("utf-8"))
            out += [self.ids.get(part, self.eot) for part in self._bpe(symbols)]  # unknown: EOT (transformers' unk)
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """(len(texts), context_length) int32 ids, as open_clip.tokenize(texts, context_length)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), context_length), np.int32)
        for row, text in zip(out, texts, strict=True):
            ids = [self.sot, *self.encode(text), self.eot][:context_length]
            ids[-1] = self.eot
            row[: len(ids)] = ids
        return out


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def siglip_clean(text: str, lower: bool = True) -> str:
    """SigLIP's text canonicalization (big_vision's, as transformers' SiglipTokenizer): lower case, ASCII
    punctuation removed, whitespace runs collapsed to one space, ends stripped."""
    text = (text.lower() if lower else text).translate(_PUNCTUATION)
    return re.sub(r"\s+", " ", text).strip()


class SiglipTokenizer:
    """Texts -> (n, context_length) int32 ids of a SentencePiece model: SigLIP's spiece.model (the cleaned text's
    pieces, EOS, then PAD up to context_length) or SigLIP 2's Gemma tokenizer.model (clean=str.lower, BOS / EOS as
    its tokenizer_config.json says, padded on its padding_side). A too long text is cut and still ends in EOS. Equal
    to transformers' SiglipTokenizer / Siglip2Tokenizer(texts, padding="max_length", truncation=True,
    max_length=context_length), except that a special token's text ("</s>", "<eos>") inside a text is read as plain
    text. Needs the sentencepiece package."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        eos: str | None = "</s>",
        pad: str = "</s>",
        clean: Callable[[str], str] = siglip_clean,
        bos: str | None = None,
        padding_side: str = "right",
    ) -> None:
        """eos / bos: the pieces ending / starting every text (None: none); clean: the text's normalization before
        SentencePiece; padding_side: "right" (PAD after the ids) or "left"."""
        try:
            import sentencepiece
        except ImportError as err:
            raise UserError(
                f"SigLIP's tokenizer ({os.fspath(model_path)}) needs the sentencepiece package: "
                "pip install 'dgmr-jax[siglip]' (or pip install sentencepiece)"
            ) from err
        if padding_side not in ("right", "left"):
            raise UserError(f"{os.fspath(model_path)}: padding_side must be 'right' or 'left', got {padding_side!r}")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(model_path))
        self.bos, self.eos = ([self._id(piece, model_path)] if piece else [] for piece in (bos, eos))
        self.pad, self.clean, self.left = self._id(pad, model_path), clean, padding_side == "left"

    def _id(self, piece: str, model_path: str | os.PathLike) -> int:
        """The id of a special piece, which must be in the model's vocabulary."""
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            raise UserError(f"{os.fspath(model_path)} has no piece {piece!r}: check tokenizer_config.json's tokens")
        return i

    def __call__(self, texts: str | Sequence[str], context_length: int = 64) -> np.ndarray:
        """(len(texts), context_length) int32 ids."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), context_length), self.pad, np.int32)
        for row, text in zip(out, texts, strict=True):
            ids = [*self.bos, *self.sp.encode(self.clean(text)), *self.eos]
            if len(ids) > context_length:  # cut the text, keep BOS and EOS
                ids = ids[: context_length - len(self.eos)] + self.eos
            start = context_length - len(ids) if self.left else 0
            row[start : start + len(ids)] = ids
        return out
