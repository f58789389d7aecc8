"""Generate Postroom's shipped sample of labelled customer-support tickets.

Writes two files under ``postroom/data/``:

* ``support_tickets.labels.json``: the eight labels, each with a one-sentence description that
  is embedded as the label text for zero-shot classification;
* ``support_tickets.jsonl``: 640 short tickets (80 per label), one JSON object per line, in a
  fixed shuffled order.

Every ticket is written by this script from templates and slot fillers (no downloaded data), and
the output is deterministic: running ``python bench/make_sample.py`` again rewrites both files
byte-identically.
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "postroom" / "data"
LABELS_PATH = DATA_DIR / "support_tickets.labels.json"
TICKETS_PATH = DATA_DIR / "support_tickets.jsonl"
SEED = 7
PER_LABEL = 80
MIN_WORDS, MAX_WORDS = 15, 60

LABELS = {
    "billing": "Questions about invoices, charges on my card, payment methods, pricing, VAT and "
    "billing errors on the account.",
    "technical": "Technical problems with the app or software: bugs, error messages, crashes, "
    "slow loading, sync failures, outages and API issues.",
    "shipping": "Questions about delivery and shipping: tracking numbers, late or lost packages, "
    "couriers, delivery addresses and shipping times.",
    "account": "Problems signing in to or managing a user account: passwords, login, two-factor "
    "codes, email changes, profile settings and locked accounts.",
    "refund": "Requests to get my money back: refunds for returned or faulty items, duplicate "
    "charges, and the status of a refund.",
    "product_question": "Questions before buying about product features, specs, compatibility, "
    "sizes, stock availability and how a product works.",
    "feedback": "General feedback, praise, compliments, complaints and suggestions for "
    "improvement about the product or the service experience.",
    "cancellation": "Requests to cancel or end a subscription or membership, stop auto-renewal, "
    "or cancel an order or plan.",
}

SLOTS = {
    "app": ["Acme Cloud", "the Postroom app", "Postroom Pro", "Acme Sync", "the Acme desktop client",
            "Acme Drive", "the Acme mobile app", "Postroom Teams"],
    "item": ["Acme Kettle 2", "the Orbit headphones", "a Nimbus backpack", "the Acme Hub router",
             "two Luma desk lamps", "the TrailPro hiking boots", "a Postroom label printer",
             "the Acme smart plug"],
    "plan": ["Pro plan", "Business plan", "annual plan", "Family plan", "Starter plan",
             "Premium membership"],
    "amount": ["$12.99", "$49", "$79.00", "€19.90", "£35", "$240", "$9.99", "€120"],
    "when": ["yesterday", "last week", "on Monday", "three days ago", "this morning",
             "on the 3rd", "two weeks ago", "last month"],
    "device": ["iPhone 14", "Pixel 8", "Windows 11 laptop", "MacBook", "iPad", "Chromebook",
               "Samsung tablet"],
    "error": ["error 500", "'Something went wrong'", "error code E-1042", "a blank white screen",
              "'Connection timed out'", "a 403 Forbidden error"],
    "courier": ["UPS", "DHL", "FedEx", "Royal Mail", "USPS", "the courier"],
}

TEMPLATES = {
    "billing": [
        "I was charged {amount} on my card {when} but my invoice for the {plan} says a "
        "different price.",
        "Can you send me a proper invoice for {amount} with our company VAT number on it?",
        "My credit card payment keeps getting declined when I try to pay for the {plan}.",
        "How do I change the payment method on my account from PayPal to a credit card?",
        "Why did the price of the {plan} go up? My last bill was higher than before.",
        "There is a charge of {amount} on my statement from {when} that I don't recognise, "
        "what is it for?",
        "Where can I download past invoices and receipts for {app}? Our accountant needs them.",
        "The billing page shows an unpaid balance of {amount} even though the payment went "
        "through.",
        "I need to update the billing address and tax ID that appear on our invoices.",
        "Is sales tax included in the price of the {plan} or added at checkout?",
        "My invoice lists 5 seats but we only pay for 3, can someone fix the billing?",
        "Do you accept bank transfer or only card payments for the {plan}?",
    ],
    "technical": [
        "{app} keeps crashing every time I open it on my {device}.",
        "I'm getting {error} when I try to upload a file in {app}.",
        "Sync stopped working in {app} {when}, changes on my {device} never show up.",
        "The dashboard in {app} takes forever to load and then shows {error}.",
        "After the latest update {app} freezes on the loading screen on my {device}.",
        "Your API returns {error} for every request since {when}, is there an outage?",
        "Notifications from {app} stopped working on my {device} after the update.",
        "The export button in {app} does nothing, the CSV download never starts.",
        "Is {app} down? Nothing loads and I just get {error}.",
        "The webhook integration with Slack broke {when} and events are not delivered anymore.",
        "Search in {app} returns no results even for files I can see in the folder, looks "
        "like a bug.",
        "{app} uses 100% CPU on my {device} and the fan never stops.",
    ],
    "shipping": [
        "My package with {item} was supposed to arrive {when} but it still hasn't been "
        "delivered.",
        "The tracking number for order #{order} hasn't updated in days, where is my parcel?",
        "{courier} says my order #{order} was delivered but there is no package at my door.",
        "Can I change the delivery address for order #{order}? It hasn't shipped yet.",
        "How long does shipping to Canada usually take for {item}?",
        "I ordered {item} {when} and still have no tracking info or shipping confirmation.",
        "The box arrived damaged by {courier} and {item} inside was crushed in transit.",
        "Do you offer express delivery? I need {item} shipped before Friday.",
        "My parcel is stuck at the {courier} depot and the delivery date keeps moving.",
        "Only half of order #{order} arrived, the second package with {item} is missing.",
        "Which courier do you ship with, and can I pick up the parcel at a locker instead?",
        "The shipment for order #{order} was returned to sender because of a wrong postcode.",
    ],
    "account": [
        "I can't log in to {app}, it says my password is incorrect even after resetting it.",
        "The password reset email never arrives, I've checked my spam folder too.",
        "My account got locked after too many login attempts, can you unlock it?",
        "I lost my phone and can't get the two-factor code to sign in to {app}.",
        "How do I change the email address on my {app} account?",
        "Someone else may have logged into my account {when}, I got a sign-in alert from "
        "another country.",
        "I want to change my username and profile picture but the settings page won't save.",
        "How do I add a second user to our {app} account and give them admin access?",
        "I signed up with Google and now I can't log in with my email and password.",
        "Can you merge my two {app} accounts? I accidentally created a second login.",
        "The verification link to activate my new account has expired.",
        "Please delete my personal data and profile from {app}, I don't use the account "
        "anymore.",
    ],
    "refund": [
        "I returned {item} {when}, when will I get my money back?",
        "I was charged twice for order #{order}, please refund the duplicate payment of "
        "{amount}.",
        "{item} arrived broken and I'd like a full refund instead of a replacement.",
        "It's been two weeks since you approved my return and the refund of {amount} still "
        "isn't on my card.",
        "I'd like my money back for the {plan}, I bought it by mistake {when} and never used "
        "it.",
        "Can I get a refund for order #{order}? {item} is not what I expected.",
        "You said the refund was issued but my bank shows nothing, can you send the "
        "transaction reference?",
        "I only got a partial refund of {amount} for my return, the shipping cost wasn't "
        "refunded.",
        "The return label is printed and {item} is on its way back, please process the "
        "refund.",
        "Please reimburse the {amount} I paid for express delivery, order #{order} came a "
        "week late.",
        "Can the refund go to my PayPal instead of store credit?",
        "I want a refund for {item}, it stopped working after three days.",
    ],
    "product_question": [
        "Does {item} work with a {device}? I want to check before I buy.",
        "What's the battery life of the Orbit headphones, and do they support noise "
        "cancelling?",
        "Is {item} available in other colours, or only black?",
        "What size should I order in the TrailPro boots if I'm normally a 43?",
        "When will {item} be back in stock? It's been sold out for a while.",
        "What is the difference between the {plan} and the Starter plan in features?",
        "Can {app} be used offline, or does it need an internet connection all the time?",
        "Is {item} waterproof? I'm thinking about buying it for camping.",
        "Does {app} support single sign-on and how many users can a team have?",
        "What are the dimensions and weight of {item}?",
        "Does {item} come with a warranty, and what's included in the box?",
        "Can {app} import data from spreadsheets, or do I have to enter everything by hand?",
    ],
    "feedback": [
        "Just wanted to say {app} is great, it saves our team hours every week.",
        "Your support agent Maria was super helpful {when}, please pass on my thanks.",
        "Honestly the new design of {app} is worse, everything takes more clicks now.",
        "It would be great if {app} had a dark mode, my eyes would thank you.",
        "I love {item}, best purchase I've made this year.",
        "Suggestion: let us schedule reports in {app}, that would make it perfect for us.",
        "I'm disappointed with how long it took to get an answer from support, five days is "
        "too long.",
        "The onboarding tutorial in {app} was really clear, nice job.",
        "Please bring back the old sidebar, the new layout in {app} is confusing.",
        "Quick feedback on {item}: great quality, but the instructions could be clearer.",
        "Five stars for the quick response {when}, really impressed with your team.",
        "Not a problem, just an idea: a keyboard shortcut for search would make {app} even "
        "better.",
    ],
    "cancellation": [
        "Please cancel my {plan} subscription, I don't need it anymore.",
        "How do I cancel my {app} subscription before it renews next month?",
        "I want to cancel order #{order}, I placed it by mistake {when}.",
        "Please turn off auto-renewal on my {plan}, I won't be continuing after this year.",
        "We're moving to another tool, please close our {app} subscription at the end of the "
        "month.",
        "Can I still cancel order #{order} or has it already shipped?",
        "I'd like to end my {plan} membership, where is the cancel button?",
        "I tried to cancel my subscription in the settings but it still says active.",
        "Please stop my {plan} from renewing and confirm the cancellation by email.",
        "Cancel my trial of {app} please, I don't want to be moved to a paid plan.",
        "I need to cancel the {plan} for our whole team, we are shutting down the project.",
        "Is there a cancellation fee if I end my {plan} contract early?",
    ],
}

# Optional second sentences that add detail without changing the topic.
EXTRAS = {
    "billing": ["Can you check the billing on my account?", "Please correct the invoice.",
                "I need this sorted before our finance team closes the month.",
                "The payment was made with a Visa ending in 4421."],
    "technical": ["I already tried reinstalling and clearing the cache.",
                  "Restarting didn't help.", "Screenshots attached.",
                  "This is blocking my whole team from working."],
    "shipping": ["I really need it for a birthday this weekend.",
                 "The tracking page just says 'in transit'.",
                 "Can you contact the courier for me?", "I paid for standard shipping."],
    "account": ["I still have access to my email inbox.",
                "I need to get into my account today.",
                "My username is the same as my email.", "I've tried three different browsers."],
    "refund": ["I'd prefer the money back on the original card.",
               "I have the receipt and the return confirmation.",
               "Please let me know when the refund is processed.",
               "I don't want store credit."],
    "product_question": ["I'm deciding between this and a competitor.",
                         "Thinking of ordering a few for the office.",
                         "Couldn't find this on the product page.",
                         "It would be a gift so I want to be sure."],
    "feedback": ["Keep up the good work!", "No reply needed, just wanted to share.",
                 "Hope this helps you improve.", "I've recommended you to a few friends."],
    "cancellation": ["Please confirm once it's cancelled.",
                     "I don't want to be charged again.",
                     "No need to offer a discount, I've decided.",
                     "My account email is the one I'm writing from."],
}

OPENERS = ["", "", "", "Hi,", "Hello,", "Hi there,", "hey,", "Good morning,", "Hi support,",
           "Hello team,"]
CLOSERS = ["", "", "", "Thanks!", "Thank you.", "thx", "Thanks in advance.", "Cheers,",
           "Regards,", "Please help."]
NAMES = ["Dana", "Raj", "Sofia", "Tom", "Aiko", "Marek", "Lena", "Chris", "Priya", "Olu"]
CASUAL = [("please", "pls"), ("you", "u"), ("received", "recieved"), ("the ", "teh "),
          ("I'm", "im"), ("don't", "dont"), ("because", "bc"), ("really", "realy")]


def fill(template: str, rng: random.Random) -> str:
    """Fill a template's slots with random values."""
    values = {key: rng.choice(options) for key, options in SLOTS.items()}
    values["order"] = str(rng.randint(10000, 99999))
    text = template.format(**values)
    return text[0].upper() + text[1:]


def casualise(text: str, rng: random.Random) -> str:
    """Add a typo or two and sometimes lower-case the whole message, as people do."""
    for old, new in rng.sample(CASUAL, 2):
        if old in text and rng.random() < 0.6:
            text = text.replace(old, new, 1)
    if rng.random() < 0.4:
        text = text.lower()
    return text


def make_ticket(label: str, rng: random.Random) -> str:
    """Compose one ticket text: opener, core sentence, optional detail, closer and name."""
    parts = [rng.choice(OPENERS), fill(rng.choice(TEMPLATES[label]), rng)]
    if rng.random() < 0.5:
        parts.append(rng.choice(EXTRAS[label]))
    closer = rng.choice(CLOSERS)
    if closer:
        parts.append(closer)
        if closer.endswith(",") or rng.random() < 0.3:
            parts.append(rng.choice(NAMES))
    text = " ".join(p for p in parts if p)
    if rng.random() < 0.25:
        text = casualise(text, rng)
    return text


def generate(rng: random.Random) -> list[dict[str, str]]:
    """Return the shuffled, numbered tickets, PER_LABEL unique ones for each label."""
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    for label in LABELS:
        count = 0
        while count < PER_LABEL:
            text = make_ticket(label, rng)
            if text in seen or not MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                continue
            seen.add(text)
            rows.append((text, label))
            count += 1
    rng.shuffle(rows)
    return [
        {"id": f"t{i:04d}", "text": text, "label": label}
        for i, (text, label) in enumerate(rows, start=1)
    ]


def main() -> None:
    rng = random.Random(SEED)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    labels = [{"name": name, "description": desc} for name, desc in LABELS.items()]
    LABELS_PATH.write_text(json.dumps(labels, ensure_ascii=False, indent=2) + "\n",
                           encoding="utf-8")
    tickets = generate(rng)
    lines = [json.dumps(t, ensure_ascii=False) for t in tickets]
    TICKETS_PATH.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(labels)} labels to {LABELS_PATH.relative_to(ROOT)}")
    print(f"wrote {len(tickets)} tickets to {TICKETS_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
