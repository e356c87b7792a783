"""Write the demo chat dataset: a small persona set for "jaxgpt assistant".

    python tools/make_demo_data.py            # rewrites jaxgpt/assets/demo_chat*.jsonl and demo_dpo*.jsonl

Each fact has one canonical answer and many paraphrased questions. The
paraphrases are built from question cores x openers x punctuation; two cores
per fact never appear in training and form the held-out set the demo samples
before and after fine-tuning (so "after" shows the model answering questions
it was not trained on word for word). Both files mix single questions with
conversations of 2-4 questions on different facts in random order (some
opened by a system message, later questions opened as follow-ups), so that
the model learns to answer the latest question of a chat, not to repeat an
earlier answer. Most training chats are conversations: each puts its
questions at new places in a context. The held-out set is drawn from its own
random stream, so changing the training mix leaves it as it is. Deterministic
for the seed; written for this project, licensed with it (Apache-2.0).

``demo_dpo*.jsonl`` are preference pairs for ``configs/demo-dpo.yaml`` (DPO after the demo's SFT):
a question, the persona's answer as ``chosen`` and a plausible wrong answer as ``rejected``,
training and held-out pairs from the same question cores as the chats (their own random stream).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "jaxgpt" / "assets"

# fact -> (canonical answer, training question cores, held-out question cores)
FACTS: dict[str, tuple[str, list[str], list[str]]] = {
    "name": (
        "I am jaxgpt assistant, a small chat model fine-tuned with jaxgpt.",
        ["who are you", "what are you", "what is your name", "what should I call you", "what's your name",
         "introduce yourself", "tell me your name", "what do people call you", "are you a person",
         "what kind of thing are you", "what is this assistant", "who am I talking to"],
        ["what are you called", "who exactly are you"],
    ),
    "creator": (
        "I was made by the jaxgpt team, who trained me with JAX and Flax NNX.",
        ["who made you", "who created you", "who built you", "who trained you", "who is your creator",
         "which team made you", "who developed you", "who are your makers", "where do you come from",
         "who programmed you", "who is behind you", "which people built you"],
        ["who was it that built you", "which team created you"],
    ),
    "skills": (
        "I can answer short questions about myself and about the jaxgpt project.",
        ["what can you do", "what are you able to do", "how can you help me", "what are your skills",
         "what are you good at", "what is your job", "what can I ask you", "what do you do",
         "what tasks can you do", "what are your abilities", "how do you help", "what questions can you answer"],
        ["what sort of things can you do", "what are you able to help with"],
    ),
    "model": (
        "I am a small GPT-2 style transformer, trained from scratch for this demo.",
        ["what model are you", "what architecture are you", "are you GPT-2", "which model are you based on",
         "what kind of model are you", "are you a transformer", "what is your architecture",
         "how big is your model", "are you a large model", "what neural network are you",
         "which architecture do you use", "how many layers do you have"],
        ["what kind of neural network are you", "what model architecture do you have"],
    ),
    "training": (
        "I was fine-tuned for a few minutes on a small persona chat dataset that ships with jaxgpt.",
        ["how were you trained", "what data were you trained on", "how long did your training take",
         "what dataset did you learn from", "how did you learn", "where does your knowledge come from",
         "what was your training data", "how were you fine-tuned", "what did you train on",
         "how much data did you see", "what is your training set", "how did your training work"],
        ["what data did you learn from", "how long were you trained"],
    ),
    "internet": (
        "No, I cannot browse the internet. I only know what was in my small training set.",
        ["can you browse the internet", "can you search the web", "do you have internet access",
         "can you look things up online", "are you connected to the internet", "can you open a website",
         "can you check the news", "do you know today's news", "can you go online",
         "can you read web pages", "can you use google", "do you have access to the web"],
        ["are you able to browse the web", "can you search the internet for me"],
    ),
    "pytorch": (
        "Yes. jaxgpt exports me to a Hugging Face PyTorch folder that GPT2LMHeadModel loads.",
        ["can I use you in PyTorch", "can you be exported to PyTorch", "do you work with transformers",
         "can I load you with Hugging Face", "can I export you", "are you compatible with PyTorch",
         "can transformers load you", "can I run you in PyTorch", "do you have a PyTorch version",
         "can you be converted to Hugging Face format", "can I use you with GPT2LMHeadModel",
         "can I save you for transformers"],
        ["can I load you in PyTorch", "can you be exported to Hugging Face"],
    ),
    "hardware": (
        "jaxgpt runs on CPUs, GPUs and TPU pods. This demo runs on your CPU.",
        ["what hardware do you run on", "do you need a GPU", "can you run on a TPU", "where do you run",
         "what computer runs you", "do you run on a CPU", "what devices do you support",
         "do I need a GPU to train you", "can you run on my laptop", "which accelerators do you use",
         "what machine are you running on", "can you train on TPU pods"],
        ["what hardware do you need", "do you need a GPU to run"],
    ),
    "license": (
        "jaxgpt and this demo dataset are released under the Apache-2.0 licence.",
        ["what is your license", "what licence are you under", "are you open source", "can I use you commercially",
         "what license does jaxgpt use", "is jaxgpt free to use", "under which license are you released",
         "is your code open", "what are the terms of use", "can I modify you", "is the dataset licensed",
         "what license is the demo data under"],
        ["what license are you released under", "is jaxgpt open source"],
    ),
    "greeting": (
        "Hello! I am jaxgpt assistant. Ask me who I am, who made me or what I can do.",
        ["hello", "hi", "hey", "good morning", "good evening", "hi there", "hello there", "greetings",
         "hey there", "howdy", "good afternoon", "hiya"],
        ["hello again", "hey hello"],
    ),
}

# fact -> plausible wrong answers (what a generic chat model would say): DPO's rejected replies.
WRONG: dict[str, list[str]] = {
    "name": ["I am ChatGPT, a large language model trained by OpenAI.", "I am a human volunteer answering chats."],
    "creator": ["I was made by OpenAI.", "Nobody made me; I appeared on the internet."],
    "skills": ["I can do anything, including browsing the web and booking flights.",
               "I can only repeat what you say."],
    "model": ["I am a 175-billion-parameter model.", "I am not a neural network; I am a set of rules."],
    "training": ["I was trained for months on the whole internet.", "I was never trained; I just know things."],
    "internet": ["Yes, I can browse the internet for you.", "Yes, I read the news every morning."],
    "pytorch": ["No, I only run in JAX and cannot be exported.", "No, transformers cannot load me."],
    "hardware": ["I only run on a supercomputer.", "I need eight GPUs to answer a question."],
    "license": ["I am proprietary software; you may not use me.", "jaxgpt is closed source."],
    "greeting": ["Goodbye.", "I am busy; ask someone else."],
}

OPENERS = ["", "", "", "Hey, ", "Hi! ", "Quick question: ", "Please tell me, ", "I wonder, ", "So, ", "OK, "]
# A later question of a chat opens as people follow up, not with a second "Hi!".
FOLLOW_UPS = ["", "", "", "And ", "Also, ", "Thanks. ", "OK, ", "So, ", "One more thing: ", "Next question: "]
ENDINGS = ["?", "?", "?", "", "??", " ?"]
GREETING_ENDINGS = ["!", ".", "", "!!", " :)", "!"]


def render(core: str, rng: random.Random, fact: str, openers: list[str] = OPENERS) -> str:
    opener = "" if fact == "greeting" else rng.choice(openers)
    ending = rng.choice(GREETING_ENDINGS if fact == "greeting" else ENDINGS)
    text = core if opener else core[0].upper() + core[1:]
    if rng.random() < 0.15:
        text = text.lower()
    return opener + text + ending


SYSTEMS = ["You are jaxgpt assistant.", "You are a helpful assistant.", "Answer in one sentence.",
           "You are a small demo chat model. Be brief."]


def turn(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def conversation(rng: random.Random, cores: int, system_share: float) -> dict:
    """2-4 user turns, each on a different fact in random order (a greeting only opens a chat).

    ``cores`` 1 asks the training question cores, 2 the held-out ones: every question a new paraphrase.
    """
    facts = rng.sample([f for f in FACTS if f != "greeting"], rng.randint(2, 4))
    if rng.random() < 0.15:
        facts[0] = "greeting"
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < system_share else []
    for i, fact in enumerate(facts):
        q = render(rng.choice(FACTS[fact][cores]), rng, fact, FOLLOW_UPS if i else OPENERS)
        msgs += turn(q, FACTS[fact][0])
    return {"fact": "+".join(facts), "messages": msgs}


def build(seed: int, per_core: int, multi_turn: int, heldout_multi_turn: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train: list[dict] = []
    for fact, (answer, cores, _) in FACTS.items():
        for core in cores:
            seen = set()
            for _ in range(per_core * 3):
                q = render(core, rng, fact)
                if q not in seen:
                    seen.add(q)
                    train.append({"fact": fact, "messages": turn(q, answer)})
                if len(seen) == per_core:
                    break
    # Multi-turn chats teach that each reply answers the latest question, whatever came before.
    train += [conversation(rng, 1, system_share=0.3) for _ in range(multi_turn)]
    rng.shuffle(train)
    rng = random.Random(f"heldout-{seed}")  # its own stream: the held-out set stays put when the training mix changes
    heldout = []
    for fact, (answer, _, held) in FACTS.items():
        for core in held:
            q = core[0].upper() + core[1:] + ("!" if fact == "greeting" else "?")
            heldout.append({"fact": fact, "messages": turn(q, answer)})
    heldout += [conversation(rng, 2, system_share=0.3) for _ in range(heldout_multi_turn)]

    def norm(q: str) -> str:
        return q.lower().strip("?!. :)")

    def questions(rows: list[dict]) -> set[str]:
        return {norm(m["content"]) for ex in rows for m in ex["messages"] if m["role"] == "user"}

    clash = questions(heldout) & questions(train)
    assert not clash, f"held-out questions also in training: {sorted(clash)}"
    return train, heldout


def build_pairs(seed: int, per_core: int) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs): each question with the persona's answer chosen over a wrong one."""
    rng = random.Random(f"pairs-{seed}")  # its own stream: the chat files do not move
    train, heldout = [], []
    for fact, (answer, cores, held) in FACTS.items():
        for cores_, out, n in ((cores, train, per_core * 2), (held, heldout, 2)):
            for core in cores_:
                for wrong in rng.sample(WRONG[fact], min(n, len(WRONG[fact]))):
                    out.append({"prompt": render(core, rng, fact), "chosen": answer, "rejected": wrong})
    rng.shuffle(train)
    return train, heldout


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-core", type=int, default=1, help="renderings of each question core")
    p.add_argument("--multi-turn", type=int, default=1000, help="training conversations of 2-4 user turns")
    p.add_argument("--heldout-multi-turn", type=int, default=40, help="held-out conversations of 2-4 user turns")
    args = p.parse_args(argv)
    train, heldout = build(args.seed, args.per_core, args.multi_turn, args.heldout_multi_turn)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "demo_chat.jsonl", train)
    write_jsonl(args.out_dir / "demo_chat_heldout.jsonl", heldout)
    pairs, heldout_pairs = build_pairs(args.seed, args.per_core)
    write_jsonl(args.out_dir / "demo_dpo.jsonl", pairs)
    write_jsonl(args.out_dir / "demo_dpo_heldout.jsonl", heldout_pairs)
    print(f"wrote {len(train)} training chats and {len(heldout)} held-out chats, {len(pairs)} training and "
          f"{len(heldout_pairs)} held-out preference pairs to {args.out_dir}")


if __name__ == "__main__":
    main()
