"""`rlhf label`: make preference data from sampled responses.

    records.py    what every labeller produces (PairLabel) and how labels become training rows (pairs, KTO rows)
    agreement.py  raw agreement, Cohen's and Fleiss' kappa, annotators far from the rest
    store.py      the append-only, fsync'd answers file that makes a labelling session resumable
    human.py      the interactive terminal session (and its one-answer-per-line mode for scripts)
    judge.py      a local instruction-tuned model as a pairwise judge under a constitution (A/B probabilities,
                  both orders), and the constitutional critique-and-revise mode
    scorers.py    reward-model (one or an ensemble) and rule labellers

The stage that samples candidates and runs a labeller is `rlhf_cli.stages.label`.
"""
