"""A rule-based sentence splitter for English and Chinese (no models, no downloads).

``split_sentences(text)`` returns pieces that concatenate back to ``text`` exactly. A piece ends:

- after ``.``, ``!``, ``?`` (and closing quotes or brackets) followed by whitespace and a sentence
  start (not a lowercase letter), unless the word before the full stop is a known abbreviation
  (``Mr.``, ``e.g.``, ``Fig.``) or an initial (``J.``, ``U.S.``);
- after ``!``/``?`` directly followed by a Chinese character;
- after ``。``, ``！``, ``？``, ``；``... runs and ``……`` (with closing quotes), with or without
  whitespace;
- at a paragraph break (a blank line).

The whitespace between two sentences starts the next piece (so ``"A. B."`` splits into ``"A."`` and
``" B."``, and the tokens of the next piece begin with the space as they would inside the document).
"""

from __future__ import annotations

import re

__all__ = ["split_sentences"]

_ABBREVIATIONS_TEXT = """
    mr mrs ms dr prof sr jr st mt ft vs etc fig figs eq eqs no nos vol vols ch sec secs pp ed eds
    approx dept est inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec e.g i.e cf al
    viz resp gen col lt sgt capt cmdr adm gov rep sen rev hon univ
"""
_ABBREVIATIONS = frozenset(_ABBREVIATIONS_TEXT.split())

_CLOSE = "\"'’”»)\\]}」』）】》〉"

# Candidate sentence ends (a run of terminators with closing quotes) and paragraph breaks; the rules
# are checked in Python per candidate, which is much faster than one regex with lookarounds.
_CANDIDATE = re.compile(rf"[.!?。！？…]+[{_CLOSE}]*|\n[^\S\n]*\n")
_CJK_ENDS = frozenset("。！？…")
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)*[A-Za-z]$")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return 0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF or 0xAC00 <= code <= 0xD7AF


def _is_abbreviation(text: str, end: int) -> bool:
    """Whether the full stop at ``text[end]`` closes an abbreviation or an initial."""
    before = text[max(0, end - 40) : end]
    if not before or before[-1].isspace():
        return False
    word = before.split()[-1].lstrip("(\"'“‘[")
    return word.lower() in _ABBREVIATIONS or bool(_INITIALS.match(word))


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``; ``"".join(split_sentences(text)) == text``. Empty text gives ``[]``."""
    if not text:
        return []
    pieces: list[str] = []
    start = 0
    for match in _CANDIDATE.finditer(text):
        found = match.group()
        if found[0] == "\n":  # paragraph break: the blank line starts the next piece
            end = match.start()
        elif _CJK_ENDS.intersection(found):
            end = match.end()
        else:
            end = match.end()
            after = text[end : end + 1]
            if not after:
                continue
            if after.isspace():
                following = text[end : end + 64].lstrip()[:1]
                if not following or following.islower():
                    continue
                if found[0] == "." and len(found.rstrip(_CLOSE)) == 1 and _is_abbreviation(text, match.start()):
                    continue
            elif not (found[0] in "!?" and _is_cjk(after)):
                continue
        if end <= start or not text[start:end].strip():
            continue
        pieces.append(text[start:end])
        start = end
    if start < len(text):
        tail = text[start:]
        if pieces and not tail.strip():
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return pieces
