"""Critic PPO for RLHF: four models (policy, critic, reference, reward) on accelerate / DeepSpeed."""
