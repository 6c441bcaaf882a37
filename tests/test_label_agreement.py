"""rlhf label --report: raw agreement, Cohen's and Fleiss' kappa and the flagging of an annotator far from the rest,
checked against kappas computed by hand (the working is in the comments)."""

import pytest

from rlhf_cli.labelling.agreement import agreement_report, cohen_kappa, describe, fleiss_kappa
from rlhf_cli.labelling.records import PairLabel


def label(item, who, outcome, a=0, b=1):
    return PairLabel(item, a, b, outcome, "human", who)


def test_cohen_kappa_textbook_two_by_two():
    # Two readers, 50 proposals (the Wikipedia "Cohen's kappa" example):
    #               B yes  B no
    #     A yes       20     5      A says yes 25/50 = 0.5
    #     A no        10    15      B says yes 30/50 = 0.6
    # p_o = (20 + 15) / 50 = 0.7
    # p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.3 + 0.2 = 0.5
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    result = cohen_kappa([[20, 5], [10, 15]])
    assert result["p_o"] == pytest.approx(0.7)
    assert result["p_e"] == pytest.approx(0.5)
    assert result["kappa"] == pytest.approx(0.4)
    assert result["pairs"] == 50


def test_fleiss_kappa_textbook_fourteen_raters():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters each, 5 categories.
    counts = [
        [0, 0, 0, 0, 14],  # P_1 = (196 - 14) / (14 * 13) = 182 / 182 = 1.000
        [0, 2, 6, 4, 2],  # (4 + 36 + 16 + 4 - 14) / 182 = 46 / 182 = 0.253
        [0, 0, 3, 5, 6],  # (9 + 25 + 36 - 14) / 182 = 56 / 182 = 0.308
        [0, 3, 9, 2, 0],  # (9 + 81 + 4 - 14) / 182 = 80 / 182 = 0.440
        [2, 2, 8, 1, 1],  # (4 + 4 + 64 + 1 + 1 - 14) / 182 = 60 / 182 = 0.330
        [7, 7, 0, 0, 0],  # (49 + 49 - 14) / 182 = 84 / 182 = 0.462
        [3, 2, 6, 3, 0],  # (9 + 4 + 36 + 9 - 14) / 182 = 44 / 182 = 0.242
        [2, 5, 3, 2, 2],  # (4 + 25 + 9 + 4 + 4 - 14) / 182 = 32 / 182 = 0.176
        [6, 5, 2, 1, 0],  # (36 + 25 + 4 + 1 - 14) / 182 = 52 / 182 = 0.286
        [0, 2, 2, 3, 7],  # (4 + 4 + 9 + 49 - 14) / 182 = 52 / 182 = 0.286
    ]
    # P_bar = (182 + 46 + 56 + 80 + 60 + 84 + 44 + 32 + 52 + 52) / 182 / 10 = 688 / 1820 = 0.37802
    # column totals 20, 28, 39, 21, 32 of 140: p_j = 0.143, 0.200, 0.279, 0.150, 0.229
    # P_e = (400 + 784 + 1521 + 441 + 1024) / 140^2 = 4170 / 19600 = 0.21276
    # kappa = (0.37802 - 0.21276) / (1 - 0.21276) = 0.16526 / 0.78724 = 0.20993
    result = fleiss_kappa(counts)
    assert result["P_bar"] == pytest.approx(688 / 1820)
    assert result["P_e"] == pytest.approx(4170 / 19600)
    assert result["kappa"] == pytest.approx((688 / 1820 - 4170 / 19600) / (1 - 4170 / 19600))
    assert result["kappa"] == pytest.approx(0.210, abs=5e-4)
    assert (result["pairs"], result["raters_per_pair"]) == (10, 14)


def test_fleiss_needs_the_same_number_of_answers_per_unit():
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[2, 0, 0], [1, 1, 1]])


def test_two_annotators_three_categories_by_hand():
    # Ten pairs answered by both ana (rows) and ben (columns), categories a / b / tie:
    #               ben a  ben b  ben tie
    #     ana a        3      1       0     ana: 4 a, 4 b, 2 tie
    #     ana b        0      3       1     ben: 4 a, 4 b, 2 tie
    #     ana tie      1      0       1
    # p_o = (3 + 3 + 1) / 10 = 0.7
    # p_e = 0.4 * 0.4 + 0.4 * 0.4 + 0.2 * 0.2 = 0.36
    # kappa = (0.7 - 0.36) / (1 - 0.36) = 0.34 / 0.64 = 0.53125
    cells = [("a", "a")] * 3 + [("a", "b")] + [("b", "b")] * 3 + [("b", "tie")] + [("tie", "a"), ("tie", "tie")]
    labels = []
    for n, (ana, ben) in enumerate(cells):
        labels.append(label(f"p{n}", "ana", ana))
        labels.append(label(f"p{n}", "ben", ben))
    # Ben saw p0 the other way round (candidate 1 as A): "b" there is "a" in canonical orientation, the same answer.
    labels[1] = PairLabel("p0", 1, 0, "b", "human", "ben")
    # Left out: a skip (no answer), a pair only ana answered, an answer ana replaced by a later one on the same pair.
    labels += [label("p10", "ana", "a"), label("p10", "ben", "skip"), label("p11", "ana", "b")]
    labels.insert(0, label("p4", "ana", "a"))  # ana's earlier answer on p4, replaced by "b" later in the list

    report = agreement_report(labels)
    cohen = report["cohen"]
    assert cohen["annotators"] == ["ana", "ben"]
    assert cohen["pairs"] == 10
    assert cohen["p_o"] == pytest.approx(0.7)
    assert cohen["p_e"] == pytest.approx(0.36)
    assert cohen["kappa"] == pytest.approx(0.53125)
    assert report["fleiss"] is None
    assert report["raw_agreement"] == {"value": pytest.approx(0.7), "pairs": 10, "comparisons": 10}
    assert (report["shared_pairs"], report["shared_items"]) == (10, 10)
    assert report["annotators"] == {"ana": {"answers": 13, "skips": 0}, "ben": {"answers": 10, "skips": 1}}
    # With two annotators each one's agreement with "the others" is p_o, and nobody can be flagged.
    assert report["per_annotator"]["ana"] == {"agreement": pytest.approx(0.7), "pairs": 10, "no_majority": 0}
    assert report["flagged"] == []
    assert any("cannot be pinned" in note for note in report["notes"])
    assert any("Cohen's kappa (ana vs ben): 0.531" in line for line in describe(report))


def three_raters() -> list[PairLabel]:
    # r1, r2, r3 on five pairs, and r1, r2 on a sixth:
    #     u1: a a a     u2: a a b     u3: b b b     u4: a b tie     u5: b b tie     u6: a a (-)
    answers = {"u1": "aaa", "u2": "aab", "u3": "bbb", "u4": "abt", "u5": "bbt", "u6": "aa"}
    names = {"a": "a", "b": "b", "t": "tie"}
    return [label(unit, f"r{k + 1}", names[c]) for unit, row in answers.items() for k, c in enumerate(row)]


def test_three_annotators_fleiss_by_hand():
    # Fleiss over the five pairs with three answers (u6 has two: left out, counted):
    #     counts (a, b, tie)   sum n_ij^2   P_i = (sum - 3) / (3 * 2)
    #     u1 (3, 0, 0)            9            1
    #     u2 (2, 1, 0)            5            1/3
    #     u3 (0, 3, 0)            9            1
    #     u4 (1, 1, 1)            3            0
    #     u5 (0, 2, 1)            5            1/3
    # P_bar = (1 + 1/3 + 1 + 0 + 1/3) / 5 = 8/15
    # totals a 6, b 7, tie 2 of 15: P_e = (36 + 49 + 4) / 225 = 89/225
    # kappa = (8/15 - 89/225) / (1 - 89/225) = (120 - 89) / (225 - 89) = 31/136 = 0.22794
    report = agreement_report(three_raters())
    fleiss = report["fleiss"]
    assert fleiss["P_bar"] == pytest.approx(8 / 15)
    assert fleiss["P_e"] == pytest.approx(89 / 225)
    assert fleiss["kappa"] == pytest.approx(31 / 136)
    assert (fleiss["pairs"], fleiss["raters_per_pair"], fleiss["left_out"]) == (5, 3, 1)
    assert report["cohen"] is None
    # Raw: agreeing rater pairs of all rater pairs: u1 3/3, u2 1/3, u3 3/3, u4 0/3, u5 1/3, u6 1/1 -> 9/16
    assert report["raw_agreement"] == {"value": pytest.approx(9 / 16), "pairs": 6, "comparisons": 16}
    # Each against the majority of the other two (level pairs left out):
    #   r1: u1 a=a, u2 (a,b) level, u3 b=b, u4 (b,tie) level, u5 (b,tie) level, u6 a=a     -> 3/3
    #   r3: u1 a=a, u2 b vs a, u3 b=b, u4 (a,b) level, u5 tie vs b                          -> 2/4
    per = report["per_annotator"]
    assert per["r1"] == {"agreement": 1.0, "pairs": 3, "no_majority": 3}
    assert per["r2"] == {"agreement": 1.0, "pairs": 3, "no_majority": 3}
    assert per["r3"] == {"agreement": 0.5, "pairs": 4, "no_majority": 1}
    # Too few pairs to judge anyone at the default minimum of 5 ...
    assert report["flagged"] == []
    assert any("Nobody is flagged" in note for note in report["notes"])
    assert any("left out" in note for note in report["notes"])
    # ... at 3: the median of (1, 1, 0.5) is 1 and r3 is 0.5 below it, more than the 0.15 margin.
    flagged = agreement_report(three_raters(), min_compared=3)["flagged"]
    assert flagged == [{"annotator": "r3", "agreement": 0.5, "median": 1.0, "pairs": 4}]
    assert agreement_report(three_raters(), min_compared=3, flag_margin=0.5)["flagged"] == []


def test_one_contrarian_among_four_is_flagged():
    # x, y, z say "a" on six pairs, w says "b". Each pair: counts (3, 1, 0), P_i = (9 + 1 - 4) / 12 = 1/2;
    # p_a = 18/24, p_b = 6/24: P_e = 9/16 + 1/16 = 5/8; kappa = (1/2 - 5/8) / (3/8) = -1/3.
    # Against the others' majority: x, y, z 6/6 (the others are a, a, b -> a); w 0/6. Median 1: w is flagged.
    labels = [label(f"p{n}", who, "b" if who == "w" else "a") for n in range(6) for who in "wxyz"]
    report = agreement_report(labels)
    assert report["fleiss"]["kappa"] == pytest.approx(-1 / 3)
    assert report["raw_agreement"]["value"] == pytest.approx(18 / 36)  # per pair 3 of 6 rater pairs agree
    assert [flag["annotator"] for flag in report["flagged"]] == ["w"]
    assert report["per_annotator"]["w"] == {"agreement": 0.0, "pairs": 6, "no_majority": 0}
    assert any(line.startswith("Flagged: w") for line in describe(report))


def test_everyone_always_the_same_kappa_is_undefined_raw_agreement_stays():
    # p_o = 1 and p_e = 1 * 1 = 1: kappa = 0/0.
    two = agreement_report([label(f"p{n}", who, "a") for n in range(4) for who in ("ana", "ben")])
    assert two["cohen"]["kappa"] is None
    assert two["cohen"]["p_e"] == pytest.approx(1.0)
    assert two["raw_agreement"]["value"] == 1.0
    assert any("undefined" in note for note in two["notes"])
    assert any("Cohen's kappa (ana vs ben): undefined" in line for line in describe(two))
    three = agreement_report([label(f"p{n}", who, "tie") for n in range(4) for who in ("r1", "r2", "r3")])
    assert three["fleiss"]["kappa"] is None
    assert three["raw_agreement"]["value"] == 1.0
    assert any("Fleiss' kappa is undefined" in note for note in three["notes"])


def test_nothing_to_compare_says_why():
    alone = agreement_report([label("p0", "ana", "a"), label("p1", "ana", "b")])
    assert alone["cohen"] is None and alone["fleiss"] is None
    assert alone["raw_agreement"] == {"value": None, "pairs": 0, "comparisons": 0}
    assert any("agreement needs two or more" in note for note in alone["notes"])
    split = agreement_report([label("p0", "ana", "a"), label("p1", "ben", "b"), label("p1", "ana", "skip")])
    assert split["shared_pairs"] == 0
    assert split["annotators"]["ana"] == {"answers": 1, "skips": 1}
    assert any("overlap" in note for note in split["notes"])


def test_a_later_skip_withdraws_the_earlier_answer():
    labels = [label("p0", "ana", "a"), label("p0", "ben", "a"), label("p0", "ana", "skip")]
    assert agreement_report(labels)["shared_pairs"] == 0


def test_labellers_without_a_name_count_by_kind():
    labels = [PairLabel("p0", 0, 1, "a", "judge"), PairLabel("p0", 0, 1, "b", "rule")]
    report = agreement_report(labels)
    assert report["cohen"]["annotators"] == ["judge", "rule"]
    assert report["cohen"]["p_o"] == 0.0
