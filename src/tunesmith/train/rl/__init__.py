"""Online reinforcement learning: rewards (rewards.py), the losses and advantages as pure functions
(losses.py), the rollout (rollout.py) and the online step the loop runs for grpo, rloo and ppo (online.py)."""
