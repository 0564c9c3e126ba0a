"""Sequence mixers usable inside the multi-direction SSM layer; ``create_mixer(name, ...)`` builds one."""
from .base import MixerType, SequenceMixer, available_mixers, create_mixer, register_mixer
from .mamba import MambaMixer

__all__ = ["MixerType", "SequenceMixer", "available_mixers", "create_mixer", "register_mixer", "MambaMixer"]
