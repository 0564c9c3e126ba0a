"""Sequence mixers usable inside the multi-direction SSM layer; ``create_mixer(name, ...)`` builds one."""
from .base import MixerType, SequenceMixer, available_mixers, create_mixer, register_mixer
from .gla import GLAMixer
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer
from .retnet import RetNetMixer
from .rwkv7 import RWKV7Mixer

__all__ = ["MixerType", "SequenceMixer", "available_mixers", "create_mixer", "register_mixer", "MambaMixer"]
__all__ += ["Mamba2Mixer", "GLAMixer"]
__all__ += ["RetNetMixer", "RWKV7Mixer"]
