"""Fine-tuning with analog noise: LAFT (HILAL Algorithm 1) and the stage it shares with mac-greedy."""

from hetcomp.finetune.laft import LAFT

__all__ = ["LAFT"]
