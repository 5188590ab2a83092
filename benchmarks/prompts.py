"""Benchmark prompt sets, written for this project. Each is a list of chat-user messages."""

from __future__ import annotations

_ARTICLE = (
    "The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Several residents "
    "said that the lanes made the street safer for children who ride to school, while shop owners worried "
    "that removing parking spaces would reduce the number of customers. The council agreed to count the "
    "cyclists and the shoppers for three months and to vote on the lanes again in the spring."
)
_CODE = (
    "def moving_average(values, window):\n"
    "    result = []\n"
    "    for i in range(len(values)):\n"
    "        start = max(0, i - window + 1)\n"
    "        chunk = values[start:i + 1]\n"
    "        result.append(sum(chunk) / len(chunk))\n"
    "    return result\n"
)

# Input-grounded tasks: the answer copies long spans of the prompt, where prompt lookup shines.
SUMMARISE_EDIT = [
    f"Summarise this article in two sentences:\n\n{_ARTICLE}",
    f"Repeat the following text exactly, then say 'done':\n\n{_ARTICLE}",
    f"Rewrite this text, replacing 'council' with 'committee' and changing nothing else:\n\n{_ARTICLE}",
    f"Add a docstring to this function and return the whole function:\n\n{_CODE}",
    f"Rename the variable 'chunk' to 'window_values' in this code and return all of it:\n\n{_CODE}",
]

# Open-ended generation: coding and prose.
CODE_PROSE = [
    "Write a Python function that checks whether a string is a palindrome, with a docstring and tests.",
    "Write a Python class for a stack with push, pop, peek and is_empty methods.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a short story about a robot who learns to paint, in about 150 words.",
    "Describe how a bicycle works to a ten-year-old.",
]

PROMPT_SETS = {"summarise-edit": SUMMARISE_EDIT, "code-prose": CODE_PROSE}
