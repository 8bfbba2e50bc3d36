"""A SentencePiece tokenizer rebuilt from a GGUF's metadata (llama.cpp's `tokenizer.ggml.model = "llama"`).

A GGUF carries the SentencePiece vocabulary as three parallel lists: pieces (`tokenizer.ggml.tokens`), their scores
and their types (llama.cpp numbers types as SentencePiece does: 1 normal, 2 unknown, 3 control, 4 user defined,
5 unused, 6 byte). One difference is undone: llama.cpp's converter exports every special piece as control, while
SentencePiece keeps only pad, BOS and EOS as control and the unknown piece as unknown; the others (Gemma 3's
`<start_of_turn>`, `<unused0>`...) are user defined, i.e. matched in text. Only the ids the metadata declares as
pad, BOS, EOS and unknown keep their kind: Gemma 3's GGUF lists 6,249 control pieces and 165 user-defined ones,
which become 3 control, 1 unknown and 6,410 user-defined, the counts of the original `tokenizer.model`. From them and the flags beside them this module builds a `ModelProto` (BPE, byte fallback when
byte pieces exist, the identity normalizer with whitespace escaped to U+2581, a dummy prefix only where
`tokenizer.ggml.add_space_prefix` says so) and loads it into `sentencepiece` itself, so encoding is SentencePiece's
own algorithm on the original pieces, not a reimplementation. `tests/models/test_gemma.py` checks it against
encodings published from the original Gemma 3 `tokenizer.model` and against an independent pure-Python BPE.

The object answers the subset of `tokenizers.Tokenizer` the project uses: `encode(text).ids`, `decode(ids)`,
`token_to_id(piece)`.
"""

from __future__ import annotations

import dataclasses

from .errors import ModelFileError

UNKNOWN_TYPE, CONTROL_TYPE, USER_DEFINED_TYPE, BYTE_TYPE = 2, 3, 4, 6  # SentencePiece's and llama.cpp's


@dataclasses.dataclass(frozen=True)
class Encoding:
    ids: list


class SentencePieceTokenizer:
    def __init__(self, processor, pieces: list[str]):
        self._sp = processor
        self._id = {p: i for i, p in enumerate(pieces)}

    def encode(self, text: str) -> Encoding:
        """Token ids of `text`, without BOS or EOS (the caller prepends BOS where it scores text)."""
        return Encoding(list(self._sp.encode(text)))

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, piece: str) -> int | None:
        return self._id.get(piece)

    def pieces(self, text: str) -> list[str]:
        return list(self._sp.encode(text, out_type=str))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


def model_proto(meta: dict) -> bytes:
    """The serialized SentencePiece ModelProto of GGUF tokenizer metadata (see `gguf_source.tokenizer_metadata`)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = meta["tokens"], meta["scores"], meta["token_type"]
    if not (len(tokens) == len(scores) == len(types)) or not tokens:
        raise ModelFileError(f"GGUF tokenizer lists {len(tokens)} pieces, {len(scores)} scores, {len(types)} types")
    declared = {k: int(meta[k]) for k in ("unknown_token_id", "bos_token_id", "eos_token_id", "padding_token_id")
                if meta.get(k) is not None}
    kinds = [USER_DEFINED_TYPE if k == CONTROL_TYPE else int(k) for k in types]
    for key, i in declared.items():
        kinds[i] = UNKNOWN_TYPE if key == "unknown_token_id" else CONTROL_TYPE
    proto = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, kinds):
        sp = proto.pieces.add()
        sp.piece, sp.score, sp.type = piece, float(score), kind
    t = proto.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = any(k == BYTE_TYPE for k in types)
    for field, key in (("unk_id", "unknown_token_id"), ("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"),
                       ("pad_id", "padding_token_id")):
        setattr(t, field, declared.get(key, -1))
    n = proto.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(meta.get("add_space_prefix", False))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return proto.SerializeToString()


def sentencepiece_from_gguf_metadata(meta: dict) -> SentencePieceTokenizer:
    import sentencepiece

    proc = sentencepiece.SentencePieceProcessor(model_proto=model_proto(meta))
    return SentencePieceTokenizer(proc, list(meta["tokens"]))
