"""Choosing a method: estimate (memory and trainable parameters before any weights load), compare
(the same task with several methods) and recommend (the methods that fit a budget, ranked)."""
