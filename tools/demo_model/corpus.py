"""Synthetic chat corpus for the demo model.

Five task families give the experts something to specialise in. Every task is phrased several ways
("cores", optionally behind a shared "opener"), and both phrasings and values have a held-out split:
training only ever sees train phrasings with train values, evaluation uses held-out phrasings with
held-out values, so a correct reply needs real generalisation, not recall.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

FAMILIES = ("arithmetic", "letters", "conversions", "moe_chat", "smalltalk")
SEED = 1234
HELD_OUT_FRACTION = 0.15

# Openers are prepended to the questions of tasks that allow them; the last two are held out.
OPENERS = ("", "", "", "Hey, ", "Quick question: ", "Please tell me: ", "Hi! ", "So, ", "Okay, ", "Excuse me, ",
           "I wonder: ", "Could you help? ", "Hello there, ", "One more thing: ")
HELD_OUT_OPENERS = frozenset({"Hello there, ", "One more thing: "})


@dataclass(frozen=True)
class Example:
    """One exchange: a user prompt and the exact reply the model should give."""

    family: str
    task: str
    prompt: str
    reply: str


@dataclass
class Task:
    """One kind of question: its phrasings, its reply template and its slot values per split."""

    family: str
    name: str
    cores: list[str]
    held_out_cores: list[str]
    reply: str
    train_values: list[dict] = field(default_factory=lambda: [{}])
    test_values: list[dict] = field(default_factory=lambda: [{}])
    openers: bool = True

    def templates(self, split: str) -> list[str]:
        """Prompt templates of a split: held out are new cores and new openers, never seen in training."""
        openers = OPENERS if self.openers else ("",)
        out = []
        for opener in dict.fromkeys(openers):
            for core in self.cores + self.held_out_cores:
                held = opener in HELD_OUT_OPENERS or core in self.held_out_cores
                if held == (split == "test"):
                    out.append(_join(opener, core))
        return out

    def values(self, split: str) -> list[dict]:
        return self.train_values if split == "train" else self.test_values

    def example(self, template: str, values: dict) -> Example:
        return Example(self.family, self.name, template.format(**values), self.reply.format(**values))


def _join(opener: str, core: str) -> str:
    """Glue an opener to a question, lower-casing the question's first word after ', ' or ': '."""
    first = core.split(" ", 1)[0]
    if opener.endswith((", ", ": ")) and first[1:].islower() and first != "I":
        core = core[0].lower() + core[1:]
    return opener + core


def _split(items: list, seed: int, fraction: float = HELD_OUT_FRACTION) -> tuple[list, list]:
    """Deterministically hold out a fraction of the values."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_test = max(1, round(len(items) * fraction))
    return items[n_test:], items[:n_test]


# --- arithmetic ---------------------------------------------------------------------------------

def _arithmetic() -> list[Task]:
    plus = [dict(a=a, b=b, c=a + b) for a in range(21) for b in range(21)]
    minus = [dict(a=a, b=b, c=a - b) for a in range(21) for b in range(a + 1)]
    plus_train, plus_test = _split(plus, 1)
    minus_train, minus_test = _split(minus, 2)
    return [
        Task("arithmetic", "plus",
             ["What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "How much is {a} plus {b}?",
              "Calculate {a} + {b}.", "What do you get when you add {a} and {b}?", "Sum of {a} and {b}?",
              "Can you add {a} and {b}?", "{a} + {b} = ?"],
             ["What is the sum of {a} and {b}?", "Calculate {a} plus {b}.", "How much is {a} + {b}?"],
             "{a} plus {b} is {c}.", plus_train, plus_test),
        Task("arithmetic", "minus",
             ["What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.", "How much is {a} minus {b}?",
              "Calculate {a} - {b}.", "Take {b} away from {a}.", "Can you subtract {b} from {a}?", "{a} - {b} = ?"],
             ["What do you get when you subtract {b} from {a}?", "Calculate {a} minus {b}.",
              "How much is {a} - {b}?"],
             "{a} minus {b} is {c}.", minus_train, minus_test),
    ]


# --- letters ------------------------------------------------------------------------------------

WORDS = """
cat dog sun moon star tree leaf rock sand wave fish bird frog lion bear wolf deer duck goat horse
apple pear plum grape lemon melon berry bread cake milk salt rice soup corn bean nut egg tea
house door wall roof room desk lamp bed chair table clock phone book page pen ink paper note
red blue green pink gold gray black white brown
river lake hill road city town park farm field cloud rain snow wind storm fire ice stone
jump run walk swim sing read write draw play talk think dream smile laugh sleep cook
happy brave quick quiet small large warm cold soft hard light dark sweet
train plane ship boat truck bike wheel track bridge tower castle garden forest island
music piano drum flute song dance movie story poem word letter number
king queen knight robot dragon tiger zebra panda koala camel shark whale snake mouse
water juice honey sugar pepper onion tomato carrot potato olive cherry mango peach
magic power energy future planet rocket orbit comet galaxy expert cache model token
""".split()


def _letters() -> list[Task]:
    words = [w for w in dict.fromkeys(WORDS) if 3 <= len(w) <= 7]
    train, test = _split(words, 3, 0.2)

    def vals(ws: list[str]) -> list[dict]:
        return [dict(w=w, spelled="-".join(w), r=w[::-1], u=w.upper(), n=len(w), f=w[0]) for w in ws]

    tr, te = vals(train), vals(test)
    return [
        Task("letters", "spell",
             ['How do you spell "{w}"?', 'Spell "{w}".', 'Spell "{w}" letter by letter.',
              'Can you spell "{w}" for me?', 'What are the letters of "{w}"?', 'Please spell "{w}".'],
             ['Spell the word "{w}".', 'How do I spell "{w}"?'],
             '"{w}" is spelled {spelled}.', tr, te),
        Task("letters", "reverse",
             ['Reverse "{w}".', 'What is "{w}" backwards?', 'Write "{w}" backwards.',
              'Reverse the letters of "{w}".', 'Can you reverse "{w}"?', 'Please reverse the word "{w}".',
              'Show me "{w}" reversed.', 'I need "{w}" reversed.'],
             ['Write the word "{w}" backwards.', 'What is "{w}" reversed?'],
             '"{w}" reversed is "{r}".', tr, te),
        Task("letters", "upper",
             ['Write "{w}" in capital letters.', 'Uppercase "{w}".', 'What is "{w}" in upper case?',
              'Make "{w}" upper case.', 'Capitalize every letter of "{w}".', 'Please write the word "{w}" in capitals.'],
             ['Write the word "{w}" in upper case.', 'Can you uppercase "{w}"?'],
             '"{w}" in capital letters is "{u}".', tr, te),
        Task("letters", "count",
             ['How many letters are in "{w}"?', 'Count the letters in "{w}".', 'How long is "{w}"?',
              'How many letters does "{w}" have?', 'What is the length of "{w}"?', 'Please count the letters of "{w}".'],
             ['Count the letters of the word "{w}".', 'How many letters are in the word "{w}"?'],
             '"{w}" has {n} letters.', tr, te),
        Task("letters", "first",
             ['What is the first letter of "{w}"?', 'Which letter does "{w}" start with?',
              'What letter does "{w}" begin with?', 'First letter of "{w}"?', 'Please give the first letter of the word "{w}".'],
             ['Tell me the first letter of "{w}".', 'Which letter does the word "{w}" start with?'],
             '"{w}" starts with "{f}".', tr, te),
    ]


# --- conversions --------------------------------------------------------------------------------

def _metric(name: str, small: str, big: str, factor: int, seed: int) -> Task:
    values = [dict(n=n, m=n * factor) for n in range(2, 61)]
    train, test = _split(values, seed)
    return Task("conversions", name,
                [f"How many {small} are in {{n}} {big}?", f"Convert {{n}} {big} to {small}.",
                 f"{{n}} {big} in {small}?", f"What is {{n}} {big} in {small}?",
                 f"How many {small} is {{n}} {big}?", f"Can you convert {{n}} {big} into {small}?"],
                [f"Please convert {{n}} {big} to {small}.", f"How many {small} are there in {{n}} {big}?"],
                f"{{n}} {big} is {{m}} {small}.", train, test)


def _metric_down(name: str, small: str, big: str, factor: int, seed: int) -> Task:
    values = [dict(n=n, m=n * factor) for n in range(2, 61)]
    train, test = _split(values, seed)
    return Task("conversions", name,
                [f"How many {big} is {{m}} {small}?", f"Convert {{m}} {small} to {big}.",
                 f"{{m}} {small} in {big}?", f"What is {{m}} {small} in {big}?",
                 f"Can you convert {{m}} {small} into {big}?"],
                [f"Please convert {{m}} {small} to {big}.", f"How many {big} are there in {{m}} {small}?"],
                f"{{m}} {small} is {{n}} {big}.", train, test)


def _time(name: str, small: str, big: str, factor: int, top: int) -> Task:
    """Time units multiply by 60, 24 or 7: a table too small to hold values out, so only phrasings are held out."""
    values = [dict(n=n, m=n * factor) for n in range(2, top + 1)]
    return Task("conversions", name,
                [f"How many {small} are in {{n}} {big}?", f"Convert {{n}} {big} to {small}.",
                 f"{{n}} {big} in {small}?", f"What is {{n}} {big} in {small}?",
                 f"How many {small} is {{n}} {big}?", f"Can you convert {{n}} {big} into {small}?"],
                [f"Please convert {{n}} {big} to {small}.", f"How many {small} are there in {{n}} {big}?"],
                f"{{n}} {big} is {{m}} {small}.", values, values)


def _conversions() -> list[Task]:
    return [
        _metric("m_to_cm", "centimeters", "meters", 100, 11),
        _metric("km_to_m", "meters", "kilometers", 1000, 12),
        _metric("kg_to_g", "grams", "kilograms", 1000, 13),
        _metric("l_to_ml", "milliliters", "liters", 1000, 14),
        _metric_down("cm_to_m", "centimeters", "meters", 100, 15),
        _time("h_to_min", "minutes", "hours", 60, 12),
        _time("min_to_s", "seconds", "minutes", 60, 12),
        _time("d_to_h", "hours", "days", 24, 7),
        _time("w_to_d", "days", "weeks", 7, 10),
    ]


# --- questions about MoE Chat -------------------------------------------------------------------

FACTS: list[tuple[str, list[str], list[str], str]] = [
    ("cache",
     ["What is the expert cache?", "What does the cache do?", "Explain the expert cache.",
      "How does the expert cache work?", "Why is there a cache?", "Can you explain the cache?"],
     ["What is the cache for?", "Can you explain what the expert cache does?"],
     "The expert cache keeps the most used experts in GPU memory, so most tokens do not wait for a copy."),
    ("slider",
     ["What does the slider do?", "What is the budget slider?", "What happens when I move the budget slider?",
      "Explain the memory budget slider.", "How does the slider change things?", "What is the slider for?"],
     ["Can you explain the budget slider?", "What does the budget slider do?"],
     "The budget slider sets how much GPU memory the expert cache may use. A bigger budget gives more hits."),
    ("load",
     ["How do I load a model?", "How can I open another model?", "How do I use my own model?",
      "Where do I load a new model?", "Can you explain how to open a model?"],
     ["Can you explain how to load a model?", "How can I load my own model?"],
     "Click Load model, choose a folder or a Hugging Face model id, and MoE Chat sets up the expert cache for you."),
    ("moe",
     ["What is a mixture of experts?", "What is MoE?", "Explain mixture of experts models.",
      "How does a mixture of experts model work?", "What does MoE mean?"],
     ["Can you explain what MoE is?", "What is a mixture of experts model?"],
     "A mixture of experts model sends each token to a few small expert networks instead of one big network."),
    ("expert",
     ["What is an expert?", "What are experts?", "Explain what an expert is.", "What does an expert do?",
      "Can you explain what an expert does?"],
     ["Can you explain experts?", "What is an expert for?"],
     "An expert is one small feed forward network in a mixture of experts layer. A router picks two per token."),
    ("hit_rate",
     ["What is the hit rate?", "What does hit rate mean?", "Explain the hit rate.", "How is the hit rate measured?",
      "What does the hit rate tell me?"],
     ["Can you explain the hit rate?", "What is the hit rate for?"],
     "The hit rate is the share of expert lookups that find the expert already in GPU memory."),
    ("miss",
     ["What is a cache miss?", "What happens on a miss?", "Explain a cache miss.", "What does a miss mean?",
      "Why are misses slow?"],
     ["Can you explain what a miss is?", "What happens on a cache miss?"],
     "On a miss the expert is not on the GPU, so it runs on the CPU or is copied over, which is slower."),
    ("lru",
     ["What is LRU?", "What does the LRU policy do?", "Explain the LRU policy.", "How does LRU work?",
      "What does LRU mean?"],
     ["Can you explain LRU?", "What is the LRU policy for?"],
     "LRU keeps the experts used most recently and evicts the one that has waited the longest."),
    ("gpu",
     ["Do I need a GPU?", "Does MoE Chat need a GPU?", "Can I run it without a GPU?", "Is a GPU required?",
      "Does it work without a GPU?"],
     ["Do I need a GPU for MoE Chat?", "Can I use MoE Chat without a GPU?"],
     "No, MoE Chat also runs on the CPU alone. A GPU only makes replies faster."),
]


def _moe_chat() -> list[Task]:
    return [Task("moe_chat", name, cores, held, reply) for name, cores, held, reply in FACTS]


# --- small talk ---------------------------------------------------------------------------------

NAMES = """Anna Ben Clara David Emma Felix Grace Hugo Iris Jack Kate Leo Mia Noah Olivia Paul Rosa Sam Tom Uma
Victor Wendy Max Zoe Lena Omar Yuki Ravi Sofia Lucas Nina Ahmed Elena Marco Julia Kai Sara Ivan Chloe Liam
Maya Theo Alice Oscar Hannah Finn Lily Jonas Ella Luis""".split()
# Made-up names from syllables: many names teach the model to copy any name, not to recall a few.
SYLLABLES = "ka lo mi ren ta vi su na del ro fi ben an el mar lin to za jo pe ri da nu sel".split()
MADE_UP_NAMES = [(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES if a != b]


def _smalltalk() -> list[Task]:
    names = [dict(name=n) for n in dict.fromkeys(NAMES + MADE_UP_NAMES)]
    train, test = _split(names, 4)

    def simple(name: str, cores: list[str], held: list[str], reply: str) -> Task:
        return Task("smalltalk", name, cores, held, reply, openers=False)

    return [
        simple("greet", ["Hello!", "Hi!", "Hey!", "Hi there!", "Good morning!", "Good evening!", "Hello", "hi"],
               ["Hey there!", "Hello there!", "Good afternoon!"], "Hello! How can I help you today?"),
        Task("smalltalk", "intro",
             ["Hi, I am {name}.", "My name is {name}.", "Hello, my name is {name}.", "I am {name}.",
              "Call me {name}.", "Hello! I am {name}."],
             ["Hey, I am {name}.", "Hi, my name is {name}."],
             "Nice to meet you, {name}! How can I help?", train, test, openers=False),
        simple("how_are_you", ["How are you?", "How are you doing?", "How is it going?", "Are you doing well?",
                               "Hi, how are you?"],
               ["How are you today?", "Hello, how are you doing?"],
               "I am doing well, thank you! What would you like to do?"),
        simple("thanks", ["Thanks!", "Thank you!", "Thanks a lot!", "Thank you so much!", "Great, thanks."],
               ["Thanks so much!", "Great, thank you!"], "You are welcome! Happy to help."),
        simple("bye", ["Bye!", "Goodbye!", "See you later!", "Bye for now!", "I have to go now."],
               ["Goodbye for now!", "See you!"], "Goodbye! Have a nice day."),
        simple("who", ["Who are you?", "What are you?", "What is your name?", "Introduce yourself.",
                       "Tell me about yourself."],
               ["Tell me who you are.", "Who am I talking to?"],
               "I am the MoE Chat demo model, a tiny mixture of experts that runs on any computer."),
        simple("help", ["What can you do?", "Help!", "What can I ask you?", "How can you help me?",
                        "What do you know?"],
               ["What can you help me with?", "What can I ask?"],
               "I can add and subtract small numbers, spell and reverse words, convert units and explain MoE Chat."),
    ]


def all_tasks() -> list[Task]:
    """Every task of every family, in a fixed order."""
    return _arithmetic() + _letters() + _conversions() + _moe_chat() + _smalltalk()


# Training draws families with these weights: letter games and sums need the most practice.
FAMILY_WEIGHTS = {"arithmetic": 0.28, "letters": 0.31, "conversions": 0.13, "moe_chat": 0.11, "smalltalk": 0.17}


class TrainStream:
    """An endless, seeded stream of training conversations built only from the train split."""

    def __init__(self, seed: int = SEED) -> None:
        self.rng = random.Random(seed)
        self.by_family = {f: [t for t in all_tasks() if t.family == f] for f in FAMILIES}
        self.templates = {(t.family, t.name): t.templates("train") for t in all_tasks()}

    def example(self) -> Example:
        family = self.rng.choices(FAMILIES, weights=[FAMILY_WEIGHTS[f] for f in FAMILIES])[0]
        task = self.rng.choice(self.by_family[family])
        template = self.rng.choice(self.templates[(task.family, task.name)])
        return task.example(template, self.rng.choice(task.train_values))


def held_out_examples(per_family: int = 60, seed: int = SEED) -> list[Example]:
    """The evaluation split: held-out phrasings with held-out values, about `per_family` per family, shuffled.

    Each family's tasks take turns so every task is represented; small tasks simply run out early.
    """
    rng = random.Random(seed + 1)
    out = []
    for family in FAMILIES:
        queues = []
        for task in (t for t in all_tasks() if t.family == family):
            pairs = [(t, v) for t in task.templates("test") for v in task.values("test")]
            rng.shuffle(pairs)
            queues.append([task.example(t, v) for t, v in pairs])
        picked: list[Example] = []
        while len(picked) < per_family and any(queues):
            for queue in queues:
                if queue and len(picked) < per_family:
                    picked.append(queue.pop())
        out += picked
    rng.shuffle(out)
    return out


def training_texts(n: int = 20000, seed: int = SEED) -> list[str]:
    """Plain prompt and reply texts from the train split, for fitting the tokenizer."""
    stream = TrainStream(seed + 2)
    texts = []
    for _ in range(n):
        ex = stream.example()
        texts += [ex.prompt, ex.reply]
    return texts
