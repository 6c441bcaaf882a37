"""Rule rewards for the PPO tests (imported by `ppo.reward.function: rules:...`)."""


def starts_with_sure(prompts, completions):
    """1 for a completion that opens with 'Sure', else 0: a reward known exactly."""
    return [1.0 if completion.strip().startswith("Sure") else 0.0 for completion in completions]
