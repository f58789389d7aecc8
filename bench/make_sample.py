"""Generate Postroom's shipped sample of labelled customer-support tickets.

Writes two files under ``postroom/data/``:

* ``support_tickets.labels.json``: the eight labels, each with a one-sentence description that
  is embedded as the label text for zero-shot classification;
* ``support_tickets.jsonl``: 640 short tickets (80 per label), one JSON object per line, in a
  fixed shuffled order.

Every ticket is written by this script from templates and slot fillers (no downloaded data), and
the output is deterministic: running ``python bench/make_sample.py`` from the repository root
rewrites both files byte-identically.
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
    "billing": "Questions about invoices, receipts, charges on my card, declined payments, "
    "payment methods, prices, VAT and billing errors.",
    "technical": "Bug reports: the software crashes, freezes, shows error messages, loads slowly, "
    "fails to sync, or the service or API is down.",
    "shipping": "Questions about delivery and shipping: tracking numbers, late or lost packages, "
    "couriers, delivery addresses and shipping times.",
    "account": "Problems signing in to or managing a user account: passwords, login, two-factor "
    "codes, email changes, profile settings and locked accounts.",
    "refund": "Requests to get my money back: refunds for returned or faulty items, duplicate "
    "charges, and the status of a refund.",
    "product_question": "I'm thinking of buying this product: questions about features, battery "
    "life, size, colour, material, what's in the box and stock.",
    "feedback": "Customer opinions and feedback: love it, great service, thank you, complaints, "
    "suggestions and ideas for improvement.",
    "cancellation": "Requests to cancel or end a subscription or membership, stop auto-renewal, "
    "or cancel an order or plan.",
}

# Slot fillers, "|"-separated to keep the lists compact.
SLOTS = {
    "app": "Acme Cloud|Postroom|Postroom Pro|Acme Sync|Acme Desktop|Acme Drive|Acme Mobile"
    "|Postroom Teams",
    "item": "the Acme Kettle 2|the Orbit X headset|the Nimbus backpack|the Acme Hub router"
    "|the Luma desk lamp|the TrailPro rain jacket|the Postroom label printer|the Acme smart plug",
    "plan": "Pro plan|Business plan|annual plan|Family plan|Starter plan|Premium membership",
    "amount": "$12.99|$49|$79.00|€19.90|£35|$240|$9.99|€120",
    "when": "yesterday|last week|on Monday|three days ago|this morning|two weeks ago|last month",
    "device": "iPhone 14|Pixel 8|Windows 11 laptop|MacBook|iPad|Chromebook|Samsung tablet",
    "error": "error 500|'Something went wrong'|error code E-1042|'Unexpected token'"
    "|'Connection timed out'|a 403 Forbidden error",
    "courier": "UPS|DHL|FedEx|Royal Mail|USPS|the courier",
}

# One core sentence per line; {slot} placeholders are filled from SLOTS, {order} is a number.
TEMPLATES = {
    "billing": """
I was charged {amount} on my card {when} but my invoice for the {plan} shows a different price.
Can you send me a proper invoice for {amount} with our company VAT number on it?
My credit card payment keeps getting declined at checkout, why does the payment fail?
How do I change the payment method on my account from PayPal to a credit card?
Why did the price of the {plan} go up? My last bill was higher than before.
There's a charge of {amount} on my card statement I don't recognise, what is this payment for?
Where can I download past invoices and receipts for {app}? Our accountant needs them.
The billing page shows an unpaid balance of {amount} even though the payment went through.
I need to update the billing address and tax ID that appear on our invoices.
Is sales tax included in the price of the {plan} or added at checkout?
My invoice lists 5 seats but we only pay for 3, can someone fix the billing?
Do you accept bank transfer or only card payments for the {plan}?
We got two invoices for the {plan} this month, can you explain the difference?
Can I switch from monthly to annual billing and pay for the {plan} by invoice?
The invoice for my {amount} payment shows the wrong company name, can you reissue it?
What payment methods do you accept? My Amex card isn't listed at checkout.
""",
    "technical": """
{app} keeps crashing every time I open it on my {device}.
I'm getting {error} when I try to upload a file in {app}.
Sync stopped working in {app} {when}, changes on my {device} never show up.
The dashboard in {app} takes forever to load and then shows {error}.
After the latest update {app} freezes on the loading screen on my {device}.
Your API has been returning {error} for every request since {when}, is there an outage?
Notifications from {app} stopped working on my {device} after the update.
The export button in {app} does nothing, the CSV download never starts.
Is {app} down? Nothing loads and I just get {error}.
The webhook integration with Slack broke {when} and events are not delivered anymore.
Search in {app} returns no results even for files I can see in the folder, looks like a bug.
{app} uses 100% CPU on my {device} and the fan never stops.
{app} shows a blank white screen right after I log in on my {device}.
Files uploaded to {app} come out corrupted and won't open anymore.
The page in {app} keeps spinning and then times out, I tried two different networks.
Calendar sync with Google is broken in {app} since the last release.
""",
    "shipping": """
My package with {item} was supposed to arrive {when} but it still hasn't been delivered.
The tracking number for order #{order} hasn't updated in days, where is my parcel?
{courier} says my order #{order} was delivered but there is no package at my door.
Can I change the delivery address for order #{order}? It hasn't shipped yet.
How long does shipping to Canada usually take for {item}?
I ordered {item} {when} and still have no tracking info or shipping confirmation.
The box arrived damaged by {courier} and {item} inside was crushed in transit.
Do you offer express delivery? I need {item} shipped before Friday.
My parcel is stuck at the {courier} depot and the delivery date keeps moving.
Only half of order #{order} arrived, the second package with {item} is missing.
Which courier do you ship with, and can I pick up the parcel at a locker instead?
The shipment for order #{order} was returned to sender because of a wrong postcode.
Do you ship to Ireland, and how much would shipping cost for {item}?
The courier left a note saying they tried to deliver order #{order} but I was home all day.
Tracking for order #{order} says 'label created' for a week now, has it actually shipped?
Can you deliver order #{order} to my office address instead? It's out for delivery tomorrow.
""",
    "account": """
I can't log in to {app}, it says my password is incorrect even after resetting it.
The password reset email never arrives, I've checked my spam folder too.
My account got locked after too many login attempts, can you unlock it?
I lost my phone and can't get the two-factor code to sign in to {app}.
How do I change the email address on my {app} account?
Someone else may have logged into my account {when}, I got a sign-in alert from another country.
I want to change my username and profile picture but the settings page won't save.
How do I add a second user to our {app} account and give them admin access?
I signed up with Google and now I can't log in with my email and password.
Can you merge my two {app} accounts? I accidentally created a second login.
The verification link to activate my new account has expired.
Please delete my personal data and profile from {app}, I don't use the account anymore.
I get 'invalid code' every time I enter my two-factor code for {app}.
How can I transfer ownership of our {app} account to a colleague who is taking over?
I forgot which email I used to sign up for {app}, can you help me find my account?
My {app} account shows the wrong name and I can't edit it in my profile.
""",
    "refund": """
I returned {item} {when}, when will I get my money back?
I was charged twice for order #{order}, please refund the duplicate payment of {amount}.
{item} arrived broken and I'd like a full refund instead of a replacement.
It's been two weeks since you approved my return and the refund of {amount} still isn't on my card.
I'd like my money back for the {plan}, I bought it by mistake {when} and never used it.
Can I get a refund for order #{order}? {item} is not what I expected.
You said the refund was issued but my bank shows nothing, can you send the transaction reference?
I only got a partial refund of {amount} for my return, the shipping cost wasn't refunded.
The return label is printed and {item} is on its way back, please process the refund.
Please reimburse the {amount} I paid for express delivery, order #{order} came a week late.
Can the refund go to my PayPal instead of store credit?
I want a refund for {item}, it stopped working after three days.
Your return policy says 30 days, I sent {item} back after 10, so where is my refund?
Your agent promised me a refund of {amount} {when} but the money never arrived.
The {plan} renewed without any reminder, I'd like the {amount} refunded please.
I'm still waiting for my money back for order #{order}, it was cancelled weeks ago.
""",
    "product_question": """
I'm thinking of buying {item}, but does it work with my {device}?
I'm thinking of buying the Orbit X headset. How long does the battery last, and is there a mic?
Thinking of buying {item}, what's in the box? Is a charger included?
Is {item} available in other colours, or only in black?
Is the TrailPro rain jacket true to size? I'm normally a medium and want to order the right one.
When will {item} be back in stock? I'd love to get one.
Does {app} have a mobile version? We are thinking of buying it.
Is {item} waterproof? I'm thinking of buying one for hiking.
What is {item} made of? Thinking of buying it for daily use.
Which model of {item} would you recommend for a small office? I'd like to buy a few.
Is the Nimbus backpack big enough for a 16 inch laptop? Thinking of ordering one.
I'm thinking of buying the Acme Hub router. Which features does it have, does it support Wi-Fi 6?
What's the difference between the Orbit X headset and the older Orbit model? Which should I buy?
Does the TrailPro rain jacket come in green, and what sizes do you have?
Does the Acme Kettle 2 have automatic shut-off? Considering buying it for my parents.
Is {item} a good gift for a teenager? What colours does it come in?
""",
    "feedback": """
Just wanted to say I love {app}, it saves our team hours every week. Great product!
Big thanks to your support agent Maria who helped me {when}, excellent service.
Honest feedback: the new design of {app} is worse than the old one, everything takes more clicks.
Feature suggestion: a dark mode in {app} would be a great improvement.
I love {item}, best purchase I've made this year and I'm really happy with the quality.
Idea for improvement: let us schedule reports in {app}, that would make it perfect.
I want to complain about your customer service, five days to get an answer is far too long.
Compliments to whoever designed the onboarding tutorial in {app}, it was really clear.
I don't like the new layout of {app}, please bring back the old sidebar. Just my opinion.
Some feedback on {item}: great quality, but the instructions could be clearer.
Five stars for the quick response {when}, I'm really impressed with your team.
Just a suggestion: a keyboard shortcut for search would make {app} even better.
Overall a great experience with your shop, easy checkout and friendly staff.
Your team went above and beyond {when}, thank you for the amazing service!
The new version of {app} is so much faster, whoever worked on it deserves a raise.
Not happy with your packaging, way too much plastic for such a small item.
Suggestion: send a short survey after each support chat, I'd happily fill it in.
Thank you for fixing my issue so quickly, your support team is amazing.
""",
    "cancellation": """
Please cancel my {plan} subscription, I don't need it anymore.
How do I cancel my {app} subscription before it renews next month?
I want to cancel order #{order}, I placed it by mistake {when}.
Please turn off auto-renewal on my {plan}, I won't be continuing after this year.
We're moving to another tool, please close our {app} subscription at the end of the month.
Can I still cancel order #{order} or has it already shipped?
I'd like to end my {plan} membership, where is the cancel button?
I tried to cancel my subscription in the settings but it still says active.
Please stop my {plan} from renewing and confirm the cancellation by email.
Cancel my trial of {app} please, I don't want to be moved to a paid plan.
I need to cancel the {plan} for our whole team, we are shutting down the project.
Is there a cancellation fee if I end my {plan} contract early?
I'm cancelling my {plan}, it's too expensive for us right now. Please confirm.
How do I cancel my membership? I can't find a cancel option anywhere in {app}.
Please cancel the second item in order #{order}, I only need one.
Don't renew my {plan} next year, we want to cancel the subscription.
""",
}

# Optional second sentences that add detail without changing the topic.
EXTRAS = {
    "billing": """
Can you check the billing on my account?
Please correct the invoice.
I need this sorted before our finance team closes the month.
The payment was made with a Visa ending in 4421.
""",
    "technical": """
I already tried reinstalling and clearing the cache.
Restarting didn't help.
Screenshots attached.
This is blocking my whole team from working.
""",
    "shipping": """
I really need it for a birthday this weekend.
The tracking page just says 'in transit'.
Can you contact the courier for me?
I paid for standard shipping.
""",
    "account": """
I still have access to my email inbox.
I need to get into my account today.
My username is the same as my email.
I've tried three different browsers.
""",
    "refund": """
I'd prefer the money back on the original card.
I have the receipt and the return confirmation.
Please let me know when the refund is processed.
I don't want store credit.
""",
    "product_question": """
I'm deciding between this and a competitor.
I couldn't find this in the product specs.
Couldn't find this on the product page.
Just want to be sure before I order.
""",
    "feedback": """
Keep up the good work!
No reply needed, just wanted to share.
Hope this helps you improve.
I've recommended you to a few friends.
""",
    "cancellation": """
Please confirm once it's cancelled.
I don't want to be charged again.
No need to offer a discount, I've decided.
My account email is the one I'm writing from.
""",
}

OPENERS = ["", "", "", "Hi!", "Hello,", "Hi there!", "hey -", "Good morning,", "Dear support,"]
CLOSERS = ["", "", "", "Thanks!", "Thank you.", "thx", "Thanks in advance.", "Cheers,", "Best,"]
NAMES = ["Dana", "Raj", "Sofia", "Tom", "Aiko", "Marek", "Lena", "Chris", "Priya", "Olu"]
# (correct, casual) pairs used to roughen some messages.
CASUAL = [
    ("please", "pls"),
    ("you", "u"),
    ("the ", "teh "),
    ("I'm", "im"),
    ("don't", "dont"),
    ("really", "realy"),
    ("because", "bc"),
    ("thanks", "thnx"),
]


def lines(block: str) -> list[str]:
    """Split a triple-quoted block into its non-empty lines."""
    return [line for line in block.strip().splitlines() if line]


def fill(template: str, rng: random.Random) -> str:
    """Fill a template's slots with random values."""
    values = {key: rng.choice(options.split("|")) for key, options in SLOTS.items()}
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
    parts = [rng.choice(OPENERS), fill(rng.choice(lines(TEMPLATES[label])), rng)]
    if rng.random() < 0.5:
        parts.append(rng.choice(lines(EXTRAS[label])))
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
    """Return the shuffled, numbered tickets, PER_LABEL distinct ones for each label."""
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
    LABELS_PATH.write_text(json.dumps(labels, ensure_ascii=False, indent=2) + "\n", "utf-8")
    tickets = generate(rng)
    rows = "".join(json.dumps(ticket, ensure_ascii=False) + "\n" for ticket in tickets)
    TICKETS_PATH.write_text(rows, encoding="utf-8")
    print(f"wrote {len(labels)} labels to {LABELS_PATH.relative_to(ROOT)}")
    print(f"wrote {len(tickets)} tickets to {TICKETS_PATH.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
