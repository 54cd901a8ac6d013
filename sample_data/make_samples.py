"""Generate the synthetic product-review sample data shipped with batcher.

The reviews are made up: every row is composed from the sentence fragments
below with a fixed-seed ``random.Random``, so re-running this script produces
byte-identical ``reviews.csv``, ``reviews.parquet`` and ``reviews.jsonl`` next
to it (given the same pyarrow version, which is recorded in the Parquet
footer).

A handful of hand-written rows exercise awkward input: non-ASCII text, an
emoji, a comma and double quotes inside a field, and an embedded newline.

Usage::

    python sample_data/make_samples.py
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SEED = 20240501
N_REVIEWS = 300
OUT_DIR = Path(__file__).resolve().parent
COLUMNS = ["review_id", "product", "category", "rating", "title", "text"]
# Rough shape of real star ratings: skewed positive, with a small 1-star bump.
RATING_WEIGHTS = {1: 9, 2: 8, 3: 13, 4: 28, 5: 42}


@dataclass(frozen=True)
class Product:
    name: str
    category: str
    short: str  # noun used inside sentences, e.g. "charger"
    plural: bool  # "these shoes" vs "this charger"
    device: bool  # has setup, cables, a manual; gets the DEVICE_* fragments
    good: tuple[str, ...]  # product-specific praise
    bad: tuple[str, ...]  # product-specific complaints


PRODUCTS: tuple[Product, ...] = (
    Product(
        name="USB-C charger 65W",
        category="Electronics",
        short="charger",
        plural=False,
        device=True,
        good=(
            "Charges my laptop and phone at full speed at the same time.",
            "It stays cool even when charging a laptop for hours.",
            "Much smaller than the brick that came with my laptop, great for travel.",
        ),
        bad=(
            "It gets worryingly hot after twenty minutes of charging.",
            "My laptop keeps switching between charging and not charging.",
            "The prongs wobble in the socket and it falls out of the wall.",
        ),
    ),
    Product(
        name="Wireless noise-cancelling headphones",
        category="Electronics",
        short="headphones",
        plural=True,
        device=True,
        good=(
            "The noise cancelling makes my commute so much calmer.",
            "Battery life easily lasts a full week of office use.",
            "Comfortable enough to wear for a whole flight.",
        ),
        bad=(
            "The left ear cup started crackling after a month.",
            "Battery life is nowhere near the advertised 30 hours.",
            "They press hard on my ears and give me a headache after an hour.",
        ),
    ),
    Product(
        name="Smartwatch fitness tracker",
        category="Electronics",
        short="watch",
        plural=False,
        device=True,
        good=(
            "Step counting and heart rate match my chest strap closely.",
            "The battery lasts about five days with the always-on display off.",
            "Sleep tracking is surprisingly detailed.",
        ),
        bad=(
            "The app disconnects from my phone several times a day.",
            "The strap gave me a rash within a week.",
            "GPS takes forever to lock on before a run.",
        ),
    ),
    Product(
        name="Portable power bank 20000mAh",
        category="Electronics",
        short="power bank",
        plural=False,
        device=True,
        good=(
            "It charges my phone four times before it needs topping up.",
            "Handy display shows exactly how much charge is left.",
            "Survived a whole camping weekend powering two phones.",
        ),
        bad=(
            "It takes a full night to recharge the power bank itself.",
            "Much heavier than I expected from the photos.",
            "It stopped holding a charge after a few weeks.",
        ),
    ),
    Product(
        name="Mechanical keyboard",
        category="Computer accessories",
        short="keyboard",
        plural=False,
        device=True,
        good=(
            "The switches feel crisp and typing is a joy.",
            "Solid metal frame, it does not flex at all.",
            "The backlight is even and the software is easy to use.",
        ),
        bad=(
            "Two keys started double-typing within a month.",
            "It is far louder than the video made it seem.",
            "The keycaps are already shiny after a few weeks.",
        ),
    ),
    Product(
        name="Ergonomic wireless mouse",
        category="Computer accessories",
        short="mouse",
        plural=False,
        device=True,
        good=(
            "My wrist pain is noticeably better since switching.",
            "The scroll wheel is smooth and the side buttons are handy.",
            "Pairs instantly with both my laptop and desktop.",
        ),
        bad=(
            "Too small for large hands, my fingers hang off the end.",
            "The cursor stutters whenever I am more than a metre from the receiver.",
            "The right click started squeaking after a couple of weeks.",
        ),
    ),
    Product(
        name="Trail running shoes",
        category="Footwear",
        short="shoes",
        plural=True,
        device=False,
        good=(
            "Great grip on muddy and rocky trails.",
            "They fit true to size and needed no breaking in.",
            "Light and comfortable even on long runs.",
        ),
        bad=(
            "The sole started peeling off after about 100 km.",
            "They run at least half a size small.",
            "My feet get soaked because they are not waterproof at all.",
        ),
    ),
    Product(
        name="Waterproof hiking jacket",
        category="Apparel",
        short="jacket",
        plural=False,
        device=False,
        good=(
            "Stayed completely dry during a full day of rain in the hills.",
            "The hood adjusts well and does not block my view.",
            "Packs down small enough to fit in a daypack.",
        ),
        bad=(
            "Water soaked through the shoulders within an hour.",
            "The zip is flimsy and already catches on the fabric.",
            "The sleeves are strangely short for the size.",
        ),
    ),
    Product(
        name="Merino wool socks (3-pack)",
        category="Apparel",
        short="socks",
        plural=True,
        device=False,
        good=(
            "Warm, soft and they do not smell even after a few days of hiking.",
            "No blisters at all on a long walking holiday.",
            "They kept their shape after many washes.",
        ),
        bad=(
            "One pair had a hole in the heel after two weeks.",
            "They shrank a full size in the first wash.",
            "Itchier than I expected for merino.",
        ),
    ),
    Product(
        name="Yoga mat",
        category="Sports & outdoors",
        short="mat",
        plural=False,
        device=False,
        good=(
            "Thick enough to protect my knees but still stable for balance poses.",
            "Grippy even when I get sweaty.",
            "It rolls out flat straight away.",
        ),
        bad=(
            "It smelled strongly of rubber for weeks.",
            "The surface is slippery as soon as my hands get damp.",
            "It is already flaking at the edges.",
        ),
    ),
    Product(
        name="Insulated water bottle 750ml",
        category="Sports & outdoors",
        short="bottle",
        plural=False,
        device=False,
        good=(
            "Ice is still there at the end of a hot day.",
            "Coffee stays hot for hours on my commute.",
            "The lid is properly leak-proof in my bag.",
        ),
        bad=(
            "The lid leaked all over my laptop bag.",
            "The paint chipped the first time I dropped it.",
            "Drinks are lukewarm by lunchtime.",
        ),
    ),
    Product(
        name="Camping tent 2-person",
        category="Sports & outdoors",
        short="tent",
        plural=False,
        device=False,
        good=(
            "Easy to pitch alone in about ten minutes.",
            "Stayed dry through a stormy night.",
            "Light enough for backpacking.",
        ),
        bad=(
            "One of the poles snapped on the second trip.",
            "Condensation drips on us every single morning.",
            "Far too cramped for two adults and their gear.",
        ),
    ),
    Product(
        name="Espresso machine",
        category="Kitchen",
        short="machine",
        plural=False,
        device=True,
        good=(
            "Makes a proper crema and the steam wand is powerful.",
            "Heats up in under a minute.",
            "Easy to clean and looks great on the counter.",
        ),
        bad=(
            "The pump is extremely loud.",
            "It started leaking water from underneath after a month.",
            "The coffee is never hot enough, no matter the setting.",
        ),
    ),
    Product(
        name="Non-stick frying pan 28cm",
        category="Kitchen",
        short="pan",
        plural=False,
        device=False,
        good=(
            "Eggs slide right off without any oil.",
            "Heats evenly, even on my old electric hob.",
            "Still looks new after months of daily use.",
        ),
        bad=(
            "The coating started scratching after a few weeks.",
            "The base warped and now it wobbles on the hob.",
            "The handle gets too hot to touch.",
        ),
    ),
    Product(
        name="Electric kettle",
        category="Kitchen",
        short="kettle",
        plural=False,
        device=True,
        good=(
            "Boils a full kettle really quickly.",
            "Quiet and the temperature settings are great for tea.",
            "The water window is easy to read.",
        ),
        bad=(
            "The water tastes of plastic even after several boils.",
            "The lid does not close properly and it spits water.",
            "It switches off before the water actually boils.",
        ),
    ),
    Product(
        name="Chef's knife 20cm",
        category="Kitchen",
        short="knife",
        plural=False,
        device=False,
        good=(
            "Razor sharp out of the box and well balanced.",
            "It has held its edge for months.",
            "Comfortable handle, even for long prep sessions.",
        ),
        bad=(
            "It was blunt out of the box.",
            "Rust spots appeared after one hand wash.",
            "The handle is loose and rattles.",
        ),
    ),
    Product(
        name="Robot vacuum cleaner",
        category="Home",
        short="vacuum",
        plural=False,
        device=True,
        good=(
            "It handles pet hair on our carpets really well.",
            "The app scheduling works perfectly.",
            "It maps the flat accurately and avoids stairs.",
        ),
        bad=(
            "It gets stuck under the sofa every single day.",
            "The battery only lasts for half of our small flat.",
            "It keeps losing the Wi-Fi connection.",
        ),
    ),
    Product(
        name="LED desk lamp",
        category="Home",
        short="lamp",
        plural=False,
        device=True,
        good=(
            "Bright, even light with no flicker.",
            "Love the adjustable colour temperature.",
            "The USB port on the base is a nice touch.",
        ),
        bad=(
            "It flickers noticeably at low brightness.",
            "The arm slowly droops and will not stay in position.",
            "The touch buttons are very unresponsive.",
        ),
    ),
    Product(
        name="Memory foam pillow",
        category="Home",
        short="pillow",
        plural=False,
        device=False,
        good=(
            "My neck pain is gone after a week.",
            "Firm but comfortable, keeps its shape.",
            "The cover is soft and washes well.",
        ),
        bad=(
            "It had a chemical smell that never went away.",
            "Far too high for a side sleeper like me.",
            "It went flat within a month.",
        ),
    ),
    Product(
        name="Kids' building blocks set",
        category="Toys",
        short="set",
        plural=False,
        device=False,
        good=(
            "My kids have played with it every day since it arrived.",
            "The pieces fit well with the big-brand blocks.",
            "Bright colours and good sturdy pieces.",
        ),
        bad=(
            "Several pieces were missing from the box.",
            "The pieces do not click together properly.",
            "The instructions skip steps and the kids got frustrated.",
        ),
    ),
)

# Fragments about delivery, service, value and packaging that fit any product.
GENERIC_GOOD = (
    "Arrived a day earlier than promised.",
    "Delivery was quick and the box was in perfect condition.",
    "Shipping took {days} days, which is faster than I expected.",
    "Customer service answered my question within an hour.",
    "The first order was faulty and support sent a replacement with no fuss.",
    "Great value for the price.",
    "Cheaper than the big brands and honestly just as good.",
    "Nice packaging with very little plastic.",
    "The quality is better than I expected at this price.",
)
GENERIC_BAD = (
    "Delivery took almost {weeks} weeks with no tracking updates.",
    "The box arrived crushed and the {short} inside got damaged.",
    "The courier left the parcel in the rain outside my door.",
    "Customer service took {days} days to reply and then sent a generic template.",
    "Support keeps asking me for photos I already sent.",
    "Way overpriced for what you get.",
    "For this price I expected much better quality.",
    "Far too much plastic packaging.",
    "It looks nothing like the photos on the listing.",
)
# Extra fragments that only make sense for gadgets and appliances.
DEVICE_GOOD = (
    "The instructions were clear and setup took five minutes.",
    "Build quality feels premium.",
    "The firmware update fixed the one bug I noticed.",
)
DEVICE_BAD = (
    "The manual is badly translated and almost useless.",
    "It feels cheap and hollow in the hand.",
    "It was dead on arrival and the replacement is not much better.",
)
MINOR_GRIPES = (
    "I only wish there were more colours to choose from.",
    "Delivery was a couple of days late, but that is not the seller's fault.",
    "The packaging was a bit excessive.",
    "Slightly pricier than similar options.",
    "It took a few days to get used to.",
)
DEVICE_GRIPES = (
    "My only complaint is that the cable is a bit short.",
    "The instructions could be clearer.",
    "The status light is too bright at night.",
)
OPENERS = (
    "I bought {this} {weeks} weeks ago.",
    "Bought {this} as a gift for my {relative}.",
    "This is my second purchase from this brand.",
    "I needed a replacement for my old {short}.",
    "Ordered {this} after reading a lot of reviews.",
    "I have been using {this} almost daily for {months} months now.",
    "I did a lot of research before choosing {this}.",
    "Picked {this} up in a sale.",
)
CLOSERS = {
    "good": ("Highly recommend.", "Would buy again.", "Very happy with {it}.", "No regrets."),
    "mixed": (
        "It's okay for the price.",
        "Not bad, not great.",
        "Might return {it}, still deciding.",
        "Does the job, nothing more.",
    ),
    "bad": (
        "Returning {it}.",
        "Would not recommend.",
        "Save your money.",
        "Very disappointed.",
        "Already asked for a refund.",
    ),
}
TITLES = {
    5: (
        "Excellent",
        "Love it",
        "Best {short} I've owned",
        "Exactly what I needed",
        "Highly recommend",
        "Great {short}",
        "Perfect",
        "Five stars",
    ),
    4: (
        "Very good",
        "Solid {short}",
        "Good value",
        "Happy with it overall",
        "Almost perfect",
        "Does what it says",
        "Pretty good",
    ),
    3: (
        "It's okay",
        "Mixed feelings",
        "Average",
        "Decent but not great",
        "Fine for the price",
        "Could be better",
    ),
    2: ("Disappointing", "Not as described", "Expected better", "Meh", "Wouldn't buy again"),
    1: ("Terrible", "Broke after {days} days", "Do not buy", "Waste of money", "Avoid"),
}
RELATIVES = ("sister", "dad", "partner", "mum", "brother", "best friend", "son", "daughter")

# Hand-written rows that exercise encoding and CSV quoting: {review number: row}.
QUIRKS: dict[int, dict[str, str | int]] = {
    17: {
        "product": "Electric kettle",
        "rating": 5,
        "title": "Très bien",
        "text": "Très bien, livraison rapide. La bouilloire chauffe vite et ne fait pas de bruit.",
    },
    58: {
        "product": "Wireless noise-cancelling headphones",
        "rating": 5,
        "title": "Love these 😍",
        "text": "Absolutely love these 😍 The noise cancelling works great on the train. "
        "Would buy again 👍",
    },
    123: {
        "product": "USB-C charger 65W",
        "rating": 2,
        "title": 'Not really "65W"',
        "text": 'The listing says "fast charging, up to 65W", but my laptop only ever '
        'shows "slow charger connected". Returning it.',
    },
    241: {
        "product": "Trail running shoes",
        "rating": 4,
        "title": "Pros and cons",
        "text": "Pros: light, grippy on wet rock, comfortable straight away.\n"
        "Cons: the laces keep coming undone.",
    },
}


def sentiment(rating: int) -> str:
    """Map a star rating to the mood of the fragments used for it."""
    if rating <= 2:
        return "bad"
    return "mixed" if rating == 3 else "good"


def pick(rng: random.Random, product: Product, good: bool) -> str:
    """Pick one aspect sentence: usually product-specific, sometimes generic."""
    if rng.random() < 0.35:
        pool: tuple[str, ...] = GENERIC_GOOD if good else GENERIC_BAD
        if product.device:
            pool += DEVICE_GOOD if good else DEVICE_BAD
        return rng.choice(pool)
    return rng.choice(product.good if good else product.bad)


def compose_text(rng: random.Random, product: Product, rating: int) -> str:
    """Build 1-4 sentences whose tone matches the star rating."""
    mood = sentiment(rating)
    if mood == "mixed":
        body = [pick(rng, product, good=True), pick(rng, product, good=False)]
        rng.shuffle(body)
    else:
        good = mood == "good"
        body = [pick(rng, product, good)]
        if rng.random() < 0.5:
            body.append(pick(rng, product, good))
        if rating == 4 and rng.random() < 0.4:
            body.append(rng.choice(MINOR_GRIPES + (DEVICE_GRIPES if product.device else ())))
    body = list(dict.fromkeys(body))  # drop an accidental repeat, keep order

    sentences = body
    if len(sentences) < 4 and rng.random() < 0.45:
        sentences = [rng.choice(OPENERS), *sentences]
    if len(sentences) < 4 and rng.random() < 0.5:
        sentences = [*sentences, rng.choice(CLOSERS[mood])]
    return " ".join(sentences)


def fill(template: str, rng: random.Random, product: Product) -> str:
    """Substitute the placeholders used by the fragments."""
    return template.format(
        this=("these " if product.plural else "this ") + product.short,
        short=product.short,
        it="them" if product.plural else "it",
        relative=rng.choice(RELATIVES),
        days=rng.randint(2, 12),
        weeks=rng.randint(2, 6),
        months=rng.randint(2, 18),
    )


def make_rows(seed: int = SEED, n: int = N_REVIEWS) -> list[dict[str, str | int]]:
    """Generate ``n`` review rows (dicts keyed by ``COLUMNS``) from ``seed``."""
    rng = random.Random(seed)
    by_name = {p.name: p for p in PRODUCTS}
    ratings, weights = zip(*RATING_WEIGHTS.items(), strict=True)
    rows: list[dict[str, str | int]] = []
    seen: set[str] = set()
    for i in range(1, n + 1):
        if i in QUIRKS:
            quirk = QUIRKS[i]
            product = by_name[str(quirk["product"])]
            row = {"review_id": f"R{i:04d}", "category": product.category, **quirk}
        else:
            product = rng.choice(PRODUCTS)
            rating = rng.choices(ratings, weights)[0]
            text = fill(compose_text(rng, product, rating), rng, product)
            while text in seen:  # keep every text unique
                text = fill(compose_text(rng, product, rating), rng, product)
            row = {
                "review_id": f"R{i:04d}",
                "product": product.name,
                "category": product.category,
                "rating": rating,
                "title": fill(rng.choice(TITLES[rating]), rng, product),
                "text": text,
            }
        seen.add(str(row["text"]))
        rows.append({col: row[col] for col in COLUMNS})
    return rows


def write_csv(rows: list[dict[str, str | int]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=COLUMNS, quoting=csv.QUOTE_MINIMAL, lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)


def write_jsonl(rows: list[dict[str, str | int]], path: Path) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_parquet(rows: list[dict[str, str | int]], path: Path) -> None:
    schema = pa.schema(
        [
            ("review_id", pa.string()),
            ("product", pa.string()),
            ("category", pa.string()),
            ("rating", pa.int64()),
            ("title", pa.string()),
            ("text", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)


def main() -> None:
    rows = make_rows()
    write_csv(rows, OUT_DIR / "reviews.csv")
    write_parquet(rows, OUT_DIR / "reviews.parquet")
    write_jsonl(rows, OUT_DIR / "reviews.jsonl")
    print(f"wrote {len(rows)} reviews to {OUT_DIR}")


if __name__ == "__main__":
    main()
