"""What an acceptable answer looks like, beyond being equal to the truth.

Two rules live here, both pure text checks:

- `plain_number`: the strict numeric answer mode (`reward.math_answer_mode: number`,
  as DAPO's verifier for integer-answer sets). math-verify evaluates expressions, so a
  response that boxes the question itself (`\\boxed{29\\cdot 5}` for "What is 29 * 5?")
  is paid as correct there; a policy learns that fast. Under this rule the boxed
  content must itself be a number literal: an integer, a decimal, or a fraction
  (`7/2`, `\\frac{7}{2}`) in lowest terms with a denominator above 1 (so `145/5` is a
  restatement, not an answer). Allowed decoration: surrounding `$`, spaces, LaTeX
  thin spaces (`\\,` `\\!` `\\;`), thousands separators (`1,000`, `1{,}000`), a
  Unicode minus and a final period. Anything else (units, `x =`, operators,
  percent signs) is not a plain number.
- `well_formed`: what the format bonus (`reward.format_reward`) pays for: one final
  answer where it belongs. Math: exactly one `\\boxed{}` with non-empty content, and
  after it at most `FORMAT_TAIL_CHARS` characters besides whitespace (a closing
  sentence, `$.`), so filling a response with boxes earns nothing. Code: exactly one
  complete fenced code block.
"""
from __future__ import annotations

import re
from fractions import Fraction

from srpo_ray.rewards.math_check import outer_boxes

FORMAT_TAIL_CHARS = 40

_DECORATION = re.compile(r"\\[,!;: ]|\s+|\{,\}")
_INTEGER = re.compile(r"[+-]?\d+")
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_SLASH_FRACTION = re.compile(r"(?P<sign>[+-]?)(?P<num>\d+)/(?P<den>\d+)")
_TEX_FRACTION = re.compile(r"(?P<sign>[+-]?)\\[dt]?frac\{(?P<num>\d+)\}\{(?P<den>\d+)\}")
_FENCE = re.compile(r"```")


def plain_number(text: str) -> Fraction | None:
    """The value of `text` if it is a plain number literal (see the module docstring), else None."""
    s = text.strip()
    for left, right in (("$$", "$"), ("$", "$")):
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left):-len(right)]
    s = _DECORATION.sub("", s).replace("\u2212", "-").rstrip(".")
    if not s:
        return None
    if _INTEGER.fullmatch(s):
        return Fraction(int(s))
    if _GROUPED.fullmatch(s):
        return Fraction(s.replace(",", ""))
    if _DECIMAL.fullmatch(s):
        return Fraction(s)
    m = _SLASH_FRACTION.fullmatch(s) or _TEX_FRACTION.fullmatch(s)
    if m is None:
        return None
    num, den = int(m["num"]), int(m["den"])
    value = Fraction(num, den) if den else None
    if value is None or value.denominator != den or den == 1:
        return None  # 145/5, 4/2, x/1, x/0: an expression to evaluate, not an answer
    return -value if m["sign"] == "-" else value


def single_box_content(text: str) -> str | None:
    """The content of the response's only complete `\\boxed{}`; None when there are
    none, several, or an unfinished one."""
    boxes, unfinished = outer_boxes(text)
    if unfinished or len(boxes) != 1:
        return None
    return boxes[0].content


def well_formed(domain: str, text: str) -> bool:
    """One final answer where it belongs (see the module docstring)."""
    if domain == "code":
        return len(_FENCE.findall(text)) == 2
    boxes, unfinished = outer_boxes(text)
    if unfinished or len(boxes) != 1 or not boxes[0].content.strip():
        return False
    return len(_DECORATION.sub("", text[boxes[0].end:])) <= FORMAT_TAIL_CHARS
