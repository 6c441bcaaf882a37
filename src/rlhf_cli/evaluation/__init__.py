"""The model-free half of `rlhf eval`: metrics, reward-hacking alarms, the written report and its plots.

Nothing here loads a model or imports torch: a stage computes scores, log-probs and token lists, and these
modules turn them into numbers (`metrics`), warnings during PPO (`alarms`), `eval.json` + `report.md` (`report`)
and PNG figures (`plots`, matplotlib imported only when a figure is drawn).
"""
