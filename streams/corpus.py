"""A seeded, realistic English corpus for the demo, tests and benchmarks.

Texts read like what teams embed: support tickets, product reviews, news briefs, recipe
notes and documentation snippets, of mixed lengths. The same seed gives the same texts.
"""

from __future__ import annotations

import random
from typing import Iterator

_PRODUCTS = ["wireless headphones", "standing desk", "espresso machine", "running shoes", "laptop stand",
             "electric kettle", "air purifier", "mechanical keyboard", "backpack", "smart thermostat",
             "robot vacuum", "yoga mat", "e-reader", "camping tent", "blender"]
_FEELINGS = ["works exactly as described", "stopped working after two weeks", "is well worth the price",
             "arrived with a cracked housing", "feels sturdy and well made", "is louder than I expected",
             "exceeded my expectations", "was difficult to assemble", "has excellent battery life",
             "came without the promised accessories"]
_TICKET_ISSUES = ["cannot reset my password", "was charged twice for the same order",
                  "the mobile app crashes on start-up", "my invoice shows the wrong address",
                  "the export to CSV times out", "two-factor codes never arrive by SMS",
                  "the dashboard loads without any data", "I want to cancel my subscription",
                  "the API returns error 429 all the time", "a teammate cannot accept the invitation"]
_NEWS_SUBJECTS = ["The city council", "A regional hospital", "The central bank", "Local farmers",
                  "A university research team", "The transit authority", "Volunteers", "The football club",
                  "A software start-up", "The national weather service"]
_NEWS_ACTIONS = ["approved a new budget for road repairs", "reported a record harvest despite the drought",
                 "raised interest rates by a quarter point", "opened a new cancer treatment wing",
                 "published a study on sleep and memory", "announced later night services on weekends",
                 "planted two thousand trees along the river", "signed a young striker from abroad",
                 "closed a funding round led by European investors", "warned of heavy snow in the mountains"]
_RECIPES = ["Roast the peppers until the skins blister, then peel and slice them.",
            "Whisk the eggs with a pinch of salt before folding in the flour.",
            "Simmer the lentils with cumin and garlic for twenty minutes.",
            "Let the dough rest overnight in the fridge for a better crust.",
            "Toast the rice in olive oil before adding the stock a ladle at a time.",
            "Marinate the chicken in yoghurt, lemon and paprika for at least an hour."]
_DOCS = ["To rotate the credentials, create a new key, deploy it, then revoke the old one.",
         "The consumer commits offsets only after the result has been acknowledged.",
         "Set the memory budget below the container limit to leave room for the model.",
         "Backups run nightly and are kept for thirty days in a separate region.",
         "Use the staging environment to test schema changes before production.",
         "Rate limits apply per API key and reset at the start of every minute.",
         "Indexes speed up reads but slow down writes, so add them where queries need them."]
_DETAILS = ["I contacted support twice and got no answer.", "This happened on both of my devices.",
            "Please advise on the next steps.", "The team reacted quickly and fixed it within a day.",
            "Officials expect the work to finish before the summer.", "Critics say the plan does not go far enough.",
            "Serve it warm with a green salad.", "The same steps apply to every region.",
            "We have already tried restarting and clearing the cache.", "Residents were invited to comment online."]


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"The {rng.choice(_PRODUCTS)} {rng.choice(_FEELINGS)}."
    if kind == 1:
        return f"Hello, {rng.choice(_TICKET_ISSUES)}."
    if kind == 2:
        return f"{rng.choice(_NEWS_SUBJECTS)} {rng.choice(_NEWS_ACTIONS)}."
    if kind == 3:
        return rng.choice(_RECIPES)
    return rng.choice(_DOCS)


def text(rng: random.Random, sentences: int) -> str:
    parts = [_sentence(rng)]
    parts.extend(rng.choice(_DETAILS) if rng.random() < 0.4 else _sentence(rng) for _ in range(sentences - 1))
    return " ".join(parts)


def texts(count: int, *, seed: int = 7, min_sentences: int = 1, max_sentences: int = 12) -> list[str]:
    """`count` texts of mixed lengths (short ones more common, as in real streams)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = min_sentences + int((max_sentences - min_sentences) * rng.random() ** 2.5)
        out.append(text(rng, n))
    return out


def texts_of_length(count: int, chars: int, *, seed: int = 7) -> list[str]:
    """Texts cut to about `chars` characters (at a word boundary) for length sweeps."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        body = ""
        while len(body) < chars:
            body += (" " if body else "") + _sentence(rng)
        cut = body[:chars].rsplit(" ", 1)[0] if len(body) > chars else body
        out.append(f"{cut} ({index})"[: max(chars, 8)])
    return out


def demo_events(count: int = 1200, *, seed: int = 11) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, value) pairs: mostly valid events, ~10% repeated texts, a few malformed ones."""
    import orjson

    rng = random.Random(seed)
    corpus = texts(count, seed=seed)
    for index, body in enumerate(corpus):
        if index and rng.random() < 0.10:
            body = corpus[rng.randrange(index)]
        event = {"id": f"doc-{index:05d}", "text": body, "metadata": {"source": "demo", "n": index}}
        yield f"doc-{index:05d}".encode(), orjson.dumps(event)
    malformed = [b"this is not json", b'["a", "list"]', b'{"id": "no-text"}', b'{"id": 5, "text": "id is a number"}',
                 b'{"id": "bad-utf8", "text": "\xff\xfe"}', b'{"id": "empty", "text": ""}']
    for value in malformed:
        yield None, value
