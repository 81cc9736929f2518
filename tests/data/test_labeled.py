"""Labeled subsets per fold (select_labeled / apply_selection) and patient-level cross-validation splits."""
import copy
import random

import pytest

from nnunet_contrastive.data.labeled import (
    LABELED_KEY,
    SELECTION_KEY,
    LabeledSubsetError,
    apply_selection,
    grouped_crossval_split,
    labeled_and_unlabeled,
    patients_across_train_and_val,
    select_labeled,
)

CASES = [f"case{i:02d}" for i in range(20)]
# ACDC-like: two phases per patient, plus one patient with three cases and one with a single case
PATIENT_OF = {f"p{i:02d}_{ph}": f"p{i:02d}" for i in range(10) for ph in ("ED", "ES")}
PATIENT_OF.update({"p10_ED": "p10", "p10_ES": "p10", "p10_MID": "p10", "p11_ED": "p11"})
PATIENT_CASES = sorted(PATIENT_OF)


def _by_patient(cases):
    out = {}
    for c in cases:
        out.setdefault(PATIENT_OF[c], set()).add(c)
    return out


# ------------------------------------------------------------------------------------------------- select_labeled
def test_reproducible_for_same_seed_and_fold():
    for seed in (0, 1, 123):
        for fold in range(5):
            assert select_labeled(CASES, 4, seed, fold) == select_labeled(list(CASES), 4, seed, fold)


def test_differs_across_seeds_and_folds_for_most():
    picks = [tuple(select_labeled(CASES, 4, seed, 0)) for seed in range(20)]
    # C(20, 4) = 4845 possible subsets: 20 seeds should nearly all give distinct ones
    assert len(set(picks)) >= 17
    per_fold = [tuple(select_labeled(CASES, 4, 0, fold)) for fold in range(5)]
    assert len(set(per_fold)) >= 4


def test_independent_of_input_order():
    rnd = random.Random(0)
    for seed in range(5):
        reference = select_labeled(CASES, 5, seed, 2)
        for _ in range(3):
            shuffled = CASES[:]
            rnd.shuffle(shuffled)
            assert select_labeled(shuffled, 5, seed, 2) == reference


@pytest.mark.parametrize("n", [1, 3, 19, 20])
def test_picks_exactly_n_cases(n):
    for seed in range(5):
        lab = select_labeled(CASES, n, seed, 1)
        assert len(lab) == n == len(set(lab))
        assert set(lab) <= set(CASES)
        assert lab == sorted(lab)


def test_all_labels_everything():
    shuffled = CASES[::-1]
    assert select_labeled(shuffled, "all", 0, 0) == sorted(CASES)


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_by_patient_picks_n_whole_patients(n):
    all_patients = _by_patient(PATIENT_CASES)
    for seed in range(8):
        lab = select_labeled(PATIENT_CASES, n, seed, 0, groups=PATIENT_OF)
        chosen = _by_patient(lab)
        assert len(chosen) == n
        for patient, cases in chosen.items():  # never a partial patient
            assert cases == all_patients[patient], patient
        assert len(lab) == sum(len(all_patients[p]) for p in chosen)


def test_by_patient_draws_patients_uniformly_not_cases():
    # p10 has 3 cases, p11 one: a draw of patients gives both the same chance (about 1/12 each for n=1)
    counts = {}
    for seed in range(600):
        (patient,) = _by_patient(select_labeled(PATIENT_CASES, 1, seed, 0, groups=PATIENT_OF))
        counts[patient] = counts.get(patient, 0) + 1
    assert set(counts) == set(PATIENT_OF.values())
    assert all(20 <= c <= 85 for c in counts.values()), counts  # expectation 50 each


def test_by_patient_only_counts_the_folds_training_cases():
    # the fold's train list holds only part of the patients: patients outside it never appear
    train = [c for c in PATIENT_CASES if PATIENT_OF[c] in {"p01", "p03", "p10"}]
    for seed in range(10):
        lab = select_labeled(train, 2, seed, 3, groups=PATIENT_OF)
        assert set(lab) <= set(train) and len(_by_patient(lab)) == 2


def test_too_many_names_fold_and_maximum():
    with pytest.raises(LabeledSubsetError) as e:
        select_labeled(CASES, 21, 0, 3)
    msg = str(e.value)
    assert "fold 3" in msg and "21 labeled cases" in msg and "only 20" in msg and "at most 20" in msg
    with pytest.raises(LabeledSubsetError) as e:
        select_labeled(PATIENT_CASES, 13, 0, 4, groups=PATIENT_OF)
    msg = str(e.value)
    assert "fold 4" in msg and "13 labeled patients" in msg and "at most 12" in msg


@pytest.mark.parametrize("n", [0, -1, 2.0, "3", None])
def test_bad_num_labeled(n):
    with pytest.raises(LabeledSubsetError) as e:
        select_labeled(CASES, n, 0, 0)
    assert "positive integer or 'all'" in str(e.value) and repr(n) in str(e.value)


def test_case_without_patient_is_named():
    groups = {c: c for c in CASES[1:]}
    with pytest.raises(LabeledSubsetError) as e:
        select_labeled(CASES, 2, 0, 1, groups=groups)
    assert "fold 1" in str(e.value) and CASES[0] in str(e.value) and "patient" in str(e.value)


# ------------------------------------------------------------------------------------------------- apply_selection
def _splits():
    return grouped_crossval_split(PATIENT_CASES, PATIENT_OF, n_splits=3)


def test_apply_selection_only_adds_keys():
    splits = _splits()
    before = copy.deepcopy(splits)
    out = apply_selection(splits, 2, seed=7, by="patient", groups=PATIENT_OF)
    assert splits == before  # input untouched
    assert len(out) == len(splits)
    for fold, (s, o) in enumerate(zip(splits, out)):
        assert o["train"] == s["train"] and o["val"] == s["val"]
        assert set(o) == {"train", "val", LABELED_KEY, SELECTION_KEY}
        assert o[SELECTION_KEY] == {"num_labeled": 2, "seed": 7, "by": "patient"}
        assert o[LABELED_KEY] == select_labeled(s["train"], 2, 7, fold, PATIENT_OF)
        assert len(_by_patient(o[LABELED_KEY])) == 2


def test_apply_selection_by_case_ignores_groups():
    out = apply_selection(_splits(), 3, seed=0, by="case", groups=PATIENT_OF)
    for fold, o in enumerate(out):
        assert o[LABELED_KEY] == select_labeled(o["train"], 3, 0, fold)
        assert len(o[LABELED_KEY]) == 3


def test_apply_selection_folds_argument():
    out = apply_selection(_splits(), 1, seed=0, folds=[2, 0])
    assert LABELED_KEY in out[0] and LABELED_KEY in out[2]
    assert LABELED_KEY not in out[1] and SELECTION_KEY not in out[1]


@pytest.mark.parametrize("fold", [3, -1])
def test_apply_selection_bad_fold(fold):
    with pytest.raises(LabeledSubsetError) as e:
        apply_selection(_splits(), 1, seed=0, folds=[fold])
    assert f"fold {fold} does not exist" in str(e.value) and "3 folds" in str(e.value)


def test_apply_selection_bad_by():
    with pytest.raises(LabeledSubsetError, match="--by must be 'case' or 'patient', got 'site'"):
        apply_selection(_splits(), 1, seed=0, by="site")


# ------------------------------------------------------------------------------------------ grouped_crossval_split
@pytest.mark.parametrize("n_splits", [2, 5])
def test_grouped_split_invariants(n_splits):
    splits = grouped_crossval_split(PATIENT_CASES, PATIENT_OF, n_splits=n_splits)
    assert len(splits) == n_splits
    val_count = {c: 0 for c in PATIENT_CASES}
    for s in splits:
        assert set(s["train"]) | set(s["val"]) == set(PATIENT_CASES)
        assert not set(s["train"]) & set(s["val"])
        assert not {PATIENT_OF[c] for c in s["train"]} & {PATIENT_OF[c] for c in s["val"]}
        assert s["train"] == sorted(s["train"]) and s["val"] == sorted(s["val"])
        for c in s["val"]:
            val_count[c] += 1
    assert set(val_count.values()) == {1}
    assert patients_across_train_and_val(splits, PATIENT_OF) == {}


def test_grouped_split_equals_nnunet_when_every_case_is_its_own_patient():
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    cases = [f"img_{i:03d}" for i in range(23)]
    for seed in (12345, 1):
        ours = grouped_crossval_split(cases[::-1], {c: c for c in cases}, n_splits=5, seed=seed)
        # nnU-Net's trainer passes the sorted identifiers (nnUNetTrainer.do_split)
        ref = generate_crossval_split(sorted(cases), seed=seed, n_splits=5)
        assert [{"train": [str(x) for x in r["train"]], "val": [str(x) for x in r["val"]]} for r in ref] == ours
    # default seed is nnU-Net's
    assert grouped_crossval_split(cases, {c: c for c in cases}) == [
        {k: [str(x) for x in v] for k, v in r.items()} for r in generate_crossval_split(cases)]


def test_grouped_split_too_few_patients():
    groups = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}
    with pytest.raises(LabeledSubsetError) as e:
        grouped_crossval_split(list(groups), groups, n_splits=5)
    assert "3 patients cannot make 5 folds" in str(e.value) and "add patients" in str(e.value)


# ------------------------------------------------------------------------------------------------ leakage detection
def test_patients_across_train_and_val_detects_leakage():
    splits = [{"train": ["p00_ED", "p01_ED", "p01_ES"], "val": ["p00_ES", "p02_ED"]},
              {"train": ["p00_ED", "p00_ES"], "val": ["p01_ED", "p01_ES"]},
              {"train": ["p02_ED", "p01_ES", "p00_ED"], "val": ["p02_ES", "p01_ED"]}]
    assert patients_across_train_and_val(splits, PATIENT_OF) == {0: ["p00"], 2: ["p01", "p02"]}
    # a case missing from the groups is its own patient
    assert patients_across_train_and_val([{"train": ["x"], "val": ["y"]}], {}) == {}


# --------------------------------------------------------------------------------------------- labeled_and_unlabeled
def test_labeled_and_unlabeled_partition():
    split = {"train": ["a", "b", "c", "d"], "val": ["e"], LABELED_KEY: ["c", "a"]}
    lab, unl = labeled_and_unlabeled(split, 0)
    assert sorted(lab) == ["a", "c"] and unl == ["b", "d"]
    assert set(lab) | set(unl) == set(split["train"]) and not set(lab) & set(unl)
    # without the key: fully labeled
    assert labeled_and_unlabeled({"train": ["a", "b"], "val": ["c"]}) == (["a", "b"], [])


def test_labeled_and_unlabeled_errors():
    with pytest.raises(LabeledSubsetError) as e:
        labeled_and_unlabeled({"train": ["a", "b"], "val": ["v"], LABELED_KEY: ["a", "v"]}, fold=3)
    msg = str(e.value)
    assert "fold 3" in msg and "'v'" in msg and "'train'" in msg and "Re-run" in msg
    with pytest.raises(LabeledSubsetError) as e:
        labeled_and_unlabeled({"train": ["a"], "val": [], LABELED_KEY: []}, fold=1)
    assert "fold 1" in str(e.value) and "empty" in str(e.value)


def test_bool_is_not_a_number_of_labeled_cases():
    from nnunet_contrastive.data.labeled import LabeledSubsetError, select_labeled

    with pytest.raises(LabeledSubsetError, match="positive integer"):
        select_labeled(["a", "b"], True, seed=0, fold=0)


def test_by_patient_without_groups_is_refused():
    from nnunet_contrastive.data.labeled import LabeledSubsetError, apply_selection

    with pytest.raises(LabeledSubsetError, match="patient"):
        apply_selection([{"train": ["a", "b"], "val": ["c"]}], 1, 0, by="patient", groups=None)
