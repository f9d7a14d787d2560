"""Which domain a conversation belongs to: code or chat (the two phases of the traffic-shift benchmark).

What it does: `is_code_conversation` decides from the text of a conversation's turns alone whether it is
about code, by looking for what code looks like on the page, not for words about code:

- a fenced block (```) whose body holds at least one code-like line (a fence around a poem, a game board
  or a plain table is not enough: ShareGPT's fence language tags were guessed by the exporter and are
  often wrong, so they are ignored);
- outside fences, one unmistakable line (`def f(x):`, `class Foo(Base):`, `import numpy as np`,
  `from x import y`, `#include <stdio.h>`, `function f(a) {`, `public static void main`, an uppercase
  `SELECT ... FROM` / `CREATE TABLE` / `INSERT INTO`, `console.log(`, `<?php`, ...), or two lines that
  each merely look like code (`x = f(y);`, a lone `}`, `if (a) {`, `npm install`, `<div ...>`).

It is conservative on purpose: prose that talks about code ("can you review my code?", "the function of
the liver", "import the CSV, then select the rows from the sheet") is chat, since the benchmark must not
call a conversation code when a drafter would see no code in it. `split_by_domain` splits a list of
conversations with it, keeping their order.

Turns are ShareGPT's {"from", "value"} or OpenAI's {"role", "content"} (see `draftsmith.datasets_io` for
loading the embedded ShareGPT file); a whole ShareGPT record ({"conversations": [...]}) is accepted too.

What it does not do: no language identification (which programming language), no tokenization, no model,
no I/O; inline `code` spans in prose are not counted (they name files and terms as often as code), nor are
spreadsheet formulas, JSON or math on their own. Pure and deterministic: the same text, the same answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

CHAT = "chat"
CODE = "code"

# A fence opens with ``` (optionally a language tag) and runs to the next ``` or the end of the turn
# (ShareGPT turns are sometimes cut inside a block).
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|\Z)", re.S)


def _line_pattern(*shapes: str) -> re.Pattern:
    # Searched in "\n" + text: the literal "\n" lets the regex engine jump from line start to line start
    # instead of trying every shape at every character (a whole ShareGPT file stays cheap to filter).
    # Each shape is a group of its own, so a match says which shape it was (`lastindex`).
    return re.compile(r"\n[ \t]*(?:" + "|".join(f"({shape})" for shape in shapes) + ")", re.M)


_W = r"[ \t]"  # horizontal space: a shape never spans lines unless it says so

# One such line outside a fence is enough: these shapes do not occur in prose. Case-sensitive on
# purpose ("Import the data" is prose).
_STRONG_LINE = _line_pattern(
    rf"(?:async{_W}+)?def{_W}+\w+{_W}*\([^)\n]*\){_W}*(?:->[^:\n]+)?:",  # Python def
    # class Foo(Base): / class Foo: (capitalised name) / class Foo ... { / class Foo extends|implements Bar
    rf"(?:(?:public|private|protected|export|abstract|final|static|data|sealed){_W}+)*class{_W}+"
    rf"(?:\w+{_W}*\([^)\n]*\){_W}*:{_W}*$|[A-Z]\w*{_W}*:{_W}*$|\w+[^\n]*\{{{_W}*$"
    rf"|\w+{_W}+(?:extends|implements){_W}+\w)",
    # Python / Java import line: a dotted name, an alias or a ';', nothing after ("import the data into
    # Excel" is prose; a bare "import duty" line is only weak evidence, below: PDF text wraps like that)
    rf"import{_W}+(?:\w+(?:\.(?:\w+|\*))+|\w+{_W}+as{_W}+\w+|[\w.]+{_W}*;){_W}*;?{_W}*$",
    rf"import{_W}+(?:[\w*{{}}, \t]+{_W}+from{_W}+)?['\"][^'\"\n]+['\"]",  # JavaScript import
    rf"from{_W}+[\w.]+{_W}+import{_W}+(?:\*|\(|\w+(?:{_W}+as{_W}+\w+)?(?:{_W}*,{_W}*\w+)*{_W}*$)",
    rf"#{_W}*include{_W}*[<\"][\w./+-]+[>\"]",
    rf"(?:export{_W}+)?(?:async{_W}+)?function{_W}*\*?{_W}*\w*{_W}*\([^)\n]*\){_W}*\{{",
    rf"(?:using|package){_W}+[\w.]+;{_W}*$",  # C# using, Java package
    rf"fn{_W}+main{_W}*\(\)",
)

# Code that may sit anywhere in a line. The literal keyword is tested first (a plain substring search),
# the regex only where it occurs. SQL keywords must be capitals here ("select a book from the shelf").
_STRONG_INLINE = (
    ("SELECT", re.compile(rf"\bSELECT{_W}+(?:DISTINCT{_W}+)?[\w*`\"\[\].,() \t]+?\s+FROM\s+[\w`\"\[]")),
    ("ALTER", re.compile(rf"\bALTER{_W}+TABLE{_W}+\w")),
    ("CREATE", re.compile(rf"\bCREATE{_W}+(?:TABLE|INDEX|VIEW){_W}+\w")),
    ("INSERT", re.compile(rf"\bINSERT{_W}+INTO{_W}+\w")),
    ("UPDATE", re.compile(rf"\bUPDATE{_W}+\w+{_W}+SET{_W}+\w")),
    ("main", re.compile(rf"\bpublic{_W}+static{_W}+void{_W}+main\b|\bint{_W}+main{_W}*\(")),
    ("console.log(", None),
    ("System.out.print", None),
    ("std::", re.compile(r"\bstd::\w")),
    ("<?php", None),
    ("document.getElementById(", None),
    ("__name__", re.compile(rf"\bif{_W}+__name__{_W}*==")),
)

# Each of these lines only looks like code. Inside a fence one decides; outside, two different shapes in
# one turn must (a glossary of "TP = true positive;" lines or a JSON listing of brackets is one shape).
_WEAK_LINE = _line_pattern(
    # a statement ending in ';' with '=' or a call (the cheap test first: most lines do not end in ';')
    r"(?=[^\n]*;[ \t]*$)[^\n]*?(?:=|\w\([^()\n]*\))[^\n]*",
    rf"[{{}}()\[\]]+{_W}*[;,)]*{_W}*$",  # a line of brackets only: {, }, });, ]
    # a line opening a block: f(x) {, f(x) -> T {, x = {, else {, struct S {
    rf"(?=[^\n]*\{{{_W}*$)[^\n]*"
    rf"(?:\)[^\n]*|=>|=|\belse|\btry|\bdo|\b(?:struct|enum|interface){_W}+\w+){_W}*\{{{_W}*$",
    rf"[^\n]*;{_W}*(?:then|do){_W}*$",  # shell: if ...; then / for ...; do
    # declarations ("let x = 2" alone is math, so `let` needs the ';')
    rf"(?:const|var|val|auto|int|float|double|char|bool|string|String){_W}+\w+{_W}*(?::[^=\n]+)?=(?!=)",
    rf"let{_W}+(?:mut{_W}+)?\w+[^\n]*=[^\n]*;{_W}*$",
    # x = mod.f(y) / x = f("a") / x = f(y); (not "y = sin(x)", which is math)
    rf"[A-Za-z_][\w.]*(?:\[[^\]\n]*\])?{_W}*[+\-*/]?={_W}*"
    rf"(?:\w*[._][\w.]*\(.*\)|\w+\([^\n]*['\"][^\n]*\)|\w+\(.*\){_W}*;){_W}*$",
    # x = "text" / x = ['a', 'b'] / x = {"k": 1} (a literal with quotes or a ':'; "A = {1, 2}" is a set)
    rf"[A-Za-z_][\w.]*(?:\[[^\]\n]*\])?{_W}*={_W}*(?:[rbf]?['\"]|[\[{{][^\n]*['\":])",
    r"[A-Za-z_]\w*(?:\.\w+)+\(.*\)[ \t]*;?[ \t]*$",  # a method call as a statement: obj.do(x)
    rf"(?:return|print|echo|printf|puts)\b{_W}*\(?[^\n]*[();]{_W}*$",
    rf"(?:for|if|while|switch|catch){_W}*\(.*\){_W}*\{{?{_W}*$",
    # Python block headers
    rf"(?:for{_W}+\w+(?:{_W}*,{_W}*\w+)*{_W}+in{_W}+\S.*|elif{_W}.+|else|try"
    rf"|except(?:{_W}+[\w.]+(?:{_W}+as{_W}+\w+)?)?|with{_W}+.+{_W}+as{_W}+\w+):{_W}*$",
    r"@\w+(?:\.\w+)*\(.*\)[ \t]*$",  # a decorator / annotation with arguments
    r"(?://|/\*|\*/|<!--)",  # comment lines of C-like languages and HTML
    # shell: a prompt with a lowercase command, a script run, a package/VCS/container command
    rf"\${_W}+[a-z][\w.-]*(?:{_W}|$)|\./[\w.-]+",
    rf"(?:sudo{_W}+)?(?:pip3?|npm|npx|yarn|apt(?:-get)?|brew|git|docker|kubectl|cargo|conda){_W}+"
    r"(?:install|run|build|clone|commit|push|pull|add|init|apply|update|create|exec|checkout)\b",
    rf"import{_W}+\w+(?:{_W}*,{_W}*\w+)*{_W}*$",  # import os / import UIKit / import a, b
    r"</?(?:!DOCTYPE|html|head|body|div|span|script|style|form|input|button|table|tr|td|ul|li|img|meta|link)"
    r"\b[^>\n]*>",
)

# Inside a fence the exporter may have lost the capitals; SQL in any case counts there.
_FENCED_SQL = re.compile(
    r"\bselect\s+(?:distinct\s+)?(?:\*|[\w.]+(?:\s*,\s*[\w.]+)+)\s+from\s+\w"
    r"|\b(?:create|alter|drop)\s+table\s+\w|\binsert\s+into\s+\w|\bdelete\s+from\s+\w"
    r"|\b(?:grant|revoke)\s+\w+(?:\s*,\s*\w+)*\s+on\s+\S",
    re.I,
)

Turn = Mapping
Conversation = Sequence[Turn] | Mapping


def _turn_text(turn) -> str:
    if not isinstance(turn, Mapping):
        return ""
    text = turn.get("value") if "value" in turn else turn.get("content")
    if isinstance(text, list):  # OpenAI multi-part content: keep the text parts
        text = "\n".join(str(p.get("text", "")) for p in text if isinstance(p, Mapping))
    return text if isinstance(text, str) else ""


def _turns(conversation: Conversation) -> Sequence:
    if isinstance(conversation, Mapping):  # a ShareGPT record
        turns = conversation.get("conversations", conversation.get("messages", ()))
        return turns if isinstance(turns, Sequence) else ()
    return conversation


def _has_strong(text: str) -> bool:
    if _STRONG_LINE.search("\n" + text):
        return True
    return any(needle in text and (regex is None or regex.search(text)) for needle, regex in _STRONG_INLINE)


def _fence_is_code(body: str) -> bool:
    return bool(_has_strong(body) or _WEAK_LINE.search("\n" + body) or _FENCED_SQL.search(body))


def _text_is_code(text: str) -> bool:
    # ShareGPT's markdown export escaped '_' and '*' outside fences (`def apply\_classifier`).
    text = text.replace("\\_", "_").replace("\\*", "*")
    if "```" in text:
        if any(_fence_is_code(m.group(1)) for m in _FENCE.finditer(text)):
            return True
        text = _FENCE.sub("\n", text)  # a fence that is not code (a board, a poem) is no evidence outside
    if _has_strong(text):
        return True
    shapes = {m.lastindex for m in _WEAK_LINE.finditer("\n" + text)}
    return len(shapes) >= 2


def is_code_conversation(turns: Conversation) -> bool:
    """True when any turn shows code (see the module docstring for what counts); False for empty input.

    Weak evidence is counted per turn, so two unrelated code-looking lines in different turns do not add up.
    """
    return any(_text_is_code(_turn_text(t)) for t in _turns(turns))


def domain_of(turns: Conversation) -> str:
    """`CODE` or `CHAT` for one conversation."""
    return CODE if is_code_conversation(turns) else CHAT


def split_by_domain(conversations: Iterable[Conversation]) -> tuple[list, list]:
    """(chat, code): the conversations as given, each in its original order."""
    chat: list = []
    code: list = []
    for conv in conversations:
        (code if is_code_conversation(conv) else chat).append(conv)
    return chat, code
