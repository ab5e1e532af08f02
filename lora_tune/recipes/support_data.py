"""Help-desk chats for the support recipe, written for this repository (the company is fictional).

Brightwave's IT help desk answers employees in one house tone: greet by first name, one short
sentence of empathy, the fix or the policy, then an offer to follow up. If a fix does not work,
the assistant opens a ticket with the right team and says when they will call back; if it works,
it closes warmly. Training and held-out chats use different employees and, for every problem, a
different way of asking (the last phrasing of each problem never appears in training).
"""

from __future__ import annotations

import random

SYSTEM = "You are the IT help desk assistant of Brightwave. You are chatting with {name} from {team}."

# ChatterBot problem (as they ask it) -> (our other phrasings, which team takes the ticket, call-back time)
TROUBLESHOOTING = {
    "I can't hear any sound.": (
        ["There's no sound coming from my laptop.", "My speakers stopped working.", "Audio isn't working at all."],
        "Workplace Devices",
        "4 hours",
    ),
    "I forgot my password.": (
        ["I can't remember my password.", "I'm locked out, I forgot my login.", "How do I reset my password?"],
        "Identity",
        "1 hour",
    ),
    "My computer won't turn on.": (
        ["My PC is dead, it won't start.", "Nothing happens when I press the power button.", "My desktop won't boot."],
        "Workplace Devices",
        "2 hours",
    ),
    "My internet is not working.": (
        ["I have no internet connection.", "The internet is down on my computer.", "I can't get online."],
        "Network",
        "2 hours",
    ),
    "My laptop screen is black.": (
        ["My laptop display went dark.", "I can't see anything on my laptop screen.", "My screen stays black."],
        "Workplace Devices",
        "4 hours",
    ),
    "My mouse is not responding.": (
        ["My mouse stopped working.", "The cursor won't move.", "My wireless mouse is frozen."],
        "Workplace Devices",
        "1 day",
    ),
    "My printer is not printing.": (
        ["The printer won't print my documents.", "Nothing comes out of the printer.", "My print jobs are stuck."],
        "Facilities",
        "1 day",
    ),
    "My screen is flickering.": (
        ["My monitor keeps flickering.", "The display flashes on and off.", "My screen keeps blinking."],
        "Workplace Devices",
        "4 hours",
    ),
    "My system is overheating.": (
        ["My laptop is getting really hot.", "My computer is overheating and the fan is loud.", "My PC runs very hot."],
        "Workplace Devices",
        "4 hours",
    ),
    "My webcam isn't detected.": (
        ["My camera doesn't show up in Teams.", "The webcam isn't recognised.", "My video call can't find a camera."],
        "Workplace Devices",
        "4 hours",
    ),
}

# Brightwave policies (question phrasings, answer), written here.
POLICIES = [
    (
        ["How do I connect to the VPN from home?", "How do I use the VPN?", "I need VPN access from home."],
        "Open the Brightwave Connect app, sign in with your work email and approve the prompt on your phone. "
        "You need the VPN for file shares and the intranet, not for email.",
    ),
    (
        ["I need a new laptop.", "Can I get a laptop replacement?", "How do I request a new laptop?"],
        "Laptops are replaced every four years, or sooner if broken. Request one in the IT portal under "
        "Hardware, your manager approves it, and delivery takes about five working days.",
    ),
    (
        ["Can I install Zoom?", "How do I install new software?", "I need an app that isn't on my computer."],
        "Approved apps are in the Software Center and install without an admin password. For anything else, "
        "request it in the IT portal under Software; security reviews it within two working days.",
    ),
    (
        ["When is the help desk open?", "What are your opening hours?", "Is IT support available on weekends?"],
        "The help desk is open Monday to Friday from 8:00 to 18:00. Outside those hours, call extension 4444 "
        "for outages only.",
    ),
    (
        ["I got a suspicious email.", "I think I received a phishing email.", "Someone sent me a weird link."],
        "Please don't click any links or open attachments. Use the Report Phish button in Outlook and delete "
        "the message. If you already clicked, tell us right away so we can reset your password.",
    ),
    (
        ["What's the guest Wi-Fi password?", "How do visitors get on the Wi-Fi?", "My guest needs internet access."],
        "Guests join the network Brightwave-Guest. The password is on the card at reception and changes every Monday.",
    ),
]

EMPATHY = ["Sorry to hear that.", "That's annoying, let's fix it.", "Sorry about that."]
NOT_FIXED = ["That didn't work.", "Still the same, unfortunately.", "I tried that, no luck.", "It's still broken."]
FIXED = ["That fixed it, thanks!", "It works now.", "Great, that did it.", "Perfect, all good now."]
THANKS = ["Thanks!", "Great, thank you.", "OK, thanks for the help."]

TRAIN_NAMES = [
    "Ana",
    "Ben",
    "Carla",
    "Dev",
    "Elif",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jonas",
    "Kemi",
    "Liam",
    "Mara",
    "Nils",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
]
HELD_OUT_NAMES = ["Sam", "Tara", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
TEAMS = ["Finance", "Sales", "Marketing", "Engineering", "Legal", "Operations"]


def _troubleshooting_chat(rng: random.Random, name: str, question: str, fix: str, team: str, hours: str) -> list:
    msgs = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"Hi {name}, {rng.choice(EMPATHY).lower()} {fix} Let me know if that helps!"},
    ]
    outcome = rng.random()
    if outcome < 0.4:
        msgs += [
            {"role": "user", "content": rng.choice(NOT_FIXED)},
            {
                "role": "assistant",
                "content": f"Thanks for trying that, {name}. I've opened a ticket with the {team} team; they will "
                f"contact you within {hours}. Sorry for the trouble!",
            },
        ]
    elif outcome < 0.75:
        msgs += [
            {"role": "user", "content": rng.choice(FIXED)},
            {"role": "assistant", "content": f"Glad it's working again, {name}! Have a great day."},
        ]
    return msgs


def _policy_chat(rng: random.Random, name: str, question: str, answer: str) -> list:
    msgs = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"Hi {name}! {answer} Anything else I can help with?"},
    ]
    if rng.random() < 0.3:
        msgs += [
            {"role": "user", "content": rng.choice(THANKS)},
            {"role": "assistant", "content": f"You're welcome, {name}! Have a great day."},
        ]
    return msgs


def conversations(fixes: dict[str, str], n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, list]:
    """Seeded chats; `fixes` maps each ChatterBot problem to its fix. Held-out chats use unseen phrasings/names."""
    missing = sorted(set(TROUBLESHOOTING) - set(fixes))
    if missing:
        raise ValueError(f"the ChatterBot corpus lacks the problems {missing}")
    topics = [(q, [q, *alts], fixes[q], team, hours) for q, (alts, team, hours) in TROUBLESHOOTING.items()]
    topics += [(qs[0], qs, answer, None, None) for qs, answer in POLICIES]

    def make(rng: random.Random, n: int, held_out: bool) -> list:
        rows = []
        for i in range(n):
            _, phrasings, answer, team, hours = topics[i % len(topics)]
            question = phrasings[-1] if held_out else rng.choice(phrasings[:-1])
            name = rng.choice(HELD_OUT_NAMES if held_out else TRAIN_NAMES)
            system = {"role": "system", "content": SYSTEM.format(name=name, team=rng.choice(TEAMS))}
            if team is None:
                body = _policy_chat(rng, name, question, answer)
            else:
                body = _troubleshooting_chat(rng, name, question, answer, team, hours)
            rows.append({"messages": [system, *body]})
        return rows

    return {
        "train": make(random.Random(seed), n_train, held_out=False),
        "val": make(random.Random(seed + 1), n_val, held_out=True),
        "test": make(random.Random(seed + 2), n_test, held_out=True),
    }
