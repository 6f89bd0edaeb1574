"""A small bundled synonym list for EDA's synonym replacement and random insertion (data/augment.py):
common English adjectives, verbs and nouns, with the sentiment words of review data. Each group is a set
of mutual synonyms."""
from __future__ import annotations

GROUPS = [
    "good fine nice decent solid", "great excellent superb terrific wonderful fantastic", "bad poor awful lousy",
    "terrible horrible dreadful atrocious", "boring dull tedious monotonous", "funny amusing hilarious comic",
    "interesting fascinating engaging intriguing", "beautiful lovely gorgeous stunning pretty",
    "ugly unattractive hideous", "happy glad cheerful joyful", "sad unhappy gloomy sorrowful",
    "smart clever bright intelligent", "stupid dumb foolish silly", "big large huge enormous",
    "small little tiny minor", "fast quick rapid swift", "slow sluggish leisurely", "old aged ancient",
    "new fresh novel recent", "strong powerful mighty", "weak feeble frail", "easy simple effortless",
    "hard difficult tough", "important significant major", "strange odd weird peculiar", "real genuine authentic",
    "fake false phony", "quiet calm silent", "loud noisy", "rich wealthy affluent", "brave bold courageous",
    "scary frightening terrifying", "movie film picture", "story tale narrative plot", "actor performer player",
    "director filmmaker", "performance portrayal acting", "scene sequence", "ending finale conclusion",
    "character role figure", "audience viewers spectators", "book novel volume", "show program series",
    "music score soundtrack", "job work task", "car automobile vehicle", "house home dwelling", "kid child youngster",
    "friend companion pal", "problem issue trouble", "idea notion concept", "way method manner", "place spot location",
    "like enjoy love", "hate dislike detest", "make create produce", "show reveal display", "say state tell",
    "think believe suppose", "see watch view", "try attempt", "help aid assist", "begin start commence",
    "end finish conclude", "use employ utilize", "get obtain acquire", "give offer provide", "keep retain hold",
    "very really truly extremely", "completely entirely totally wholly", "often frequently regularly",
    "maybe perhaps possibly", "quickly rapidly swiftly", "mostly largely mainly",
]

SYNONYMS: dict[str, list[str]] = {}
for _group in GROUPS:
    _words = _group.split()
    for _w in _words:
        SYNONYMS.setdefault(_w, []).extend(x for x in _words if x != _w)

#: words EDA never replaces (Wei & Zou's stop words, abridged)
STOP_WORDS = frozenset(
    "i me my myself we our ours you your he him his she her it its they them their what which who whom this that "
    "these those am is are was were be been being have has had do does did a an the and but if or because as until "
    "while of at by for with about against between into through during before after above below to from up down in "
    "out on off over under again further then once here there when where why how all any both each few more most "
    "other some such no nor not only own same so than too very s t can will just don should now".split())
