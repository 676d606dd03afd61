"""Python wrappers for the small custom JS components in ``assets/``."""
