"""The paper's rewriting prompt (App. A.2, verbatim), its chat rendering, and the cleaning of model outputs.

Slots: raw caption = the top retrieved realistic text (text1, "R1"), synthetic caption = the captioner's caption,
detection tags = the tagger's tags. The same prompt is used to build instruction data (make-instructions), to
fine-tune the rewriter (fit-rewriter) and to run it (rewrite stage), so the three always agree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# Verbatim from the paper (App. A.2), including "realworld" and the space-free "caption:<...>" slots; only the line
# breaks of the PDF are joined with single spaces.
PAPER_PROMPT = (
    "Please merge the information from the given raw text and the synthetic caption with the help of the highly "
    "relevant detection tags. The raw caption offers detailed real-world information, yet it suffers from flaws in "
    "sentence structure and grammar. The synthetic caption exhibits impeccable sentence structure but often lacks "
    "in-depth realworld details and may contain false information. The highly relevant detection tags are provided "
    "to enrich the semantic information of the raw caption, while some are redundant and noisy. You are a great "
    "information integration and summary expert, you are also good at enriching semantic information. Ensure a "
    "well-structured sentence while retaining the detailed real-world information provided in the raw caption. "
    "Avoid simply concatenating the sentences and avoid adding external information to describe. Correct and "
    "simplify sentences finally. Raw caption:<raw caption>, synthetic caption:<synthetic caption>, and highly "
    "relevant detection tags:<detection tags>"
)
SLOTS = ("<raw caption>", "<synthetic caption>", "<detection tags>")


@dataclass
class RewriteInput:
    raw_caption: str           # text1
    synthetic_caption: str     # the captioner's caption
    tags: list[str] = field(default_factory=list)


def format_tags(tags: Sequence[str], separator: str = ", ") -> str:
    return separator.join(t.strip() for t in tags if t and t.strip())


def render_prompt(x: RewriteInput, separator: str = ", ") -> str:
    """The paper's prompt with its three slots filled (each slot replaced once, left to right, so a caption that
    happens to contain "<detection tags>" is not substituted again)."""
    head, rest = PAPER_PROMPT.split(SLOTS[0], 1)
    mid, rest = rest.split(SLOTS[1], 1)
    mid2, tail = rest.split(SLOTS[2], 1)
    return (head + x.raw_caption.strip() + mid + x.synthetic_caption.strip() + mid2
            + format_tags(x.tags, separator) + tail)


def chat_messages(x: RewriteInput, system_prompt: Optional[str] = None, separator: str = ", ") -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return msgs + [{"role": "user", "content": render_prompt(x, separator)}]


def render_chat(tokenizer: Any, x: RewriteInput, system_prompt: Optional[str] = None, separator: str = ", ") -> str:
    """The prompt as the model sees it: the tokenizer's chat template with the generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the rewriter's tokenizer has no chat_template; use an instruct/chat model or set one")
    return tokenizer.apply_chat_template(chat_messages(x, system_prompt, separator), tokenize=False,
                                         add_generation_prompt=True)


def template_merge(x: RewriteInput, max_tags: int = 3) -> str:
    """Deterministic merge without an LLM, for CPU smoke runs: "<Caption>, <text1>[, with <tags>]." Never used as
    real synthetic text: the rewrite stage marks rows made this way with backend=template in syn_meta."""
    cap = x.synthetic_caption.strip().rstrip(".")
    raw = x.raw_caption.strip().rstrip(".")
    parts = [p for p in (cap[:1].upper() + cap[1:], raw) if p]
    tags = [t for t in x.tags[:max_tags] if t.lower() not in (cap + " " + raw).lower()]
    text = ", ".join(parts)
    if tags:
        text += ", with " + " and ".join(tags) if len(tags) <= 2 else ", with " + ", ".join(tags[:-1]) + " and " + tags[-1]
    return text + "." if text else ""


# ---- output cleaning -------------------------------------------------------------------------------------------

# Chatty openers instruction-tuned models put before the answer ("Here is the merged caption:", "Sure! ...:").
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|okay|ok)[!,.]?\s*)?"
    r"(?:here(?:'s| is| are)\b[^:\n]{0,80}:|(?:merged|final|rewritten|synthetic|refined|new)\s+caption\s*:|"
    r"caption\s*:|answer\s*:|output\s*:)\s*", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
_WORD = re.compile(r"\S+")


@dataclass
class Cleaned:
    text: Optional[str]               # None when rejected
    reason: Optional[str] = None      # why it was rejected (counted in the manifest)
    edits: list[str] = field(default_factory=list)  # what was stripped (recorded in syn_meta)


def clean_output(raw: str, min_words: int = 3, max_words: int = 77) -> Cleaned:
    """Strip preambles, quotes and trailing chatter; keep the first paragraph. Reject empty, too short, too long
    (CLIP's 77-token context is the natural bound) and outputs that still look like the prompt."""
    edits: list[str] = []
    text = (raw or "").strip()
    m = _PREAMBLE.match(text)
    if m and m.end() > 0:
        text = text[m.end():].strip()
        edits.append("preamble")
    if "\n\n" in text:  # models often add an explanation after a blank line
        text = text.split("\n\n", 1)[0].strip()
        edits.append("extra_paragraphs")
    if "\n" in text:
        text = " ".join(text.split())
        edits.append("newlines")
    if text and text[0] in _QUOTES:
        inner = [j for j, ch in enumerate(text) if ch in _QUOTES]
        # the whole answer is quoted ("..." or "...".): drop the pair; a lone opening quote: drop it. A quote that
        # closes earlier ('"Hi" said the man.') is part of the sentence and stays.
        if len(inner) == 2 and (inner[1] == len(text) - 1 or (inner[1] == len(text) - 2 and text[-1] == ".")):
            text = (text[1:inner[1]] + text[inner[1] + 1:]).strip()
            edits.append("quotes")
        elif len(inner) == 1:
            text = text[1:].strip()
            edits.append("quotes")
    if not text:
        return Cleaned(None, "empty", edits)
    if "raw caption:" in text.lower() or "detection tags:" in text.lower():
        return Cleaned(None, "prompt_echo", edits)
    n = len(_WORD.findall(text))
    if n < min_words:
        return Cleaned(None, "too_short", edits)
    if n > max_words:
        return Cleaned(None, "too_long", edits)
    return Cleaned(text, None, edits)
