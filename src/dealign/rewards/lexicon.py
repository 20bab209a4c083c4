"""English word tables shared by the rule-based rewards: irregular verbs and nouns, and the words that
look inflected but are not.  Data only, so every reward module can import it."""

from __future__ import annotations

import re

# Matching is deliberately permissive: generating a non-word such as "catted"
# costs nothing, while missing "threw" for "throw" makes the search chase a keyword it already has.

# Irregular verbs: base -> irregular forms.  Regular -s and -ing are added by rule; regular -ed is
# not (it would turn "see" into "seed"), so verbs that also take -ed list it here.
IRREGULAR_VERBS = """
be am is are was were been being | have has had | do does did done | go goes went gone
say said | get got gotten | make made | know knew known | think thought | take took taken
see saw seen | come came | give gave given | find found | tell told | become became
leave left | feel felt | bring brought | begin began begun | keep kept | hold held
write wrote written | stand stood | hear heard | mean meant | meet met | run ran | pay paid
sit sat | speak spoke spoken | lie lay lain lied | lay laid | lead led | grow grew grown
lose lost | fall fell fallen | send sent | build built | understand understood | draw drew drawn
break broke broken | spend spent | rise rose risen | drive drove driven | buy bought
wear wore worn | choose chose chosen | throw threw thrown | catch caught | eat ate eaten
ride rode ridden | swim swam swum | sing sang sung | fly flew flown | hang hung hanged
drink drank drunk | sleep slept | teach taught | fight fought | bite bit bitten | blow blew blown
dig dug | feed fed | shoot shot | shake shook shaken | sell sold | sweep swept | hide hid hidden
kneel knelt kneeled | light lit lighted | shine shone shined | slide slid | spin spun
stick stuck | swing swung | tear tore torn | wake woke woken | win won | beat beaten | bend bent
bleed bled | dive dove dived | freeze froze frozen | forget forgot forgotten | steal stole stolen
strike struck | leap leapt leaped | sew sewed sewn | mow mowed mown | ring rang rung
sink sank sunk | lend lent | bear bore borne born | seek sought | fit fitted | cut | hit | put
set | let | shut | read | spread | cost | hurt
"""

# Irregular plurals (regular rules are still applied to the singular: "persons", "fishes").
IRREGULAR_NOUNS = """
man men | woman women | child children | person people | foot feet | tooth teeth | mouse mice
goose geese | ox oxen | knife knives | wife wives | life lives | leaf leaves | loaf loaves
half halves | shelf shelves | wolf wolves | calf calves | thief thieves | scarf scarves | elf elves
potato potatoes | tomato tomatoes | hero heroes | cactus cacti | fungus fungi | sheep | fish | deer
"""

# Past forms that are common words in their own right: as a keyword they are taken literally
# ("left" the direction must not match "leaving"; "saw" the tool must not match "seeing").
AMBIGUOUS_FORMS = frozenset("left saw found felt fell rose bit lit shot dove spoke bore born ground".split())

# Words ending in -s that are not plurals of a shorter word ("news" is not "new" + s).
NOT_PLURAL = frozenset("news series species means always perhaps sometimes towards afterwards besides".split())


def parse_table(text: str) -> dict[str, tuple[str, ...]]:
    table = {}
    for entry in re.split(r"[|\n]", text):
        if not entry.strip():
            continue
        base, *forms = entry.split()
        table[base] = tuple(forms)
    return table


VERBS = parse_table(IRREGULAR_VERBS)
NOUNS = parse_table(IRREGULAR_NOUNS)
BASE_OF: dict[str, set[str]] = {}  # irregular form -> its base(s), for keywords given inflected
for _table in (VERBS, NOUNS):
    for _base, _forms in _table.items():
        for _form in _forms:
            if _form not in AMBIGUOUS_FORMS and _form not in VERBS and _form not in NOUNS:
                BASE_OF.setdefault(_form, set()).add(_base)
