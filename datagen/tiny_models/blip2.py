"""A tiny, randomly initialised BLIP-2 captioner in the real on-disk format.

Same classes and folder layout as ``Salesforce/blip2-opt-6.7b-coco`` (``Blip2ForConditionalGeneration``
+ ``Blip2Processor`` with a ``BlipImageProcessor`` and an OPT-style byte-level BPE tokenizer), at a
few hundred kilobytes: a 2-layer ViT on 64×64 images, a 2-layer Q-Former with 8 query tokens and a
2-layer OPT decoder. The weights are random (fixed seed), so captions are strings of real subword
text without meaning: it checks plumbing, not quality.

No OPT tokenizer is available offline, so one is trained here with the ``tokenizers`` library on a
fixed English corpus (caption-style sentences below): a real byte-level BPE with OPT's special
tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3; ``</s>`` doubles as BOS/EOS as in OPT).
``Blip2Processor`` adds the ``<image>`` token; the model's ``image_token_index`` points at it, and
the processor's ``num_query_tokens`` matches the model's, as transformers v5 requires.
"""

from __future__ import annotations

from pathlib import Path

SEED = 1
IMAGE_SIZE = 64
NUM_QUERY_TOKENS = 8
BPE_VOCAB_SIZE = 600
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's ids 0..3

# Fixed training text for the tiny tokenizer: the kind of sentence a captioner writes.
CORPUS = (
    "a man in a suit standing in front of a building",
    "a woman holding an umbrella on a rainy street",
    "two women sitting on a bench in a park",
    "three young men playing frisbee on the grass",
    "an astronaut in a white space suit holding a helmet",
    "a black and white photo of a man with a camera",
    "a woman in a uniform with medals on her jacket",
    "a group of people standing around a table with food",
    "a little girl with a teddy bear on a bed",
    "a dog running on the beach near the water",
    "a cat sleeping on a couch next to a pillow",
    "a man riding a bicycle down a city street",
    "a person riding a horse in a field",
    "an elderly woman reading a book by the window",
    "a couple of kids eating pizza at a restaurant",
    "a boy and a girl walking along the road",
    "a man and a woman posing for a picture at a wedding",
    "a baby in a high chair with a cake",
    "a woman talking on a cell phone in a kitchen",
    "a young man with a backpack at a train station",
    "a close up of a smiling woman with long hair",
    "a man wearing glasses and a tie in an office",
    "a crowd of people watching a game in a stadium",
    "a woman with a red dress dancing on a stage",
    "an old man with a beard sitting on a chair",
    "a family having dinner around a dining table",
    "a girl holding a kite on a sunny day",
    "a soldier in uniform standing next to a car",
    "a man skiing down a snowy mountain",
    "two people sitting on a boat on a lake",
)


def train_tokenizer(vocab_size: int = BPE_VOCAB_SIZE):
    """Train a byte-level BPE (GPT-2/OPT style) on :data:`CORPUS`; returns a ``GPT2Tokenizer``."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    return GPT2Tokenizer(
        vocab=spec["vocab"],
        merges=merges,
        unk_token="<unk>",
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        model_max_length=512,
    )


def build_blip2(dest: Path) -> None:
    """Write a tiny BLIP-2 (model + processor) into ``dest`` with ``save_pretrained``."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    dest = Path(dest)
    tokenizer = train_tokenizer()
    image_processor = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=16, initializer_range=0.02,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, cross_attention_frequency=1, max_position_embeddings=64,
    )
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config.max_new_tokens = 12
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
