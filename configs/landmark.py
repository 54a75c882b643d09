"""Landmark attention (Mohtashami & Jaggi, 2023): the transformer with `attention.impl=landmark`, a landmark token
after every `attention.mem_freq` tokens and the grouped softmax over blocks. Presets: tiny (one CPU, minutes;
trained at 512 tokens, as the paper's LLaMA fine-tune), small and 350m (the blockwise Pallas kernel; TPU tiles of
128 slots hold one block at mem_freq=127, several at 63 and below).

python main.py --config=configs/landmark.py:tiny --workdir=runs/landmark-tiny

`model.attention.landmark_impl`: xla (the dense grouped softmax; any mem_freq), pallas (the kernel; on TPU mem_freq
+ 1 must divide a tile of at most 1024 slots that is a multiple of 128, e.g. 127, 63, 31, 15; on GPU, Triton, any
mem_freq < 256, each block padded to a power of two; interpret mode on CPU) or auto (the default: the kernel on TPU
where mem_freq allows it, the dense form elsewhere: the GPU kernel is not yet compiled and timed on a GPU).
The paper's lm_benchmark uses mem_freq=50 (dense form on TPU, the kernel on GPU); its LLaMA code 63.
"""

from configs import base
from configs.transformer import PRESETS as TRANSFORMER
from lcjax.models.transformer import TransformerConfig


def _landmark(size: str, mem_freq: int, **train) -> dict:
    preset = TRANSFORMER[size]
    model = {**preset["model"], "attention": {"impl": "landmark", "mem_freq": mem_freq}}
    return {**preset, "model": model, "train": {**preset["train"], **train}}


PRESETS = {
    "tiny": _landmark("tiny", 31, seq_len=512, batch_size=8),
    "small": _landmark("small", 63),
    "350m": _landmark("350m", 127),
}


def get_config(preset: str = "tiny"):
    return base.apply_preset(base.with_model(TransformerConfig()), PRESETS, preset or "tiny")
