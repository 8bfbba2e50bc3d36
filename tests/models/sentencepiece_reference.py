"""An independent SentencePiece BPE encoder in plain Python, to check the tokenizer built from a GGUF.

It shares nothing with `sentencepiece`: spaces become U+2581; user-defined pieces are matched first, longest first,
and never merge; the rest starts as single characters; the adjacent pair whose concatenation is a normal piece of
highest score merges first (ties: the leftmost pair), until no pair is a piece; a character sequence that is not a
piece falls back to its UTF-8 bytes as `<0xXX>` pieces. That is the BPE encoding SentencePiece documents
(`bpe_model.cc`), written out naively: quadratic, fine for a few thousand characters.
"""

from __future__ import annotations

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


class ReferenceBPE:
    def __init__(self, pieces: list[str], scores: list[float], kinds: list[int]):
        """`kinds`: SentencePiece's piece types (after the GGUF's control/user-defined correction)."""
        self.id = {p: i for i, p in enumerate(pieces)}
        self.score = {p: s for p, s, k in zip(pieces, scores, kinds) if k == NORMAL}
        self.user = sorted((p for p, k in zip(pieces, kinds) if k == USER_DEFINED), key=len, reverse=True)
        self.first = {}
        for p in self.user:
            self.first.setdefault(p[0], []).append(p)

    def _split_user(self, text: str) -> list[tuple[str, bool]]:
        out, i, run = [], 0, []
        while i < len(text):
            match = next((p for p in self.first.get(text[i], ()) if text.startswith(p, i)), None)
            if match is None:
                run.append(text[i])
                i += 1
                continue
            if run:
                out.append(("".join(run), False))
                run = []
            out.append((match, True))
            i += len(match)
        if run:
            out.append(("".join(run), False))
        return out

    def _merge(self, text: str) -> list[str]:
        syms = list(text)
        while True:
            best = None
            for j in range(len(syms) - 1):
                s = self.score.get(syms[j] + syms[j + 1])
                if s is not None and (best is None or s > best[0]):
                    best = (s, j)
            if best is None:
                return syms
            j = best[1]
            syms[j:j + 2] = [syms[j] + syms[j + 1]]

    def pieces(self, text: str) -> list[str]:
        out = []
        for chunk, is_user in self._split_user(text.replace(" ", "\u2581")):
            if is_user:
                out.append(chunk)
                continue
            for sym in self._merge(chunk):
                if sym in self.score:
                    out.append(sym)
                else:
                    out += [f"<0x{b:02X}>" for b in sym.encode("utf-8")]
        return out

    def ids(self, text: str) -> list[int]:
        return [self.id[p] for p in self.pieces(text)]
