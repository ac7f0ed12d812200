"""The Flamingo-style captioner: an open_clip vision tower, a perceiver and gated cross-attention over a Hugging Face
causal LM, prompted with interleaved few-shot examples.

    model.py      the architecture (perceiver, gated cross-attention, the wrapper over the LM)
    decoding.py   greedy / beam / nucleus decoding over a KV cache
    weights.py    what to build (OpenFlamingo releases, flamingo.json), loading and saving, the OpenFlamingo key map
    prompts.py    interleaved few-shot prompts and the demonstrations pool (random or RICES)
    captioner.py  FlamingoCaptioner: the captioner role (caption, log-likelihood, teacher-forced logits)
"""

from recon.captioners.flamingo.captioner import LORA_MODULES_TO_SAVE, LORA_TARGETS, FlamingoCaptioner
from recon.captioners.flamingo.decoding import generate
from recon.captioners.flamingo.model import Flamingo, vision_embedding, vision_tokens
from recon.captioners.flamingo.prompts import (
    CHUNK_SEPARATOR,
    EOC_TOKEN,
    MEDIA_TOKEN,
    PAD_TOKEN,
    TEXT_ONLY_ZERO_SHOT,
    Demonstrations,
    chunk,
    few_shot_prompt,
)
from recon.captioners.flamingo.weights import (
    OPENFLAMINGO_RELEASES,
    REMOTE_CODE_LMS,
    CheckpointKeyError,
    FlamingoSpec,
    flamingo_spec,
    load_flamingo,
    load_openflamingo_state_dict,
    openflamingo_key_map,
    save_flamingo,
    to_openflamingo_state_dict,
    vision_weights_sha256,
)

__all__ = [
    "CHUNK_SEPARATOR",
    "EOC_TOKEN",
    "LORA_MODULES_TO_SAVE",
    "LORA_TARGETS",
    "MEDIA_TOKEN",
    "OPENFLAMINGO_RELEASES",
    "PAD_TOKEN",
    "REMOTE_CODE_LMS",
    "TEXT_ONLY_ZERO_SHOT",
    "CheckpointKeyError",
    "Demonstrations",
    "Flamingo",
    "FlamingoCaptioner",
    "FlamingoSpec",
    "chunk",
    "few_shot_prompt",
    "flamingo_spec",
    "generate",
    "load_flamingo",
    "load_openflamingo_state_dict",
    "openflamingo_key_map",
    "save_flamingo",
    "to_openflamingo_state_dict",
    "vision_embedding",
    "vision_tokens",
    "vision_weights_sha256",
]
