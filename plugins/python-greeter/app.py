"""Greeter: an AgentChat plugin written in Python.

It answers a text message that is a greeting ("hello", "bonjour", "hola", ...) with a greeting
in the same language that names the sender, and passes on everything else. The optional config
key `languages` (a JSON array of language codes) limits the languages it answers in.

Each call runs in a fresh instance, so the module keeps no state between messages; the tables
below are built once when the component is made and are read-only at run time.
"""

import json
import unicodedata

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import config, log
from wit_world.imports.types import (
    ContentKind,
    Draft,
    InboundDecision,
    InboundDecision_Pass,
    InboundDecision_Reply,
    InboundMessage,
    Level,
    PluginError_BadInput,
)

# Language code -> (greeting phrases in normalised form, reply template).
GREETINGS = {
    "en": (("hello", "hi", "hey", "good morning", "good afternoon", "good evening"), "Hello, {}!"),
    "fr": (("bonjour", "salut", "bonsoir", "coucou"), "Bonjour, {} !"),
    "es": (("hola", "buenos dias", "buenas tardes", "buenas noches"), "¡Hola, {}!"),
    "de": (("hallo", "guten tag", "guten morgen", "guten abend", "servus", "moin"), "Hallo, {}!"),
    "it": (("ciao", "buongiorno", "buonasera", "salve"), "Ciao, {}!"),
    "pt": (("ola", "oi", "bom dia", "boa tarde", "boa noite"), "Olá, {}!"),
    "nl": (("hoi", "goedemorgen", "goedemiddag", "goedenavond"), "Hoi, {}!"),
}

# Words allowed after the greeting phrase ("hello there", "salut tout le monde"): longer
# messages are questions or requests that happen to start politely, left to other plugins.
MAX_TRAILING_WORDS = 3

# Longest text looked at, in characters; a greeting is short, and this bounds the work a huge
# message can cause.
MAX_TEXT_CHARS = 200


def normalise(text: str) -> list[str]:
    """Lowercase words without accents or punctuation: "¡Buenos días!" -> ["buenos", "dias"]."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    kept = []
    for char in decomposed:
        if unicodedata.combining(char):
            continue
        kept.append(char if char.isalnum() else " ")
    return "".join(kept).split()


def match_greeting(text: str, languages: list[str]) -> str | None:
    """The language code of the greeting `text` opens with, or None when it is no greeting."""
    if len(text) > MAX_TEXT_CHARS:
        return None
    words = normalise(text)
    best: tuple[int, str] | None = None
    for code in languages:
        phrases, _ = GREETINGS[code]
        for phrase in phrases:
            phrase_words = phrase.split()
            n = len(phrase_words)
            if words[:n] != phrase_words or len(words) - n > MAX_TRAILING_WORDS:
                continue
            # The longest phrase wins, so "good morning" is not read as a bare "good".
            if best is None or n > best[0]:
                best = (n, code)
    return best[1] if best else None


def configured_languages() -> list[str]:
    """The `languages` config key, or every known language when it is not set.

    The manifest's schema already refuses unknown codes; the checks here keep the plugin
    correct when it runs without its manifest (as `agentchatd plugin test` allows).
    """
    raw = config.get("languages")
    if raw is None:
        return list(GREETINGS)
    try:
        codes = json.loads(raw)
    except ValueError:
        codes = None
    if not isinstance(codes, list) or not all(code in GREETINGS for code in codes):
        known = ", ".join(GREETINGS)
        raise Err(PluginError_BadInput(f"config `languages` must be a list of: {known}"))
    return codes


class Inbound(exports.Inbound):
    def on_message(self, msg: InboundMessage) -> InboundDecision:
        if msg.kind != ContentKind.TEXT or msg.text is None:
            return InboundDecision_Pass()

        language = match_greeting(msg.text, configured_languages())
        if language is None:
            return InboundDecision_Pass()

        # Ids and the language code only: message text stays out of the log.
        log.log(Level.DEBUG, "greeting answered", [("message_id", msg.id), ("language", language)])
        _, template = GREETINGS[language]
        return InboundDecision_Reply([Draft(None, template.format(msg.sender), None)])
