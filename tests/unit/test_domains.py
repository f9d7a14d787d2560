"""The code filter: hand-written code and chat cases (tricky ones included) and its share on ShareGPT."""

import pytest

from draftsmith.datasets_io import sharegpt_conversations
from draftsmith.domains import CHAT, CODE, domain_of, is_code_conversation, split_by_domain


def sg(*values):
    """ShareGPT turns, alternating human / gpt."""
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


CODE_CASES = {
    "fenced python with a tag": sg(
        "How do I read a CSV?",
        "Use pandas:\n```python\nimport pandas as pd\ndf = pd.read_csv('data.csv')\n```\nThat's it.",
    ),
    "fence without a tag, code only in the answer": sg(
        "reverse a list",
        "Here you go:\n```\nitems = [1, 2, 3]\nitems.reverse()\n```",
    ),
    "python pasted without a fence": sg(
        "why does this fail?\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n\nprint(mean([]))",
    ),
    "uppercase SQL inline in prose": sg(
        "My query SELECT name, email FROM users WHERE active = 1 is slow, why?",
        "Add an index on the active column.",
    ),
    "C include": sg("what does this do\n#include <stdio.h>\nint x;"),
    "javascript one-line function": sg("function add(a, b) { return a + b; }  -- is this right?"),
    "java main without a fence": sg(
        "public class Hello {\n    public static void main(String[] args) {\n"
        "        System.out.println(\"hi\");\n    }\n}"
    ),
    "openai role/content messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Show a bash loop."},
        {"role": "assistant", "content": "```bash\nfor f in *.txt; do\n  wc -l \"$f\"\ndone\n```"},
    ],
    "sharegpt-escaped underscores outside a fence": sg(
        "explain:\ndef apply\\_classifier(self, name, samples=None):\n    return self.\\_run(name)"
    ),
    "fence cut off at the end of the turn": sg(
        "continue", "```js\nconst total = items.reduce((a, b) => a + b, 0"),
    "shell session in a fence": sg("how do I get the repo?", "Run:\n```\n$ git clone https://x/y.git\n```"),
    "whole sharegpt record": {"id": "x_0", "conversations": sg(
        "fix my import", "from collections import defaultdict\n\ncounts = defaultdict(int)")},
    "lowercase SQL inside a fence": sg("count rows", "```\nselect id, name from users where id > 3\n```"),
    "swift: two different weak shapes": sg(
        "why is my view blank?\n\nimport UIKit\n\n"
        "func makeView(frame: CGRect) -> UIView {\n  view.backgroundColor = .red"
    ),
    "html in a fence": sg("make a page", "```html\n<!DOCTYPE html>\n<html>\n<body>hi</body>\n</html>\n```"),
    "kivy-style attribute code without a fence": sg(
        "my drawer does not close:\non_press:\n    screen_manager.current = \"quests\"\n"
        "    nav_drawer.set_state(\"close\")"
    ),
}

CHAT_CASES = {
    "mentions code in prose": sg(
        "Can you review my code? It's not working and the function crashes.",
        "Sure, please paste the code and the error message.",
    ),
    "talks about languages": sg("Python or JavaScript: which programming language should I learn first?"),
    "import/select/from as English": sg(
        "Import the CSV into Excel.\nThen select the rows from the sheet you need.\nFrom there import them."
    ),
    "function and define as English": sg("Define the function of the liver.", "The liver's function is..."),
    "fenced game board": sg(
        "solve this board",
        "```\n 1  1  1\n 1  ?  1\n 1  1  1\n```\nThe middle square is a mine.",
    ),
    "fenced poem with a wrong tag": sg(
        "a poem", "```css\nRoses are red,\nviolets are blue,\nI wrote this for you\n```"),
    "math, not code": sg(
        "Let x = 2\nlet y = sin(x)\nA = {1, 2, 3}\nf(x) = x^2 + 1\nWhat is f(y)?"
    ),
    "glossary of one repeated shape": sg(
        "TP = true positive;\nFN = false negative;\nTN = true negative;\nFP = false positive;"
    ),
    "wrapped PDF text with a bare import line": sg(
        "Where the vehicle is reimported, no VAT on\nimport duty\nis payable. See section 12 (a) and (b)."
    ),
    "class in a school sense": sg("class notes:\nOur class: 30 students\nclass Schedule today"),
    "legal list with semicolons": sg(
        "Matters include:\n1. the quality of any work (see clause 4);\n"
        "2. whether (a) applies; and\n3. the rest."
    ),
    "prose with lowercase sql words": sg("Please select the best candidate from the list below."),
    "prices and hashtags": sg("It costs $ 100 now.\n#include everyone in the #team\n# Heading"),
    "inline code spans only": sg("What do the `def` keyword and `print()` do in Python?"),
    "one comment-like line": sg("// just a thought\nI like turtles."),
    "json-like brackets only": sg("Scene data:\n{\n  \"game\": \"Labyrinth\",\n  \"chapter\": 1\n}"),
    "empty and odd turns": [{"from": "human", "value": None}, {"from": "gpt"}, "not a dict"],
}


@pytest.mark.parametrize("name", sorted(CODE_CASES))
def test_code_conversations(name):
    assert is_code_conversation(CODE_CASES[name]), name
    assert domain_of(CODE_CASES[name]) == CODE


@pytest.mark.parametrize("name", sorted(CHAT_CASES))
def test_chat_conversations(name):
    assert not is_code_conversation(CHAT_CASES[name]), name
    assert domain_of(CHAT_CASES[name]) == CHAT


def test_weak_evidence_does_not_add_up_across_turns():
    # One code-looking line in each of two turns: neither turn shows code.
    assert not is_code_conversation(sg("}\nthat's all", "import os\nok"))
    assert is_code_conversation(sg("}\nimport os"))


def test_empty_conversation_is_chat():
    assert not is_code_conversation([])
    assert not is_code_conversation({"conversations": []})


def test_split_by_domain_keeps_order_and_identity():
    convs = [CHAT_CASES["talks about languages"], CODE_CASES["C include"],
             CHAT_CASES["math, not code"], CODE_CASES["html in a fence"]]
    chat, code = split_by_domain(iter(convs))
    assert chat == [convs[0], convs[2]] and code == [convs[1], convs[3]]
    assert all(a is b for a, b in zip(code, [convs[1], convs[3]]))


def test_code_share_on_embedded_sharegpt():
    convs = sharegpt_conversations()[:2000]
    assert len(convs) == 2000
    chat, code = split_by_domain(convs)
    share = len(code) / len(convs)
    print(f"code share among the first 2000 ShareGPT conversations: {share:.3f} ({len(code)})")
    assert 0.05 <= share <= 0.60, f"code share {share:.3f} outside the sane range 5%-60%"
    assert len(chat) + len(code) == len(convs)
