"""Caption metrics through pycocoevalcap (the COCO caption evaluation code). No torch here.

`coco_scores`: BLEU-1..4, METEOR, ROUGE-L and CIDEr after the PTB tokenizer, as the COCO server
computes them (METEOR and the tokenizer need Java). `quick_scores`: BLEU-4 and CIDEr on captions
that are already token lists, for validation during training (no Java, a second or two).
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

Tokens = Sequence[str]



class JavaMissing(RuntimeError):
    """METEOR and the PTB tokenizer (pycocoevalcap) run Java, and there is none."""


def _joined(predictions: Mapping[Hashable, Tokens], references: Mapping[Hashable, Sequence[Tokens]]):
    if set(predictions) != set(references):
        raise ValueError("predictions and references must cover the same images")
    res = {k: [" ".join(v)] for k, v in predictions.items()}
    gts = {k: [" ".join(r) for r in refs] for k, refs in references.items()}
    return res, gts


def quick_scores(predictions: Mapping[Hashable, Tokens], references: Mapping[Hashable, Sequence[Tokens]]) -> dict:
    res, gts = _joined(predictions, references)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-4": float(bleu[3]), "CIDEr": float(cider)}


def coco_scores(predictions: Mapping[Hashable, Tokens], references: Mapping[Hashable, Sequence[Tokens]]) -> dict:
    """The COCO caption metrics. Raises JavaMissing if Java (needed by METEOR) is missing."""
    return coco_scores_many({"only": predictions}, references)["only"]


def coco_scores_many(prediction_sets: Mapping[str, Mapping[Hashable, Tokens]],
                     references: Mapping[Hashable, Sequence[Tokens]]) -> dict[str, dict]:
    """`coco_scores` of several prediction sets (decoding settings) against the same references, with one
    PTB tokenizer run over every caption and one METEOR process for all of them: each Java start costs
    seconds, and `tune-decoding` scores 14 settings. The scores are those of separate `coco_scores` calls
    (METEOR scores each EVAL line on its own; the tokenizer works caption by caption)."""
    if shutil.which("java") is None:
        raise JavaMissing("METEOR and the PTB tokenizer need Java (install a JRE, e.g. apt-get install default-jre-headless)")
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    joined = {name: _joined(predictions, references) for name, predictions in prediction_sets.items()}
    if not joined:
        return {}
    # one tokenizer run: every set's captions under (set, image) keys, and the references once
    everything = {("res", name, k): [{"caption": c} for c in v] for name, (res, _) in joined.items() for k, v in res.items()}
    _, gts_joined = next(iter(joined.values()))
    everything.update({("gts", k): [{"caption": c} for c in v] for k, v in gts_joined.items()})
    keyed = {i: key for i, key in enumerate(everything)}  # the tokenizer wants plain, sortable ids
    tokenized = PTBTokenizer().tokenize({i: everything[key] for i, key in keyed.items()})
    by_key = {keyed[i]: captions for i, captions in tokenized.items()}
    gts = {k: by_key[("gts", k)] for k in gts_joined}

    meteor = Meteor()
    results: dict[str, dict] = {}
    try:
        for name, (res_joined, _) in joined.items():
            res = {k: by_key[("res", name, k)] for k in res_joined}
            scores: dict[str, float] = {}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            for n in range(4):
                scores[f"BLEU-{n + 1}"] = float(bleu[n])
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
            scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
            results[name] = scores
    finally:
        del meteor
    return results
