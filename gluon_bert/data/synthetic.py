"""The offline sample shipped in gluon_bert/data/samples/, and its generator.

Nothing here is taken from SNLI, WikiText or any other corpus: a small
English-like grammar, written for this project, produces

* ``samples/wikitext-2/wiki.{train,valid,test}.tokens``: encyclopedia-style
  articles about invented towns, rivers, ships, birds and people, in WikiText's
  token format (``' = Title = '`` headings, space-separated tokens, ``@-@``,
  ``@,@`` and ``@.@`` inside words and numbers);
* ``samples/snli/snli_1.0_{train,dev,test}.txt``: sentence pairs in the official
  14-column SNLI format (binary and full parses built from the tokens), with a
  few ``-`` gold labels. The labels follow from the text: an entailed
  hypothesis restates part of the premise, often with a hypernym (man -> person,
  running -> moving, park -> outside); a contradiction negates it or swaps in an
  incompatible attribute; a neutral one adds content the premise does not give.

The output is a pure function of the code and the seed:
``python -m gluon_bert.data.synthetic --out gluon_bert/data/samples`` rewrites
byte-identical files.
"""
from __future__ import annotations

import argparse
import os
import random
import re

__all__ = ['sample_dir', 'make_wikitext', 'make_snli', 'write_samples', 'SEED']

SEED = 20240601
_HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(_HERE, 'samples')


def sample_dir(name: str) -> str:
    """The shipped sample folder: 'wikitext-2' or 'snli'."""
    if name not in ('wikitext-2', 'snli'):
        raise ValueError(f"no shipped sample {name!r}: use 'wikitext-2' or 'snli'")
    path = os.path.join(SAMPLES, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path} is missing; regenerate it with '
                                'python -m gluon_bert.data.synthetic --out ' + SAMPLES)
    return path


# ---------------------------------------------------------------------------
# WikiText-like articles

_ONSETS = ['b', 'br', 'c', 'd', 'dr', 'f', 'g', 'gr', 'h', 'k', 'l', 'm', 'n', 'p', 'r', 's',
           'st', 't', 'tr', 'v', 'w', 'z']
_VOWELS = ['a', 'e', 'i', 'o', 'u', 'ai', 'ea', 'ou']
_CODAS = ['', 'n', 'r', 'l', 'm', 'th', 'nd', 'rk', 'st', 's']

_W = dict(
    adj=['small', 'large', 'old', 'ancient', 'modern', 'quiet', 'busy', 'rural', 'coastal',
         'northern', 'southern', 'eastern', 'western', 'wealthy', 'poor', 'famous', 'remote',
         'historic', 'important', 'popular', 'narrow', 'wide', 'deep', 'shallow', 'green',
         'rocky', 'flat', 'steep', 'major', 'minor'],
    region=['north', 'south', 'east', 'west', 'centre', 'valley', 'hills', 'coast', 'plains',
            'highlands'],
    occupation=['farmer', 'merchant', 'priest', 'soldier', 'engineer', 'architect', 'teacher',
                'writer', 'painter', 'sailor', 'doctor', 'lawyer', 'banker', 'poet', 'singer',
                'politician', 'scientist', 'builder', 'miller', 'fisherman'],
    industry=['trade', 'fishing', 'farming', 'mining', 'weaving', 'shipbuilding', 'tourism',
              'education', 'brewing', 'printing', 'forestry', 'pottery'],
    structure=['church', 'bridge', 'castle', 'school', 'market', 'mill', 'tower', 'harbour',
               'library', 'museum', 'station', 'hospital', 'theatre', 'wall', 'fort'],
    disaster=['fire', 'flood', 'storm', 'earthquake', 'war', 'famine'],
    period=['middle ages', 'industrial revolution', 'colonial period', 'first world war',
            'second world war', 'nineteenth century', 'eighteenth century', 'great depression'],
    month=['january', 'february', 'march', 'april', 'may', 'june', 'july', 'august',
           'september', 'october', 'november', 'december'],
    org=['council', 'government', 'church', 'company', 'army', 'navy', 'university', 'society'],
    genre=['rock', 'folk', 'jazz', 'pop', 'country', 'blues', 'soul', 'punk'],
    bird_part=['wings', 'tail', 'beak', 'feathers', 'legs', 'crown', 'throat', 'breast'],
    colour=['brown', 'grey', 'black', 'white', 'red', 'yellow', 'blue', 'green', 'olive'],
    food=['insects', 'seeds', 'fish', 'berries', 'worms', 'fruit', 'snails', 'grain'],
    habitat=['forests', 'wetlands', 'grasslands', 'mountains', 'rivers', 'coasts', 'deserts',
             'islands'],
    ship_type=['frigate', 'cruiser', 'destroyer', 'steamer', 'schooner', 'battleship',
               'gunboat', 'liner'],
    ship_event=['sank', 'ran aground', 'was damaged', 'was captured', 'was scrapped',
                'was sold'],
    sea=['north sea', 'baltic', 'atlantic', 'pacific', 'mediterranean', 'indian ocean'],
    song_word=['night', 'river', 'heart', 'road', 'fire', 'summer', 'rain', 'home', 'light',
               'dream', 'city', 'blue', 'gold', 'wind', 'morning', 'stone'],
    party=['liberal', 'conservative', 'labour', 'national', 'democratic', 'progressive'],
    office=['mayor', 'senator', 'governor', 'minister', 'judge', 'ambassador'],
)


def _name(rng: random.Random, syllables: int | None = None) -> str:
    n = syllables or rng.choice([2, 2, 2, 3])
    word = ''.join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n))
    return (word + rng.choice(_CODAS)).capitalize()


def _number(rng: random.Random, lo: int, hi: int) -> str:
    """A number in WikiText style: thousands separated by ' @,@ '."""
    n = rng.randint(lo, hi)
    s = f'{n:,}'
    return s.replace(',', ' @,@ ')


def _decimal(rng: random.Random) -> str:
    return f'{rng.randint(1, 99)} @.@ {rng.randint(1, 9)}'


def _pick(rng, key):
    return rng.choice(_W[key])


def _town_paragraphs(rng, name, people, places):
    kind = rng.choice(['town', 'village', 'city', 'parish'])
    founder, other = rng.choice(people), rng.choice(places)
    year = rng.randint(1100, 1850)
    structure = _pick(rng, 'structure')
    intro = [f'{name} is a {_pick(rng, "adj")} {kind} in the {_pick(rng, "region")} of {other}',
             f'It lies on the {_pick(rng, "adj")} road between {rng.choice(places)} and '
             f'{rng.choice(places)}',
             f'The {kind} has a population of {_number(rng, 800, 90000)} people',
             f'{name} is known for its {_pick(rng, "adj")} {structure} and its {_pick(rng, "industry")}']
    history = [f'The {kind} was founded in {year} by {founder} , a {_pick(rng, "occupation")} '
               f'from {other}',
               f'During the {_pick(rng, "period")} , {name} became an important centre of '
               f'{_pick(rng, "industry")}',
               f'In {year + rng.randint(20, 150)} the {_pick(rng, "org")} built a '
               f'{_pick(rng, "adj")} {structure} near the {_pick(rng, "structure")}',
               f'The {structure} was destroyed by a {_pick(rng, "disaster")} in '
               f'{year + rng.randint(151, 300)} and rebuilt {rng.randint(2, 40)} years later',
               f'The people of {name} worked in {_pick(rng, "industry")} and '
               f'{_pick(rng, "industry")} until the {_pick(rng, "period")}']
    today = [f'Today the {kind} has a {_pick(rng, "structure")} , a {_pick(rng, "structure")} '
             f'and a {_pick(rng, "structure")}',
             f'The {_pick(rng, "adj")} @-@ {_pick(rng, "adj")} {_pick(rng, "structure")} of '
             f'{name} is {_decimal(rng)} metres high',
             f'Most of the people of the {kind} work in {_pick(rng, "industry")}',
             f'{rng.choice(people)} , a {_pick(rng, "occupation")} , was born in {name} in '
             f'{rng.randint(1700, 1990)}',
             f'The {kind} is served by a {_pick(rng, "structure")} on the line to '
             f'{rng.choice(places)}']
    return [('History', history), ('Geography', intro), ('Today', today)]


def _river_paragraphs(rng, name, people, places):
    length = _decimal(rng)
    course = [f'The {name} is a {_pick(rng, "adj")} river in the {_pick(rng, "region")} of '
              f'{rng.choice(places)}',
              f'It is {length} kilometres ( {_number(rng, 10, 400)} mi ) long',
              f'The river rises in the {_pick(rng, "adj")} hills near {rng.choice(places)} and '
              f'flows into the {_pick(rng, "sea")}',
              f'Its main tributary is the {_name(rng)} , which joins it at {rng.choice(places)}',
              f'The valley of the {name} is {_pick(rng, "adj")} and {_pick(rng, "adj")}']
    history = [f'In {rng.randint(1200, 1900)} a {_pick(rng, "structure")} was built across '
               f'the {name} at {rng.choice(places)}',
               f'The river was used for {_pick(rng, "industry")} and {_pick(rng, "industry")}',
               f'A {_pick(rng, "disaster")} in {rng.randint(1700, 2000)} destroyed the '
               f'{_pick(rng, "structure")} on the river',
               f'{rng.choice(people)} , a {_pick(rng, "occupation")} , described the river '
               f'as " {_pick(rng, "adj")} and {_pick(rng, "adj")} "']
    wildlife = [f'The {name} is home to many {_pick(rng, "food")} and birds',
                f'Its banks are covered by {_pick(rng, "habitat")} and {_pick(rng, "habitat")}',
                f'The water of the river is {_pick(rng, "adj")} and {_pick(rng, "colour")}']
    return [('Course', course), ('History', history), ('Wildlife', wildlife)]


def _ship_paragraphs(rng, name, people, places):
    ship = _pick(rng, 'ship_type')
    year = rng.randint(1850, 1960)
    design = [f'{name} was a {_pick(rng, "adj")} {ship} built for the navy of '
              f'{rng.choice(places)}',
              f'She was {_number(rng, 60, 300)} metres long and had a crew of '
              f'{_number(rng, 80, 1600)} men',
              f'The {ship} was designed by {rng.choice(people)} , an {rng.choice(["engineer", "architect"])} '
              f'from {rng.choice(places)}',
              f'Her main guns were {_decimal(rng)} centimetres in size']
    service = [f'{name} was launched in {year} and entered service in {year + 1}',
               f'In {year + rng.randint(2, 10)} she sailed to the {_pick(rng, "sea")} with the '
               f'{_pick(rng, "adj")} fleet',
               f'During the {_pick(rng, "period")} the {ship} {_pick(rng, "ship_event")} near '
               f'{rng.choice(places)}',
               f'{name} {_pick(rng, "ship_event")} in {year + rng.randint(11, 40)}',
               f'Her captain , {rng.choice(people)} , was praised by the {_pick(rng, "org")}']
    return [('Design', design), ('Service history', service)]


def _bird_paragraphs(rng, name, people, places):
    colour, food = _pick(rng, 'colour'), _pick(rng, 'food')
    description = [f'The {name} is a {_pick(rng, "adj")} bird of the {_pick(rng, "habitat")} '
                   f'of {rng.choice(places)}',
                   f'It is {_decimal(rng)} centimetres long and has {colour} '
                   f'{_pick(rng, "bird_part")}',
                   f'The male has a {_pick(rng, "colour")} {_pick(rng, "bird_part")} and a '
                   f'{colour} {_pick(rng, "bird_part")}',
                   f'The female is {_pick(rng, "colour")} with {_pick(rng, "colour")} '
                   f'{_pick(rng, "bird_part")}']
    ecology = [f'The {name} eats {food} and {_pick(rng, "food")}',
               f'It lives in {_pick(rng, "habitat")} and {_pick(rng, "habitat")}',
               f'The bird builds its nest in {_pick(rng, "month")} and lays '
               f'{rng.randint(2, 6)} eggs',
               f'The species was first described by {rng.choice(people)} in '
               f'{rng.randint(1750, 1950)}',
               f'It is a {_pick(rng, "adj")} species and is not threatened']
    return [('Description', description), ('Ecology', ecology)]


def _person_paragraphs(rng, name, people, places):
    born = rng.randint(1780, 1970)
    job = _pick(rng, 'occupation')
    surname = name.split()[-1]
    early = [f'{name} ( {born} - {born + rng.randint(30, 90)} ) was a {_pick(rng, "adj")} '
             f'{job} from {rng.choice(places)}',
             f'{surname} was born in {rng.choice(places)} in {_pick(rng, "month")} {born}',
             f'His father was a {_pick(rng, "occupation")} and his mother was a '
             f'{_pick(rng, "occupation")}',
             f'{surname} studied {_pick(rng, "industry")} at the university of '
             f'{rng.choice(places)}']
    career = [f'In {born + rng.randint(18, 30)} {surname} became a {_pick(rng, "office")} for '
              f'the {_pick(rng, "party")} party',
              f'{surname} released a {_pick(rng, "genre")} album called " '
              f'{_pick(rng, "song_word").capitalize()} {_pick(rng, "song_word").capitalize()} "',
              f'{surname} worked with {rng.choice(people)} on a {_pick(rng, "adj")} '
              f'{_pick(rng, "structure")} in {rng.choice(places)}',
              f'The {_pick(rng, "org")} gave {surname} a {_pick(rng, "adj")} prize in '
              f'{born + rng.randint(31, 60)}',
              f'{surname} died in {rng.choice(places)} after a {_pick(rng, "adj")} illness']
    return [('Early life', early), ('Career', career)]


_TOPICS = [_town_paragraphs, _river_paragraphs, _ship_paragraphs, _bird_paragraphs,
           _person_paragraphs]


def _sentence_text(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def make_wikitext(rng: random.Random, num_articles: int, places, people) -> str:
    """Articles in the layout of wiki.*.tokens (leading spaces, ' . ' sentence ends)."""
    lines = [' \n']
    for _ in range(num_articles):
        topic = rng.choice(_TOPICS)
        if topic is _person_paragraphs:
            name = f'{_name(rng)} {_name(rng)}'
        elif topic is _river_paragraphs:
            name = f'{_name(rng)} River'
        elif topic is _ship_paragraphs:
            name = f'{rng.choice(["HMS", "SMS", "USS"])} {_name(rng)}'
        elif topic is _bird_paragraphs:
            name = f'{_pick(rng, "colour")} @-@ {rng.choice(["tailed", "throated", "crowned", "winged"])} {_name(rng).lower()}'
        else:
            name = rng.choice(places)
        title = name[0].upper() + name[1:]
        lines += [f' = {title} = \n', ' \n']
        for section, sentences in topic(rng, name, people, places):
            lines += [f' = = {section} = = \n', ' \n']
            # Shuffle within a section but keep its first sentence first.
            rest = sentences[1:]
            rng.shuffle(rest)
            picked = [sentences[0]] + rest[:rng.randint(2, len(rest))]
            text = ' . '.join(_sentence_text(s) for s in picked)
            lines += [f' {text} . \n', ' \n']
    # 'a' before a vowel sound becomes 'an' ("an ancient river").
    return re.sub(r'\b([Aa]) (?=[aeiou])', r'\1n ', ''.join(lines))


# ---------------------------------------------------------------------------
# SNLI-like pairs

# noun -> (hypernym, pronoun-ish plural unused)
_NOUNS = {'man': 'person', 'woman': 'person', 'boy': 'child', 'girl': 'child',
          'worker': 'person', 'teacher': 'person', 'doctor': 'person', 'student': 'person',
          'cook': 'person', 'farmer': 'person', 'dog': 'animal', 'cat': 'animal',
          'horse': 'animal', 'puppy': 'animal'}
_HUMAN = [n for n, h in _NOUNS.items() if h != 'animal']
_ANIMAL = [n for n, h in _NOUNS.items() if h == 'animal']
_AGE = {'young': 'old', 'old': 'young', 'tall': 'short', 'short': 'tall',
        'happy': 'sad', 'sad': 'happy'}
_COLOURS = ['red', 'blue', 'green', 'yellow', 'black', 'white', 'orange', 'purple']
_CLOTHES = ['shirt', 'jacket', 'hat', 'dress', 'coat', 'sweater']
# action -> (hypernym, group); actions of different groups cannot happen at once.
_ACTIONS = {'running': ('moving', 'move'), 'walking': ('moving', 'move'),
            'jumping': ('moving', 'move'), 'dancing': ('moving', 'move'),
            'sitting': ('resting', 'rest'), 'sleeping': ('resting', 'rest'),
            'lying down': ('resting', 'rest'), 'eating an apple': ('eating', 'eat'),
            'eating a sandwich': ('eating', 'eat'), 'reading a book': ('reading', 'read'),
            'reading a newspaper': ('reading', 'read'),
            'playing a guitar': ('playing music', 'music'),
            'playing the piano': ('playing music', 'music'),
            'riding a bike': ('riding', 'ride'), 'riding a horse': ('riding', 'ride')}
_ANIMAL_ACTIONS = ['running', 'walking', 'jumping', 'sitting', 'sleeping', 'lying down']
# place -> outside/indoors
_PLACES = {'in the park': 'outside', 'on the beach': 'outside', 'on a street': 'outside',
           'in a field': 'outside', 'in the snow': 'outside', 'near a river': 'outside',
           'in a kitchen': 'indoors', 'in a classroom': 'indoors', 'in a library': 'indoors',
           'in an office': 'indoors'}
_NEUTRAL_ADDITIONS = ['to win a contest', 'for the first time', 'because it is late',
                      'with a best friend', 'before going to work', 'after a long day',
                      'while waiting for a bus', 'to raise money for charity',
                      'on a birthday', 'for a television show']
_NEUTRAL_FACTS = ['is waiting for a friend', 'is on vacation', 'is very tired',
                  'is about to go home', 'is famous', 'is training for a race',
                  'is celebrating a birthday', 'is late for a meeting']

_POS = {'a': 'DT', 'an': 'DT', 'the': 'DT', 'is': 'VBZ', 'not': 'RB', 'in': 'IN', 'on': 'IN',
        'near': 'IN', 'to': 'TO', 'for': 'IN', 'with': 'IN', 'because': 'IN', 'before': 'IN',
        'after': 'IN', 'while': 'IN', 'it': 'PRP', 'there': 'EX', 'nobody': 'NN', '.': '.',
        'outside': 'RB', 'indoors': 'RB', 'very': 'RB', 'about': 'RB'}


def _article(word: str) -> str:
    return 'an' if word[0] in 'aeiou' else 'a'


class _Scene:
    """One premise's facts; hypotheses are built from (and against) them."""

    def __init__(self, rng: random.Random):
        self.animal = rng.random() < 0.25
        self.noun = rng.choice(_ANIMAL if self.animal else _HUMAN)
        self.adj = rng.choice(list(_AGE)) if rng.random() < 0.5 else None
        self.colour = (rng.choice(_COLOURS) if not self.animal and rng.random() < 0.6 else None)
        self.clothes = rng.choice(_CLOTHES)
        self.action = rng.choice(_ANIMAL_ACTIONS if self.animal else list(_ACTIONS))
        self.place = rng.choice(list(_PLACES))

    def np(self, noun=None, adj=None, colour=None, det=None):
        words = [adj] if adj else []
        words.append(noun or self.noun)
        phrase = ' '.join(words)
        out = f'{det or _article(phrase)} {phrase}'
        if colour:
            out += f' in {_article(colour)} {colour} {self.clothes}'
        return out

    def premise(self):
        return f'{self.np(adj=self.adj, colour=self.colour)} is {self.action} {self.place}'


def _entailment(rng, s: _Scene) -> str:
    hyper_noun = _NOUNS[s.noun]
    hyper_action = _ACTIONS[s.action][0]
    options = [f'{s.np(noun=hyper_noun)} is {s.action}',
               f'{s.np()} is {hyper_action} {s.place}',
               f'{s.np(noun=hyper_noun)} is {hyper_action}',
               f'{s.np(noun=hyper_noun)} is {_PLACES[s.place]}',
               f'there is {s.np()} {s.place}']
    if s.colour:
        options.append(f'{s.np(noun=hyper_noun, colour=s.colour)} is {hyper_action}')
    if s.adj:
        options.append(f'{s.np(adj=s.adj, noun=hyper_noun)} is {_PLACES[s.place]}')
    return rng.choice(options)


def _contradiction(rng, s: _Scene) -> str:
    group = _ACTIONS[s.action][1]
    others = [a for a in (_ANIMAL_ACTIONS if s.animal else _ACTIONS) if _ACTIONS[a][1] != group]
    opposite_place = 'indoors' if _PLACES[s.place] == 'outside' else 'outside'
    options = [f'{s.np(det="the")} is not {s.action}',
               f'nobody is {s.action} {s.place}',
               f'{s.np(det="the")} is {rng.choice(others)} {s.place}',
               f'{s.np(det="the")} is {opposite_place}']
    if s.adj:
        options.append(f'{s.np(adj=_AGE[s.adj], det="the")} is {s.action}')
    if s.colour:
        other = rng.choice([c for c in _COLOURS if c != s.colour])
        options.append(f'{s.np(colour=other, det="the")} is {s.action}')
    return rng.choice(options)


def _neutral(rng, s: _Scene) -> str:
    options = [f'{s.np()} is {s.action} {rng.choice(_NEUTRAL_ADDITIONS)}',
               f'{s.np(det="the")} {rng.choice(_NEUTRAL_FACTS)}',
               f'{s.np(det="the")} is {_ACTIONS[s.action][0]} {rng.choice(_NEUTRAL_ADDITIONS)}']
    if not s.adj:
        options.append(f'{s.np(adj=rng.choice(list(_AGE)))} is {s.action}')
    return rng.choice(options)


def _tokens(sentence: str) -> list[str]:
    return sentence.split() + ['.']


def _binary_parse(tokens: list[str]) -> str:
    """A right-branching binary tree over the tokens, with the period attached last."""
    def tree(toks):
        if len(toks) == 1:
            return toks[0]
        if len(toks) == 2:
            return f'( {toks[0]} {toks[1]} )'
        return f'( {toks[0]} {tree(toks[1:])} )'
    return f'( {tree(tokens[:-1])} {tokens[-1]} )'


def _full_parse(tokens: list[str]) -> str:
    tagged = ' '.join(f'({_POS.get(t.lower(), "VBG" if t.endswith("ing") else "NN")} {t})'
                      for t in tokens)
    return f'(ROOT (S {tagged}))'


def _capitalise(tokens: list[str]) -> list[str]:
    return [tokens[0].capitalize()] + tokens[1:]


def make_snli(rng: random.Random, num_premises: int, split: str, with_annotators: bool) -> str:
    """Pairs in the official snli_1.0_<split>.txt layout (14 columns, header)."""
    header = ['gold_label', 'sentence1_binary_parse', 'sentence2_binary_parse',
              'sentence1_parse', 'sentence2_parse', 'sentence1', 'sentence2', 'captionID',
              'pairID', 'label1', 'label2', 'label3', 'label4', 'label5']
    rows = ['\t'.join(header)]
    makers = {'entailment': _entailment, 'contradiction': _contradiction, 'neutral': _neutral}
    for k in range(num_premises):
        scene = _Scene(rng)
        p_tokens = _capitalise(_tokens(scene.premise()))
        caption = f'synth{split}{k:05d}.jpg#{rng.randint(0, 4)}'
        for label, code in (('entailment', 'e'), ('contradiction', 'c'), ('neutral', 'n')):
            h_tokens = _capitalise(_tokens(makers[label](rng, scene)))
            # About 2% of pairs have no majority label: gold '-'.
            if rng.random() < 0.02:
                votes = [label, label] + rng.sample([m for m in makers if m != label], 2)
                votes.append(rng.choice(list(makers)))
                gold = '-'
            else:
                votes = [label] * rng.randint(3, 5)
                votes += [rng.choice(list(makers)) for _ in range(5 - len(votes))]
                gold = label
            if not with_annotators:
                votes = [votes[0]] + [''] * 4
            rows.append('\t'.join([
                gold, _binary_parse(p_tokens), _binary_parse(h_tokens),
                _full_parse(p_tokens), _full_parse(h_tokens),
                ' '.join(p_tokens[:-1]) + '.', ' '.join(h_tokens[:-1]) + '.',
                caption, f'{caption}r1{code}'] + votes))
    return '\n'.join(rows) + '\n'


def write_samples(out: str, seed: int = SEED) -> dict[str, int]:
    """Write every sample file under `out`; returns their sizes in bytes."""
    rng = random.Random(seed)
    places = [_name(rng) for _ in range(60)]
    people = [f'{_name(rng)} {_name(rng)}' for _ in range(80)]
    files = {
        'wikitext-2/wiki.train.tokens': make_wikitext(rng, 900, places, people),
        'wikitext-2/wiki.valid.tokens': make_wikitext(rng, 30, places, people),
        'wikitext-2/wiki.test.tokens': make_wikitext(rng, 30, places, people),
        'snli/snli_1.0_train.txt': make_snli(rng, 1000, 'train', with_annotators=False),
        'snli/snli_1.0_dev.txt': make_snli(rng, 120, 'dev', with_annotators=True),
        'snli/snli_1.0_test.txt': make_snli(rng, 120, 'test', with_annotators=True),
    }
    sizes = {}
    for rel, text in files.items():
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = text.encode('utf-8')
        with open(path, 'wb') as f:
            f.write(data)
        sizes[rel] = len(data)
    return sizes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=SAMPLES, help='folder to write (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=SEED)
    args = parser.parse_args(argv)
    for rel, size in write_samples(args.out, args.seed).items():
        print(f'{size:>9,d}  {os.path.join(args.out, rel)}')


if __name__ == '__main__':
    main()
