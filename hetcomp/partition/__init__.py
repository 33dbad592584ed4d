"""Row-level multi-tier mapping (H3PIMAP): the cost problem, its Pareto search, and row assignment."""
