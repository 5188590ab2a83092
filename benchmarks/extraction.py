"""A schema-heavy workload: extract the facts of a short paragraph into a given JSON schema.

Ten record kinds (person, product, event, ...) with 4-6 fields each, five paragraphs per kind: 50
schema x paragraph tasks. Strings carry `maxLength` and numbers bounds, as schemas written for
extraction do, so an answer ends within a few dozen tokens even when a small model rambles inside a
string. `check(task, text)` says whether an answer parses and matches its schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import jsonschema


def _str(max_length: int = 40) -> dict:
    return {"type": "string", "maxLength": max_length}


def _int(low: int, high: int) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high}


def _object(**properties: dict) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


# kind -> (schema, paragraph template, five rows of values for the template)
KINDS: dict[str, tuple[dict, str, list[tuple]]] = {
    "person": (
        _object(name=_str(), age=_int(0, 120), city=_str(), employed={"type": "boolean"}),
        "{0} is {1} years old and lives in {2}. {3}",
        [("Maria Lopez", 34, "Madrid", "She works as a nurse."), ("Tom Becker", 71, "Hamburg", "He retired last year."),
         ("Aiko Tanaka", 28, "Osaka", "She is a software engineer."), ("Liam Walsh", 19, "Cork", "He is a student."),
         ("Sara Nilsson", 45, "Uppsala", "She runs a bakery.")],
    ),
    "product": (
        _object(name=_str(), price=_int(0, 100000), currency={"enum": ["USD", "EUR", "GBP"]},
                in_stock={"type": "boolean"}),
        "The {0} costs {1} {2}. {3}",
        [("Aurora desk lamp", 49, "EUR", "It is sold out."), ("Trail runner shoes", 120, "USD", "Plenty are in stock."),
         ("Espresso maker", 230, "GBP", "Two are left."), ("Wool scarf", 35, "EUR", "It ships today."),
         ("Noise-cancelling headphones", 299, "USD", "Out of stock until May.")],
    ),
    "event": (
        _object(title=_str(), month={"enum": ["January", "February", "March", "April", "May", "June", "July",
                                              "August", "September", "October", "November", "December"]},
                day=_int(1, 31), venue=_str(), free={"type": "boolean"}),
        "{0} takes place on {1} {2} at {3}. {4}",
        [("The spring book fair", "April", 12, "the city library", "Entry is free."),
         ("Jazz by the river", "July", 3, "Riverside Park", "Tickets cost 20 dollars."),
         ("The robotics meetup", "October", 21, "Hall B of the tech campus", "Admission is free."),
         ("A winter market", "December", 8, "the old town square", "Stalls charge no entry fee."),
         ("The charity gala", "March", 30, "the Grand Hotel", "Seats are 150 euros each.")],
    ),
    "address": (
        _object(street=_str(), number=_int(1, 9999), postcode=_str(10), city=_str(), country=_str()),
        "Send the parcel to {0} {1}, {2} {3}, {4}.",
        [("Baker Street", 221, "NW1 6XE", "London", "United Kingdom"),
         ("Rue de Rivoli", 99, "75001", "Paris", "France"), ("Main Street", 1200, "94105", "San Francisco", "USA"),
         ("Via Roma", 7, "10121", "Turin", "Italy"), ("Karl-Marx-Allee", 34, "10178", "Berlin", "Germany")],
    ),
    "book": (
        _object(title=_str(), author=_str(), year=_int(1400, 2030), pages=_int(1, 5000)),
        "{1} wrote {0}, published in {2}; it runs to {3} pages.",
        [("The Quiet Orchard", "Helen Marsh", 1998, 312), ("Rivers of Salt", "Omar Haddad", 2011, 458),
         ("A Map of Small Things", "Jun Park", 2020, 204), ("The Clockmaker", "Ines Duarte", 1987, 390),
         ("Northern Lights", "Erik Lund", 2005, 276)],
    ),
    "weather": (
        _object(city=_str(), temperature_c=_int(-60, 60),
                condition={"enum": ["sunny", "cloudy", "rain", "snow", "fog"]},
                wind_kmh=_int(0, 300)),
        "In {0} it is {1} degrees Celsius with {2} today, and the wind blows at {3} km/h.",
        [("Oslo", -4, "snow", 22), ("Lisbon", 24, "sunny", 10), ("Seattle", 11, "rain", 30),
         ("Dublin", 9, "cloudy", 41),
         ("San Francisco", 15, "fog", 18)],
    ),
    "order": (
        _object(order_id=_str(12), item=_str(), quantity=_int(1, 1000), express={"type": "boolean"}),
        "Order {0}: {2} x {1}. {3}",
        [("A-1042", "printer paper", 10, "Ship it by express courier."),
         ("B-7710", "USB cable", 3, "Standard shipping."),
         ("C-0031", "office chair", 1, "Express delivery requested."), ("D-5120", "coffee beans", 24, "No rush."),
         ("E-9902", "whiteboard marker", 50, "Needed tomorrow, use express.")],
    ),
    "flight": (
        _object(flight=_str(8), origin=_str(), destination=_str(), hour=_int(0, 23), delayed={"type": "boolean"}),
        "Flight {0} from {1} to {2} leaves at {3}:00. {4}",
        [("LH123", "Frankfurt", "New York", 9, "It is on time."), ("BA456", "London", "Rome", 14, "It is delayed."),
         ("AF789", "Paris", "Tokyo", 22, "Boarding starts soon."),
         ("KL210", "Amsterdam", "Nairobi", 6, "Delayed by fog."),
         ("IB333", "Madrid", "Lima", 23, "On schedule.")],
    ),
    "movie": (
        _object(title=_str(), director=_str(), year=_int(1880, 2030), rating=_int(1, 10)),
        "{0}, directed by {1} in {2}, gets {3} out of 10 from our critic.",
        [("Glass Harbour", "Nora Quinn", 2016, 8), ("The Last Ferry", "Paolo Greco", 1994, 7),
         ("Sunday Static", "Lena Vogel", 2022, 6), ("Iron Meadow", "Kwame Mensah", 2009, 9),
         ("Paper Moons", "Ruth Alder", 1978, 5)],
    ),
    "recipe": (
        _object(dish=_str(), servings=_int(1, 50), minutes=_int(1, 600), vegetarian={"type": "boolean"}),
        "This {0} serves {1} and takes {2} minutes. {3}",
        [("lentil soup", 4, 45, "It contains no meat."), ("beef stew", 6, 150, "It uses beef."),
         ("mushroom risotto", 2, 35, "It is vegetarian."), ("fish tacos", 3, 25, "It uses cod."),
         ("pancakes", 8, 20, "No meat at all.")],
    ),
}


@dataclass(frozen=True)
class Task:
    kind: str
    schema: dict
    paragraph: str

    @property
    def messages(self) -> list[dict]:
        instruction = (f"Extract the {self.kind} described below as JSON with the fields "
                       f"{', '.join(self.schema['properties'])}.\n\n{self.paragraph}")
        return [{"role": "user", "content": instruction}]


def tasks() -> list[Task]:
    """The 50 tasks, kind by kind."""
    return [Task(kind, schema, template.format(*row)) for kind, (schema, template, rows) in KINDS.items()
            for row in rows]


def check(task: Task, text: str) -> bool:
    """Whether `text` is JSON that matches the task's schema."""
    try:
        jsonschema.validate(json.loads(text), task.schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True
