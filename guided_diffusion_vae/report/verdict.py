"""One paragraph that says whether the generated spectrograms can enlarge an
identification data set, and why, from an evaluation's metrics JSON.

:func:`verdict` reads the result of ``scripts/evaluate.py`` (a dict) and
returns ``(headline, paragraph)``. Each check compares a metric with its own
reference (TRTR, the Frechet floor), never with an absolute number, because
what is reachable depends on the data set:

===========================  ==========================================  ========
check, in order of weight    fails when                                  weight
===========================  ==========================================  ========
VAE caps identity            rCAS < 0.9 x TRTR                           caveat
samples not the right person CAS < 0.9 x TRTR                            blocking
samples copy training walks  ``memorised`` > 0 or ``memorised_gu`` > 0   caveat
little variety               ``variety.ratio`` < 0.97; FD > 1.5 x floor  caveat
generated data hurt          augmentation gain (all real, else the       blocking
                             largest k) < 0
TSTR low                     TSTR < 0.8 x TRTR                           caveat
===========================  ==========================================  ========

Headline: "not usable" when a blocking check fails; "usable with caveats"
when only caveats fail or the augmentation gain was not measured; "usable"
otherwise. Nothing is judged without TRTR or CAS (no generated samples
evaluated), or when TRTR is less than a quarter of the way from chance to 1
(a reference classifier that cannot tell the people apart). No key is
required: a metric that is null is named as not measured; one that is absent
(an evaluation older than the check) is skipped.
"""

import math

RCAS_MIN = 0.9  # x TRTR: below, the VAE loses the person before diffusion sees it
CAS_MIN = 0.9  # x TRTR: below, too many samples show someone else
VARIETY_MIN = 0.97  # generated / real within-person nearest-neighbour distance
FD_MAX = 1.5  # x the real-vs-real floor
TSTR_MIN = 0.8  # x TRTR
GAIN_MIN = 0.0  # accuracy points: below, adding generated data makes the classifier worse
# TRTR must get this share of the way from chance to 1; below, the reference
# classifier barely tells the people apart and ratios to it mean nothing.
SKILL_MIN = 0.25

USABLE = "usable for augmentation"
CAVEATS = "usable for augmentation, with caveats"
NOT_USABLE = "not usable for augmentation"
NOT_JUDGED = "not judged"


def _num(value):
    """A finite float, or None (for null, missing, text, booleans, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _dict(value):
    return value if isinstance(value, dict) else {}


def _with_spread(result, key, value, digits=3, signed=False):
    """``0.812`` or ``0.812 +- 0.010`` when the evaluation repeated the metric
    over classifier seeds (``spread[key]``; the gains are ``augmentation_gain_K``)."""
    std = _num(_dict(_dict(result.get("spread")).get(key)).get("std"))
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return f"{text} \u00b1 {std:.{digits}f}" if std is not None else text


def _ratio_check(result, key, label, minimum, trtr):
    """(passed, text) of ``key`` against ``minimum`` x TRTR, or None if not measured."""
    value = _num(result.get(key))
    if value is None or not trtr:
        return None
    ratio = value / trtr
    text = f"{label} {_with_spread(result, key, value)} = {ratio:.2f} \u00d7 TRTR (needs \u2265 {minimum:g} \u00d7)"
    return ratio >= minimum, text


def augmentation_entry(result):
    """(k, label, gain dict) of the augmentation experiment the verdict reads:
    all real data (key ``"all"``) when present, else the largest k; None if none measured."""
    gains = {str(k): _dict(v) for k, v in _dict(result.get("augmentation_gain")).items()
             if _num(_dict(v).get("gain")) is not None}
    if "all" in gains:
        return "all", "all real training data", gains["all"]
    ks = [k for k in gains if k.isdigit()]
    if not ks:
        return None
    k = max(ks, key=int)
    return k, f"{k} real per person", gains[k]


def _checks(result):
    """Every check as ``(name, blocking, passed, text)``, in order of weight; unmeasured ones have passed None."""
    trtr = _num(result.get("trtr"))
    out = []

    def add(name, blocking, outcome, missing_text):
        passed, text = outcome if outcome else (None, missing_text)
        out.append((name, blocking, passed, text))

    add("vae", False, _ratio_check(result, "rcas", "rCAS", RCAS_MIN, trtr), "rCAS (no VAE given)")
    add("cas", True, _ratio_check(result, "cas", "CAS", CAS_MIN, trtr), "CAS")
    out.extend(_copy_checks(result))
    out.extend(_variety_checks(result))
    out.append(_gain_check(result))
    add("tstr", False, _ratio_check(result, "tstr", "TSTR", TSTR_MIN, trtr), "TSTR")
    return out


def _copy_checks(result):
    memorised = result.get("memorised")
    generated = _num(_dict(result.get("counts")).get("generated"))
    of = f" of {int(generated):,}" if generated else ""
    out = []
    if _num(memorised) is None:
        out.append(("copies", False, None, "memorisation"))
    else:
        threshold = _dict(result.get("memorisation")).get("threshold")
        rule = f" (nearest-training distance below {threshold} \u00d7 the typical held-out one)" if threshold else ""
        out.append(("copies", False, memorised == 0, f"{int(memorised)}{of} samples memorised{rule}"))
    gu = result.get("memorised_gu")
    if _num(gu) is not None:
        limit = _num(_dict(result.get("memorisation")).get("copy_ratio_threshold"))
        limit = f"{limit:.2g}" if limit is not None else "1/3"
        out.append(("copies_gu", False, gu == 0,
                    f"{int(gu)}{of} samples far closer to one training walk than to any other "
                    f"(nearest / second-nearest distance < {limit})"))
    elif "memorised_gu" in result:  # null: not computed; absent: an evaluation older than the test
        out.append(("copies_gu", False, None, "the second-nearest copy test"))
    return out


def _variety_checks(result):
    out = []
    variety = _dict(result.get("variety"))
    ratio = _num(variety.get("ratio"))
    if ratio is None and "variety" in result:
        out.append(("variety", False, None, "within-person variety"))
    if ratio is not None:
        gen, real = _num(variety.get("generated")), _num(variety.get("real"))
        detail = f"{gen:.3g} vs {real:.3g}; " if gen is not None and real is not None else ""
        out.append(("variety", False, ratio >= VARIETY_MIN,
                    f"within-person nearest-neighbour distance of the samples {ratio:.2f} \u00d7 the real one "
                    f"({detail}needs \u2265 {VARIETY_MIN:g} \u00d7)"))
    fd, floor = _num(result.get("fd")), _num(result.get("fd_floor"))
    if fd is not None and floor:
        out.append(("fd", False, fd / floor <= FD_MAX,
                    f"Frechet distance {fd:.2f} = {fd / floor:.2f} \u00d7 the real-vs-real floor {floor:.2f} "
                    f"(needs \u2264 {FD_MAX:g} \u00d7)"))
    else:
        out.append(("fd", False, None, "Frechet distance"))
    return out


def _gain_check(result):
    entry = augmentation_entry(result)
    if entry is None:
        return ("gain", True, None, "augmentation gain")
    k, label, g = entry
    gain = _num(g.get("gain"))
    before, after = _num(g.get("real_only")), _num(g.get("augmented"))
    extra = g.get("generated_per_class")
    added = f"{extra} generated per person" if extra is not None else "generated samples"
    change = f" ({before:.3f} \u2192 {after:.3f})" if before is not None and after is not None else ""
    text = (f"adding {added} to {label} changes held-out accuracy by "
            f"{_with_spread(result, f'augmentation_gain_{k}', gain, signed=True)}{change}")
    recon = _num(_dict(result.get("reconstruction_gain")).get("gain"))
    if k == "all" and recon is not None:
        text += (f"; adding the VAE's reconstructions of training walks instead changes it by "
                 f"{_with_spread(result, 'reconstruction_gain', recon, signed=True)}")
    return ("gain", True, gain >= GAIN_MIN, text)


# The sentence that opens each failed check, by check name.
FAILED = {
    "vae": "the VAE caps identity",
    "cas": "the samples are often not the right person",
    "copies": "samples copy training walks",
    "copies_gu": "samples copy training walks",
    "variety": "the samples have little variety",
    "fd": "the samples have little variety or drift from the real ones",
    "gain": "the generated data hurt the classifier",
    "tstr": "a classifier trained on samples alone falls short on real walks",
}


# The evaluation's ``notes`` key that says why a check's metric is null.
NOTE_KEYS = {"vae": "rcas", "cas": "cas", "copies": "memorised", "copies_gu": "memorised_gu", "variety": "variety",
             "fd": "fd", "gain": "augmentation_gain", "tstr": "tstr"}


def _unmeasured(result, name, text):
    """``TSTR: every person needs ...``: the metric and, when recorded, why it is null."""
    note = _dict(result.get("notes")).get(NOTE_KEYS.get(name, name))
    return f"{text}: {note}" if note else text


def _sentence(text):
    return text[:1].upper() + text[1:] + "."


def verdict(result):
    """``(headline, paragraph)`` of an evaluation result dict (see the module docstring)."""
    result = _dict(result)
    trtr = _num(result.get("trtr"))
    if trtr is None or _num(result.get("cas")) is None:
        missing = "TRTR" if trtr is None else "CAS (no generated samples were evaluated)"
        return NOT_JUDGED, _sentence(f"{NOT_JUDGED}: the evaluation has no {missing}, so the generated "
                                     "spectrograms cannot be judged for augmentation")
    chance = _num(result.get("chance"))
    if chance is not None and chance < 1 and (trtr - chance) / (1 - chance) < SKILL_MIN:
        return NOT_JUDGED, _sentence(
            f"{NOT_JUDGED}: the reference classifier barely tells the people apart (TRTR {trtr:.3f}, chance "
            f"{chance:.3f}; it needs to get {SKILL_MIN:g} of the way from chance to 1), so no metric measured "
            "against it says whether the samples show the right person; train it longer or on more data")
    checks = _checks(result)
    failed = [c for c in checks if c[2] is False]
    unmeasured = [_unmeasured(result, name, text) for name, _, passed, text in checks if passed is None]
    gain_measured = any(c[0] == "gain" and c[2] is not None for c in checks)
    if any(blocking for _, blocking, _, _ in failed):
        headline = NOT_USABLE
    elif failed or not gain_measured:
        headline = CAVEATS
    else:
        headline = USABLE

    decisive = [FAILED[name] for name, blocking, _, _ in failed if blocking]
    because = f": {' and '.join(decisive)}" if decisive else ""
    parts = [_sentence(f"{headline}{because} (TRTR {_with_spread(result, 'trtr', trtr)})")]
    seen = set()
    for name, _, _, text in failed:
        opening = FAILED[name]
        if opening in seen:  # two copy checks: one opening, both numbers
            parts.append(_sentence(text))
            continue
        seen.add(opening)
        parts.append(_sentence(f"{opening}: {text}"))
    if not gain_measured and headline == CAVEATS:
        parts.append("The augmentation gain was not measured, so a benefit to the classifier is unproven.")
    passed = [text for _, _, ok, text in checks if ok]
    if passed:
        parts.append("Passed: " + "; ".join(passed) + ".")
    if unmeasured:
        parts.append("Not measured: " + "; ".join(unmeasured) + ".")
    return headline, " ".join(parts)


def verdict_text(result):
    """The verdict as one printable line: ``Verdict: <paragraph>``."""
    return "Verdict: " + verdict(result)[1]
