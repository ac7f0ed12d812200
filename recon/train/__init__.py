"""Joint LoRA finetuning of the captioner and the generator with reconstruction regularisers (``recon finetune``).

config.py      FinetuneConfig (configs/finetune-*.yaml) and its overrides
bridge.py      SoftTokenBridge: captioner logits -> CLIP-vocabulary soft tokens -> text-encoder states, with grad
losses.py      JointObjective: task losses + image->text->image / text->image->text / image-similarity terms
adapters.py    LoRA (peft) on both models, the checkpointed LoRA state, the exports recon's presets load
data.py        training pairs as a function of the step (shapes world, Karpathy / COCO files)
validation.py  caption metrics, reconstruction score, sample grid
joint.py       finetune(): the accelerate loop
commands.py    register(subparsers): the `finetune` command
"""
