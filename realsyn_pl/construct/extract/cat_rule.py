"""A rule-based approximation of DiHT's CAT text rule: caption complexity >= C_k and an action.

DiHT (Radenovic et al., CVPR'23) parses each caption into a scene graph (objects, attributes, relations) and keeps
captions whose complexity is at least C1 -- at least one object carrying an attribute or a relation -- and that
contain an action (a verb relation). realsyn_pl ships no scene-graph parser (none installs without downloading a
model), so the graph is approximated with closed-class word lists, deterministically:

- tokens: lower-cased words (sentence_filters.words).
- function words: determiners/numbers, prepositions, pronouns, auxiliaries, conjunctions, a few adverbs (below);
  every other token is a content word.
- action: a token that is (a) an inflection (-s, -es, -ed, -ing, e-drop, consonant doubling) of a verb in
  ACTION_VERBS, or (b) an -ing word of >= 5 letters not in NOT_VERBS_ING and not directly after a determiner
  ("a building" is a noun), or (c) an -ed/-en word directly after an auxiliary ("is parked", "was taken").
- complexity = number of approximate scene-graph edges:
  attribute edges: in a run of consecutive non-action content words (a noun phrase), every word before the last
  modifies the head: run length - 1 edges ("red vintage car" = 2);
  relation edges: a preposition with a content word somewhere before it and one after it, or an action with a
  content word before or after it (1 each; an intransitive action is an attribute of its subject).
- keep iff complexity >= min_complexity (C1 = 1) and (an action is present, if required).
Known gaps: no real POS tagging, so noun/verb ambiguity ("the dogs run" vs "a run") is settled by the lists;
non-English text never passes. Switch it off with sentence_filter.cat_rule=off.
"""
from __future__ import annotations

from dataclasses import dataclass

DETERMINERS = set("a an the this that these those his her its their our my your some many several each every "
                  "another no any all both few more most one two three four five six seven eight nine ten".split())
PREPOSITIONS = set("on in at under over above below near beside behind with by from into onto through across along "
                   "around between among against inside outside of for to toward towards up down off out upon "
                   "beneath within without during after before".split())
PRONOUNS = set("i you he she it we they me him us them who whom which what there here someone something".split())
AUXILIARIES = set("is are was were be been being am has have had do does did will would can could should may "
                  "might must 's 're".split())
CONJUNCTIONS = set("and or but nor so yet because while when if than as".split())
ADVERBS = set("not very also just only too then now really quite".split())
FUNCTION_WORDS = DETERMINERS | PREPOSITIONS | PRONOUNS | AUXILIARIES | CONJUNCTIONS | ADVERBS

ACTION_VERBS = set("""
run walk sit stand ride drive fly swim jump play eat drink hold carry throw catch kick hit read write paint draw cook
cut climb dance sing smile laugh look watch wear open close build make take give put pull push lift lie sleep wait
talk speak show cross fall grow stretch lean hang float rise pour wash clean fix repair sell buy serve pose park land
move turn roll skate ski surf hike race chase feed pet hug kiss shake point raise wave celebrate perform work study
teach learn prepare display feature stand cover fill surround overlook line decorate light shine burn bloom flow
""".split())
NOT_VERBS_ING = set("thing something anything nothing everything morning evening building ceiling king ring wing "
                    "spring string during clothing bedding wedding pudding icing setting ending heading".split())


def _inflections(verb: str) -> set[str]:
    forms = {verb, verb + "s", verb + "es", verb + "ed", verb + "ing"}
    if verb.endswith("e"):
        forms |= {verb[:-1] + "ing", verb + "d"}
    if len(verb) >= 3 and verb[-1] not in "aeiouwxy" and verb[-2] in "aeiou" and verb[-3] not in "aeiou":
        forms |= {verb + verb[-1] + "ing", verb + verb[-1] + "ed"}  # run -> running, stop -> stopped
    return forms


ACTION_FORMS = set().union(*(_inflections(v) for v in ACTION_VERBS)) | {
    "sat", "stood", "rode", "drove", "flew", "swam", "ate", "drank", "held", "threw", "caught", "read", "wrote",
    "drew", "climbed", "made", "took", "given", "gave", "fell", "grew", "hung", "rose", "sold", "bought", "ran",
    "taken", "built", "lying", "worn", "wore", "shown", "lit", "led", "leading"}


@dataclass(frozen=True)
class CatResult:
    complexity: int
    has_action: bool

    def passes(self, min_complexity: int, require_action: bool) -> bool:
        return self.complexity >= min_complexity and (self.has_action or not require_action)


def _is_action(tokens: list[str], i: int) -> bool:
    t = tokens[i]
    prev = tokens[i - 1] if i > 0 else ""
    if t in ACTION_FORMS:
        return prev not in DETERMINERS or not t.endswith("ing") and t not in ACTION_VERBS
    if t.endswith("ing") and len(t) >= 5 and t not in NOT_VERBS_ING and prev not in DETERMINERS:
        return True
    return prev in AUXILIARIES and (t.endswith("ed") or t.endswith("en")) and len(t) >= 4


def analyse(tokens: list[str]) -> CatResult:
    """Approximate scene-graph complexity and action presence of a lower-cased token list."""
    action = [_is_action(tokens, i) for i in range(len(tokens))]
    content = [t not in FUNCTION_WORDS and not t.isdigit() for t in tokens]
    edges = 0
    run = 0
    for i in range(len(tokens)):
        if content[i] and not action[i]:
            run += 1
        else:
            edges += max(0, run - 1)
            run = 0
    edges += max(0, run - 1)
    for i, t in enumerate(tokens):
        if t in PREPOSITIONS or action[i]:
            before = any(content[j] and not action[j] for j in range(i))
            after = any(content[j] and not action[j] for j in range(i + 1, len(tokens)))
            # a preposition links two objects; an action needs one (intransitive "the cat is sleeping")
            edges += int(before and after) if t in PREPOSITIONS else int(before or after)
    return CatResult(complexity=edges, has_action=any(action))
