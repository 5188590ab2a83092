"""Built-in prompt sets of `specserve bench` and the benchmark scripts, written for this project. Each
is a list of chat-user messages."""

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

# A repeated workload: 5 task templates asked 20 times each with different inputs, interleaved as a
# server would see them. Answers share their template's structure, not the inputs' words: the outputs
# of earlier requests predict later ones (the suffix drafter's shared store), the prompt alone less so.
_NAMES = ["Alice Martin", "Bob Chen", "Carla Rossi", "David Okafor", "Elena Petrova", "Farid Haddad",
          "Grace Kim", "Hugo Silva", "Ines Dubois", "Jonas Berg", "Kenji Sato", "Lena Novak",
          "Marco Bianchi", "Nadia Ali", "Oscar Lind", "Priya Nair", "Quentin Roy", "Rosa Diaz",
          "Samir Khan", "Tara Walsh"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Toronto", "Osaka", "Lyon", "Austin", "Krakow", "Porto", "Seoul"]
_PRODUCTS = [("kettle", "kitchen appliance", "boils water in two minutes"),
             ("backpack", "travel bag", "has a padded laptop sleeve"),
             ("desk lamp", "lighting product", "dims to three brightness levels"),
             ("water bottle", "drinkware item", "keeps drinks cold for a day"),
             ("keyboard", "computer accessory", "has quiet mechanical keys")]
_COLUMNS = ["price", "name", "email", "total", "created_at"]
_TABLES = ["orders", "customers", "products", "invoices"]
_OPS = [("add", "+"), ("subtract", "-"), ("multiply", "*"), ("divide", "/")]
_COLOURS = ["red", "black", "white", "green"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]


def _repeated(i: int) -> list[str]:
    """The 5 templates filled with the i-th inputs."""
    name, city = _NAMES[i], _CITIES[i % len(_CITIES)]
    product, category, feature = _PRODUCTS[i % len(_PRODUCTS)]
    verb, op = _OPS[i % len(_OPS)]
    return [
        f"Extract the name, age and city from this sentence. Answer with JSON only, in the form "
        f'{{"name": ..., "age": ..., "city": ...}}.\n\n{name} is {21 + 2 * i} years old and lives in {city}.',
        f"Add type hints and a one-line docstring to this function. Return only the code.\n\n"
        f"def {verb}_{i}(x, y):\n    return x {op} y\n",
        f"Write a two-sentence product description of a {_COLOURS[i // 5]} {product} ({category}) that "
        f"{feature}. Start with 'The {product} is'.",
        f"Write an SQL query that selects the {_COLUMNS[i % 5]} of every row of the table {_TABLES[i % 4]} "
        f"whose id is greater than {100 * (i + 1)}, ordered by id. Answer with the query only.",
        f"Write a short, polite email to {name} confirming their appointment on {_DAYS[i % 5]} at "
        f"{9 + i % 8}:30. Sign it 'The City Clinic'.",
    ]


REPEATED = [prompt for i in range(20) for prompt in _repeated(i)]

PROMPT_SETS = {"summarise-edit": SUMMARISE_EDIT, "code-prose": CODE_PROSE, "repeated": REPEATED}
