"""Small reference models that ship with hetcomp (no downloads): built in code, random or trained here."""

from hetcomp.zoo.transformer import DecoderLM, DigitsTransformer, pythia_70m_shaped

__all__ = ["DecoderLM", "DigitsTransformer", "pythia_70m_shaped"]
