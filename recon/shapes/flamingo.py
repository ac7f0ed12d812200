"""A small Flamingo trained on the shapes world, and a measurement of few-shot learning of an unseen caption format.

Recipe (as Flamingo, at toy scale, CPU-minutes):

1. **Language model** (Llama layout, 3 layers, 0.51M parameters, word-level tokenizer of the world's vocabulary):
   trained on text only -- documents of 1-5 chunks ``<image>Output:{caption}<|endofchunk|>\\n``, the captions of one
   document all in one *format* drawn per document (the world's four sentence templates, or a key-value list with
   a random attribute order, key words and separators) and attribute values drawn at random (text has no image to
   read). It learns to continue a format from the chunks before, not what is in any picture. Two cycles
   (:data:`LM_PHASES`): after the first it copied every separator but not the first key word of a chunk.
2. **Flamingo**: the LM frozen, the shapes CLIP's image tower (``bundle/clip``, a ModifiedResNet; its last
   feature map is one 512-d token at 32 px) frozen; only the perceiver resampler and the gated cross-attention
   blocks (before each of the 3 decoder layers) train, on interleaved sequences of 1-4 rendered scenes whose
   captions share a format -- now with the values of each scene. The tanh gates learn 10x faster
   (:data:`GATE_LR_SCALE`).
3. **Few-shot evaluation** (:func:`fewshot_eval`): :data:`NOVEL_FORMAT` (``colour: red; shape: circle; size: small;
   position: top left; background: white``) pairs ``": "`` with ``"; "``, a pairing no training document of either
   stage contains. It reaches the model only through the in-context examples: k rendered scenes captioned in it,
   then the query scene.

``recon shapes train --component flamingo`` trains both stages into ``bundle/flamingo``;
``recon shapes eval --captioner flamingo --shots 0,1,2,4``
prints :func:`fewshot_eval`'s json.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from recon import hub
from recon.captioners.flamingo import (
    CHUNK_SEPARATOR,
    EOC_TOKEN,
    MEDIA_TOKEN,
    Demonstrations,
    FlamingoCaptioner,
    chunk,
    flamingo_spec,
    load_flamingo,
    save_flamingo,
    vision_weights_sha256,
)
from recon.captioners.flamingo.model import Flamingo, vision_tokens
from recon.config import CaptionerConfig, DecodingConfig
from recon.preprocess import ImagePreprocess
from recon.shapes import world
from recon.shapes.metrics import to_tensor
from recon.shapes.train import TrainArgs, run_loop

# ----------------------------------------------------------------------------------------------- formats
KEY_WORDS = {
    "shape": ("shape", "form", "object"),
    "color": ("color", "colour", "hue"),
    "size": ("size", "scale"),
    "position": ("position", "location", "place"),
    "background": ("background", "backdrop", "bg"),
}
KV_SEPARATORS = (": ", "=", " - ")
ITEM_SEPARATORS = ("; ", ", ", " | ", " / ")
NOVEL_PAIR = (": ", "; ")  # never together in training


@dataclass(frozen=True)
class CaptionFormat:
    """``kind='sentence'``: the world's templates (one drawn per caption); ``kind='kv'``: ``key<kv>value`` items in
    ``order`` joined by ``item_sep``."""

    kind: str = "sentence"
    order: tuple[str, ...] = world.ATTRIBUTES
    keys: tuple[str, ...] = world.ATTRIBUTES
    kv_sep: str = ": "
    item_sep: str = "; "

    def render(self, attributes: dict[str, str], template: int = 0) -> str:
        if self.kind == "sentence":
            return world.caption_for(attributes, template)
        return self.item_sep.join(f"{k}{self.kv_sep}{attributes[a]}" for a, k in zip(self.order, self.keys))

    def pattern(self) -> re.Pattern:
        """Matches a caption in this (kv) format with any valid values."""
        items = [
            re.escape(k + self.kv_sep) + "(" + "|".join(map(re.escape, world.VALUES[a])) + ")"
            for a, k in zip(self.order, self.keys)
        ]
        return re.compile(re.escape(self.item_sep).join(items))


NOVEL_FORMAT = CaptionFormat(
    "kv",
    ("color", "shape", "size", "position", "background"),
    ("colour", "shape", "size", "position", "background"),
    *NOVEL_PAIR,
)


def sample_format(rng: np.random.Generator, sentence_fraction: float = 0.4) -> CaptionFormat:
    """A training format: the sentence templates, or a random key-value format other than the novel pairing."""
    if rng.random() < sentence_fraction:
        return CaptionFormat()
    order = tuple(world.ATTRIBUTES[i] for i in rng.permutation(len(world.ATTRIBUTES)))
    keys = tuple(KEY_WORDS[a][rng.integers(len(KEY_WORDS[a]))] for a in order)
    pairs = [p for p in itertools.product(KV_SEPARATORS, ITEM_SEPARATORS) if p != NOVEL_PAIR]
    kv, item = pairs[rng.integers(len(pairs))]
    return CaptionFormat("kv", order, keys, kv, item)


def random_attributes(rng: np.random.Generator) -> dict[str, str]:
    return {a: world.VALUES[a][rng.integers(len(world.VALUES[a]))] for a in world.ATTRIBUTES}


# ----------------------------------------------------------------------------------------------- tokenizer
SPECIALS = ("<|endoftext|>", "<PAD>", "<unk>", "<|endofchunk|>", "<image>")
PUNCTUATION = (":", ";", ",", "|", "/", "=", "-", ".")


def vocabulary() -> list[str]:
    """Byte-level word pieces of every word the world, the formats and the prompt use (with and without a leading
    space, ``Ġ``), the punctuation, the newline (``Ċ``) and the special tokens."""
    words = {"Output"} | {w for k in KEY_WORDS.values() for w in k}
    for text in world.caption_vocabulary()[:: len(world.TEMPLATES)] + list(world.TEMPLATES):
        words |= set(re.findall(r"[a-z]+", text))
    words |= {w for vals in world.VALUES.values() for v in vals for w in v.split()}
    pieces = sorted(words | set(PUNCTUATION))
    return list(SPECIALS) + ["Ċ", "Ġ"] + pieces + ["Ġ" + p for p in pieces]


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` with GPT-2's byte-level pre-tokenisation (exact round trip of
    spaces), adding no BOS/EOS (like GPT-NeoX / MPT tokenizers), with Flamingo's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<PAD>",
        unk_token="<unk>",
        additional_special_tokens=["<|endofchunk|>", "<image>"],
    )


# ----------------------------------------------------------------------------------------------- architecture
LM = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rope_theta=10000.0,
)
PERCEIVER = dict(depth=2, dim_head=32, heads=4, num_latents=8, ff_mult=1)
XATTN = dict(dim_head=32, heads=4, ff_mult=2)
CROSS_ATTN_EVERY = 1
PROMPT = "Output:"
MAX_CHUNKS = {"lm": 5, "flamingo": 4}
BATCH = {"lm": 24, "flamingo": 16}
LR = {"lm": 2e-3, "flamingo": 1e-3}
LM_PHASES = [
    (900, 2e-3),
    (600, 1e-3),
]  # (steps, peak lr): a second, cooler cycle taught the first key to copy
FLAMINGO_STEPS = 600
GATE_LR_SCALE = 10
EVAL_STREAM = 1  # test-split renders the training never draws (training uses the train split)


def build_lm(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
            **LM,
        )
    )


def document(captions: list[str]) -> str:
    return "".join(chunk(c, PROMPT) + CHUNK_SEPARATOR for c in captions)


def lm_documents(rng: np.random.Generator, n: int) -> list[str]:
    """Text-only documents: one format each, 1-5 chunks of random attribute values."""
    docs = []
    for _ in range(n):
        fmt = sample_format(rng)
        k = int(rng.integers(1, MAX_CHUNKS["lm"] + 1))
        docs.append(
            document(
                [
                    fmt.render(random_attributes(rng), int(rng.integers(len(world.TEMPLATES))))
                    for _ in range(k)
                ]
            )
        )
    return docs


def flamingo_documents(
    rng: np.random.Generator, scenes: list[world.Scene]
) -> list[tuple[str, list[world.Scene]]]:
    """Interleaved documents over ``scenes``: 1-4 consecutive scenes each, one format per document."""
    docs, i = [], 0
    while i < len(scenes):
        k = min(int(rng.integers(1, MAX_CHUNKS["flamingo"] + 1)), len(scenes) - i)
        fmt, group = sample_format(rng), scenes[i : i + k]
        docs.append((document([fmt.render(s.attributes, s.template) for s in group]), group))
        i += k
    return docs


def tokenize(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and next-token labels (padding ``-100``)."""
    rows = [tokenizer(t).input_ids for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    return ids, labels


# ----------------------------------------------------------------------------------------------- training
def train_lm(
    tokenizer,
    seed: int = 0,
    phases: list[tuple[int, float]] | None = None,
    work: Path | None = None,
    threads: int = 1,
) -> tuple[torch.nn.Module, list[dict]]:
    """Stage 1: the language model on text only, in ``phases`` of ``(steps, lr)`` (each a fresh AdamW with warmup
    and cosine decay; the data stream continues). With ``work``, the LM is saved there after each phase and a
    rerun resumes after the last finished one (and inside a phase, from its checkpoint)."""
    from transformers import LlamaForCausalLM

    phases = phases or LM_PHASES
    done: list[dict] = []
    if work is not None and (work / "stage1.json").is_file():
        done = json.loads((work / "stage1.json").read_text())
        lm = LlamaForCausalLM.from_pretrained(work).float()
        print(f"stage 1: resuming after {len(done)} phase(s) from {work}", flush=True)
    else:
        lm = build_lm(tokenizer, seed)
    lm.train()
    for phase, (steps, lr) in enumerate(phases[len(done) :], start=len(done)):
        offset = sum(r["steps"] for r in done)

        def step_fn(step: int, offset=offset) -> float:
            rng = np.random.default_rng([seed, 0, offset + step])
            ids, labels = tokenize(tokenizer, lm_documents(rng, BATCH["lm"]))
            loss = lm(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            return loss.item()

        done.append(
            _loop(
                f"lm-phase{phase}",
                {"lm": lm},
                list(lm.parameters()),
                steps,
                lr,
                BATCH["lm"],
                step_fn,
                work,
                threads,
            )
        )
        lm.train()
        if work is not None:
            lm.save_pretrained(work)
            (work / "stage1.json").write_text(json.dumps(done))
    return lm.eval(), done


def _loop(
    name: str,
    modules: dict,
    params: list,
    steps: int,
    lr: float,
    batch: int,
    step_fn,
    work: Path | None,
    threads: int,
) -> dict:
    """recon shapes train's checkpointed loop (resume, logging; warmup + cosine as the bundle's recipe), with the
    gradient clipped at 1.0 as this recipe always did."""
    import tempfile

    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="shapes-flamingo-"))
    work.mkdir(parents=True, exist_ok=True)
    args = TrainArgs(
        component="flamingo", out=work, work=work, steps=steps, lr=lr, batch=batch, threads=threads
    )
    return run_loop(args, name, modules, params, step_fn, clip_norm=1.0)


def clip_pixels(images: np.ndarray, preprocess) -> torch.Tensor:
    return preprocess(to_tensor(images))


def train_flamingo_stage(
    model,
    tokenizer,
    preprocess,
    seed: int = 0,
    steps: int | None = None,
    work: Path | None = None,
    threads: int = 1,
) -> dict:
    """Stage 2: perceiver + gated cross-attention on interleaved rendered scenes; LM and vision frozen."""
    model.train()
    model.lang_model.eval()  # frozen: no dropout either
    model.vision_encoder.eval()
    gates = [p for n, p in model.named_parameters() if n.endswith("_gate.alpha")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("_gate.alpha")]
    # Adam moves a parameter ~lr per step: at 1e-3 the tanh gates stayed below 0.2 in 600 steps (OpenFlamingo
    # trains for hundreds of thousands), so they get a faster rate and no weight decay.
    params = [{"params": rest}, {"params": gates, "lr": LR["flamingo"] * GATE_LR_SCALE, "weight_decay": 0.0}]

    def step_fn(step: int) -> float:
        rng = np.random.default_rng([seed, 1, step])
        scenes = world.sample_scenes(BATCH["flamingo"] * 3, seed, "train", stream=step)
        docs = flamingo_documents(rng, scenes)[: BATCH["flamingo"]]
        ids, labels = tokenize(tokenizer, [text for text, _ in docs])
        width = max(len(group) for _, group in docs)
        with torch.no_grad():
            flat = [s for _, group in docs for s in group]
            tokens = vision_tokens(model.vision_encoder, clip_pixels(world.render_batch(flat), preprocess))
        padded = tokens.new_zeros(len(docs), width, *tokens.shape[1:])
        i = 0
        for row, (_, group) in enumerate(docs):
            padded[row, : len(group)] = tokens[i : i + len(group)]
            i += len(group)
        media = model.perceiver(padded)
        logits = model(ids, media, attention_mask=(labels != -100).long()).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        return loss.item()

    trained = {"perceiver": model.perceiver, "gated_cross_attn": model.gated_cross_attn}
    record = _loop(
        "flamingo",
        trained,
        params,
        steps or FLAMINGO_STEPS,
        LR["flamingo"],
        BATCH["flamingo"],
        step_fn,
        work,
        threads,
    )
    model.eval()
    return record


def train(
    out: Path | None = None,
    work: Path | None = None,
    clip: str = "builtin:shapes/clip",
    seed: int = 0,
    lm_steps: int | None = None,
    flamingo_steps: int | None = None,
    threads: int = 1,
) -> dict:
    """Both stages; writes ``out`` (default ``bundle/flamingo``: fp16 safetensors + flamingo.json +
    training.json). The LM of stage 1 is kept in ``work/lm`` so a rerun goes straight to stage 2."""
    torch.set_num_threads(threads)
    out = Path(out or hub.SHAPES_BUNDLE / "flamingo")
    work = Path(work or hub.cache_root() / "shapes-train" / "flamingo")
    tokenizer = build_tokenizer()
    record = {
        "component": "flamingo",
        "seed": seed,
        "torch": torch.__version__,
        "threads": threads,
        "lm": LM,
        "perceiver": PERCEIVER,
        "xattn": XATTN,
        "novel_format": NOVEL_FORMAT.render(
            dict(shape="circle", color="red", size="small", position="top left", background="white")
        ),
    }
    phases = [(lm_steps, LR["lm"])] if lm_steps else None
    lm, record["stage1"] = train_lm(tokenizer, seed, phases, work / "lm", threads)
    visual, pre_cfg, _ = hub.load_open_clip(clip, None, torch.device("cpu"))
    torch.manual_seed(seed)
    model = Flamingo(
        visual.visual,
        lm,
        tokenizer.convert_tokens_to_ids(MEDIA_TOKEN),
        tokenizer.convert_tokens_to_ids(EOC_TOKEN),
        CROSS_ATTN_EVERY,
        PERCEIVER,
        XATTN,
    )
    record["stage2"] = train_flamingo_stage(
        model,
        tokenizer,
        ImagePreprocess.from_open_clip(pre_cfg),
        seed,
        flamingo_steps,
        work / "stage2",
        threads,
    )
    save_flamingo(
        model,
        tokenizer,
        out,
        vision=clip,
        half=True,
        vision_sha256=vision_weights_sha256(hub.resolve(clip, "shapes CLIP")),
    )
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------------------------- evaluation
@contextlib.contextmanager
def closed_gates(model):
    """All tanh gates at 0: the model is exactly its language model (images ignored)."""
    gates = [m.alpha for n, m in model.named_modules() if n.endswith(("attn_gate", "ff_gate"))]
    saved = [g.detach().clone() for g in gates]
    with torch.no_grad():
        for g in gates:
            g.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for g, s in zip(gates, saved):
                g.copy_(s)


def score_outputs(
    outputs: list[str], truths: list[dict[str, str]], fmt: CaptionFormat = NOVEL_FORMAT
) -> dict:
    pattern = fmt.pattern()
    parsed = [world.parse_caption(o) for o in outputs]
    attr = [np.mean([p[a] == t[a] for a in world.ATTRIBUTES]) for p, t in zip(parsed, truths)]
    return {
        "format_following": float(np.mean([bool(pattern.fullmatch(o)) for o in outputs])),
        "attr_acc": float(np.mean(attr)),
        "tuple_acc": float(np.mean([a == 1.0 for a in attr])),
        "exact": float(np.mean([o == fmt.render(t) for o, t in zip(outputs, truths)])),
        "per_attribute": {
            a: float(np.mean([p[a] == t[a] for p, t in zip(parsed, truths)])) for a in world.ATTRIBUTES
        },
    }


def fewshot_eval(
    shots: list[int],
    n: int,
    seed: int,
    bundle_dir: str | Path | None = None,
    pool_size: int = 64,
    device: str = "cpu",
    lm_only: bool = True,
) -> dict:
    """Few-shot learning of :data:`NOVEL_FORMAT`, keyed by shot count.

    ``n`` test-split scenes (seen combinations, fresh renders) are captioned after ``k`` demonstrations: scenes of
    a pool of ``pool_size`` train-split renders drawn per query (seeded), each captioned in the novel format.
    ``0`` means no demonstrations at all. Decoding: beam 3, at most 32 new tokens. Per shot count:
    ``format_following`` (the output is the novel format with valid values), ``attr_acc`` (attributes parsed from
    the output -- any wording -- that match the scene), ``tuple_acc`` (all five), ``exact`` (format and values),
    and with ``lm_only`` the same two first numbers with every gate closed (the frozen LM alone: the format can be
    copied, the values only guessed).
    """
    root = Path(bundle_dir or hub.SHAPES_BUNDLE)
    dev = hub.resolve_device(device)
    model, tokenizer, pre = load_flamingo(flamingo_spec(str(root / "flamingo")), dev)
    pool = world.sample_scenes(pool_size, seed, "train", stream=10_000)
    demos = Demonstrations(
        [world.render_pil(s) for s in pool], [NOVEL_FORMAT.render(s.attributes) for s in pool]
    )
    queries = world.sample_scenes(n, seed, "test", stream=EVAL_STREAM)
    images, truths = [world.render_pil(s) for s in queries], [s.attributes for s in queries]
    decoding = DecodingConfig(method="beam", num_beams=3, min_new_tokens=1, max_new_tokens=32)
    cfg = CaptionerConfig(backend="flamingo", model=str(root / "flamingo"), prompt=PROMPT, decoding=decoding)
    result = {}
    for k in shots:
        cap = FlamingoCaptioner(
            model,
            tokenizer,
            pre,
            cfg,
            demos=demos if k else None,
            num_shots=k,
            text_only_zero_shot=0,
            batch_size=16,
        )
        seeds = [seed * 100_003 + i for i in range(n)]
        outputs = [c[0] for c in cap.caption(images, seeds=seeds)]
        entry = score_outputs(outputs, truths)
        if lm_only:
            with closed_gates(model):
                blind = score_outputs([c[0] for c in cap.caption(images, seeds=seeds)], truths)
            entry.update(
                lm_only_format_following=blind["format_following"], lm_only_attr_acc=blind["attr_acc"]
            )
        entry["example"] = outputs[0]
        result[str(k)] = entry
    return result
