"""Prompt weighting: ``(phrase:1.3)`` in a prompt, as the official MLX runner reads it.

The official runner (Stability-AI/stable-audio-3, ``optimized/mlx/scripts/prompt_weighting.py``)
defines the semantics, and this module follows them:

* ``(phrase:W)`` marks ``phrase`` with the weight ``W`` (``[+-]DIGITS[.DIGITS]``: 2, 1.3, -0.5); the
  text encoder reads the prompt with the syntax removed (``a (warm pad:1.4) intro`` is encoded as
  ``a warm pad intro``);
* the phrase's tokens are found by construction: the token count of the clean prompt's prefix up to
  the phrase's start and end (a space just before the phrase, or at its end, belongs to the phrase's
  tokens, as SentencePiece attaches it);
* after the encoder, each weighted token's embedding ``e`` becomes ``p + W * (e - p)``, with ``p`` the
  model's own learned padding ("empty") embedding: W = 1 keeps it, 0 gives the empty embedding, above 1
  pushes away from it, below 0 reverses it. Tokens of weight 1 keep their exact bits, so a prompt
  without the syntax is encoded exactly as before.

Where the official parser lets malformed text pass through silently, this one refuses it with a
message naming the prompt setting (nothing is guessed):

* an unbalanced ``(`` or ``)``; write ``\\(`` and ``\\)`` for literal parentheses (the only escapes;
  a backslash before anything else is itself);
* a weight that is not a number (``(bass:loud)``), is empty, or lies outside [-10, 10]; a group is a
  weighted one when the text after its last colon has no space (``(note: quiet)`` stays literal text);
* nesting: a weighted group inside another group, or a group inside a weighted phrase (the official
  regex gives such input an accidental meaning); an empty phrase or one with a colon;
* a weighted group glued to a letter or digit (``un(usual:2)``), where no token boundary exists: the
  official runner skips such a weight with a warning; here it is an error (add a space or a comma).

Balanced parentheses without a weight, ``(remix)``, are literal text, kept as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_WEIGHT = 10.0
_WEIGHT = re.compile(r"[+-]?\d+(?:\.\d+)?")


class PromptSyntaxError(ValueError):
    """A malformed weighted prompt; the message completes "{prompt} ..."."""


@dataclass(frozen=True)
class WeightedPrompt:
    text: str  # what the text encoder reads
    spans: tuple[tuple[int, int, float], ...]  # (start, end, weight): character offsets into text

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for _, _, w in self.spans)


def _tokens(raw: str):
    """``raw`` as (kind, char, position): kind "open", "close" or "char" (escapes resolved)."""
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw) and raw[i + 1] in "()":
            yield "char", raw[i + 1], i
            i += 2
            continue
        yield ("open" if c == "(" else "close" if c == ")" else "char"), c, i
        i += 1


def parse(raw: str) -> WeightedPrompt:
    """The clean text and weighted spans of ``raw``; :class:`PromptSyntaxError` when malformed."""
    if "(" not in raw and ")" not in raw:
        return WeightedPrompt(raw, ())
    # Group structure: each top-level group is a list of items (chars and nested groups).
    root: list = []
    stack: list[tuple[list, int]] = []
    current = root
    for kind, c, pos in _tokens(raw):
        if kind == "open":
            group: list = []
            current.append(("group", group, pos))
            stack.append((current, pos))
            current = group
        elif kind == "close":
            if not stack:
                raise PromptSyntaxError(f"has an unbalanced ')' at character {pos + 1} (write \\) for a literal one)")
            current, _ = stack.pop()
        else:
            current.append(("char", c, pos))
    if stack:
        pos = stack[-1][1]
        raise PromptSyntaxError(f"has an unbalanced '(' at character {pos + 1} (write \\( for a literal one)")

    out: list[str] = []
    spans: list[tuple[int, int, float]] = []

    def flat(items) -> str:
        return "".join("(" + flat(x[1]) + ")" if x[0] == "group" else x[1] for x in items)

    def weight_of(items, pos):
        """(phrase items, weight) when the group is a weighted one, else None."""
        colon = max((i for i, x in enumerate(items) if x[0] == "char" and x[1] == ":"), default=None)
        if colon is None:
            return None
        tail = items[colon + 1:]
        if any(x[0] == "group" for x in tail):
            return None
        text = "".join(x[1] for x in tail)
        if any(ch.isspace() for ch in text):
            return None
        shown = "(" + flat(items) + ")"
        if not _WEIGHT.fullmatch(text):
            raise PromptSyntaxError(f"{shown}: the weight {text!r} is not a number such as 1.3 or -0.5"
                                    if text else f"{shown}: the weight after ':' is missing")
        phrase = items[:colon]
        if any(x[0] == "group" for x in phrase):
            raise PromptSyntaxError(f"{shown}: nested groups are not supported")
        phrase_text = "".join(x[1] for x in phrase)
        if ":" in phrase_text:
            raise PromptSyntaxError(f"{shown}: a weighted phrase cannot contain ':'")
        if not phrase_text.strip():
            raise PromptSyntaxError(f"{shown}: the phrase is empty")
        weight = float(text)
        if abs(weight) > MAX_WEIGHT:
            raise PromptSyntaxError(f"{shown}: the weight must be in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}] (got {text})")
        return phrase_text, weight

    def walk(items, depth: int):
        for index, item in enumerate(items):
            if item[0] == "char":
                out.append(item[1])
                continue
            inner, pos = item[1], item[2]
            found = weight_of(inner, pos)
            if found is None:
                out.append("(")
                walk(inner, depth + 1)
                out.append(")")
                continue
            shown = "(" + flat(inner) + ")"
            if depth:
                raise PromptSyntaxError(f"{shown}: nested groups are not supported")
            before = items[index - 1] if index else None
            after = items[index + 1] if index + 1 < len(items) else None
            if (before and before[0] == "char" and before[1].isalnum()) or (
                    after and after[0] == "char" and after[1].isalnum()):
                raise PromptSyntaxError(f"{shown} at character {pos + 1} touches a letter or digit; put a space "
                                        "or punctuation between them")
            phrase, weight = found
            start = sum(len(s) for s in out)
            out.append(phrase)
            spans.append((start, start + len(phrase), weight))

    walk(root, 0)
    return WeightedPrompt("".join(out), tuple(spans))


def token_spans(text: str, spans, count) -> list[tuple[int, int, float]]:
    """Character spans -> token spans ``(start, end, weight)`` of the content tokens (no special tokens),
    by the official construction: ``count(prefix)`` is the number of tokens of a prefix of ``text``."""
    out = []
    for start, end, weight in spans:
        if weight == 1.0:
            continue
        head = start - 1 if start > 0 and text[start - 1] == " " else start
        tail = end - 1 if end > 0 and text[end - 1] == " " else end
        first, last = count(text[:head]), count(text[:tail])
        if first < last:
            out.append((first, last, weight))
    return out


__all__ = ["PromptSyntaxError", "WeightedPrompt", "parse", "token_spans", "MAX_WEIGHT"]
