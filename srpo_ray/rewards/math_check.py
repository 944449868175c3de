"""Which part of a math response is its final answer (the ONE place this rule lives).

The rule, precisely:

1. Boxes. A box is `\\boxed{...}` (whitespace allowed before the brace) with balanced
   braces; `\\{` and `\\}` are literal braces and do not count. Boxes nested inside a
   box are part of it. If a `\\boxed{` that never closes comes after the last complete
   box, the final answer is unfinished: no answer.
2. The final answer region. Starting from the last complete box, the box before it is
   in the same region when the text between them is short (at most 16 characters
   besides whitespace, e.g. " or ", "$, $", "\\n\\nand\\n\\n") or names alternatives (at
   most 200 characters besides whitespace that include the word "or", "either" or
   "alternatively"); and so on backwards. Boxes further back are earlier attempts and
   do not count. If the region holds boxes with different contents (whitespace
   ignored), there are several candidate answers: no answer.
3. The answer is the last box's content, stripped. A content that lists alternatives
   (the word "or", `\\lor`, `\\vee`, "∨") is several candidates: no answer. A set or
   list such as "1, 2" is one answer and is left to math-verify (which compares sets).
4. Only when there is no box at all, and `allow_answer_line` is set: the last non-empty
   line, if it reads "Answer: ..." (or "Final answer: ...", markdown emphasis allowed),
   gives the answer (outer $...$, \\(...\\), \\[...\\] removed; braces must balance);
   the alternatives rule of 3 applies to it too.

Callers cut responses to their last `RewardConfig.math_max_chars` characters first.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_START = re.compile(r"\\boxed\s*\{")
_SPACE = re.compile(r"\s+")
_ALTERNATIVE_WORD = re.compile(r"(?i)(?<![A-Za-z])(?:or|either|alternatively)(?![A-Za-z])")
_ALTERNATIVE_SYMBOL = re.compile(r"\\lor(?![A-Za-z])|\\vee(?![A-Za-z])|∨")
_ANSWER_LINE = re.compile(r"(?i)^[\s>*_#]*(?:final\s+)?answer[\s*_]*[:：][\s*_]*(?P<answer>.+?)[\s*_.]*$")
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
SHORT_GAP_CHARS = 16
ALTERNATIVES_GAP_CHARS = 200


@dataclass(frozen=True)
class _Box:
    start: int
    end: int  # one past the closing brace
    content: str


def extract_final_answer(text: str, allow_answer_line: bool) -> str | None:
    """The final answer of a response by the rule in this module's docstring, or None."""
    boxes, unfinished = outer_boxes(text)
    if unfinished:
        return None
    if not boxes:
        return _answer_line(text) if allow_answer_line else None
    region = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        if not _same_region(text[box.end:region[-1].start]):
            break
        region.append(box)
    if len({_SPACE.sub("", b.content) for b in region}) > 1:
        return None
    answer = boxes[-1].content.strip()
    return answer if answer and not lists_alternatives(answer) else None


def lists_alternatives(answer: str) -> bool:
    """True when an answer offers several candidates ("3 or 4", "3 \\lor 4")."""
    return bool(_ALTERNATIVE_WORD.search(answer) or _ALTERNATIVE_SYMBOL.search(answer))


def _same_region(gap: str) -> bool:
    compact = _SPACE.sub("", gap)
    if len(compact) <= SHORT_GAP_CHARS:
        return True
    return len(compact) <= ALTERNATIVES_GAP_CHARS and bool(_ALTERNATIVE_WORD.search(gap))


def outer_boxes(text: str) -> tuple[list[_Box], bool]:
    """Complete outermost boxes in order, and whether an unclosed box follows the last."""
    closing = _matching_braces(text)
    boxes: list[_Box] = []
    unfinished = False
    for m in _BOX_START.finditer(text):
        if boxes and m.start() < boxes[-1].end:
            continue  # nested inside the previous box
        open_at = m.end() - 1
        close_at = closing.get(open_at)
        if close_at is None:
            unfinished = True
            continue
        boxes.append(_Box(m.start(), close_at + 1, text[open_at + 1:close_at]))
        unfinished = False
    return boxes, unfinished


def _matching_braces(text: str) -> dict[int, int]:
    """Index of each grouping `{` -> index of its `}` (one linear pass, so 5000 nested
    braces or thousands of unclosed boxes cost no more than the text's length)."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # \{ \} \\ : an escaped character never groups
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _answer_line(text: str) -> str | None:
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    m = _ANSWER_LINE.match(lines[-1])
    if m is None:
        return None
    answer = m.group("answer").strip()
    for left, right in _MATH_DELIMITERS:
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            answer = answer[len(left):-len(right)].strip()
            break
    if not answer or lists_alternatives(answer) or not _balanced(answer):
        return None
    return answer


def _balanced(text: str) -> bool:
    depth, i = 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return False
        i += 1
    return depth == 0
